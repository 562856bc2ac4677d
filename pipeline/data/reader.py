"""Reading one shard: a WebDataset tar streamed through fsspec, decoded safely.

Shards are untrusted. Only the member suffixes the manifest declares are accepted
(anything else, e.g. ``.pyd`` pickles, is refused before its bytes are read), members larger
than any legitimate sample are refused before they are read, ``.npy`` is loaded with
``allow_pickle=False`` and must match the manifest's shape and dtype, and any read error is
re-raised as a ShardError naming the shard.

Remote shards are read through `remote.RetryingReader` (transient errors retried, counted)
and, when ``cache_dir`` is set, through the local `cache.ShardCache`.

Corruption policy (``on_corrupt``):
- ``"error"`` (default): the first problem raises ShardError naming the shard and the sample.
- ``"skip"``: a bad sample is skipped; a shard that cannot be read further (truncated,
  garbage, unreachable, sha256 mismatch) has its remaining samples skipped. Each skipped
  sample position is counted once per process (`data_health()`), with the shard's first
  problem. Nothing is ever unpickled in either mode. With ``verify`` the shard is hashed
  in full *before* any sample is yielded (from the cache when there is one, else by a
  first pass over the stream), so a tampered shard contributes no samples at all.
"""

from __future__ import annotations

import hashlib
import lzma
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.data.cache import ShardCache
from pipeline.data.contract import SampleDecoder, SampleSpec
from pipeline.data.errors import DataError, ShardError
from pipeline.data.health import DataHealth, data_health, record_skip, reset_data_health  # noqa: F401 - the reader's counts
from pipeline.data.fasttar import _fast_samples, _Recorded
from pipeline.data.remote import RetryPolicy, is_local, is_transient, open_for_reading
from pipeline.data.shards import Manifest, ShardInfo, shard_url

OnCorrupt = Literal["error", "skip"]
Sample = tuple[str, np.ndarray, int]
# Consecutive samples: keys, uint8 images [n, C, H, W] (an object array of [C, H', W'] arrays when
# their sizes differ before a random crop), int64 labels [n].
Chunk = tuple[list[str], np.ndarray, np.ndarray]
Piece = tuple[int, int, int]

# Errors a corrupt shard can raise while it is read; all are re-raised as ShardError.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 4096  # np.save headers are 128 bytes; anything much larger is not ours


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadOptions:
    """How a process reads shards; passed explicitly to every reading function."""

    on_corrupt: OnCorrupt = "error"
    cache_dir: str | None = None
    cache_max_bytes: int = 10 << 30
    retries: int = 5
    retry_backoff_s: float = 0.2
    fast_path: bool = True  # the numpy tar parser for fixed-size .npy shards (False: the reference path)

    @classmethod
    def from_config(cls, data: Any) -> "ReadOptions":
        """From a `pipeline.config.DataConfig`."""
        return cls(on_corrupt=data.on_corrupt, cache_dir=data.cache_dir, cache_max_bytes=data.cache_max_bytes,
                   retries=data.read_retries, retry_backoff_s=data.retry_backoff_s)

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, backoff_s=self.retry_backoff_s)


@lru_cache(maxsize=8)
def _cache(directory: str, max_bytes: int) -> ShardCache:
    return ShardCache(directory, max_bytes)


# --- decoding ------------------------------------------------------------------------------------------


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


