"""Per-rank streaming: assignment, lockstep, shuffling, position-seeded transforms and refusal of bad shards.

Binarization is the model likelihood's (pipeline.models.likelihoods.Bernoulli): here it is checked on the
loader's uint8 batches, as the model applies it."""

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
    steps_per_epoch,
    train_batches,
    write_shards,
)
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.models.likelihoods import Bernoulli


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
    args = dict(epoch=0, seed=0, rank=0, world_size=1, batch_per_rank=8, shuffle_buffer=16) | kw
    return list(train_batches(manifest, url, **args))


@pytest.mark.parametrize("batch_per_rank", [1, 5, 8, 35])
def test_every_rank_runs_the_same_number_of_steps(tmp_path: Path, batch_per_rank: int) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [7, 50, 13])
    steps = steps_per_epoch(70, 2, batch_per_rank)
    for epoch in range(3):
        per_rank = [run_epoch(manifest, url, epoch=epoch, rank=r, world_size=2, batch_per_rank=batch_per_rank) for r in range(2)]
        assert [len(batches) for batches in per_rank] == [steps, steps]
        assert all(x.shape == (batch_per_rank, 1, 4, 4) and x.dtype == torch.uint8 and y.shape == (batch_per_rank,)
                   for b in per_rank for x, y, _ in b)
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


def flipping(manifest: Manifest, crop: tuple[int, int] | None = None) -> SampleDecoder:
    """A decoder with the position-seeded random transforms on: horizontal flips (and a random crop)."""
    size = crop or tuple(manifest.spec.size)
    return SampleDecoder(manifest.spec, ImageTarget(1, size, resize="random-crop" if crop else "center-crop", hflip=True))


def test_resumed_epoch_continues_with_identical_batches(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [30, 25])
    full = run_epoch(manifest, url, epoch=3, decoder=flipping(manifest, (3, 4)))
    resumed = run_epoch(manifest, url, epoch=3, decoder=flipping(manifest, (3, 4)), start_step=4)
    assert len(resumed) == len(full) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], resumed))
    assert full[0].x.shape == (8, 1, 3, 4)  # the random crop (seeded by position) happened


def test_binarization_modes_on_the_loaders_batches(tmp_path: Path) -> None:
    """The loader hands out uint8 levels; the Bernoulli likelihood turns them into what the model sees."""
    manifest, url = write_indexed_dataset(tmp_path, [64])
    levels = torch.cat([x for x, _, _ in run_epoch(manifest, url, shuffle_buffer=0)])
    assert levels.dtype == torch.uint8 and levels.shape == (64, 1, 4, 4) and len(levels.unique()) > 2
    grey, grey_target = Bernoulli("none").prepare(levels)
    assert torch.equal(grey, grey_target) and torch.equal(grey, levels.float() / 255)
    assert grey.dtype == torch.float32 and 0 <= grey.min() and grey.max() <= 1 and len(grey.unique()) > 2

    def dynamic(seed: int) -> torch.Tensor:  # the training loop seeds torch's RNG per (seed, step, partition)
        torch.manual_seed(seed)
        inputs, target = Bernoulli("dynamic").prepare(levels)
        assert torch.equal(inputs, target)  # the encoder sees the very pixels it is scored on
        return inputs
    draws = [dynamic(0), dynamic(1)]
    assert all(set(d.unique().tolist()) == {0.0, 1.0} for d in draws)
    assert not torch.equal(draws[0], draws[1])  # a fresh Bernoulli draw for another seed (step, epoch)
    assert torch.equal(dynamic(0), draws[0])  # the same draw for the same seed (resume, validation)
    assert abs(draws[0].mean().item() - grey.mean().item()) < 0.05  # and an unbiased one

    threshold = Bernoulli("threshold").prepare(levels)[0]
    assert torch.equal(threshold, (grey > 0.5).float()) and torch.equal(threshold, (levels > 127).float())
    with pytest.raises(ValueError, match="binarize"):
        Bernoulli("sometimes")

    evals = [torch.cat([x for x, _ in eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=10)])
             for _ in range(2)]
    assert torch.equal(evals[0], evals[1]) and evals[0].dtype == torch.uint8
    assert sorted(evals[0].flatten().tolist()) == sorted(levels.flatten().tolist())


