"""Per-rank streaming: assignment, lockstep, shuffling, binarization and refusal of bad shards."""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import itertools
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from test_corrupt import tar_bytes

from pipeline.data import (
    DataError,
    Manifest,
    ShardError,
    ShardInfo,
    Split,
    SplitInfo,
    eval_batches,
    load_digits_splits,
    partitions_of_rank,
    rank_assignment,
    read_pieces,
    read_shard,
    steps_per_epoch,
    train_batches,
    write_shards,
)
from pipeline.data import reader, stream
from pipeline.data.reader import ReadOptions, data_health, reset_data_health, set_read_options


def shards_of(sizes: list[int]) -> list[ShardInfo]:
    return [ShardInfo(path=f"s{i}.tar", samples=n, bytes=0, sha256="") for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [[7, 50, 13], [1], [5, 5, 5, 5], [100, 3, 0, 41, 9, 77, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
def test_rank_assignment_covers_every_sample_once(sizes: list[int]) -> None:
    shards = shards_of(sizes)
    for world_size, epoch in itertools.product(range(1, 9), range(3)):
        seen: collections.Counter[tuple[int, int]] = collections.Counter()
        per_rank = []
        for rank in range(world_size):
            pieces = rank_assignment(shards, epoch=epoch, seed=11, world_size=world_size, rank=rank)
            assert pieces == rank_assignment(shards, epoch=epoch, seed=11, world_size=world_size, rank=rank)
            assert all(0 <= start < stop <= sizes[index] for index, start, stop in pieces)
            seen.update((index, s) for index, start, stop in pieces for s in range(start, stop))
            per_rank.append(sum(stop - start for _, start, stop in pieces))
        assert set(seen.values()) <= {1} and len(seen) == sum(sizes)
        assert max(per_rank) - min(per_rank) <= 1


def test_rank_assignment_order_depends_on_epoch_and_seed() -> None:
    shards = shards_of([10] * 12)
    order = lambda epoch, seed: [p[0] for p in rank_assignment(shards, epoch=epoch, seed=seed, world_size=1, rank=0)]  # noqa: E731
    assert len({tuple(order(epoch, 0)) for epoch in range(5)}) == 5
    assert order(0, 0) != order(0, 1)
    # A rank reads a contiguous ~1/W share: with 12 equal shards on 4 ranks, 3 whole shards each.
    assert all(len(rank_assignment(shards, epoch=2, seed=0, world_size=4, rank=r)) == 3 for r in range(4))


def test_steps_per_epoch_and_too_small_datasets() -> None:
    assert steps_per_epoch(70, 2, 8) == 4
    assert steps_per_epoch(60_000, 3, 100) == 200
    with pytest.raises(DataError, match="too small.*4 workers.*batch of 64"):
        steps_per_epoch(200, 4, 64)


def write_indexed_dataset(folder: Path, sizes: list[int], shape: tuple[int, int] = (4, 4)) -> tuple[Manifest, str]:
    """One 'train' split made of shards of the given sizes; label = global sample index, so samples are traceable."""
    rng = np.random.default_rng(0)
    parts: dict[str, Split] = {}
    first = 0
    for number, size in enumerate(sizes):
        images = rng.integers(0, 256, size=(size, *shape), dtype=np.uint8)
        parts[f"part{number}"] = Split(images, np.arange(first, first + size))
        first += size
    written = write_shards(parts, str(folder), source="test", samples_per_shard=max(sizes), progress=False)
    shards = [shard for part in written.splits.values() for shard in part.shards]
    manifest = written.model_copy(update={"splits": {"train": SplitInfo(samples=sum(sizes), shards=shards)}})
    (folder / "manifest.json").write_text(manifest.model_dump_json())
    return manifest, str(folder)


def run_epoch(manifest: Manifest, url: str, **kw: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    args = dict(epoch=0, seed=0, rank=0, world_size=1, batch_per_rank=8, shuffle_buffer=16, binarize="none") | kw
    return list(train_batches(manifest, url, **args))


@pytest.mark.parametrize("batch_per_rank", [1, 5, 8, 35])
def test_every_rank_runs_the_same_number_of_steps(tmp_path: Path, batch_per_rank: int) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [7, 50, 13])
    steps = steps_per_epoch(70, 2, batch_per_rank)
    for epoch in range(3):
        per_rank = [run_epoch(manifest, url, epoch=epoch, rank=r, world_size=2, batch_per_rank=batch_per_rank) for r in range(2)]
        assert [len(batches) for batches in per_rank] == [steps, steps]
        assert all(x.shape == (batch_per_rank, 16) and y.shape == (batch_per_rank,) for b in per_rank for x, y, _ in b)
        labels = [int(v) for batches in per_rank for _, y, _ in batches for v in y]
        assert len(labels) == len(set(labels)) == 2 * steps * batch_per_rank  # no sample twice in one epoch


def test_shuffle_order_is_seeded_and_changes_by_epoch(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [40, 40])
    labels = lambda **kw: [int(v) for _, y, _ in run_epoch(manifest, url, **kw) for v in y]  # noqa: E731
    assert labels(epoch=1) == labels(epoch=1)
    assert labels(epoch=1) != labels(epoch=2)
    # Without a buffer the stream is the whole shards, each in order, in the epoch's shard order.
    assert labels(epoch=1, shuffle_buffer=0) in ([*range(40), *range(40, 80)], [*range(40, 80), *range(40)])
    assert labels(epoch=1) != labels(epoch=1, shuffle_buffer=0)  # the buffer mixes samples within the rank's stream


def test_resumed_epoch_continues_with_identical_batches(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [30, 25])
    full = run_epoch(manifest, url, epoch=3, binarize="dynamic")
    resumed = run_epoch(manifest, url, epoch=3, binarize="dynamic", start_step=4)
    assert len(resumed) == len(full) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], resumed))