def _groups(tar: tarfile.TarFile, url: str, spec: SampleSpec, max_member: int) -> Iterator[tuple[str, dict, ShardError | None]]:
    """(key, {suffix: bytes}, problem) per sample, WebDataset-style: consecutive members sharing a prefix.

    Only the members the contract reads are read; declared-but-ignored members (captions,
    metadata) are passed over unread. An undeclared or oversized member is never read; it
    marks its sample as bad instead.
    """
    declared, wanted = spec.declared, spec.read_members
    refused = f"undeclared member refused (the manifest declares only {sorted(declared)}; never unpickled)"
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    problem: ShardError | None = None
    for info in tar:
        if not info.isfile():
            continue
        prefix, suffix = base_plus_ext(info.name)
        if prefix is None:  # no "key.suffix" shape at all: a sample of its own, refused
            if key is not None:
                yield key, members, problem
                key, members, seen, problem = None, {}, set(), None
            yield info.name, {}, ShardError(url, refused, member=info.name)
            continue
        suffix = suffix.lower()
        if key is not None and (prefix != key or suffix in seen):
            yield key, members, problem
            key, members, seen, problem = None, {}, set(), None
        key = prefix
        seen.add(suffix)
        if suffix not in declared:
            problem = problem or ShardError(url, refused, member=info.name)
        elif suffix not in wanted:
            continue  # declared, never read
        elif info.size > max_member:
            problem = problem or ShardError(url, f"member of {info.size} bytes refused (limit {max_member})",
                                            member=info.name)
        elif problem is None:
            members[suffix] = tar.extractfile(info).read()  # type: ignore[union-attr]
    if key is not None:
        yield key, members, problem


def _as_shard_error(url: str, err: BaseException) -> ShardError:
    if isinstance(err, ShardError):
        return err
    detail = str(err.args[0]).split(" @ ")[0] if err.args else ""  # webdataset appends stream reprs
    return ShardError(url, f"unreadable shard ({type(err).__name__}: {detail})")


_FAST_MAX_BYTES = 256 << 20  # larger shards are streamed (memory: one shard at most)
_MAX_ENCODED_MEMBER = 64 << 20  # an encoded image (or label) member larger than this is refused unread
_DECODE_GROUP = 64  # samples handed to the decoding pool at once (bounds memory to ~64 decoded images)


# --- reading ---------------------------------------------------------------------------------------------


@contextmanager
def _open_shard(url: str, shard: ShardInfo, options: ReadOptions) -> Iterator[tuple[Any, bool]]:
    """(binary stream, already_verified). Remote shards go through the cache when one is configured."""
    if options.cache_dir and not is_local(url):
        cache = _cache(options.cache_dir, options.cache_max_bytes)
        if cache.fits(shard.bytes):
            for attempt in range(2):
                path = cache.fetch(url, shard.sha256, shard.bytes, options.policy)
                try:
                    with open(path, "rb") as local:
                        yield local, bool(shard.sha256)  # the cache checked the sha256 on download
                    return
                except FileNotFoundError:  # evicted by another process between fetch and open
                    if attempt:
                        raise
    with open_for_reading(url, options.policy) as stream:
        yield stream, False


def _hash_whole_shard(url: str, shard: ShardInfo, options: ReadOptions) -> None:
    with _open_shard(url, shard, options) as (stream, verified):
        if verified:
            return
        hasher = _HashingReader(stream)
        while hasher.read(1 << 20):
            pass
    _check_sha256(url, shard, hasher.sha256.hexdigest(), hasher.bytes)


def _check_sha256(url: str, shard: ShardInfo, actual: str, size: int) -> None:
    if actual != shard.sha256:
        raise ShardError(url, f"sha256 mismatch: manifest expects {shard.sha256}, file has {actual} ({size} bytes)")


def _samples(chunks: Iterator[Chunk]) -> Iterator[Sample]:
    for keys, images, labels in chunks:
        for i, key in enumerate(keys):
            yield key, images[i], int(labels[i])


def read_shard(manifest: Manifest, dataset_url: str, shard: ShardInfo, **kwargs: Any) -> Iterator[Sample]:
    """Yield (key, uint8 [C, H, W] image, label) for samples [start, stop) of one shard; see `read_shard_chunks`."""
    return _samples(read_shard_chunks(manifest, dataset_url, shard, **kwargs))


def default_decoder(manifest: Manifest) -> SampleDecoder:
    """The decoder that hands out the stored arrays as they are (fixed-size datasets only)."""
    return SampleDecoder(manifest.spec, dtype=manifest.dtype)


def _stack(images: list[np.ndarray]) -> np.ndarray:
    """[n, C, H, W] when every image has one shape, else an object array of [C, H', W'] arrays."""
    if images and all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    out = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        out[i] = image
    return out


