"""Streaming shards inside one DDP rank: which samples, in what order, decoded how.

Assignment: each epoch the shards are permuted by (seed, epoch); the permuted shards,
concatenated, form one sequence of N samples, and rank r reads the contiguous range
[r*N//W, (r+1)*N//W) of it, so each rank reads ~1/W of the bytes (partial shards at the
edges) and every sample is seen exactly once per epoch.

Lockstep: every rank yields exactly ``steps_per_epoch`` batches, dropping at most
``batch_per_rank`` leftover samples, so DDP's collective calls never wait on a rank
that has run out of data.

Safety: shards are untrusted. Only the member suffixes the manifest declares are
accepted (anything else, e.g. ``.pyd`` pickles, is refused before it is decoded),
``.npy`` is loaded with ``allow_pickle=False`` and must match the manifest's shape and
dtype, and any read error is re-raised as a ShardError naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import tarfile
import zlib
from typing import Any, Iterable, Iterator, Literal, Sequence

import fsspec
import numpy as np
import torch
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from pipeline.data.errors import DataError, ShardError
from pipeline.data.shards import Manifest, ShardInfo, shard_url

Piece = tuple[int, int, int]  # (shard index in the manifest's list, first sample, stop sample)
Binarize = Literal["dynamic", "threshold", "none"]

# Distinct tags keep the random streams (shard order, shuffle buffer, binarization) independent.
_SHUFFLE, _BINARIZE, _EVAL_BINARIZE = 1, 2, 3
# Errors a corrupt shard can raise while it is read; all are re-raised as ShardError.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
_NPY_MAGIC = b"\x93NUMPY"


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


class _HashingReader:
    """Read-through wrapper that hashes every byte it hands to tarfile (for verify=True)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def _declared_members_only(files: Iterable[dict[str, Any]], url: str, declared: set[str]) -> Iterator[dict[str, Any]]:
    """Refuse any tar member whose suffix the manifest does not declare, before it is grouped or decoded."""
    for member in files:
        prefix, suffix = base_plus_ext(member["fname"])
        if prefix is None or suffix.lower() not in declared:
            raise ShardError(
                url, f"undeclared member refused (the manifest declares only {sorted(declared)}; never unpickled)",
                member=member["fname"],
            )
        yield member


def _decode(sample: dict[str, Any], url: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[str, np.ndarray, int]:
    key = sample["__key__"]
    for suffix in ("npy", "cls"):
        if suffix not in sample:
            raise ShardError(url, f"sample has no .{suffix} member", key=key)
    if not sample["npy"].startswith(_NPY_MAGIC):  # np.load would otherwise also accept zip (npz) archives
        raise ShardError(url, "not an .npy array", member=f"{key}.npy")
    try:
        image = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardError(url, f"undecodable .npy ({err})", member=f"{key}.npy") from None
    if image.shape != shape or image.dtype != dtype:
        raise ShardError(
            url, f"image is {image.dtype} {list(image.shape)}, the manifest declares {dtype} {list(shape)}", key=key
        )
    text = sample["cls"].strip()
    if not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())):
        raise ShardError(url, f"label {sample['cls'][:20]!r} is not an ASCII integer", member=f"{key}.cls")
    return key, image, int(text)


def read_shard(
    manifest: Manifest,
    dataset_url: str,
    shard: ShardInfo,
    *,
    start: int = 0,
    stop: int | None = None,
    verify: bool = False,
) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield (key, uint8 image, label) for samples [start, stop) of one shard.

    Samples before ``start`` are skipped without being decoded; reading ends at ``stop``.
    With ``verify=True`` the rest of the shard is read after ``stop`` (no decoding) so the
    sha256, computed while streaming, covers the whole file; it is checked at the shard's
    end, after the samples have been yielded, against the manifest.
    """
    url = shard_url(dataset_url, shard)
    stop = shard.samples if stop is None else stop
    shape, dtype = tuple(manifest.image_shape), np.dtype(manifest.dtype)
    try:
        with fsspec.open(url, "rb") as raw:
            reader = _HashingReader(raw)
            index = 0
            if start < stop:
                files = tar_file_expander([{"url": url, "stream": reader}], eof_value=None)
                samples = group_by_keys(_declared_members_only(files, url, set(manifest.keys)))
                for sample in samples:
                    if index >= start:
                        yield _decode(sample, url, shape, dtype)
                    index += 1
                    if index >= stop:
                        break
                samples.close()
                if index < stop:  # tarfile ends quietly when a shard is cut at a member boundary
                    raise ShardError(url, f"truncated: ended after {index} samples, the manifest says {shard.samples}")
            if verify:
                while reader.read(1 << 20):
                    pass
                actual = reader.sha256.hexdigest()
                if actual != shard.sha256:
                    raise ShardError(
                        url, f"sha256 mismatch: manifest expects {shard.sha256}, file has {actual} ({reader.bytes} bytes)"
                    )
    except ShardError:
        raise
    except _READ_ERRORS as err:
        detail = str(err.args[0]).split(" @ ")[0] if err.args else ""  # webdataset appends stream reprs
        raise ShardError(url, f"unreadable shard ({type(err).__name__}: {detail})") from err


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