def test_binarization_modes(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [64])
    grey = torch.cat([x for x, _, _ in run_epoch(manifest, url, shuffle_buffer=0)])
    assert grey.dtype == torch.float32 and 0 <= grey.min() and grey.max() <= 1 and len(grey.unique()) > 2

    dynamic = [torch.cat([x for x, _, _ in run_epoch(manifest, url, epoch=e, shuffle_buffer=0, binarize="dynamic")]) for e in (0, 1)]
    assert all(set(d.unique().tolist()) == {0.0, 1.0} for d in dynamic)
    assert not torch.equal(dynamic[0], dynamic[1])  # a fresh Bernoulli draw every epoch
    assert abs(dynamic[0].mean().item() - grey.mean().item()) < 0.05  # and an unbiased one

    threshold = [torch.cat([x for x, _, _ in run_epoch(manifest, url, epoch=e, shuffle_buffer=0, binarize="threshold")]) for e in (0, 1)]
    assert torch.equal(threshold[0], threshold[1]) and torch.equal(threshold[0], (grey > 0.5).float())

    evals = [torch.cat([x for x, _ in eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=10,
                                                   binarize="dynamic", seed=5)]) for _ in range(2)]
    assert torch.equal(evals[0], evals[1]) and set(evals[0].unique().tolist()) == {0.0, 1.0}


def test_eval_batches_split_the_data_between_ranks(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [7, 50, 13])
    per_rank = []
    for rank in range(3):
        batches = list(eval_batches(manifest, url, split="train", rank=rank, world_size=3, batch_size=10, binarize="none"))
        assert all(len(y) == 10 for _, y in batches[:-1]) and 1 <= len(batches[-1][1]) <= 10
        per_rank.append([int(v) for _, y in batches for v in y])
    assert [len(labels) for labels in per_rank] == [23, 23, 24]
    assert sum(per_rank, []) == list(range(70))  # contiguous, in manifest order, every sample once