def _fast_chunk(data: bytes, start: int, stop: int, spec: SampleSpec, decoder: SampleDecoder,
                max_member: int) -> Chunk | None:
    """The numpy fast path over a whole plain shard of fixed-size .npy samples, or None."""
    channels, height, width = spec.shape  # type: ignore[misc]
    stored = (height, width) if channels == 1 else (channels, height, width)
    fast = _fast_samples(data, start, stop, stored, decoder.dtype, spec.declared, max_member)
    if fast is None:
        return None
    keys, images, labels = fast
    images = images.reshape(len(images), channels, height, width)
    if not decoder.identity:
        images = _stack([decoder.prepare_array(image) for image in images])
    return keys, images, labels


def read_shard_chunks(
    manifest: Manifest,
    dataset_url: str,
    shard: ShardInfo,
    *,
    start: int = 0,
    stop: int | None = None,
    verify: bool = False,
    on_corrupt: OnCorrupt | None = None,
    options: ReadOptions = ReadOptions(),
    decoder: SampleDecoder | None = None,
) -> Iterator[Chunk]:
    """Samples [start, stop) of one shard as chunks of uint8 [n, C, H, W] images (stage 1 of the
    contract's decoding: see contract.py): all of them in one when the fast path reads the
    shard, else one per group of samples decoded together.

    Samples before ``start`` are skipped without being decoded; reading ends at ``stop``.
    With ``verify=True`` the sha256 of the whole file is checked against the manifest: in
    "error" mode while streaming (the rest of the shard is read after ``stop``, undecoded, and
    the check runs at the shard's end); in "skip" mode before the first sample. ``on_corrupt``
    overrides the options' policy.
    """
    skip = (on_corrupt or options.on_corrupt) == "skip"
    spec = manifest.spec
    decoder = decoder or default_decoder(manifest)
    url = shard_url(dataset_url, shard)
    stop = shard.samples if stop is None else stop
    if start >= stop and not verify:
        return
    if spec.image == "npy" and spec.shape is not None:
        max_member = max(1 << 20, 4 * (_NPY_HEADER_MAX + int(np.prod(spec.shape)) * decoder.dtype.itemsize))
    else:
        max_member = _MAX_ENCODED_MEMBER
    index = 0
    try:
        if verify and skip:
            _hash_whole_shard(url, shard, options)
        with _open_shard(url, shard, options) as (raw, verified):
            check_hash = verify and not verified and not skip
            if options.fast_path and spec.fixed_npy and start < stop and shard.bytes <= _FAST_MAX_BYTES:
                recorded = _Recorded(raw)
                fast = None if recorded.error else _fast_chunk(recorded.data, start, stop, spec, decoder, max_member)
                if fast is not None:
                    yield fast
                    index = stop
                    if check_hash:
                        _check_sha256(url, shard, hashlib.sha256(recorded.data).hexdigest(), len(recorded.data))
                    return
                raw = recorded  # the reference path below, over the same bytes (and the same read error)
            stream = _HashingReader(raw) if check_hash else raw
            if start < stop:
                pending: list[tuple[int, str, dict, ShardError | None]] = []
                # Groups handed to the decoding pool, oldest first: with a pool, at most two, so it decodes one
                # group while this thread reads the next from the tar (else the pool idles during every read).
                in_flight: list[tuple[list, Callable[[], list]]] = []

                def submit() -> None:
                    group = pending[:]
                    pending.clear()  # first: a flush after an error never hands out a sample twice
                    in_flight.append((group, decoder.start_decoding([(k, m) for _, k, m, p in group if p is None], url)))

                def flushed() -> Iterator[Chunk]:
                    """Every sample read so far, decoded, in order."""
                    if pending:
                        submit()
                    while in_flight:
                        yield from decoded()

                def decoded() -> Iterator[Chunk]:
                    """The oldest submitted group decoded (in the pool), in order; skips recorded, errors raised."""
                    group, collect = in_flight.pop(0)
                    results = collect()
                    results.reverse()
                    keys, images, labels = [], [], []
                    for position, key, _, problem in group:
                        result = problem if problem is not None else results.pop()
                        if isinstance(result, ShardError):
                            if keys:  # the good samples before the bad one come first
                                yield keys, _stack(images), np.array(labels, np.int64)
                                keys, images, labels = [], [], []
                            if not skip:
                                raise result
                            record_skip(url, shard.samples, position, position + 1, str(result))
                            continue
                        keys.append(key)
                        images.append(result[0])
                        labels.append(result[1])
                    if keys:
                        yield keys, _stack(images), np.array(labels, np.int64)

                try:
                    with tarfile.open(fileobj=stream, mode="r|*") as tar:
                        for key, members, problem in _groups(tar, url, spec, max_member):
                            if index >= start:
                                pending.append((index, key, members, problem))
                                if len(pending) >= _DECODE_GROUP:
                                    submit()
                                    if len(in_flight) > (decoder.workers > 1):  # one thread: no lookahead
                                        yield from decoded()
                            index += 1
                            if index >= stop:
                                break
                except Exception:
                    yield from flushed()  # the samples read before the damage are good: not lost with the rest
                    raise
                yield from flushed()
                if index < stop:  # tarfile ends quietly when a shard is cut at a member boundary
                    raise ShardError(url, f"truncated: ended after {index} samples, the manifest says {shard.samples}")
            if check_hash:
                while stream.read(1 << 20):
                    pass
                _check_sha256(url, shard, stream.sha256.hexdigest(), stream.bytes)
    except Exception as err:  # noqa: BLE001 - filtered on the next line
        if not isinstance(err, (ShardError, *_READ_ERRORS)) and not is_transient(err):
            raise  # a bug, not a bad shard
        # e.g. botocore's HTTPClientError once retries are exhausted: not an OSError, still the shard's problem
        error = _as_shard_error(url, err)
        if not skip:
            if error is err:
                raise
            raise error from err
        record_skip(url, shard.samples, max(index, start), stop, str(error))


