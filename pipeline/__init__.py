"""pipeline: distributed training of VAEs with a categorical (multinomial) prior."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Tokenizer"]


def __getattr__(name: str) -> Any:
    """``from pipeline import Tokenizer`` imports torch and MLflow only when asked for."""
    if name == "Tokenizer":
        from pipeline.tokens.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