# --- untrusted shards -------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def hand_made_dataset(folder: Path, members: list[tuple[str, bytes]], samples: int, shape: list[int] | None = None) -> tuple[Manifest, str, str]:
    """A dataset whose single shard holds exactly ``members``; the manifest's sha256 is the shard's real one."""
    data = tar_bytes(members)
    shard_path = folder / "train-00000.tar"
    shard_path.write_bytes(data)
    shard = ShardInfo(path=shard_path.name, samples=samples, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest = Manifest(source="hand-made", image_shape=shape or [2, 2], splits={"train": SplitInfo(samples=samples, shards=[shard])}, created="2026-01-01T00:00:00+00:00")
    return manifest, str(folder), str(shard_path)


def good_sample(key: str, label: int = 3) -> list[tuple[str, bytes]]:
    return [(f"{key}.npy", npy_bytes(np.full((2, 2), 200, np.uint8))), (f"{key}.cls", str(label).encode())]


def read_all(manifest: Manifest, url: str, verify: bool = False) -> list[int]:
    return [int(v) for _, y in eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=4, binarize="none", verify=verify) for v in y]


class CreatesFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return builtins.open, (self.path, "w")


def test_pickle_members_are_refused_without_being_unpickled(tmp_path: Path) -> None:
    probe, sentinel = tmp_path / "probe", tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(probe))).close()
    assert probe.exists()  # the payload is live: loading it would have created the sentinel file

    payload = pickle.dumps(CreatesFileWhenUnpickled(sentinel))
    for name in ("x.pyd", "train-0000000.pyd", "train-0000000.pickle", "train-0000000.pth"):
        folder = tmp_path / name
        folder.mkdir()
        members = good_sample("train-0000000") + [(name, payload)] + good_sample("train-0000001")
        manifest, url, shard_path = hand_made_dataset(folder, members, samples=2)
        with pytest.raises(ShardError) as caught:
            read_all(manifest, url)
        assert shard_path in str(caught.value) and name in str(caught.value)
    assert not sentinel.exists()


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    objects = np.array([CreatesFileWhenUnpickled(sentinel)], dtype=object)
    members = [("train-0000000.npy", npy_bytes(objects, allow_pickle=True)), ("train-0000000.cls", b"1")]
    manifest, url, shard_path = hand_made_dataset(tmp_path, members, samples=1)
    with pytest.raises(ShardError, match=rf"{shard_path}, member train-0000000\.npy: undecodable"):
        read_all(manifest, url)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "members, complaint",
    [
        ([("train-0000001.npy", npy_bytes(np.zeros((3, 2), np.uint8))), ("train-0000001.cls", b"1")], r"sample train-0000001: image is uint8 \[3, 2\], the manifest declares uint8 \[2, 2\]"),
        ([("train-0000001.npy", npy_bytes(np.zeros((2, 2), np.float64))), ("train-0000001.cls", b"1")], r"sample train-0000001: image is float64 \[2, 2\]"),
        ([("train-0000001.npy", npy_bytes(np.zeros((2, 2), np.uint8)))], r"sample train-0000001: sample has no \.cls member"),
        ([("train-0000001.cls", b"1")], r"sample train-0000001: sample has no \.npy member"),
        ([("train-0000001.npy", b"PK\x03\x04 zip, not npy"), ("train-0000001.cls", b"1")], r"member train-0000001\.npy: not an \.npy array"),
        ([("train-0000001.npy", npy_bytes(np.zeros((2, 2), np.uint8))), ("train-0000001.cls", b"one")], r"member train-0000001\.cls: label"),
        ([("README", b"hello")], r"member README: undeclared member refused"),
    ],
)
def test_bad_samples_name_shard_and_sample(tmp_path: Path, members: list[tuple[str, bytes]], complaint: str) -> None:
    manifest, url, shard_path = hand_made_dataset(tmp_path, good_sample("train-0000000") + members, samples=2)
    with pytest.raises(ShardError, match=f"^shard {shard_path}.*{complaint}"):
        read_all(manifest, url)