def read_pieces(manifest: Manifest, dataset_url: str, shards: Sequence[ShardInfo], pieces: Sequence[Piece],
                **kwargs: Any) -> Iterator[Sample]:
    """Sample by sample, what `read_piece_chunks` reads."""
    return _samples(read_piece_chunks(manifest, dataset_url, shards, pieces, **kwargs))


def read_piece_chunks(
    manifest: Manifest,
    dataset_url: str,
    shards: Sequence[ShardInfo],
    pieces: Sequence[Piece],
    *,
    verify: bool = False,
    on_corrupt: OnCorrupt | None = None,
    options: ReadOptions = ReadOptions(),
    decoder: SampleDecoder | None = None,
    fill_to: int | None = None,
) -> Iterator[Chunk]:
    """The samples of (shard_index, start, stop) ``pieces`` in order, then, when samples were
    skipped, a refill that keeps lockstep; as chunks (see `read_shard_chunks`).

    With on_corrupt="skip" and ``fill_to`` set: if the first pass yields fewer than ``fill_to``
    good samples, the same pieces are read again from the start (same order, same good
    samples) until ``fill_to`` have been yielded, so a rank with damaged data still fills its
    ``steps_per_epoch`` batches and no rank waits at a DDP collective. The repeats are the
    price: at most as many as were skipped. A rank with no readable sample at all raises.
    """
    policy = on_corrupt or options.on_corrupt
    decoder = decoder or default_decoder(manifest)

    def one_pass() -> Iterator[Chunk]:
        for index, start, stop in pieces:
            yield from read_shard_chunks(manifest, dataset_url, shards[index], start=start, stop=stop, verify=verify,
                                         on_corrupt=policy, options=options, decoder=decoder)

    produced = 0
    for chunk in one_pass():
        produced += len(chunk[0])
        yield chunk
    if fill_to is None or policy != "skip" or produced >= fill_to:
        return
    if produced == 0:
        raise DataError(f"no readable sample in this rank's {len(pieces)} shard pieces: every one was skipped "
                        f"({len(data_health().skipped_shards)} damaged shards so far)")
    while produced < fill_to:
        for keys, images, labels in one_pass():
            take = min(len(keys), fill_to - produced)
            yield keys[:take], images[:take], labels[:take]
            produced += take
            if produced >= fill_to:
                return
