"""A shard's tar stream as samples: the member rules every reader of shards follows.

- `group_members`: WebDataset's grouping (consecutive members sharing a key, split by webdataset's own
  `base_plus_ext`), reading only the members the contract reads; an undeclared (e.g. ``.pyd``
  pickle) or oversized member is refused unread and marks its sample as bad;
- `HashingReader`: the sha256 of every byte handed on, for checks against the manifest;
- `fast_chunk`: the numpy fast path (`fasttar.py`) over a whole plain shard of fixed-size ``.npy``
  samples; `stack`: decoded images as one chunk.

`reader.py` applies them with a reader's options (corruption policy, verification, cache).
"""

from __future__ import annotations

import hashlib
import lzma
import tarfile
import zlib
from typing import Any, Iterator

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.data.contract import NPY_HEADER_MAX, SampleDecoder, SampleSpec
from pipeline.data.errors import ShardError
from pipeline.data.fasttar import _fast_samples
from pipeline.data.shards import ShardInfo

# Consecutive samples: keys, uint8 images [n, C, H, W] (an object array of [C, H', W'] arrays when
# their sizes differ before a random crop), int64 labels [n].
Chunk = tuple[list[str], np.ndarray, np.ndarray]

# Errors a corrupt shard can raise while it is read; all are re-raised as ShardError.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
MAX_ENCODED_MEMBER = 64 << 20  # an encoded image (or label) member larger than this is refused unread


def max_member_bytes(spec: SampleSpec, decoder: SampleDecoder) -> int:
    """The largest member a sample of ``spec`` may have; a larger one is refused unread."""
    if spec.image == "npy" and spec.shape is not None:
        return max(1 << 20, 4 * (NPY_HEADER_MAX + int(np.prod(spec.shape)) * decoder.dtype.itemsize))
    return MAX_ENCODED_MEMBER


class HashingReader:
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


def group_members(tar: tarfile.TarFile, url: str, spec: SampleSpec,
                  max_member: int) -> Iterator[tuple[str, dict, ShardError | None]]:
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


def as_shard_error(url: str, err: BaseException) -> ShardError:
    if isinstance(err, ShardError):
        return err
    detail = str(err.args[0]).split(" @ ")[0] if err.args else ""  # webdataset appends stream reprs
    return ShardError(url, f"unreadable shard ({type(err).__name__}: {detail})")


def check_sha256(url: str, shard: ShardInfo, actual: str, size: int) -> None:
    if actual != shard.sha256:
        raise ShardError(url, f"sha256 mismatch: manifest expects {shard.sha256}, file has {actual} ({size} bytes)")


def stack(images: list[np.ndarray]) -> np.ndarray:
    """[n, C, H, W] when every image has one shape, else an object array of [C, H', W'] arrays."""
    if images and all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    out = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        out[i] = image
    return out


def fast_chunk(data: bytes, start: int, stop: int, spec: SampleSpec, decoder: SampleDecoder,
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
        images = stack([decoder.prepare_array(image) for image in images])
    return keys, images, labels
