"""Larochelle's binarized MNIST (.amat.gz) -> Split dict -> shards that train on the fixed 0/1 images."""

from __future__ import annotations

import gzip

import fsspec
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import BINARIZED_MNIST_DIR
from pipeline.cli import app
from pipeline.data import DataError, eval_batches, load_binarized_mnist_splits, read_manifest
from pipeline.data.binarized import BINARIZED_MNIST_FILES, read_amat
from pipeline.models.likelihoods import Bernoulli


def _amat(images: np.ndarray) -> bytes:
    return "".join(" ".join(str(v) for v in row) + "\n" for row in images.reshape(len(images), -1)).encode()


@pytest.fixture
def tiny_source() -> tuple[str, dict[str, np.ndarray]]:
    """A memory:// folder with three small .amat.gz files in Larochelle's format."""
    rng = np.random.default_rng(0)
    fs = fsspec.filesystem("memory")
    root = f"memory://binarized-{rng.integers(1 << 30)}"
    images = {}
    for split, n in (("train", 7), ("val", 3), ("test", 4)):
        images[split] = rng.integers(0, 2, (n, 28, 28), dtype=np.uint8)
        with fs.open(f"{root}/{BINARIZED_MNIST_FILES[split]}", "wb") as f:
            f.write(gzip.compress(_amat(images[split])))
    return root, images


def test_reads_splits_as_0_255_without_labels(tiny_source) -> None:
    root, images = tiny_source
    splits = load_binarized_mnist_splits(root)
    assert set(splits) == {"train", "val", "test"}
    for name, split in splits.items():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28)
        np.testing.assert_array_equal(split.images, images[name] * 255)
        assert (split.labels == -1).all()


def test_shards_train_on_exactly_the_fixed_binarization(tiny_source, tmp_path) -> None:
    root, images = tiny_source
    out = tmp_path / "binarized"
    result = CliRunner().invoke(app, ["data", "binarized-mnist", "--source", root, "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(out))
    assert {k: v.samples for k, v in manifest.splits.items()} == {"train": 7, "val": 3, "test": 4}
    x, labels = next(iter(eval_batches(manifest, str(out), split="test", rank=0, world_size=1, batch_size=10)))
    assert x.dtype == torch.uint8 and x.shape == (4, 1, 28, 28)
    assert torch.equal(x, torch.from_numpy(images["test"] * 255).reshape(4, 1, 28, 28))
    assert (labels == -1).all()
    # Whatever binarization the model's likelihood is configured with, it sees exactly the fixed 0/1 images
    # (a dynamic draw from probabilities 0 and 1 is those images too).
    fixed = torch.from_numpy(images["test"]).float().reshape(4, 1, 28, 28)
    for mode in ("threshold", "none", "dynamic"):
        inputs, target = Bernoulli(mode).prepare(x)
        assert torch.equal(inputs, fixed) and torch.equal(target, fixed), mode


def test_missing_and_malformed_files_are_named(tmp_path) -> None:
    with pytest.raises(DataError, match="binarized_mnist_train.amat.gz"):
        load_binarized_mnist_splits(str(tmp_path))
    bad = tmp_path / "bad.amat.gz"
    bad.write_bytes(gzip.compress(b"0 1 0\n"))
    with pytest.raises(DataError, match="line 1 holds 3 values, expected 784"):
        read_amat(fsspec.filesystem("file"), str(bad))
    two = tmp_path / "two.amat.gz"
    two.write_bytes(gzip.compress(_amat(np.full((1, 784), 2, dtype=np.uint8))))
    with pytest.raises(DataError, match="other than 0 and 1"):
        read_amat(fsspec.filesystem("file"), str(two))
    cut = tmp_path / "cut.amat.gz"
    cut.write_bytes(gzip.compress(_amat(np.zeros((3, 784), dtype=np.uint8)))[:-12])
    with pytest.raises(DataError, match="cut.amat.gz"):
        read_amat(fsspec.filesystem("file"), str(cut))


def test_real_validation_file_matches_its_published_statistics() -> None:
    fs = fsspec.filesystem("file")
    images = read_amat(fs, str(BINARIZED_MNIST_DIR / BINARIZED_MNIST_FILES["val"]))
    assert images.shape == (10_000, 28, 28)
    assert set(np.unique(images)) == {0, 255}
    assert (images > 0).mean() == pytest.approx(0.13113, abs=5e-5)  # SOURCES.md: mean of ones, valid