def test_eval_batches_split_the_data_between_ranks(tmp_path: Path) -> None:
    manifest, url = write_indexed_dataset(tmp_path, [7, 50, 13])
    per_rank = []
    for rank in range(3):
        batches = list(eval_batches(manifest, url, split="train", rank=rank, world_size=3, batch_size=10))
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
    return [int(v) for _, y in eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=4,
                                            options=ReadOptions(verify=verify)) for v in y]


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
        ([("train-0000001.npy", npy_bytes(np.zeros((3, 2), np.uint8))), ("train-0000001.cls", b"1")], r"member train-0000001\.npy: image is uint8 \[3, 2\], the manifest declares uint8 \[1, 2, 2\]"),
        ([("train-0000001.npy", npy_bytes(np.zeros((2, 2), np.float64))), ("train-0000001.cls", b"1")], r"member train-0000001\.npy: image is float64 \[2, 2\]"),
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
    verifying = ShardReader(ReadOptions(verify=True))
    assert [label for _, _, label in verifying.read_shard(manifest, url, shard, start=10, stop=15)] == [10, 11, 12, 13, 14]
    bad = shard.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ShardError, match="sha256 mismatch: manifest expects 0{64}"):
        list(verifying.read_shard(manifest, url, bad, start=10, stop=15))
    assert len(list(ShardReader().read_shard(manifest, url, bad, start=10, stop=15))) == 5  # without verify, no hashing


def _global_batches(manifest: Manifest, url: str, world_size: int, partitions: int, **kw: Any) -> list[list[str]]:
    """Keys of each global batch: the ranks' batches concatenated in rank order."""
    args = dict(epoch=2, seed=11, shuffle_buffer=9, partitions=partitions) | kw
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


def test_transformed_pixels_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    """Random crops and flips are seeded by (seed, epoch, partition, position): W does not change them.
    (Dynamic binarization's W-independence is the training loop's: it seeds the model's draws per partition.)"""
    manifest, url = write_indexed_dataset(tmp_path, [40, 40])
    def pixels(world_size: int) -> torch.Tensor:
        per_rank = [list(train_batches(manifest, url, epoch=0, seed=3, rank=r, world_size=world_size,
                                       batch_per_rank=8 // world_size, shuffle_buffer=5, partitions=4,
                                       decoder=flipping(manifest, (3, 3)))) for r in range(world_size)]
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
                           shuffle_buffer=0, partitions=3))


# --- the loader equals an independent, sample-by-sample reference --------------------------------------
#
# The reference shares no code with pipeline.data (reader, stream, contract): it reads every shard with
# tarfile and numpy.load, one sample at a time, and spells out the documented order and seeding itself:
# - a config seed enters every SeedSequence modulo 2**64 (a negative seed stays usable);
# - the epoch's shard order: a numpy permutation seeded by SeedSequence([seed, epoch]);
# - partition v of P: positions [v*N//P, (v+1)*N//P) of the shards concatenated in that order;
# - a partition's stream: blocks of max(shuffle_buffer, 1) consecutive samples, block k permuted by
#   SeedSequence([seed, epoch, v, k, 1]) (blocks of one sample: as read);
# - steps per epoch: (N // P) // b, b = batch per partition; global batch t: each partition's positions
#   [t*b, (t+1)*b), partitions in order; rank r serves its P/W consecutive partitions;
# - random crop and flip of the sample at position p of partition v: one Generator seeded by
#   SeedSequence([seed, epoch, v, p, 4]) draws the crop's top, then its left, then the flip (random() < 0.5);
# - on_corrupt=skip: a bad sample, the rest of a shard the tar reader cannot get past, and (verify) every
#   sample of a shard whose sha256 is wrong are left out and counted once; a partition that comes up short
#   repeats its good samples, in order, until its steps are filled;
# - on_corrupt=error: the first problem in a partition's read order stops the epoch at the step that first
#   needs that position (the block that holds it, when shuffling); verify's sha256 mismatch is found when
#   the piece's last sample has been read (the rest of the shard is hashed, not parsed).

_NPY_MAGIC = b"\x93NUMPY"


