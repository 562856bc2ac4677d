"""Streaming shards inside one DDP rank: which samples, in what order, decoded how.

Assignment: each epoch the shards are permuted by (seed, epoch); the permuted shards,
concatenated, form one sequence of N samples, and rank r reads the contiguous range
[r*N//W, (r+1)*N//W) of it, so each rank reads ~1/W of the bytes (partial shards at the
edges) and every sample is seen exactly once per epoch.

Lockstep: every rank yields exactly ``steps_per_epoch`` batches, dropping at most
``batch_per_rank`` leftover samples, so DDP's collective calls never wait on a rank
that has run out of data.

Reading and safe decoding of one shard live in reader.py.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch

from pipeline.data.errors import DataError
from pipeline.data.reader import read_shard
from pipeline.data.shards import Manifest, ShardInfo

Piece = tuple[int, int, int]  # (shard index in the manifest's list, first sample, stop sample)
Binarize = Literal["dynamic", "threshold", "none"]

# Distinct tags keep the random streams (shard order, shuffle buffer, binarization) independent.
_SHUFFLE, _BINARIZE, _EVAL_BINARIZE = 1, 2, 3


def _entropy(*parts: int) -> list[int]:
    # SeedSequence wants non-negative ints; the modulo keeps a negative config seed usable and distinct.
    return [int(p) % 2**64 for p in parts]


def _torch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(_entropy(*parts)).generate_state(1, np.uint64)[0])


def _range_pieces(sizes: Sequence[int], order: Iterable[int], world_size: int, rank: int) -> list[Piece]:
    """Rank ``rank``'s contiguous share of the shards concatenated in ``order``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")
    total = sum(sizes)
    low, high = rank * total // world_size, (rank + 1) * total // world_size
    pieces, offset = [], 0
    for index in order:
        first, stop = max(low, offset), min(high, offset + sizes[index])
        if first < stop:
            pieces.append((int(index), first - offset, stop - offset))
        offset += sizes[index]
    return pieces


def rank_assignment(shards: list[ShardInfo], *, epoch: int, seed: int, world_size: int, rank: int) -> list[Piece]:
    """This rank's (shard_index, start_sample, stop_sample) pieces for one epoch; a pure function."""
    order = np.random.default_rng(_entropy(seed, epoch)).permutation(len(shards))
    return _range_pieces([shard.samples for shard in shards], order, world_size, rank)


def steps_per_epoch(total_samples: int, world_size: int, batch_per_rank: int) -> int:
    """Batches every rank runs per epoch: what the smallest rank's share can fill."""
    if world_size < 1 or batch_per_rank < 1:
        raise DataError(f"world_size ({world_size}) and batch_per_rank ({batch_per_rank}) must be >= 1")
    steps = (total_samples // world_size) // batch_per_rank
    if steps == 0:
        raise DataError(
            f"dataset too small: {total_samples} samples over {world_size} workers is "
            f"{total_samples // world_size} per worker, less than one batch of {batch_per_rank}; "
            "use a smaller batch size or fewer workers"
        )
    return steps


def _read_pieces(
    manifest: Manifest, dataset_url: str, shards: list[ShardInfo], pieces: list[Piece], verify: bool
) -> Iterator[tuple[str, np.ndarray, int]]:
    for index, start, stop in pieces:
        yield from read_shard(manifest, dataset_url, shards[index], start=start, stop=stop, verify=verify)


def _shuffled(samples: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle-buffer: hold ``buffer_size`` samples, emit a random one as each new one arrives."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(buffer_size))
        yield buffer[slot]
        buffer[slot] = sample
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def _batches(samples: Iterator[tuple[str, np.ndarray, int]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stacked (images [B, H, W], labels [B]); the last batch may be short."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for _, image, label in samples:
        images.append(image)
        labels.append(label)
        if len(images) == size:
            yield np.stack(images), np.asarray(labels, dtype=np.int64)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, dtype=np.int64)


def _to_tensors(images: np.ndarray, labels: np.ndarray, binarize: Binarize, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).reshape(len(images), -1).float().div_(255)
    if binarize == "dynamic":
        # Seeded per batch, so a resumed epoch draws the same pixels as an uninterrupted one.
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
    elif binarize == "threshold":
        x = (x > 0.5).float()
    elif binarize != "none":
        raise DataError(f"binarize must be dynamic, threshold or none, got {binarize!r}")
    return x, torch.from_numpy(labels)


def _split_shards(manifest: Manifest, split: str) -> list[ShardInfo]:
    if split not in manifest.splits:
        raise DataError(f"the dataset has no split {split!r} (it has: {', '.join(manifest.splits)})")
    return manifest.splits[split].shards


def train_batches(
    manifest: Manifest,
    dataset_url: str,
    *,
    split: str = "train",
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_per_rank: int,
    shuffle_buffer: int,
    binarize: Binarize,
    verify: bool = False,
    start_step: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``steps_per_epoch`` batches (x float32 [B, H*W] in [0, 1], labels int64 [B]) on every rank.

    The order is a function of (seed, epoch, world_size, rank). ``start_step`` skips that many
    batches (read, not converted) so a run resumed mid-epoch continues where it stopped.
    Iterate to exhaustion: the final ``next`` reads the (< 1 batch) remainder, so the
    truncation and sha256 checks cover every shard this rank touched.
    """
    shards = _split_shards(manifest, split)
    steps = steps_per_epoch(sum(s.samples for s in shards), world_size, batch_per_rank)
    if not 0 <= start_step <= steps:
        raise DataError(f"start_step {start_step} is outside this epoch's {steps} steps")
    pieces = rank_assignment(shards, epoch=epoch, seed=seed, world_size=world_size, rank=rank)
    samples = _shuffled(
        _read_pieces(manifest, dataset_url, shards, pieces, verify),
        shuffle_buffer,
        np.random.default_rng(_entropy(seed, epoch, rank, _SHUFFLE)),
    )
    batches = _batches(samples, batch_per_rank)
    for step in range(steps):
        images, labels = next(batches, (None, None))
        if images is None or len(images) < batch_per_rank:
            raise DataError(f"rank {rank} ran out of {split} samples at step {step} of {steps}: manifest counts are wrong")
        if step >= start_step:
            yield _to_tensors(images, labels, binarize, _torch_seed(seed, epoch, rank, step, _BINARIZE))
    for _ in samples:  # read the (< 1 batch) remainder too: its shard's truncation and sha256 checks run
        pass


def eval_batches(
    manifest: Manifest,
    dataset_url: str,
    *,
    split: str,
    rank: int,
    world_size: int,
    batch_size: int,
    binarize: Binarize,
    seed: int = 0,
    verify: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of this rank's share of ``split``, in manifest order; the last batch may be short.

    Ranks split the unpermuted concatenation of the shards contiguously, so the union over
    ranks is the whole split exactly once (callers all-reduce sums and counts). Dynamic
    binarization is seeded by (seed, rank, batch index) only, so with a fixed world size
    the validation loss is computed on the same binary images every epoch.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    shards = _split_shards(manifest, split)
    pieces = _range_pieces([s.samples for s in shards], range(len(shards)), world_size, rank)
    samples = _read_pieces(manifest, dataset_url, shards, pieces, verify)
    for index, (images, labels) in enumerate(_batches(samples, batch_size)):
        yield _to_tensors(images, labels, binarize, _torch_seed(seed, rank, index, _EVAL_BINARIZE))
