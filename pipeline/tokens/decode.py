"""`pipeline decode`: token shards back into images through the run's decoder.

Token shards are read by the data layer's reader (`tokens.read_tokens`), each sample rendered
through the run's decoder: tokens -> one-hot (or the codebook lookup of a grid decoder: the same
vectors) -> ``likelihood.mean`` -> a PNG named by key: the model's own reconstruction from the
posterior mode.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import torch

from pipeline.data.contract import encode_image
from pipeline.data.errors import DataError, ShardError
from pipeline.data.shards import read_manifest
from pipeline.tokens.codes import EncodeError, load_run_model, pixels_of, read_tokens, token_layout

def safe_name(key: str) -> str:
    """A file name for a (untrusted) sample key: characters outside [A-Za-z0-9._-] become '_', no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key)
    return "_" + name if name.startswith(".") or not name else name


@dataclass
class DecodeResult:
    images: int
    out: str
    seconds: float


def decode_tokens(run_id: str, tokens_url: str, out_dir: str, *, limit: int | None = None,
                  splits: list[str] | None = None, batch_size: int = 256, tracking_uri: str | None = None,
                  progress: bool = True) -> DecodeResult:
    """Render the token dataset at ``tokens_url`` (written by run ``run_id``) as PNGs ``OUT/<key>.png``,
    in manifest order, at most ``limit`` of them."""
    started = time.perf_counter()
    try:
        manifest = read_manifest(tokens_url)
    except DataError as err:
        raise EncodeError(str(err)) from None
    info = manifest.tokens
    if info is None:
        raise EncodeError(f"{tokens_url} is not a token dataset (no 'tokens' section in its manifest)")
    if info.run_id != run_id:
        raise EncodeError(f"{tokens_url} holds tokens of run {info.run_id}, not of run {run_id}: decode them with it")
    names = splits or list(manifest.splits)
    unknown = [name for name in names if name not in manifest.splits]
    if unknown:
        raise EncodeError(f"{tokens_url} has no split(s) {', '.join(unknown)}")
    run = load_run_model(run_id, tuple(info.image_shape), tracking_uri=tracking_uri)  # type: ignore[arg-type]
    layout = token_layout(run.model, run_id)
    if list(layout.shape) != list(info.shape) or layout.categories != info.categories:
        raise EncodeError(f"run {run_id}'s latent ({list(layout.shape)} x {layout.categories}) does not match the "
                          f"tokens ({info.shape} x {info.categories})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = run.model.to(device)
    fs, root = fsspec.core.url_to_fs(out_dir)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    total = sum(manifest.splits[name].samples for name in names)
    total = min(total, limit) if limit is not None else total
    written = 0
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal written
        if not batch:
            return
        tokens = torch.from_numpy(np.stack([t.astype(np.int64) for _, t in batch])).to(device)
        pixels = (pixels_of(model, tokens, layout).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for (key, _), image in zip(batch, pixels):
            fs.pipe_file(f"{root}/{safe_name(key)}.png", encode_image(image, "png"))
        written += len(batch)
        batch.clear()

    def samples() -> Iterator[tuple[str, np.ndarray, int]]:
        for name in names:
            for shard in manifest.splits[name].shards:
                yield from read_tokens(manifest, tokens_url, shard)

    with _image_progress(progress, total) as advance:
        try:
            for key, tokens, _label in itertools.islice(samples(), total):
                batch.append((key, tokens))
                if len(batch) >= batch_size:
                    flush()
                    advance(written)
            flush()
            advance(written)
        except (ShardError, DataError) as err:
            raise EncodeError(f"reading tokens of {tokens_url}: {err}") from None
    return DecodeResult(written, out_dir, time.perf_counter() - started)


class _image_progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda done: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("decoding tokens", total=self.total)
        return lambda done: self.bar.update(task, completed=done)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
