"""Reading shards: a `ShardReader` per worker, built from `ReadOptions` and a `SampleDecoder`, owning its `ReadStats`.

Shards are untrusted. Only the member suffixes the manifest declares are accepted
(anything else, e.g. ``.pyd`` pickles, is refused before its bytes are read), members larger
than any legitimate sample are refused before they are read, ``.npy`` is loaded with
``allow_pickle=False`` and must match the manifest's shape and dtype, and any read error is
re-raised as a ShardError naming the shard (the member rules: tarsamples.py).

Remote shards are read through `remote.RetryingReader` (transient errors retried, counted in
the reader's stats) and, when ``cache_dir`` is set, through the local `cache.ShardCache`.

Corruption policy (``on_corrupt``):
- ``"error"`` (default): the first problem raises ShardError naming the shard and the sample.
- ``"skip"``: a bad sample is skipped; a shard that cannot be read further (truncated,
  garbage, unreachable, sha256 mismatch) has its remaining samples skipped. Each skipped
  sample position is counted once per reader (`ReadStats`), with the shard's first
  problem. Nothing is ever unpickled in either mode. With ``verify`` the shard is hashed
  in full *before* any sample is yielded (from the cache when there is one, else by a
  first pass over the stream), so a tampered shard contributes no samples at all.
"""

from __future__ import annotations

import hashlib
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from pipeline.data.cache import ShardCache
from pipeline.data.contract import SampleDecoder, SampleSpec
from pipeline.data.errors import DataError, ShardError
from pipeline.data.fasttar import _Recorded
from pipeline.data.remote import is_local, is_transient, open_for_reading
from pipeline.data.shards import Manifest, ShardInfo, shard_url
from pipeline.data.stats import ReadStats
from pipeline.data.tarsamples import (READ_ERRORS, Chunk, HashingReader, as_shard_error, check_sha256, fast_chunk,
                                      group_members, max_member_bytes, stack)
from pipeline.data.retry import RetryPolicy

OnCorrupt = Literal["error", "skip"]
Sample = tuple[str, np.ndarray, int]
Piece = tuple[int, int, int]

_FAST_MAX_BYTES = 256 << 20  # larger shards are streamed (memory: one shard at most)
_DECODE_GROUP = 64  # samples handed to the decoding pool at once (bounds memory to ~64 decoded images)


@dataclass(frozen=True)
class ReadOptions:
    """How a reader reads shards."""

    on_corrupt: OnCorrupt = "error"
    verify: bool = False  # check each shard's sha256 against the manifest (see `ShardReader.read_shard_chunks`)
    cache_dir: str | None = None
    cache_max_bytes: int = 10 << 30
    retries: int = 5
    retry_backoff_s: float = 0.2
    fast_path: bool = True  # the numpy tar parser for fixed-size .npy shards (False: the reference path)

    @classmethod
    def from_config(cls, data: Any) -> "ReadOptions":
        """From a `pipeline.config.DataConfig`. ``verify`` stays off: ``data.verify`` is the training
        stream's (`ShardReader.with_options(verify=...)`); validation, previews and evaluation read unverified."""
        return cls(on_corrupt=data.on_corrupt, cache_dir=data.cache_dir, cache_max_bytes=data.cache_max_bytes,
                   retries=data.read_retries, retry_backoff_s=data.retry_backoff_s)

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, backoff_s=self.retry_backoff_s)


def default_decoder(manifest: Manifest) -> SampleDecoder:
    """The decoder that hands out the stored arrays as they are (fixed-size datasets only)."""
    return SampleDecoder(manifest.spec, dtype=manifest.dtype)


def _samples(chunks: Iterator[Chunk]) -> Iterator[Sample]:
    for keys, images, labels in chunks:
        for i, key in enumerate(keys):
            yield key, images[i], int(labels[i])


