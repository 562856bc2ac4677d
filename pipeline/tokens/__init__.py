"""Tokens: what a trained categorical VAE makes of images, and back.

- `codes`: the token format, the posterior mode as class indices, reading token shards;
- `encode`: `pipeline encode`, a dataset into token shards (Ray tasks, resumable);
- `decode`: `pipeline decode`, token shards back into images;
- `tokenizer`: `Tokenizer`, a grid model loaded from MLflow to encode and decode arrays in Python;
- `serving`: the MLflow pyfunc a grid run logs as its model (`predict` returns the codes).

``from pipeline.tokens import Tokenizer`` (or ``from pipeline import Tokenizer``) imports torch only
when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Tokenizer", "TokenizerError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipeline.tokens import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'pipeline.tokens' has no attribute {name!r}")
