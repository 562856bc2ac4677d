"""Corrupt and hostile shards: each one's documented behaviour under on_corrupt=error and =skip.

error: a ShardError whose text names the shard (and the member/sample) and the problem.
skip:  the damaged samples (or the rest of a damaged shard) are left out, counted once in
       the reader's `ReadStats` with the shard's URL, and the good samples still arrive. Nothing is unpickled.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.data import DataError, Manifest, ShardError, ShardInfo, SplitInfo, read_manifest
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.stats import ReadStats
from pipeline.data.stream import train_batches

GOOD_LABEL = 3


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def good(i: int) -> list[tuple[str, bytes]]:
    key = f"train-{i:07d}"
    return [(f"{key}.npy", npy(np.full((2, 2), 200, np.uint8))), (f"{key}.cls", str(GOOD_LABEL).encode())]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def dataset(folder: Path, shards: list[bytes], samples: list[int]) -> tuple[Manifest, str, list[str]]:
    """Shards with the given bytes; the manifest's sha256 is each file's real one (tampering is done later)."""
    infos, paths = [], []
    for number, (data, count) in enumerate(zip(shards, samples)):
        path = folder / f"train-{number:05d}.tar"
        path.write_bytes(data)
        infos.append(ShardInfo(path=path.name, samples=count, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
        paths.append(str(path))
    manifest = Manifest(source="test", image_shape=[2, 2], created="2026-01-01T00:00:00+00:00",
                        splits={"train": SplitInfo(samples=sum(samples), shards=infos)})
    (folder / "manifest.json").write_text(manifest.model_dump_json())
    return manifest, str(folder), paths


@pytest.fixture
def stats() -> ReadStats:
    """One reader's counts, shared by the readers of a test (as a worker's epochs share its reader's)."""
    return ReadStats()


def read(manifest: Manifest, url: str, mode: str, verify: bool = False, stats: ReadStats | None = None,
         **options: Any) -> list[int]:
    shard = manifest.splits["train"].shards[0]
    reader = ShardReader(ReadOptions(on_corrupt=mode, verify=verify, **options), stats=stats)  # type: ignore[arg-type]
    return [label for _, _, label in reader.read_shard(manifest, url, shard)]