@dataclass
class _ShardRead:
    """One read of samples [start, stop) of one shard, and how far it got: ``index`` is the position
    in the shard of the next sample (where, in "skip" mode, the samples a failure loses begin)."""

    url: str
    shard: ShardInfo
    spec: SampleSpec
    decoder: SampleDecoder
    max_member: int
    start: int
    stop: int
    skip: bool  # on_corrupt="skip"
    stats: ReadStats
    index: int = 0

    def bad_sample(self, position: int, error: ShardError) -> None:
        """A sample the contract refused: raised in "error" mode, counted as skipped in "skip" mode."""
        if not self.skip:
            raise error
        self.stats.record_skip(self.url, self.shard.samples, position, position + 1, str(error))


class _DecodeQueue:
    """Samples read from a shard's tar stream, decoded in groups in the decoder's pool, handed out in order.

    Groups handed to the decoding pool, oldest first: with a pool, at most two, so it decodes one
    group while this thread reads the next from the tar (else the pool idles during every read)."""

    def __init__(self, read: _ShardRead) -> None:
        self.read = read
        self.pending: list[tuple[int, str, dict, ShardError | None]] = []
        self.in_flight: list[tuple[list, Callable[[], list]]] = []

    def add(self, position: int, key: str, members: dict, problem: ShardError | None) -> Iterator[Chunk]:
        """Queue one sample; once a group is full, hand it to the pool and yield the oldest decoded group."""
        self.pending.append((position, key, members, problem))
        if len(self.pending) >= _DECODE_GROUP:
            self._submit()
            if len(self.in_flight) > (self.read.decoder.workers > 1):  # one thread: no lookahead
                yield from self._decoded()

    def flushed(self) -> Iterator[Chunk]:
        """Every sample read so far, decoded, in order."""
        if self.pending:
            self._submit()
        while self.in_flight:
            yield from self._decoded()

    def _submit(self) -> None:
        group = self.pending[:]
        self.pending.clear()  # first: a flush after an error never hands out a sample twice
        self.in_flight.append((group, self.read.decoder.start_decoding(
            [(k, m) for _, k, m, p in group if p is None], self.read.url)))

    def _decoded(self) -> Iterator[Chunk]:
        """The oldest submitted group decoded (in the pool), in order; skips recorded, errors raised."""
        group, collect = self.in_flight.pop(0)
        results = collect()
        results.reverse()
        keys, images, labels = [], [], []
        for position, key, _, problem in group:
            result = problem if problem is not None else results.pop()
            if isinstance(result, ShardError):
                if keys:  # the good samples before the bad one come first
                    yield keys, stack(images), np.array(labels, np.int64)
                    keys, images, labels = [], [], []
                self.read.bad_sample(position, result)
                continue
            keys.append(key)
            images.append(result[0])
            labels.append(result[1])
        if keys:
            yield keys, stack(images), np.array(labels, np.int64)


def _read_tar(stream: Any, read: _ShardRead) -> Iterator[Chunk]:
    """Samples [start, stop) from a shard's tar stream (the reference path): each sample's members
    grouped and checked, those before ``start`` passed over undecoded, the rest decoded in groups."""
    queue = _DecodeQueue(read)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for key, members, problem in group_members(tar, read.url, read.spec, read.max_member):
                if read.index >= read.start:
                    yield from queue.add(read.index, key, members, problem)
                read.index += 1
                if read.index >= read.stop:
                    break
    except Exception:
        yield from queue.flushed()  # the samples read before the damage are good: not lost with the rest
        raise
    yield from queue.flushed()
    if read.index < read.stop:  # tarfile ends quietly when a shard is cut at a member boundary
        raise ShardError(read.url, f"truncated: ended after {read.index} samples, "
                                   f"the manifest says {read.shard.samples}")