def _ref_sample(members: dict[str, bytes], shape: tuple[int, int]) -> tuple[np.ndarray, int] | None:
    """(uint8 [1, H, W], label) of one sample's members, or None when the sample is bad."""
    if set(members) != {"npy", "cls"} or not members["npy"].startswith(_NPY_MAGIC):
        return None
    try:
        image = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    label = members["cls"].strip()
    if image.dtype != np.uint8 or image.shape != shape or not label.lstrip(b"-").isdigit():
        return None
    return image[None], int(label)


_REF_SHARDS: dict[tuple[str, str], dict[str, Any]] = {}


def _ref_shard(path: str, shape: tuple[int, int]) -> dict[str, Any]:
    """One shard, read with tarfile: its samples in order ((key, image, label) or (key, None, None) when bad),
    where the tar reader gave up ("damaged_at", None when it did not) and the sha256 of the whole file."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return {"samples": [], "damaged_at": 0, "error": "unreadable shard", "sha256": None}
    digest = hashlib.sha256(data).hexdigest()
    if (path, digest) in _REF_SHARDS:
        return _REF_SHARDS[(path, digest)]
    samples: list[tuple[str, Any, Any]] = []
    key: str | None = None
    members: dict[str, bytes] = {}
    damaged_at, error = None, None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                stem, _, suffix = info.name.partition(".")  # WebDataset: the key is the name up to its first dot
                if key is not None and (stem != key or suffix in members):
                    samples.append((key, *(_ref_sample(members, shape) or (None, None))))
                    members = {}
                key = stem
                members[suffix] = tar.extractfile(info).read()  # type: ignore[union-attr]
        if key is not None:
            samples.append((key, *(_ref_sample(members, shape) or (None, None))))
    except (tarfile.TarError, OSError, EOFError):
        damaged_at, error = len(samples), "unreadable shard"  # the sample being read when it failed is lost
    result = {"samples": samples, "damaged_at": damaged_at, "error": error, "sha256": digest}
    _REF_SHARDS[(path, digest)] = result
    return result


def _ref_partition(manifest: Manifest, url: str, positions: list[tuple[int, int]], *, mode: str, verify: bool,
                   needed: int, skipped: list[tuple[int, str, range]]) -> tuple[list[tuple[str, np.ndarray, int]], Any]:
    """The partition's samples in read order (refilled in skip mode) and its error: (position, shard, text).
    Skips are logged as (good samples read before them, shard URL, positions)."""
    shards = manifest.splits["train"].shards
    shape = tuple(manifest.image_shape[-2:])
    pieces = [(index, [p for _, p in run]) for index, run in itertools.groupby(positions, key=lambda ip: ip[0])]
    good: list[tuple[str, np.ndarray, int]] = []
    for index, run in pieces:
        info = shards[index]
        path = f"{url}/{info.path}"
        shard = _ref_shard(path, shape)
        first, stop = run[0], run[-1] + 1
        samples = shard["samples"]
        damaged_at = shard["damaged_at"]
        if damaged_at is None and len(samples) < info.samples:  # tar ended cleanly, too early
            damaged_at, shard = len(samples), shard | {"error": "truncated"}
        end = stop if damaged_at is None else min(stop, damaged_at)
        sha_ok = shard["sha256"] == info.sha256
        if mode == "skip":
            if verify and not sha_ok:  # hashed before any sample is read: the whole piece is left out
                skipped.append((len(good), path, range(first, stop)))
                continue
            for j in range(first, end):
                key, image, label = samples[j]
                if image is None:
                    skipped.append((len(good), path, range(j, j + 1)))
                else:
                    good.append((key, image, label))
            if end < stop:
                skipped.append((len(good), path, range(max(first, end), stop)))
            continue
        for j in range(first, end):
            key, image, label = samples[j]
            if image is None:
                return good, (len(good), path, key)
            good.append((key, image, label))
        if end < stop:
            return good, (len(good), path, shard["error"])
        if verify and not sha_ok:
            return good, (len(good), path, "sha256 mismatch")
    if mode == "skip" and len(good) < needed:
        if not good:
            return good, (0, None, "no readable sample")
        good = good + [good[i % len(good)] for i in range(needed - len(good))]
    return good, None


def _reference_train_batches(manifest: Manifest, url: str, *, epoch: int, seed: int, rank: int, world_size: int,
                             batch_per_rank: int, shuffle_buffer: int, partitions: int, start_step: int = 0,
                             options: ReadOptions = ReadOptions(),
                             crop: tuple[int, int] | None = None, hflip: bool = False) -> tuple[list, Any, Any]:
    """(batches [(uint8 x, labels, keys)], expected error (shard, text) or None, (skipped count, shard urls))."""
    seed = seed % 2**64
    shards = manifest.splits["train"].shards
    total = sum(s.samples for s in shards)
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(shards))
    flat = [(int(i), j) for i in order for j in range(shards[i].samples)]
    mine = range(rank * partitions // world_size, (rank + 1) * partitions // world_size)
    per_partition = batch_per_rank // len(mine)
    steps = (total // partitions) // per_partition
    block = max(shuffle_buffer, 1)
    skips: list[list[tuple[int, str, range]]] = []  # per partition, in read order
    streams, stops = [], []
    for number, v in enumerate(mine):
        positions = flat[v * total // partitions: (v + 1) * total // partitions]
        skips.append([])
        samples, error = _ref_partition(manifest, url, positions, mode=options.on_corrupt, verify=options.verify,
                                        needed=steps * per_partition, skipped=skips[-1])
        shuffled = []
        for k, first in enumerate(range(0, len(samples), block)):
            chunk = samples[first: first + block]
            if block > 1:
                permutation = np.random.default_rng(np.random.SeedSequence([seed, epoch, v, k, 1])).permutation(len(chunk))
                chunk = [chunk[i] for i in permutation]
            shuffled += chunk
        streams.append(shuffled)
        if error is not None:  # the step that first needs the block holding the failing position
            stops.append((min(steps, error[0] // block * block // per_partition), number, error[1:]))
    stop_step, failed, error = min(stops) if stops else (steps, len(mine), None)
    if options.on_corrupt == "skip" and error is not None:
        # "no readable sample": the partition's whole first pass was skipped, at the first step. The partitions
        # after it were never read; those before it read what the first step needed (their first block), so
        # only the skips met before that many good samples count.
        assert stop_step == 0, "beyond what the reference models"
        need = block if block > 1 else per_partition
        skips = [[entry for entry in part if entry[0] < need] for part in skips[:failed]] + [skips[failed]]
    skipped: dict[str, set[int]] = {}
    for part in skips:
        for _, shard_url_, skipped_positions in part:
            skipped.setdefault(shard_url_, set()).update(skipped_positions)
    assert not (start_step and (error or skipped)), "the reference resumes clean data only"
    batches = []
    for step in range(start_step, stop_step):
        xs, labels, keys = [], [], []
        for v, stream_v in zip(mine, streams):
            for p in range(step * per_partition, (step + 1) * per_partition):
                key, image, label = stream_v[p]
                rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, v, p, 4]))
                if crop is not None and crop != image.shape[1:]:
                    top = int(rng.integers(0, image.shape[1] - crop[0] + 1))
                    left = int(rng.integers(0, image.shape[2] - crop[1] + 1))
                    image = image[:, top: top + crop[0], left: left + crop[1]]
                if hflip and rng.random() < 0.5:
                    image = image[:, :, ::-1]
                xs.append(image)
                labels.append(label)
                keys.append(key)
        batches.append((np.stack(xs).tobytes(), np.asarray(labels, np.int64).tobytes(), keys))
    return batches, error, (sum(len(s) for s in skipped.values()), set(skipped))


def _outcome(manifest: Manifest, url: str, **kw: Any) -> tuple[list[tuple[bytes, bytes, list[str]]], str | None, Any]:
    """The loader's batches (as exact bytes) up to its error, if any, and what its reader counted as skipped."""
    crop, hflip = kw.pop("crop", None), kw.pop("hflip", False)
    decoder = None
    if crop or hflip:
        size = crop or tuple(manifest.image_shape[-2:])
        decoder = SampleDecoder(manifest.spec, ImageTarget(1, size, resize="random-crop" if crop else "center-crop",
                                                           hflip=hflip))
    reader = ShardReader(kw.pop("options", ReadOptions()), decoder)
    got, error = [], None
    try:
        for x, y, keys in train_batches(manifest, url, reader=reader, **kw):
            assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.is_contiguous()
            got.append((x.numpy().tobytes(), y.numpy().tobytes(), list(keys)))
    except (DataError, ShardError) as err:
        error = str(err)
    return got, error, (reader.stats.skipped_samples, set(reader.stats.skipped_shards))


