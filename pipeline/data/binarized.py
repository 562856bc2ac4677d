"""Larochelle & Murray's binarized MNIST (the fixed binarization of Salakhutdinov & Murray 2008).

Three gzipped ``.amat`` text files, one 28x28 image per line as 784 space-separated 0/1
digits: train 50,000 / valid 10,000 / test 10,000. They carry no labels (label -1 here), and
their rows are not in the order of the MNIST idx files.

Pixels are stored as uint8 0 / 255, so the shards look like any other greyscale dataset:
with ``model.binarize: threshold`` (pixel > 0.5) or ``none`` the model sees exactly the fixed
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
    """train / val / test from the three ``binarized_mnist_*.amat.gz`` files in a folder or fsspec URL (or the
    plain ``.amat`` files, as their publisher serves them and ``--download`` keeps them)."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    paths = {split: _present(fs, root, name) for split, name in BINARIZED_MNIST_FILES.items()}
    missing = [f"{name} (or {name.removesuffix('.gz')})" for split, name in BINARIZED_MNIST_FILES.items()
               if paths[split] is None]
    if missing:
        raise DataError(f"binarized MNIST source {source} lacks {', '.join(missing)} "
                        f"(expected: {', '.join(BINARIZED_MNIST_FILES.values())}, gzipped or not)")
    splits = {}
    for split, path in paths.items():
        images = read_amat(fs, path)
        splits[split] = Split(images=images, labels=np.full(len(images), UNLABELLED, dtype=np.int64))
    return splits


def _present(fs: fsspec.AbstractFileSystem, root: str, name: str) -> str | None:
    for candidate in (name, name.removesuffix(".gz")):
        if fs.exists(f"{root}/{candidate}"):
            return f"{root}/{candidate}"
    return None


_GZIP_MAGIC = b"\x1f\x8b"


def read_amat(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    """One .amat file, gzipped or not -> uint8 [n, 28, 28] with values 0 / 255; refuses anything but 0/1 rows
    of 784."""
    try:
        with fs.open(path, "rb") as raw:
            text = raw.read()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    if text[:2] == _GZIP_MAGIC or path.endswith(".gz"):
        try:
            text = gzip.decompress(text)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off gzip an EOFError
            raise DataError(f"{path}: not a readable gzip file ({type(err).__name__}: {err})") from None
    pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    fast = _read_canonical(text, pixels)
    if fast is not None:
        return fast
    lines = text.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
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


def _read_canonical(text: bytes, pixels: int) -> np.ndarray | None:
    """The published layout, parsed at once: every line ``pixels`` digits 0/1 joined by single spaces, ending
    in ``\\n``. None for anything else (the line-by-line reader then names what is wrong)."""
    width = 2 * pixels
    if not text or len(text) % width:
        return None
    grid = np.frombuffer(text, dtype=np.uint8).reshape(-1, width)
    digits = grid[:, 0::2] - ord("0")  # uint8: anything below "0" wraps round to > 1
    if (digits > 1).any() or (grid[:, 1:-1:2] != ord(" ")).any() or (grid[:, -1] != ord("\n")).any():
        return None
    return (digits * 255).reshape(len(grid), *IMAGE_SHAPE)