class Unpickled:
    """Creates a file when unpickled: proof that nothing was."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return builtins.open, (self.path, "w")


def bad_sample_cases(tmp_path: Path) -> dict[str, tuple[list[tuple[str, bytes]], str]]:
    payload = pickle.dumps(Unpickled(tmp_path / "pwned"))
    return {
        "pickle member": ([("train-0000001.pyd", payload)], r"member train-0000001\.pyd: undeclared member refused"),
        "pickled npy": ([("train-0000001.npy", npy(np.array([Unpickled(tmp_path / "pwned")], dtype=object), True)),
                         ("train-0000001.cls", b"1")], r"member train-0000001\.npy: undecodable"),
        "wrong shape": ([("train-0000001.npy", npy(np.zeros((3, 2), np.uint8))), ("train-0000001.cls", b"1")],
                        r"member train-0000001\.npy: image is uint8 \[3, 2\], the manifest declares uint8 \[1, 2, 2\]"),
        "wrong dtype": ([("train-0000001.npy", npy(np.zeros((2, 2), np.float64))), ("train-0000001.cls", b"1")],
                        r"member train-0000001\.npy: image is float64 \[2, 2\]"),
        "missing label": ([("train-0000001.npy", npy(np.zeros((2, 2), np.uint8)))],
                          r"sample train-0000001: sample has no \.cls member"),
        "oversized member": ([("train-0000001.npy", b"\x93NUMPY" + b"\0" * (2 << 20)), ("train-0000001.cls", b"1")],
                             r"member train-0000001\.npy: member of \d+ bytes refused"),
    }


@pytest.mark.parametrize("case", ["pickle member", "pickled npy", "wrong shape", "wrong dtype", "missing label", "oversized member"])
def test_bad_sample_error_names_shard_skip_drops_only_that_sample(tmp_path: Path, case: str, stats: ReadStats) -> None:
    members, complaint = bad_sample_cases(tmp_path)[case]
    manifest, url, paths = dataset(tmp_path, [tar_bytes(good(0) + members + good(2) + good(3))], [4])
    with pytest.raises(ShardError, match=f"^shard {paths[0]}.*{complaint}"):
        read(manifest, url, "error")

    assert read(manifest, url, "skip", stats=stats) == [GOOD_LABEL] * 3
    assert stats.skipped_samples == 1 and list(stats.skipped_shards) == [paths[0]]
    assert read(manifest, url, "skip", stats=stats) == [GOOD_LABEL] * 3  # a second epoch: the same sample is counted once
    assert stats.skipped_samples == 1
    assert not (tmp_path / "pwned").exists()


def cut_inside_sample(whole: bytes, sample: int) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
    return whole[: members[2 * sample].offset_data + 40]


def cut_at_sample(whole: bytes, sample: int) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        return whole[: tar.getmembers()[2 * sample].offset]


@pytest.mark.parametrize(
    "damage, complaint, kept",
    [
        (lambda whole: cut_inside_sample(whole, 5), r"unreadable shard \(ReadError: unexpected end of data\)", 5),
        (lambda whole: cut_at_sample(whole, 5), r"truncated: ended after 5 samples, the manifest says 10", 5),
        (lambda whole: np.random.default_rng(0).bytes(4096), r"unreadable shard", 0),
        (lambda whole: b"", r"unreadable shard \(ReadError: empty file\)", 0),
    ],
    ids=["cut mid-member", "cut at a member boundary", "garbage bytes", "empty file"],
)
def test_damaged_shard_error_names_it_skip_keeps_what_was_readable(tmp_path: Path, damage, complaint: str, kept: int,
                                                                   stats: ReadStats) -> None:
    whole = tar_bytes(sum((good(i) for i in range(10)), []))
    manifest, url, paths = dataset(tmp_path, [whole], [10])
    Path(paths[0]).write_bytes(damage(whole))
    with pytest.raises(ShardError, match=f"^shard {paths[0]}: {complaint}"):
        read(manifest, url, "error")
    assert read(manifest, url, "skip", stats=stats) == [GOOD_LABEL] * kept
    assert stats.skipped_samples == 10 - kept
    assert complaint.split(r"\(")[0].replace("\\", "") in stats.skipped_shards[paths[0]]


def test_sha256_mismatch_error_and_skip_of_the_whole_shard(tmp_path: Path, stats: ReadStats) -> None:
    whole = tar_bytes(sum((good(i) for i in range(6)), []))
    manifest, url, paths = dataset(tmp_path, [whole], [6])
    tampered = whole.replace(b"3" + b"\0" * 511, b"4" + b"\0" * 511, 1)  # a label: still a valid tar
    Path(paths[0]).write_bytes(tampered)
    assert read(manifest, url, "error") == [4] + [3] * 5  # without verify only the hash could tell
    with pytest.raises(ShardError, match=f"^shard {paths[0]}: sha256 mismatch: manifest expects {manifest.splits['train'].shards[0].sha256}"):
        read(manifest, url, "error", verify=True)
    # skip + verify hashes first: a tampered shard contributes no sample at all
    assert read(manifest, url, "skip", verify=True, stats=stats) == []
    assert stats.skipped_samples == 6 and "sha256 mismatch" in stats.skipped_shards[paths[0]]


def test_unreachable_shard_error_and_skip(tmp_path: Path, stats: ReadStats) -> None:
    manifest, _, _ = dataset(tmp_path, [tar_bytes(good(0))], [1])
    url = "http://127.0.0.1:9/nowhere"  # discard port: connection refused, a transient error retried then given up
    options = dict(retries=2, retry_backoff_s=0.01)
    with pytest.raises(ShardError, match=r"^shard http://127\.0\.0\.1:9/nowhere/train-00000\.tar: unreadable shard"):
        read(manifest, url, "error", stats=stats, **options)
    assert stats.read_retries == 2
    assert read(manifest, url, "skip", stats=stats, **options) == []
    assert stats.skipped_samples == 1


def test_missing_shard_file_is_not_retried(tmp_path: Path, stats: ReadStats) -> None:
    manifest, url, paths = dataset(tmp_path, [tar_bytes(good(0))], [1])
    Path(paths[0]).unlink()
    with pytest.raises(ShardError, match=f"^shard {paths[0]}: unreadable shard .*FileNotFoundError"):
        read(manifest, url, "error", stats=stats)
    assert stats.read_retries == 0


def test_empty_shard_list_is_refused_when_the_manifest_is_read(tmp_path: Path) -> None:
    manifest = Manifest(source="test", image_shape=[2, 2], created="2026-01-01T00:00:00+00:00",
                        splits={"train": SplitInfo(samples=0, shards=[]), "val": SplitInfo(samples=0, shards=[])})
    (tmp_path / "manifest.json").write_text(manifest.model_dump_json())
    with pytest.raises(DataError, match=f"{tmp_path}/manifest.json: split\\(s\\) train, val list no shards"):
        read_manifest(str(tmp_path))


def test_unreachable_manifest_names_it() -> None:
    with pytest.raises(DataError, match=r"cannot read http://127\.0\.0\.1:9/ds/manifest\.json"):
        read_manifest("http://127.0.0.1:9/ds")


# --- lockstep under skip ------------------------------------------------------------------------------


def test_refill_keeps_the_step_count_when_samples_are_skipped(tmp_path: Path) -> None:
    """ShardReader.read_pieces(fill_to=...) re-reads the rank's good samples so its step count is still met."""
    bad = [("train-0000099.npy", npy(np.zeros((3, 2), np.uint8))), ("train-0000099.cls", b"1")]
    shards = [tar_bytes(good(0) + bad + good(2)), tar_bytes(sum((good(i) for i in range(3, 8)), []))]
    manifest, url, _ = dataset(tmp_path, shards, [3, 5])
    infos = manifest.splits["train"].shards
    pieces = [(0, 0, 3), (1, 0, 5)]
    skip, error = ShardReader(ReadOptions(on_corrupt="skip")), ShardReader(ReadOptions(on_corrupt="error"))
    keys = [k for k, _, _ in skip.read_pieces(manifest, url, infos, pieces, fill_to=8)]
    assert len(keys) == 8  # 7 good + 1 repeat
    assert keys[:7] == ["train-0000000", "train-0000002"] + [f"train-{i:07d}" for i in range(3, 8)]
    assert keys[7] == "train-0000000"  # the refill starts over the same pieces
    with pytest.raises(ShardError):
        list(error.read_pieces(manifest, url, infos, pieces, fill_to=8))
    Path(tmp_path / "train-00000.tar").write_bytes(b"junk")
    Path(tmp_path / "train-00001.tar").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable sample"):
        list(skip.read_pieces(manifest, url, infos, pieces, fill_to=8))


