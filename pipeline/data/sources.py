"""Raw datasets as in-memory uint8 image arrays, before they are written to shards.

Sources are small enough to hold in memory (MNIST is 55 MB); the shard writer is what
makes larger-than-memory datasets possible, by streaming sources like these into tar shards.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass

import fsspec
import numpy as np

from pipeline.data.errors import DataError


@dataclass
class Split:
    """One split of a dataset: ``images`` uint8 [n, H, W] (grey) or [n, C, H, W], ``labels`` int64 [n]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim not in (3, 4) or self.images.dtype != np.uint8:
            raise DataError(f"Split.images must be uint8 [n, H, W] or [n, C, H, W], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise DataError(f"Split.labels must have shape ({len(self.images)},), got {self.labels.shape}")
        self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.images)


DIGITS_SPLIT_SIZES = {"train": 1297, "val": 250, "test": 250}


def load_digits_splits(seed: int = 0) -> dict[str, Split]:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline) as train/val/test.

    Pixels 0..16 are scaled to uint8 0..255 by ``v * 255 // 16``. The images are shuffled
    by a fixed permutation (``numpy.random.default_rng(seed)``) and then cut in order into
    train = 1,297, val = 250 and test = 250 samples.
    """
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    digits = load_digits()
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    splits: dict[str, Split] = {}
    start = 0
    for name, size in DIGITS_SPLIT_SIZES.items():
        chosen = order[start : start + size]
        splits[name] = Split(images=images[chosen], labels=labels[chosen])
        start += size
    return splits


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_VALIDATION_SIZE = 10_000
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def load_mnist_splits(source: str, *, dataset: str = "MNIST") -> dict[str, Split]:
    """MNIST from the four original idx ``.gz`` files in a local folder or any fsspec URL.

    Splits: train = the first 50,000 images of the training file, val = its LAST 10,000
    images (50,000..59,999, the usual convention), test = the 10,000 images of the t10k file.
    ``dataset`` names the source in errors (Fashion-MNIST has the same files and layout).
    """
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    missing = [name for name in MNIST_FILES.values() if not fs.exists(f"{root}/{name}")]
    if missing:
        raise DataError(
            f"{dataset} source {source} lacks {', '.join(missing)} "
            f"(expected all four idx files: {', '.join(MNIST_FILES.values())})"
        )
    arrays = {role: _read_idx(fs, f"{root}/{name}", images=role.endswith("images")) for role, name in MNIST_FILES.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels):
            raise DataError(
                f"{root}/{MNIST_FILES[f'{part}_images']} holds {len(images)} images but "
                f"{root}/{MNIST_FILES[f'{part}_labels']} holds {len(labels)} labels"
            )
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    if len(train_images) <= MNIST_VALIDATION_SIZE:
        raise DataError(
            f"{root}/{MNIST_FILES['train_images']} holds {len(train_images)} images: "
            f"too few to hold out {MNIST_VALIDATION_SIZE} for validation"
        )
    cut = len(train_images) - MNIST_VALIDATION_SIZE
    return {
        "train": Split(train_images[:cut], train_labels[:cut]),
        "val": Split(train_images[cut:], train_labels[cut:]),
        "test": Split(arrays["test_images"], arrays["test_labels"]),
    }


def load_fashion_mnist_splits(source: str) -> dict[str, Split]:
    """Fashion-MNIST (Zalando's 28x28 grey article images, 10 classes) from its four idx ``.gz`` files, which
    carry MNIST's names and format: the same splits, train / val / test = 50,000 / 10,000 / 10,000."""
    return load_mnist_splits(source, dataset="Fashion-MNIST")


def _read_idx(fs: fsspec.AbstractFileSystem, path: str, *, images: bool) -> np.ndarray:
    """Parse one gzipped idx file: big-endian magic, then dims, then uint8 payload."""
    try:
        with fs.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            data = unzipped.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off gzip is an EOFError
        raise DataError(f"{path}: not a readable gzip file ({type(err).__name__}: {err})") from None
    expected_magic, ndims = (_IMAGES_MAGIC, 3) if images else (_LABELS_MAGIC, 1)
    header_size = 4 + 4 * ndims
    if len(data) < header_size:
        raise DataError(f"{path}: truncated idx header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        kind = "images" if images else "labels"
        raise DataError(f"{path}: bad idx magic {magic} (expected {expected_magic} for {kind})")
    dims = struct.unpack(f">{ndims}I", data[4:header_size])
    size = int(np.prod(dims))
    if len(data) - header_size < size:
        raise DataError(f"{path}: truncated data: header declares {dims} = {size} bytes, file holds {len(data) - header_size}")
    array = np.frombuffer(data, dtype=np.uint8, count=size, offset=header_size).reshape(dims)
    return array if images else array.astype(np.int64)