class ShardReader:
    """One worker's shard reader: how it reads (``options``), how it decodes (``decoder``; None: each
    manifest's stored arrays as they are) and what its reads skipped, retried and took from the
    cache (``stats``, cumulative)."""

    def __init__(self, options: ReadOptions = ReadOptions(), decoder: SampleDecoder | None = None, *,
                 stats: ReadStats | None = None) -> None:
        self.options = options
        self.decoder = decoder
        self.stats = ReadStats() if stats is None else stats
        self._cache: ShardCache | None = None

    @classmethod
    def given(cls, reader: "ShardReader | None", options: "ReadOptions | ShardReader | None" = None,
              decoder: SampleDecoder | None = None) -> "ShardReader":
        """``reader``, or else a reader of the call's own from ``options`` and ``decoder`` (a reading
        function's arguments: a worker passes its reader, a one-off caller just options)."""
        if isinstance(options, ShardReader):  # a worker's reader handed on under the older name (train/validate.py)
            reader, options = options, None
        if reader is None:
            return cls(options or ReadOptions(), decoder)
        if options is not None or decoder not in (None, reader.decoder):
            raise TypeError("pass a reader, or options and a decoder for a reader of the call's own: not both")
        return reader

    def with_options(self, **changes: Any) -> "ShardReader":
        """This reader (same decoder, same stats) under changed options, e.g. ``verify=True``."""
        return ShardReader(replace(self.options, **changes), self.decoder, stats=self.stats)

    def decoder_for(self, manifest: Manifest) -> SampleDecoder:
        return self.decoder or default_decoder(manifest)

    # --- opening ----------------------------------------------------------------------------------------

    @contextmanager
    def _open_shard(self, url: str, shard: ShardInfo) -> Iterator[tuple[Any, bool]]:
        """(binary stream, already_verified). Remote shards go through the cache when one is configured."""
        options = self.options
        if options.cache_dir and not is_local(url):
            if self._cache is None:
                self._cache = ShardCache(options.cache_dir, options.cache_max_bytes, self.stats)
            cache = self._cache
            if cache.fits(shard.bytes):
                entry = str(cache.entry_path(url, shard.sha256, shard.bytes))

                def fetch_and_open() -> Any:
                    return open(cache.fetch(url, shard.sha256, shard.bytes, options.policy), "rb")

                def evicted(err: BaseException) -> bool:  # by another process between fetch and open
                    return isinstance(err, FileNotFoundError) and err.filename == entry

                once_more = RetryPolicy(retries=1, backoff_s=0.0, jitter=False)  # fetched again, at once
                with once_more.retrying(when=evicted)(fetch_and_open) as local:
                    yield local, bool(shard.sha256)  # the cache checked the sha256 on download
                return
        with open_for_reading(url, options.policy, on_retry=self.stats.count_retry) as stream:
            yield stream, False

    def _hash_whole_shard(self, url: str, shard: ShardInfo) -> None:
        with self._open_shard(url, shard) as (stream, verified):
            if verified:
                return
            hasher = HashingReader(stream)
            while hasher.read(1 << 20):
                pass
        check_sha256(url, shard, hasher.sha256.hexdigest(), hasher.bytes)

    # --- one shard ----------------------------------------------------------------------------------------

    def read_shard(self, manifest: Manifest, dataset_url: str, shard: ShardInfo, *, start: int = 0,
                   stop: int | None = None) -> Iterator[Sample]:
        """Yield (key, uint8 [C, H, W] image, label) for samples [start, stop) of one shard; see `read_shard_chunks`."""
        return _samples(self.read_shard_chunks(manifest, dataset_url, shard, start=start, stop=stop))

    def read_shard_chunks(self, manifest: Manifest, dataset_url: str, shard: ShardInfo, *, start: int = 0,
                          stop: int | None = None) -> Iterator[Chunk]:
        """Samples [start, stop) of one shard as chunks of uint8 [n, C, H, W] images (stage 1 of the
        contract's decoding: see pipeline/data/contract): all of them in one when the fast path reads the
        shard, else one per group of samples decoded together.

        Samples before ``start`` are skipped without being decoded; reading ends at ``stop``.
        With ``options.verify`` the sha256 of the whole file is checked against the manifest: in
        "error" mode while streaming (the rest of the shard is read after ``stop``, undecoded, and
        the check runs at the shard's end); in "skip" mode before the first sample.
        """
        options = self.options
        verify, skip = options.verify, options.on_corrupt == "skip"
        decoder = self.decoder_for(manifest)
        url = shard_url(dataset_url, shard)
        stop = shard.samples if stop is None else stop
        if start >= stop and not verify:
            return
        read = _ShardRead(url, shard, manifest.spec, decoder, max_member_bytes(manifest.spec, decoder), start, stop,
                          skip, self.stats)
        try:
            if verify and skip:
                self._hash_whole_shard(url, shard)
            with self._open_shard(url, shard) as (raw, verified):
                yield from self._read_opened(raw, read, check_hash=verify and not verified and not skip)
        except Exception as err:  # noqa: BLE001 - filtered on the next line
            if not isinstance(err, (ShardError, *READ_ERRORS)) and not is_transient(err):
                raise  # a bug, not a bad shard
            # e.g. botocore's HTTPClientError once retries are exhausted: not an OSError, still the shard's problem
            error = as_shard_error(url, err)
            if not skip:
                if error is err:
                    raise
                raise error from err
            self.stats.record_skip(url, shard.samples, max(read.index, start), stop, str(error))

    def _read_opened(self, raw: Any, read: _ShardRead, *, check_hash: bool) -> Iterator[Chunk]:
        """The samples of an opened shard, by the fast path when it reads the shard, else by the tar
        stream; with ``check_hash``, the rest of the file is read after them and its sha256 checked."""
        spec = read.spec
        if self.options.fast_path and spec.fixed_npy and read.start < read.stop and read.shard.bytes <= _FAST_MAX_BYTES:
            recorded = _Recorded(raw)
            fast = None if recorded.error else fast_chunk(recorded.data, read.start, read.stop, spec, read.decoder,
                                                          read.max_member)
            if fast is not None:
                yield fast
                read.index = read.stop
                if check_hash:
                    check_sha256(read.url, read.shard, hashlib.sha256(recorded.data).hexdigest(), len(recorded.data))
                return
            raw = recorded  # the reference path below, over the same bytes (and the same read error)
        stream = HashingReader(raw) if check_hash else raw
        if read.start < read.stop:
            yield from _read_tar(stream, read)
        if check_hash:
            while stream.read(1 << 20):
                pass
            check_sha256(read.url, read.shard, stream.sha256.hexdigest(), stream.bytes)

    # --- pieces of shards -----------------------------------------------------------------------------------

    def read_pieces(self, manifest: Manifest, dataset_url: str, shards: Sequence[ShardInfo], pieces: Sequence[Piece],
                    *, fill_to: int | None = None) -> Iterator[Sample]:
        """Sample by sample, what `read_piece_chunks` reads."""
        return _samples(self.read_piece_chunks(manifest, dataset_url, shards, pieces, fill_to=fill_to))

    def read_piece_chunks(self, manifest: Manifest, dataset_url: str, shards: Sequence[ShardInfo],
                          pieces: Sequence[Piece], *, fill_to: int | None = None) -> Iterator[Chunk]:
        """The samples of (shard_index, start, stop) ``pieces`` in order, then, when samples were
        skipped, a refill that keeps lockstep; as chunks (see `read_shard_chunks`).

        With on_corrupt="skip" and ``fill_to`` set: if the first pass yields fewer than ``fill_to``
        good samples, the same pieces are read again from the start (same order, same good
        samples) until ``fill_to`` have been yielded, so a rank with damaged data still fills its
        ``steps_per_epoch`` batches and no rank waits at a DDP collective. The repeats are the
        price: at most as many as were skipped. A rank with no readable sample at all raises.
        """
        def one_pass() -> Iterator[Chunk]:
            for index, start, stop in pieces:
                yield from self.read_shard_chunks(manifest, dataset_url, shards[index], start=start, stop=stop)

        produced = 0
        for chunk in one_pass():
            produced += len(chunk[0])
            yield chunk
        if fill_to is None or self.options.on_corrupt != "skip" or produced >= fill_to:
            return
        if produced == 0:
            raise DataError(f"no readable sample in this rank's {len(pieces)} shard pieces: every one was skipped "
                            f"({len(self.stats.skipped_shards)} damaged shards so far)")
        while produced < fill_to:
            for keys, images, labels in one_pass():
                take = min(len(keys), fill_to - produced)
                yield keys[:take], images[:take], labels[:take]
                produced += take
                if produced >= fill_to:
                    return