def test_truncated_and_garbage_shards_name_the_shard(tmp_path: Path) -> None:
    manifest, url, shard_path = hand_made_dataset(tmp_path, sum((good_sample(f"train-{i:07d}") for i in range(20)), []), samples=20)
    whole = Path(shard_path).read_bytes()
    assert len(read_all(manifest, url)) == 20

    Path(shard_path).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ShardError, match=f"^shard {shard_path}"):  # here the cut leaves a sample without its .cls
        read_all(manifest, url)

    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
    Path(shard_path).write_bytes(whole[: members[10].offset_data + 40])  # cut inside sample 5's .npy data
    with pytest.raises(ShardError, match=f"shard {shard_path}: unreadable shard .*unexpected end of data"):
        read_all(manifest, url)

    # Cut exactly at a member boundary, tarfile reports a clean end: the manifest's count catches it.
    boundary = members[10].offset  # header of sample 5's .npy
    Path(shard_path).write_bytes(whole[:boundary])
    with pytest.raises(ShardError, match=f"shard {shard_path}: truncated: ended after 5 samples, the manifest says 20"):
        read_all(manifest, url)

    Path(shard_path).write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ShardError, match=f"shard {shard_path}: unreadable shard"):
        read_all(manifest, url)

    Path(shard_path).unlink()
    with pytest.raises(ShardError, match=f"shard {shard_path}: unreadable shard .*FileNotFoundError"):
        read_all(manifest, url)


def test_verify_catches_a_tampered_shard(tmp_path: Path) -> None:
    members = sum((good_sample(f"train-{i:07d}", label=3) for i in range(6)), [])
    manifest, url, shard_path = hand_made_dataset(tmp_path, members, samples=6)
    assert read_all(manifest, url, verify=True) == [3] * 6
    expected = manifest.splits["train"].shards[0].sha256

    tampered = Path(shard_path).read_bytes().replace(b"3" + b"\0" * 511, b"4" + b"\0" * 511, 1)  # one label's data block
    Path(shard_path).write_bytes(tampered)
    assert read_all(manifest, url) == [4] + [3] * 5  # tar is still valid: only the hash can tell
    with pytest.raises(ShardError) as caught:
        read_all(manifest, url, verify=True)
    message = str(caught.value)
    assert shard_path in message and expected in message and hashlib.sha256(tampered).hexdigest() in message


def test_verify_covers_whole_shard_when_a_rank_reads_part_of_it(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [40])
    shard = manifest.splits["train"].shards[0]
    assert [label for _, _, label in read_shard(manifest, url, shard, start=10, stop=15, verify=True)] == [10, 11, 12, 13, 14]
    bad = shard.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ShardError, match="sha256 mismatch: manifest expects 0{64}"):
        list(read_shard(manifest, url, bad, start=10, stop=15, verify=True))
    assert len(list(read_shard(manifest, url, bad, start=10, stop=15))) == 5  # without verify, no hashing


def _global_batches(manifest: Manifest, url: str, world_size: int, partitions: int, **kw: Any) -> list[list[str]]:
    """Keys of each global batch: the ranks' batches concatenated in rank order."""
    args = dict(epoch=2, seed=11, shuffle_buffer=9, binarize="none", partitions=partitions) | kw
    per_rank = [list(train_batches(manifest, url, rank=r, world_size=world_size,
                                   batch_per_rank=12 // world_size, **args)) for r in range(world_size)]
    return [sum((per_rank[r][t].keys for r in range(world_size)), []) for t in range(len(per_rank[0]))]


def test_global_batches_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [7, 50, 13, 31])
    reference = _global_batches(manifest, url, world_size=1, partitions=6)
    assert len(reference) == steps_per_epoch(101, 6, 2) == 8
    for world_size in (2, 3, 6):
        assert _global_batches(manifest, url, world_size=world_size, partitions=6) == reference
    keys = sum(reference, [])
    assert len(keys) == len(set(keys))  # nothing twice in an epoch
    # the same data in another order next epoch
    assert _global_batches(manifest, url, world_size=2, partitions=6, epoch=3) != reference


def test_binarized_pixels_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [40, 40])
    def pixels(world_size: int) -> torch.Tensor:
        per_rank = [list(train_batches(manifest, url, epoch=0, seed=3, rank=r, world_size=world_size,
                                       batch_per_rank=8 // world_size, shuffle_buffer=5, binarize="dynamic",
                                       partitions=4)) for r in range(world_size)]
        return torch.cat([torch.cat([per_rank[r][t].x for r in range(world_size)]) for t in range(len(per_rank[0]))])
    assert torch.equal(pixels(1), pixels(2)) and torch.equal(pixels(2), pixels(4))


@pytest.mark.parametrize("start_step", [1, 3, 5, 7])
def test_resume_mid_epoch_continues_with_the_next_sample(tmp_path: Path, start_step: int) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [7, 50, 13, 31])
    full = _global_batches(manifest, url, world_size=2, partitions=2)
    # checkpointed on 2 workers, resumed on 1 (and the reverse): the same remaining batches
    assert _global_batches(manifest, url, world_size=1, partitions=2, start_step=start_step) == full[start_step:]
    assert _global_batches(manifest, url, world_size=2, partitions=2, start_step=start_step) == full[start_step:]


