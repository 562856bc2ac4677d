"""The image bench's dataset (`pipeline bench data --make-images N`): JPEG shards of crops of
scikit-learn's bundled photographs, sizes varying, the same bytes for the same arguments."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _crop(photos: list[np.ndarray], seed: int, split: int, i: int, sides: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Sample i of a split: a crop of one photograph (its label), sides in ``sides``, maybe mirrored; [C, H, W]."""
    rng = np.random.default_rng([seed, split, i])
    label = int(rng.integers(len(photos)))
    photo = photos[label]
    height = int(rng.integers(sides[0], min(sides[1], photo.shape[0]) + 1))
    width = int(rng.integers(sides[0], min(sides[1], photo.shape[1]) + 1))
    top = int(rng.integers(photo.shape[0] - height + 1))
    left = int(rng.integers(photo.shape[1] - width + 1))
    crop = photo[top: top + height, left: left + width]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop.transpose(2, 0, 1)), label


def make_image_dataset(out_url: str, samples: int, *, val_samples: int | None = None, samples_per_shard: int = 500,
                       sides: tuple[int, int] = (256, 512), fmt: str = "jpg", quality: int = 90, seed: int = 0,
                       threads: int | None = None) -> Any:
    """A format-2 dataset of ``samples`` train (and ``val_samples``, default 5%) RGB images at ``out_url``:
    crops of ``sklearn.datasets.load_sample_images()`` (two 427x640 photographs; label = which one),
    sides drawn from ``sides`` (capped by the photo), encoded as ``fmt``; the size varies. Deterministic."""
    from sklearn.datasets import load_sample_images

    from pipeline.data.contract import SampleSpec, encode_image
    from pipeline.data.shards import ShardInfo, SplitInfo, begin_dataset, finish_dataset, write_shard
    from pipeline.data.writer import shard_name

    photos = [np.asarray(p) for p in load_sample_images().images]
    val_samples = max(1, samples // 20) if val_samples is None else val_samples
    fs, root, stale = begin_dataset(out_url)
    infos: dict[str, Any] = {}
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # Pillow releases the GIL while encoding
        for number, (split, count) in enumerate((("train", samples), ("val", val_samples))):
            if count < 1:
                continue

            def member(i: int, number: int = number, split: str = split) -> tuple[str, dict[str, bytes]]:
                image, label = _crop(photos, seed, number, i, sides)
                return f"{split}-{i:07d}", {fmt: encode_image(image, fmt, quality), "cls": str(label).encode()}

            shards = []
            for index, first in enumerate(range(0, count, samples_per_shard)):
                path = shard_name(split, index)
                got, size, sha = write_shard(fs, f"{root}/{path}",
                                             pool.map(member, range(first, min(first + samples_per_shard, count))))
                shards.append(ShardInfo(path=path, samples=got, bytes=size, sha256=sha))
            infos[split] = SplitInfo(samples=count, shards=shards)
    spec = SampleSpec(image=fmt, channels=3, size=None, label="cls")
    return finish_dataset(fs, root, stale, source=f"sklearn sample photos, {sides[0]}-{sides[1]} px crops, {fmt} "
                          f"q{quality}", spec=spec, split_infos=infos)
