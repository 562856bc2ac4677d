"""Real photographs that ship inside installed packages, cut into an RGB tile dataset (offline).

scikit-learn bundles two photographs (``load_sample_images``: china, flower) and scikit-image a
dozen more in its package data (astronaut, coffee, chelsea, rocket, ...). Each picture's short
side is scaled to ``scale`` pixels (Pillow, Lanczos) and cut into non-overlapping ``size`` x
``size`` tiles; training pictures are also cut at 3/4 of that scale, for more and coarser tiles.

The splits are made of *whole pictures*: no tile of a val or test picture, nor of a neighbouring
crop of one, is ever seen in training, so val figures measure generalisation to new photographs
rather than memory of neighbouring patches. Every tile is labelled with its picture's index in
`PICTURES`, so a figure can be broken down by picture.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.sources import Split

# name -> the split it belongs to. The two motorcycle pictures are a stereo pair (near-duplicates):
# they stay in one split.
PICTURES: dict[str, str] = {
    "china": "train", "flower": "train", "astronaut": "train", "hubble_deep_field": "train",
    "immunohistochemistry": "train", "motorcycle_left": "train", "motorcycle_right": "train",
    "retina": "train", "coffee": "val", "chelsea": "val", "rocket": "test",
}


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]
    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            import skimage.data
        except ImportError as err:
            raise DataError("the bundled photographs need scikit-image (pip install scikit-image)") from err
        if name == "motorcycle_left":
            return skimage.data.stereo_motorcycle()[0]
        if name == "motorcycle_right":
            return skimage.data.stereo_motorcycle()[1]
        return getattr(skimage.data, name)()
    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {"china": _sklearn(0), "flower": _sklearn(1)} | {
    name: _skimage(name) for name in PICTURES if name not in ("china", "flower")}


def load_picture(name: str) -> np.ndarray:
    """One bundled photograph as uint8 [H, W, 3]."""
    if name not in _LOADERS:
        raise DataError(f"unknown bundled picture {name!r}; known: {', '.join(PICTURES)}")
    picture = np.asarray(_LOADERS[name]())
    if picture.ndim != 3 or picture.shape[2] < 3 or picture.dtype != np.uint8:
        raise DataError(f"bundled picture {name!r} is not 8-bit RGB: {picture.dtype} {picture.shape}")
    return np.ascontiguousarray(picture[:, :, :3])


def tiles(picture: np.ndarray, size: int, short_side: int) -> np.ndarray:
    """The picture scaled so its short side is ``short_side``, cut into non-overlapping size x size
    tiles in raster order: uint8 [n, 3, size, size]."""
    height, width = picture.shape[:2]
    factor = short_side / min(height, width)
    scaled = Image.fromarray(picture).resize((round(width * factor), round(height * factor)), Image.LANCZOS)
    array = np.asarray(scaled)
    rows, cols = array.shape[0] // size, array.shape[1] // size
    cut = array[: rows * size, : cols * size].reshape(rows, size, cols, size, 3)
    return np.ascontiguousarray(cut.transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size))


def load_photo_splits(size: int = 32, scale: int = 512, seed: int = 0) -> dict[str, Split]:
    """train / val / test tiles of the bundled photographs (split by whole picture, `PICTURES`).
    Training pictures are cut at ``scale`` and at 3/4 of it; val and test at ``scale`` only. Each split's
    tiles are in an order fixed by ``seed``."""
    if size < 4 or scale < size:
        raise DataError(f"need 4 <= size <= scale, got size={size}, scale={scale}")
    parts: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "val": [], "test": []}
    for index, (name, split) in enumerate(PICTURES.items()):
        picture = load_picture(name)
        scales = (scale, scale * 3 // 4) if split == "train" else (scale,)
        for short_side in scales:
            parts[split].append((tiles(picture, size, short_side), index))
    out: dict[str, Split] = {}
    for split, chunks in parts.items():
        images = np.concatenate([chunk for chunk, _ in chunks])
        labels = np.concatenate([np.full(len(chunk), index, np.int64) for chunk, index in chunks])
        # Shuffled by a fixed permutation, so that any prefix of a split (a reader's first batches, the
        # first shard) holds tiles of all its pictures rather than of the first one.
        order = np.random.default_rng(seed).permutation(len(images))
        out[split] = Split(images=images[order], labels=labels[order])
    return out