def test_epoch_through_the_stream_with_skip_in_the_read_options(tmp_path: Path) -> None:
    """End to end through stream.train_batches: the policy passed in ReadOptions reaches every read."""
    bad = [("train-0000050.pyd", pickle.dumps(Unpickled(tmp_path / "pwned")))]
    shards = [tar_bytes(sum((good(i) for i in range(20)), []) + bad + good(21)),
              tar_bytes(sum((good(i) for i in range(30, 70)), []))]
    manifest, url, paths = dataset(tmp_path, shards, [22, 40])
    kwargs = dict(epoch=0, seed=0, rank=0, world_size=1, batch_per_rank=6, shuffle_buffer=8)
    with pytest.raises(ShardError, match=f"shard {paths[0]}, member train-0000050.pyd"):
        list(train_batches(manifest, url, **kwargs))
    reader = ShardReader(ReadOptions(on_corrupt="skip"))
    batches = list(train_batches(manifest, url, **kwargs, reader=reader))
    assert len(batches) == 62 // 6
    assert all(b.x.shape == (6, 1, 2, 2) and b.x.dtype == torch.uint8 for b in batches)
    assert all(int(label) == GOOD_LABEL for b in batches for label in b.labels)
    assert reader.stats.skipped_samples == 1 and list(reader.stats.skipped_shards) == [paths[0]]
    assert not (tmp_path / "pwned").exists()