def test_resume_skips_whole_shards_without_reading_them(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [20, 20, 20, 20])
    full = _global_batches(manifest, url, world_size=1, partitions=1, shuffle_buffer=10)
    # the shard read first this epoch: once resumed past it, deleting it must not matter
    order = rank_assignment(manifest.splits["train"].shards, epoch=2, seed=11, world_size=1, rank=0)
    first = manifest.splits["train"].shards[order[0][0]]
    assert order[0][1:] == (0, 20)  # 24 samples skipped = the whole first shard + part of the next block
    (Path(url) / first.path).unlink()
    resumed = _global_batches(manifest, url, world_size=1, partitions=1, shuffle_buffer=10, start_step=2)
    assert resumed == full[2:]


def test_partitions_must_divide_among_workers(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [20, 20])
    with pytest.raises(DataError, match="data.partitions=3"):
        list(train_batches(manifest, url, epoch=0, seed=0, rank=0, world_size=2, batch_per_rank=6,
                           shuffle_buffer=0, binarize="none", partitions=3))


# --- the batched loader equals the sample-by-sample one it replaced -----------------------------------


def _reference_train_batches(manifest: Manifest, url: str, *, split: str = "train", epoch: int, seed: int, rank: int,
                             world_size: int, batch_per_rank: int, shuffle_buffer: int, binarize: str,
                             verify: bool = False, start_step: int = 0, partitions: int | None = None):
    """The loader before issue #7, verbatim in behaviour: every sample a (key, image, label) tuple through
    generators, each block permuted sample by sample, each batch np.stack'ed."""
    partitions = partitions or world_size
    mine = partitions_of_rank(partitions, world_size, rank)
    per_partition = batch_per_rank // len(mine)
    shards = manifest.splits[split].shards
    steps = steps_per_epoch(sum(s.samples for s in shards), partitions, per_partition)

    def partition(v: int):
        block, start = max(shuffle_buffer, 1), start_step * per_partition
        first_block = start // block
        pieces = rank_assignment(shards, epoch=epoch, seed=seed, world_size=partitions, rank=v)
        samples = read_pieces(manifest, url, shards, stream._skip_pieces(pieces, first_block * block), verify=verify,
                              fill_to=steps * per_partition - first_block * block)
        skip_in_block = start - first_block * block
        for number in itertools.count(first_block):
            chunk = list(itertools.islice(samples, block))
            if not chunk:
                return
            order = (np.random.default_rng(stream._entropy(seed, epoch, v, number, stream._SHUFFLE)).permutation(len(chunk))
                     if block > 1 else range(len(chunk)))
            for position in order[skip_in_block:]:
                yield chunk[position]
            skip_in_block = 0

    streams = [partition(v) for v in mine]
    for step in range(start_step, steps):
        xs, labels, keys = [], [], []
        for v, samples in zip(mine, streams):
            chunk = list(itertools.islice(samples, per_partition))
            if len(chunk) < per_partition:
                raise DataError(f"partition {v} ran out of {split} samples at step {step} of {steps}: "
                                "manifest counts are wrong")
            x, y = stream._to_tensors(np.stack([c[1] for c in chunk]), np.asarray([c[2] for c in chunk], dtype=np.int64),
                                      binarize, stream._torch_seed(seed, epoch, v, step, stream._BINARIZE))
            xs.append(x)
            labels.append(y)
            keys.extend(c[0] for c in chunk)
        yield torch.cat(xs), torch.cat(labels), keys
    for samples in streams:
        for _ in samples:
            pass


