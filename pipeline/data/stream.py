"""Streaming shards inside one DDP rank: which samples, in what order, decoded how.

Order (training). Each epoch the shards are permuted by (seed, epoch) and, concatenated,
form one sequence of N samples, cut into P contiguous *partitions* (``data.partitions``,
a constant of the run, not of the cluster). Partition v is read in blocks of
``shuffle_buffer`` samples, each block permuted by (seed, epoch, v, block). Global batch t
is the concatenation over v = 0..P-1 of samples [t*b, (t+1)*b) of partition v's stream
(b = global batch / P). Rank r of W serves partitions r*P/W .. (r+1)*P/W - 1, so:

- the samples of every global batch are a pure function of (seed, epoch, P): the same on
  1, 2 or any W dividing P (a run checkpointed on 2 workers resumes on 1 exactly);
- each rank reads ~1/W of the bytes, contiguous shard ranges (partial shards at edges);
- a run resumed at step t skips t*b samples per partition without decoding them
  (whole shards by their manifest counts, whole blocks by their sizes).

Lockstep: every rank yields exactly ``steps_per_epoch`` batches, dropping at most one
batch's worth of leftover samples per partition, so DDP's collective calls never wait
on a rank that has run out of data.

Random transforms (crop, flip: the contract's stage 2) are seeded by (seed, epoch, partition,
position in the partition's stream), so they too are independent of W and exact on resume.
Batches are uint8 [B, C, H, W]: turning pixels into the model's inputs and targets (scaling,
binarization) belongs to the likelihood (pipeline/models/likelihoods.py).

Reading and safe decoding of one shard live in reader.py; the sample contract in contract/.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Iterable, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np
import torch

from pipeline.data.contract import SampleDecoder
from pipeline.data.errors import DataError
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.shards import Manifest, ShardInfo
from pipeline.data.tarsamples import Chunk

Piece = tuple[int, int, int]  # (shard index in the manifest's list, first sample, stop sample)

# Distinct tags keep the random streams (shard order, shuffle buffer, transforms) independent.
_SHUFFLE, _TRANSFORM = 1, 4


def _entropy(*parts: int) -> list[int]:
    # SeedSequence wants non-negative ints; the modulo keeps a negative config seed usable and distinct.
    return [int(p) % 2**64 for p in parts]


def partition_pieces(sizes: Sequence[int], order: Sequence[int], partitions: int,
                     which: Iterable[int] | None = None) -> dict[int, list[Piece]]:
    """Partition v's contiguous share [v*N//P, (v+1)*N//P) of the shards concatenated in ``order``.

    Vectorised (cumulative sums + binary search), so a million shards and a thousand
    partitions cost milliseconds per partition, not a Python loop over every shard.
    """
    if partitions < 1:
        raise DataError(f"partitions must be >= 1, got {partitions}")
    ordered = np.asarray(sizes, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    ends = np.cumsum(ordered)
    starts = ends - ordered
    total = int(ends[-1]) if len(ends) else 0
    result: dict[int, list[Piece]] = {}
    for v in range(partitions) if which is None else which:
        if not 0 <= v < partitions:
            raise DataError(f"partition {v} is not in 0..{partitions - 1}")
        low, high = v * total // partitions, (v + 1) * total // partitions
        first_shard = int(np.searchsorted(ends, low, side="right"))
        stop_shard = int(np.searchsorted(starts, high, side="left"))
        pieces = []
        for j in range(first_shard, stop_shard):
            first, stop = max(low, int(starts[j])), min(high, int(ends[j]))
            if first < stop:
                pieces.append((int(order[j]), first - int(starts[j]), stop - int(starts[j])))
        result[v] = pieces
    return result


def _range_pieces(sizes: Sequence[int], order: Sequence[int], world_size: int, rank: int) -> list[Piece]:
    """Rank ``rank``'s contiguous share of the shards concatenated in ``order``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")
    return partition_pieces(sizes, order, world_size, [rank])[rank]


def shard_layout_warning(num_shards: int, partitions: int) -> str | None:
    """A warning when shards are too few to give every partition whole shards of its own."""
    if num_shards >= partitions:
        return None
    return (f"only {num_shards} shards for {partitions} partitions: several workers read parts of the same "
            "shards (more requests per byte, less shuffling across shards); write more, smaller shards "
            "(`--samples-per-shard`)")


def epoch_order(num_shards: int, *, epoch: int, seed: int) -> np.ndarray:
    """The epoch's shard permutation: a pure function of (seed, epoch)."""
    return np.random.default_rng(_entropy(seed, epoch)).permutation(num_shards)


def rank_assignment(shards: list[ShardInfo], *, epoch: int, seed: int, world_size: int, rank: int) -> list[Piece]:
    """This rank's (shard_index, start_sample, stop_sample) pieces for one epoch; a pure function."""
    return _range_pieces([shard.samples for shard in shards], epoch_order(len(shards), epoch=epoch, seed=seed),
                         world_size, rank)


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


