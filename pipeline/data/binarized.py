"""Larochelle & Murray's binarized MNIST (the fixed binarization of Salakhutdinov & Murray 2008).

Three gzipped ``.amat`` text files, one 28x28 image per line as 784 space-separated 0/1
digits: train 50,000 / valid 10,000 / test 10,000. They carry no labels (label -1 here), and
their rows are not in the order of the MNIST idx files.

Pixels are stored as uint8 0 / 255, so the shards look like any other greyscale dataset:
with ``data.binarize: threshold`` (pixel > 0.5) or ``none`` the model sees exactly the fixed
0/1 images; ``dynamic`` would be harmless too (Bernoulli(0 or 1) is deterministic), but
threshold says what is meant.
"""

from __future__ import annotations

import gzip
import zlib

import fsspec
import numpy as np

from pipeline.data.errors import DataError
from pipeline.data.sources import Split

BINARIZED_MNIST_FILES = {
    "train": "binarized_mnist_train.amat.gz",
    "val": "binarized_mnist_valid.amat.gz",
    "test": "binarized_mnist_test.amat.gz",
}
IMAGE_SHAPE = (28, 28)
UNLABELLED = -1


def load_binarized_mnist_splits(source: str) -> dict[str, Split]:
    """train / val / test from the three ``binarized_mnist_*.amat.gz`` files in a folder or fsspec URL."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    missing = [name for name in BINARIZED_MNIST_FILES.values() if not fs.exists(f"{root}/{name}")]
    if missing:
        raise DataError(f"binarized MNIST source {source} lacks {', '.join(missing)} "
                        f"(expected: {', '.join(BINARIZED_MNIST_FILES.values())})")
    splits = {}
    for split, name in BINARIZED_MNIST_FILES.items():
        images = read_amat(fs, f"{root}/{name}")
        splits[split] = Split(images=images, labels=np.full(len(images), UNLABELLED, dtype=np.int64))
    return splits


def read_amat(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    """One gzipped .amat file -> uint8 [n, 28, 28] with values 0 / 255; refuses anything but 0/1 rows of 784."""
    try:
        with fs.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            text = unzipped.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({type(err).__name__}: {err})") from None
    lines = text.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    images = np.empty((len(lines), pixels), dtype=np.uint8)
    for row, line in enumerate(lines):
        values = line.split()
        if len(values) != pixels:
            raise DataError(f"{path}: line {row + 1} holds {len(values)} values, expected {pixels}")
        try:
            images[row] = np.array(values, dtype=np.uint8)
        except ValueError:
            raise DataError(f"{path}: line {row + 1} holds a value that is not an integer") from None
    if images.size and images.max() > 1:
        raise DataError(f"{path}: values other than 0 and 1 (max {images.max()})")
    return (images * 255).reshape(len(lines), *IMAGE_SHAPE)