def _outcome(batches: Any) -> tuple[list[tuple[bytes, bytes, list[str]]], str | None, Any]:
    """Every batch (as exact bytes) up to the error, if any, and what the process counted as skipped."""
    reset_data_health()
    got, error = [], None
    try:
        for x, y, keys in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.is_contiguous()
            got.append((x.numpy().tobytes(), y.numpy().tobytes(), list(keys)))
    except (DataError, ShardError) as err:
        error = f"{type(err).__name__}: {err}"
    health = data_health()
    return got, error, (health.skipped_samples, health.skipped_shards)


def _assert_same_batches(manifest: Manifest, url: str, **kw: Any) -> int:
    new = _outcome(train_batches(manifest, url, **kw))
    old = _outcome(_reference_train_batches(manifest, url, **kw))
    assert new[1:] == old[1:], kw
    assert len(new[0]) == len(old[0]) and all(a == b for a, b in zip(new[0], old[0])), kw
    return len(new[0])


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, str]:
    out = tmp_path_factory.mktemp("digits") / "data"
    return write_shards(load_digits_splits(), str(out), source="digits", samples_per_shard=97, progress=False), str(out)


@pytest.mark.parametrize("shuffle_buffer", [0, 1, 7, 100, 5000])
@pytest.mark.parametrize("partitions, world_size, rank, batch_per_rank", [(1, 1, 0, 32), (4, 2, 1, 10), (6, 3, 2, 4)])
def test_batched_loader_equals_the_per_sample_reference(digits_shards: tuple[Manifest, str], shuffle_buffer: int,
                                                        partitions: int, world_size: int, rank: int,
                                                        batch_per_rank: int) -> None:
    manifest, url = digits_shards
    for number, (start_step, binarize) in enumerate([(0, "dynamic"), (5, "threshold"), (1, "none")]):
        kw = dict(epoch=number, seed=partitions - 3, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank,
                  shuffle_buffer=shuffle_buffer, binarize=binarize, partitions=partitions, start_step=start_step)
        assert _assert_same_batches(manifest, url, **kw) > 0


def test_batched_loader_equals_the_reference_on_the_tarfile_path(digits_shards: tuple[Manifest, str]) -> None:
    manifest, url = digits_shards
    try:
        reader.FAST_PATH = False  # one chunk per sample from the reader
        for shuffle_buffer in (0, 50):
            _assert_same_batches(manifest, url, epoch=1, seed=4, rank=1, world_size=2, batch_per_rank=16,
                                 shuffle_buffer=shuffle_buffer, binarize="dynamic", partitions=2, start_step=2,
                                 verify=True)
    finally:
        reader.FAST_PATH = True


@pytest.mark.parametrize("damage", ["pickle member", "cut shard", "tampered shard"])
def test_batched_loader_skips_and_fails_like_the_reference(tmp_path: Path, damage: str) -> None:
    """Same batches before an error, the same error, the same skips and refills, the same counts."""
    from test_corrupt import cut_inside_sample, dataset, good

    first = sum((good(i) for i in range(20)), [])
    if damage == "pickle member":
        first += [("train-0000050.pyd", b"never unpickled")]
    second = tar_bytes(sum((good(i) for i in range(30, 70)), []))
    manifest, url, paths = dataset(tmp_path, [tar_bytes(first + good(21)), second, tar_bytes(first[:12])],
                                  [21 + (damage == "pickle member"), 40, 6])
    if damage == "cut shard":
        Path(paths[1]).write_bytes(cut_inside_sample(second, 25))
    elif damage == "tampered shard":  # a still valid tar: only verify tells
        Path(paths[1]).write_bytes(second.replace(b"3" + b"\0" * 511, b"4" + b"\0" * 511, 1))
    try:
        for mode, shuffle_buffer, partitions, verify in itertools.product(("error", "skip"), (0, 1, 8, 30), (1, 2),
                                                                          (False, True)):
            set_read_options(ReadOptions(on_corrupt=mode))  # type: ignore[arg-type]
            _assert_same_batches(manifest, url, epoch=1, seed=2, rank=0, world_size=1, batch_per_rank=6,
                                 shuffle_buffer=shuffle_buffer, binarize="dynamic", partitions=partitions,
                                 verify=verify)
    finally:
        set_read_options(ReadOptions())
        reset_data_health()