def _skip_pieces(pieces: list[Piece], count: int) -> list[Piece]:
    """The pieces left after the first ``count`` samples: whole shards drop out by their counts."""
    left = []
    for index, start, stop in pieces:
        size = stop - start
        if count >= size:
            count -= size
            continue
        left.append((index, start + count, stop))
        count = 0
    return left


class _Rows:
    """Rows taken in order from a stream of chunks. The next chunk is pulled only when a row of it
    is needed, so shards are opened, checked and skipped at the same point of the epoch as a
    sample-by-sample stream would; the rows themselves are sliced, never handled one by one."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks
        self._chunk: Chunk | None = None
        self._at = 0

    def take(self, count: int) -> list[Chunk]:
        """Up to ``count`` rows, as slices of the chunks they come from (fewer at the stream's end)."""
        parts: list[Chunk] = []
        while count > 0:
            if self._chunk is None or self._at >= len(self._chunk[0]):
                self._chunk, self._at = next(self._chunks, None), 0
                if self._chunk is None:
                    break
            keys, images, labels = self._chunk
            end = min(self._at + count, len(keys))
            parts.append((keys[self._at:end], images[self._at:end], labels[self._at:end]))
            count -= end - self._at
            self._at = end
        return parts

    def drain(self) -> None:
        for _ in self._chunks:
            pass


def _join(parts: list[Chunk]) -> Chunk:
    """One chunk of ``parts`` (at least one); images are C-contiguous and writable, as np.stack made them."""
    if len(parts) == 1:
        keys, images, labels = parts[0]
        if images.flags.c_contiguous and images.flags.writeable:  # e.g. a slice of a permuted block
            return keys, images, labels
        return keys, images.copy(), labels  # a read-only view into a shard's bytes
    return ([key for part in parts for key in part[0]], np.concatenate([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts]))


def _partition_stream(
    manifest: Manifest, dataset_url: str, shards: list[ShardInfo], pieces: list[Piece], *,
    block: int, rng_parts: tuple[int, ...], start: int, needed: int, reader: ShardReader,
) -> Iterator[Chunk]:
    """One partition's samples in block-shuffled order, from position ``start`` on, one chunk per block.

    Blocks of ``block`` consecutive samples are each permuted by rng_parts + (block index,):
    position p's sample is known without reading earlier blocks, so resuming skips them.
    A block is read only when its first sample is needed (read errors surface at that step).
    """
    block = max(block, 1)
    first_block = start // block
    # fill_to: with data.on_corrupt=skip, damaged samples are made up by re-reading good ones, so the
    # partition still fills its steps (lockstep); with "error" it has no effect.
    chunks = reader.read_piece_chunks(manifest, dataset_url, shards, _skip_pieces(pieces, first_block * block),
                                      fill_to=needed - first_block * block)
    if block == 1:  # no shuffling: the samples as read (whole shards on the fast path)
        yield from chunks
        return
    rows = _Rows(chunks)
    skip_in_block = start - first_block * block
    for number in itertools.count(first_block):
        parts = rows.take(block)
        if not parts:
            return
        keys, images, labels = _join(parts)
        order = np.random.default_rng(_entropy(*rng_parts, number, _SHUFFLE)).permutation(len(keys))[skip_in_block:]
        yield [keys[i] for i in order.tolist()], images[order], labels[order]
        skip_in_block = 0


def _batches(chunks: Iterator[Chunk], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(stage-1 images [B, ...], labels [B]); the last batch may be short."""
    rows = _Rows(chunks)
    while parts := rows.take(size):
        _, images, labels = _join(parts)
        yield images, labels


def _split_shards(manifest: Manifest, split: str) -> list[ShardInfo]:
    if split not in manifest.splits:
        raise DataError(f"the dataset has no split {split!r} (it has: {', '.join(manifest.splits)})")
    return manifest.splits[split].shards


class TrainBatch(NamedTuple):
    x: torch.Tensor  # uint8 [B, C, H, W]
    labels: torch.Tensor  # int64 [B]
    keys: list[str]  # sample keys, in batch order (to record what was trained on)


def partitions_of_rank(partitions: int, world_size: int, rank: int) -> range:
    """The partitions rank ``rank`` serves; W must divide P so every rank serves as many."""
    if partitions < 1 or partitions % world_size:
        raise DataError(
            f"data.partitions={partitions} must be a positive multiple of the number of workers ({world_size}); "
            "choose partitions divisible by every worker count you may resume with"
        )
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")
    per_rank = partitions // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


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
    start_step: int = 0,
    partitions: int | None = None,
    reader: ShardReader | None = None,
    options: ReadOptions | None = None,
    decoder: SampleDecoder | None = None,
) -> Iterator[TrainBatch]:
    """Exactly ``steps_per_epoch`` batches on every rank, from ``start_step`` on.

    ``partitions`` defaults to ``world_size``. The batch of rank r at step t is its
    partitions' chunks of global batch t, in partition order; the random crop and flip of
    the sample at position p of partition v are seeded by (seed, epoch, v, p), so they too
    are independent of W. Iterate to exhaustion: the final ``next`` reads the leftover
    samples, so the truncation and sha256 checks cover every shard this rank touched.

    ``reader``: the worker's reader (its options, decoder and stats); without one, ``options`` and
    ``decoder`` make a reader of this call's own.
    """
    reader = ShardReader.given(reader, options, decoder)
    decoder = reader.decoder_for(manifest)
    partitions = partitions or world_size
    mine = partitions_of_rank(partitions, world_size, rank)
    if batch_per_rank % len(mine):
        raise DataError(f"batch per rank {batch_per_rank} must split evenly over this rank's {len(mine)} partitions")
    per_partition = batch_per_rank // len(mine)
    shards = _split_shards(manifest, split)
    steps = steps_per_epoch(sum(s.samples for s in shards), partitions, per_partition)
    if not 0 <= start_step <= steps:
        raise DataError(f"start_step {start_step} is outside this epoch's {steps} steps")
    streams = [
        _Rows(_partition_stream(
            manifest, dataset_url, shards, rank_assignment(shards, epoch=epoch, seed=seed, world_size=partitions, rank=v),
            block=shuffle_buffer, rng_parts=(seed, epoch, v), start=start_step * per_partition,
            needed=steps * per_partition, reader=reader,
        ))
        for v in mine
    ]
    for step in range(start_step, steps):
        xs, labels, keys = [], [], []
        for v, rows in zip(mine, streams):
            parts = rows.take(per_partition)
            if sum(len(part[0]) for part in parts) < per_partition:
                raise DataError(f"partition {v} ran out of {split} samples at step {step} of {steps}: "
                                "manifest counts are wrong")
            chunk_keys, images, chunk_labels = _join(parts)
            first = step * per_partition
            seeds = [_entropy(seed, epoch, v, first + i, _TRANSFORM) for i in range(len(chunk_keys))]
            xs.append(decoder.finish(images, seeds))
            labels.append(chunk_labels)
            keys.extend(chunk_keys)
        # A copy: the rows may view a shard's read-only bytes or a block the stream still holds.
        x = torch.from_numpy(np.concatenate(xs) if len(xs) > 1 else xs[0].copy())
        yield TrainBatch(x, torch.from_numpy(np.concatenate(labels)), keys)
    for rows in streams:  # read the leftovers too: their shards' truncation and sha256 checks run
        rows.drain()


T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterator[T], depth: int, *, pin_memory: bool = False) -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead by one background thread: the same items in the
    same order (one producer, one FIFO queue), so every order guarantee of ``items`` holds.

    An error in ``items`` is raised here at the position it happened. Closing this generator
    (or dropping it) stops the producer at its next item. ``depth`` 0 returns ``items`` as is.
    With ``pin_memory`` (CUDA), a TrainBatch's images are copied to page-locked memory in the
    producer thread, so the loop's ``.to(device, non_blocking=True)`` is an asynchronous copy.
    """
    if depth < 1:
        yield from items
        return
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if pin_memory and isinstance(item, TrainBatch):
                    item = item._replace(x=item.x.pin_memory())  # type: ignore[assignment]
                if not put((item, None)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put((_DONE, err))
            return
        put((_DONE, None))

    thread = threading.Thread(target=produce, name="pipeline-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()


def eval_batches(
    manifest: Manifest,
    dataset_url: str,
    *,
    split: str,
    rank: int,
    world_size: int,
    batch_size: int,
    reader: ShardReader | None = None,
    options: ReadOptions | ShardReader | None = None,
    decoder: SampleDecoder | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of this rank's share of ``split``, in manifest order, as (uint8 [B, C, H, W],
    labels [B]); the last batch may be short. No random transforms: center crops, no flips.

    Ranks split the unpermuted concatenation of the shards contiguously, so the union over
    ranks is the whole split exactly once (callers all-reduce sums and counts).

    ``reader``: the worker's reader (its options, decoder and stats); without one, ``options`` and
    ``decoder`` make a reader of this call's own.
    """
    reader = ShardReader.given(reader, options, decoder)
    decoder = reader.decoder_for(manifest)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    shards = _split_shards(manifest, split)
    pieces = _range_pieces([s.samples for s in shards], range(len(shards)), world_size, rank)
    chunks = reader.read_piece_chunks(manifest, dataset_url, shards, pieces)
    for images, labels in _batches(chunks, batch_size):
        yield torch.from_numpy(np.array(decoder.finish(images, None))), torch.from_numpy(labels.copy())
