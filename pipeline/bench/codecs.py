"""`pipeline bench codecs`: what classical coders spend on a split, in bits per dimension — the yardstick
for a likelihood model's `val/bits_per_dim` on 8-bit images.

- histogram: the empirical entropy of the split's pixel values (one distribution for all channels and
  positions; fitted on the split itself, so an optimistic figure for a coder of this kind);
- left-neighbour: the empirical entropy of the difference to the left neighbour, per channel (mod 256;
  the first column coded as its value), again fitted on the split;
- PNG: the size of each image written by Pillow as PNG (optimize=True), all bytes included.
"""

from __future__ import annotations

import io
import json
import math
from typing import Annotated

import numpy as np
import typer
from PIL import Image

from pipeline.bench import BenchError, bench_app


def _entropy_bits(values: np.ndarray) -> float:
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def codec_bits_per_dim(images: np.ndarray) -> dict[str, float]:
    """uint8 images [n, C, H, W] -> bits per dimension of the three coders."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"need uint8 images [n, C, H, W], got {images.dtype} {images.shape}")
    differences = images.astype(np.int16)
    differences[..., 1:] -= images[..., :-1].astype(np.int16)
    png = 0
    for image in images:
        buffer = io.BytesIO()
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(buffer, format="PNG", optimize=True)
        png += buffer.tell()
    return {"histogram": _entropy_bits(images), "left_neighbour": _entropy_bits((differences % 256).astype(np.uint8)),
            "png": 8.0 * png / images.size}


@bench_app.command("codecs")
def codecs_command(
    data: Annotated[str, typer.Option("--data", help="Dataset URL (a manifest.json with 8-bit images)")],
    split: Annotated[str, typer.Option("--split", help="Split to measure")] = "val",
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object")] = False,
) -> None:
    """Bits per dimension of classical coders on a split (pixel histogram, left-neighbour differences,
    PNG files): the yardstick beside a model's val/bits_per_dim."""
    from rich.console import Console

    from pipeline.data import DataError, eval_batches, read_manifest

    try:
        manifest = read_manifest(data)
        if split not in manifest.splits:
            raise BenchError(f"{data} has no split {split!r} (splits: {', '.join(sorted(manifest.splits))})")
        images = np.concatenate([x.numpy() for x, _ in eval_batches(manifest, data, split=split, rank=0,
                                                                     world_size=1, batch_size=512)])
    except DataError as err:
        raise BenchError(str(err)) from None
    figures = {"data": data, "split": split, "images": int(len(images)), "dims": int(math.prod(images.shape[1:]))}
    figures |= {f"{name}_bits_per_dim": round(value, 4) for name, value in codec_bits_per_dim(images).items()}
    if as_json:
        print(json.dumps(figures))
        return
    console = Console(stderr=True, soft_wrap=True)  # the figures on stderr, as the CLI's messages (paths unbroken)
    console.print(f"{data} split {split}: {figures['images']} images of {figures['dims']} dims — bits/dim: "
                  f"pixel histogram {figures['histogram_bits_per_dim']:.3f}, left-neighbour differences "
                  f"{figures['left_neighbour_bits_per_dim']:.3f}, PNG files {figures['png_bits_per_dim']:.3f}")