def _assert_same_batches(manifest: Manifest, url: str, **kw: Any) -> int:
    new_batches, new_error, new_health = _outcome(manifest, url, **kw)
    old_batches, old_error, old_health = _reference_train_batches(manifest, url, **kw)
    assert new_health == old_health, kw
    assert len(new_batches) == len(old_batches), (kw, new_error, old_error)
    assert all(a == b for a, b in zip(new_batches, old_batches)), kw
    if old_error is None:
        assert new_error is None, (kw, new_error)
    else:
        shard, text = old_error
        assert new_error is not None and (shard is None or new_error.startswith(f"shard {shard}")), (kw, new_error, old_error)
        assert text in new_error, (kw, new_error, old_error)
    return len(new_batches)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, str]:
    out = tmp_path_factory.mktemp("digits") / "data"
    return write_shards(load_digits_splits(), str(out), source="digits", samples_per_shard=97, progress=False), str(out)


@pytest.mark.parametrize("shuffle_buffer", [0, 1, 7, 100, 5000])
@pytest.mark.parametrize("partitions, world_size, rank, batch_per_rank", [(1, 1, 0, 32), (4, 2, 1, 10), (6, 3, 2, 4)])
def test_loader_equals_the_independent_reference(digits_shards: tuple[Manifest, str], shuffle_buffer: int,
                                                 partitions: int, world_size: int, rank: int,
                                                 batch_per_rank: int) -> None:
    manifest, url = digits_shards
    transforms = [{}, {"hflip": True}, {"crop": (8, 6), "hflip": True}]
    for number, (start_step, transform) in enumerate(zip([0, 5, 1], transforms)):
        kw = dict(epoch=number, seed=partitions - 3, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank,
                  shuffle_buffer=shuffle_buffer, partitions=partitions, start_step=start_step, **transform)
        assert _assert_same_batches(manifest, url, **kw) > 0


