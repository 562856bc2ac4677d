"""Sources, shard writing and manifests, against real MNIST files and sklearn's digits."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import pickle
import shutil
import struct
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from pipeline.data import (
    DataError,
    Manifest,
    ShardError,
    ShardInfo,
    eval_batches,
    load_digits_splits,
    load_mnist_splits,
    read_manifest,
    shard_url,
    write_shards,
)
from pipeline.data import writer as writer_module
from pipeline.data.contract import SampleSpec
from pipeline.data.reader import ReadOptions

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"  # ../shared/data, per DESIGN.md


def read_idx_independently(path: Path) -> np.ndarray:
    """A second, minimal idx parser so the test does not trust the code under test."""
    raw = gzip.decompress(path.read_bytes())
    ndims = raw[3]
    dims = struct.unpack(f">{ndims}I", raw[4 : 4 + 4 * ndims])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndims).reshape(dims)


@pytest.fixture(scope="module")
def mnist_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("mnist-shards")
    manifest = write_shards(load_mnist_splits(str(MNIST_DIR)), str(out), source="mnist", samples_per_shard=10_000, progress=False)
    return out, manifest


def test_mnist_shards_have_the_documented_splits(mnist_dataset: tuple[Path, Manifest]) -> None:
    out, manifest = mnist_dataset
    assert {name: split.samples for name, split in manifest.splits.items()} == {"train": 50_000, "val": 10_000, "test": 10_000}
    # Format 2: the sample contract written out (grey uint8 28x28 .npy + ASCII .cls, plain tar).
    assert manifest.format_version == 2 and manifest.image_shape == [1, 28, 28] and manifest.dtype == "uint8"
    assert manifest.sample == SampleSpec(image="npy", channels=1, size=[28, 28], label="cls")
    assert manifest.keys == ["cls", "npy"] and manifest.spec.fixed_npy
    assert [len(split.shards) for split in manifest.splits.values()] == [5, 1, 1]
    assert read_manifest(str(out)) == manifest
    # Every shard on disk matches the size and sha256 recorded while it was written.
    for split in manifest.splits.values():
        for shard in split.shards:
            data = (out / shard.path).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)


def test_mnist_validation_is_the_last_10000_training_images(mnist_dataset: tuple[Path, Manifest]) -> None:
    out, manifest = mnist_dataset
    train_images = read_idx_independently(MNIST_DIR / "train-images-idx3-ubyte.gz")
    train_labels = read_idx_independently(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    images, labels = [], []
    for x, y in eval_batches(manifest, str(out), split="val", rank=0, world_size=1, batch_size=1000,
                             options=ReadOptions(verify=True)):
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 28, 28)
        images.append(x.numpy())
        labels.append(y.numpy())
    streamed = np.concatenate(images).reshape(-1, 28, 28)
    assert len(streamed) == 10_000
    assert np.array_equal(streamed[0], train_images[50_000])
    assert np.array_equal(streamed, train_images[50_000:])
    assert np.array_equal(np.concatenate(labels), train_labels[50_000:])


def test_digits_splits_are_a_seeded_partition_of_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    splits = load_digits_splits(seed=0)
    assert {name: len(split) for name, split in splits.items()} == {"train": 1297, "val": 250, "test": 250}
    assert all(split.images.dtype == np.uint8 and split.images.shape[1:] == (8, 8) for split in splits.values())
    assert max(int(split.images.max()) for split in splits.values()) == 255
    # The three splits together are exactly the bundled digits, scaled 0..16 -> 0..255.
    digits = load_digits()
    scaled = (digits.images.astype(int) * 255 // 16).reshape(len(digits.images), -1)
    ours = np.concatenate([split.images.reshape(len(split), -1) for split in splits.values()])
    as_rows = lambda a: sorted(map(bytes, a.astype(np.uint8)))  # noqa: E731
    assert as_rows(ours) == as_rows(scaled)
    assert np.array_equal(load_digits_splits(seed=0)["val"].images, splits["val"].images)
    assert not np.array_equal(load_digits_splits(seed=1)["val"].images, splits["val"].images)


def test_memory_round_trip_keeps_every_digits_sample() -> None:
    url = f"memory://digits-{uuid.uuid4().hex}"
    splits = load_digits_splits()
    written = write_shards(splits, url, source="sklearn-digits", samples_per_shard=400, progress=False)
    manifest = read_manifest(url)
    assert manifest == written and manifest.splits["train"].samples == 1297
    assert [shard.samples for shard in manifest.splits["train"].shards] == [400, 400, 400, 97]
    labels, images = [], []
    for x, y in eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=128):
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
        labels.extend(y.tolist())
        images.append(x.numpy())
    assert collections.Counter(labels) == collections.Counter(splits["train"].labels.tolist())
    assert np.array_equal(np.concatenate(images).reshape(-1, 8, 8), splits["train"].images)


def test_manifest_can_be_addressed_directly_and_through_file_urls(tmp_path: Path) -> None:
    splits = {"train": load_digits_splits()["train"]}
    manifest = write_shards(splits, f"file://{tmp_path}", source="digits", samples_per_shard=500, progress=False)
    assert read_manifest(str(tmp_path / "manifest.json")) == manifest
    shard = manifest.splits["train"].shards[0]
    assert shard_url(str(tmp_path / "manifest.json"), shard) == f"{tmp_path}/{shard.path}"
    assert shard_url("memory://x", shard) == f"memory://x/{shard.path}"
    assert shard_url("s3://bucket/prefix/", shard) == f"s3://bucket/prefix/{shard.path}"
    counts = [len(y) for _, y in eval_batches(manifest, str(tmp_path / "manifest.json"), split="train", rank=0,
                                              world_size=1, batch_size=1000)]
    assert counts == [1000, 297]


def test_digest_is_a_content_tag(tmp_path: Path) -> None:
    splits = load_digits_splits()
    first = write_shards(splits, str(tmp_path / "a"), source="digits", samples_per_shard=700, progress=False)
    again = write_shards(splits, str(tmp_path / "b"), source="digits", samples_per_shard=700, progress=False)
    assert first.digest() == again.digest()  # same samples, same bytes: written time does not change the tag
    splits["test"].labels[0] = (splits["test"].labels[0] + 1) % 10
    changed = write_shards(splits, str(tmp_path / "c"), source="digits", samples_per_shard=700, progress=False)
    assert changed.digest() != first.digest()


def test_rewrite_replaces_manifest_and_removes_stale_shards(tmp_path: Path) -> None:
    splits = load_digits_splits()
    write_shards(splits, str(tmp_path), source="digits", samples_per_shard=100, progress=False)
    assert (tmp_path / "train-00012.tar").exists()
    smaller = write_shards(splits, str(tmp_path), source="digits", samples_per_shard=1000, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["test-00000.tar", "train-00000.tar", "train-00001.tar", "val-00000.tar"]
    assert read_manifest(str(tmp_path)) == smaller


def test_interrupted_write_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = load_digits_splits()
    write_shards(splits, str(tmp_path), source="digits", samples_per_shard=500, progress=False)
    calls = 0

    def failing_encode(image: np.ndarray, label: int) -> dict[str, bytes]:
        nonlocal calls
        calls += 1
        if calls > 700:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way through
        return original(image, label)

    original = writer_module.npy_members
    monkeypatch.setattr(writer_module, "npy_members", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        write_shards(splits, str(tmp_path), source="digits", samples_per_shard=500, progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(tmp_path))


def test_missing_manifest_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        read_manifest(str(tmp_path / "nowhere"))
    message = str(caught.value)
    assert str(tmp_path / "nowhere" / "manifest.json") in message and "pipeline data digits --out" in message
    with pytest.raises(DataError, match="memory://absent-dataset/manifest.json"):
        read_manifest("memory://absent-dataset")


@pytest.mark.parametrize(
    "content, complaint",
    [
        (b"{not json", "not a valid dataset manifest"),
        (json.dumps({"source": "x", "image_shape": [2, 2], "splits": {}, "created": "now", "keys": ["npy", "cls", "pyd"]}), "keys"),
        (json.dumps({"source": "x", "image_shape": [2, 2], "created": "now", "splits": {"train": {"samples": 1, "shards": [
            {"path": "../../etc/passwd", "samples": 1, "bytes": 1, "sha256": "0"}]}}}), "relative to the manifest"),
        (json.dumps({"source": "x", "image_shape": [2, 2], "created": "now", "splits": {"train": {"samples": 5, "shards": [
            {"path": "a.tar", "samples": 1, "bytes": 1, "sha256": "0"}]}}}), "shards hold 1"),
    ],
)
def test_invalid_manifest_is_refused_with_its_path(tmp_path: Path, content: bytes | str, complaint: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as caught:
        read_manifest(str(tmp_path))
    assert str(path) in str(caught.value) and complaint in str(caught.value)


def test_mnist_dir_missing_a_file_names_it(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(MNIST_DIR / name, tmp_path / name)
    with pytest.raises(DataError) as caught:
        load_mnist_splits(str(tmp_path))
    message = str(caught.value)
    assert "lacks t10k-labels-idx1-ubyte.gz" in message and "train-images-idx3-ubyte.gz" in message


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    path.write_bytes(gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + payload))


def _fake_mnist(folder: Path, *, train_images: int = 12_000, train_labels: int = 12_000) -> None:
    _write_idx(folder / "train-images-idx3-ubyte.gz", 2051, (train_images, 2, 2), bytes(train_images * 4))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", 2049, (train_labels,), bytes(train_labels))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", 2051, (3, 2, 2), bytes(12))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", 2049, (3,), bytes(3))


def test_idx_problems_name_the_file(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    splits = load_mnist_splits(f"file://{tmp_path}")
    assert [len(s) for s in splits.values()] == [2000, 10_000, 3]

    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, (3,), bytes(3))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: bad idx magic 2051"):
        load_mnist_splits(str(tmp_path))

    _fake_mnist(tmp_path, train_labels=11_999)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz holds 12000 images but .*train-labels.* 11999 labels"):
        load_mnist_splits(str(tmp_path))

    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, (3, 2, 2), bytes(7))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: truncated data"):
        load_mnist_splits(str(tmp_path))

    _fake_mnist(tmp_path)
    whole = (tmp_path / "train-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: not a readable gzip"):
        load_mnist_splits(str(tmp_path))


def test_mnist_loads_through_an_fsspec_url() -> None:
    folder = f"memory://mnist-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for path in MNIST_DIR.glob("*.gz"):
        fs.pipe_file(f"{folder}/{path.name}", path.read_bytes())
    splits = load_mnist_splits(folder)
    assert splits["test"].images.shape == (10_000, 28, 28) and splits["train"].labels.dtype == np.int64


def test_shard_error_survives_pickling_with_its_message() -> None:
    error = ShardError("s3://bucket/train-00003.tar", "image is float64", key="train-0000042")
    copy = pickle.loads(pickle.dumps(error))  # Ray ships worker exceptions to the driver this way
    assert str(copy) == str(error) == "shard s3://bucket/train-00003.tar, sample train-0000042: image is float64"
    assert isinstance(copy, DataError)
    assert ShardInfo(path="a/b.tar", samples=1, bytes=1, sha256="x").path == "a/b.tar"


# A manifest exactly as the format-1 code (before the sample contract) wrote it, and the digest that code
# computed for it (`Manifest.digest` of commit 00d6df0): runs tagged with it must keep matching their dataset.
FORMAT_1_MANIFEST = (
    '{"format_version":1,"source":"old digits","image_shape":[2,2],"dtype":"uint8","keys":["npy","cls"],'
    '"splits":{"train":{"samples":3,"shards":[{"path":"train-00000.tar","samples":3,"bytes":10240,'
    '"sha256":"b88cec5ff8a5b413cc77341b868ccefe3ac933c435e450eb2a979e23906937d3"}]}},'
    '"created":"2025-06-01T12:00:00+00:00"}'
)
FORMAT_1_DIGEST = "1c7a7a52cbf9be2f53e1306771fa34f527f21f8452d7ba760196e83ef900dc09"


def test_a_format_1_manifest_still_parses_reads_and_keeps_its_digest(tmp_path: Path) -> None:
    from test_corrupt import npy, tar_bytes

    images = [np.arange(4, dtype=np.uint8).reshape(2, 2) * (i + 1) * 10 for i in range(3)]
    shard = tar_bytes(sum(([(f"train-{i:07d}.npy", npy(image)), (f"train-{i:07d}.cls", str(i).encode())]
                           for i, image in enumerate(images)), []))
    assert hashlib.sha256(shard).hexdigest() == json.loads(FORMAT_1_MANIFEST)["splits"]["train"]["shards"][0]["sha256"]
    (tmp_path / "train-00000.tar").write_bytes(shard)
    (tmp_path / "manifest.json").write_text(FORMAT_1_MANIFEST)

    manifest = read_manifest(str(tmp_path))
    assert manifest.format_version == 1 and manifest.sample is None and manifest.image_shape == [2, 2]
    assert manifest.spec == SampleSpec(image="npy", channels=1, size=[2, 2], label="cls")
    assert manifest.digest() == FORMAT_1_DIGEST
    # Saved again by today's code and read back: still format 1, still the same tag.
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again == manifest and again.digest() == FORMAT_1_DIGEST

    for fast_path in (True, False):
        (x, y), = eval_batches(manifest, str(tmp_path), split="train", rank=0, world_size=1, batch_size=3,
                               options=ReadOptions(fast_path=fast_path, verify=True))
        assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(np.stack(images)[:, None]))
        assert y.tolist() == [0, 1, 2]