def test_loader_equals_the_reference_on_the_tarfile_path(digits_shards: tuple[Manifest, str]) -> None:
    manifest, url = digits_shards
    for shuffle_buffer in (0, 50):  # one chunk per group of samples from the reader
        _assert_same_batches(manifest, url, epoch=1, seed=4, rank=1, world_size=2, batch_per_rank=16,
                             shuffle_buffer=shuffle_buffer, partitions=2, start_step=2, hflip=True,
                             options=ReadOptions(fast_path=False, verify=True))


def test_the_reference_catches_a_wrong_loader(digits_shards: tuple[Manifest, str]) -> None:
    """The comparison is not vacuous: another seed, order or batch is told apart."""
    manifest, url = digits_shards
    kw = dict(epoch=1, seed=4, rank=0, world_size=1, batch_per_rank=16, shuffle_buffer=50, partitions=2)
    batches, _, _ = _reference_train_batches(manifest, url, **kw)
    assert _outcome(manifest, url, **kw)[0] == batches
    assert _outcome(manifest, url, **(kw | {"seed": 5}))[0] != batches
    assert _outcome(manifest, url, **(kw | {"shuffle_buffer": 49}))[0] != batches
    assert _outcome(manifest, url, **(kw | {"hflip": True}))[0] != batches


@pytest.mark.parametrize("damage", ["pickle member", "cut shard", "tampered shard"])
def test_loader_skips_and_fails_like_the_reference(tmp_path: Path, damage: str) -> None:
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
    outcomes = set()
    for mode, shuffle_buffer, partitions, verify in itertools.product(("error", "skip"), (0, 1, 8, 30), (1, 2),
                                                                      (False, True)):
        options = ReadOptions(on_corrupt=mode, verify=verify)  # type: ignore[arg-type]
        _, error, health = _reference_train_batches(
            manifest, url, epoch=1, seed=2, rank=0, world_size=1, batch_per_rank=6, shuffle_buffer=shuffle_buffer,
            partitions=partitions, options=options)
        outcomes.add((mode, error is not None, health[0] > 0))
        _assert_same_batches(manifest, url, epoch=1, seed=2, rank=0, world_size=1, batch_per_rank=6,
                             shuffle_buffer=shuffle_buffer, partitions=partitions, hflip=True, options=options)
    # Both policies were exercised on this damage: errors in "error" mode, skips (and no error) in "skip" mode.
    assert ("error", True, False) in outcomes and ("skip", False, True) in outcomes
