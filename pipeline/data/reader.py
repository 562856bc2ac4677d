"""Reading one shard: a WebDataset tar streamed through fsspec, decoded safely.

Shards are untrusted. Only the member suffixes the manifest declares are accepted
(anything else, e.g. ``.pyd`` pickles, is refused before it is decoded), ``.npy`` is loaded
with ``allow_pickle=False`` and must match the manifest's shape and dtype, and any read
error is re-raised as a ShardError naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import tarfile
import zlib
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from pipeline.data.errors import ShardError
from pipeline.data.shards import Manifest, ShardInfo, shard_url

# Errors a corrupt shard can raise while it is read; all are re-raised as ShardError.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
_NPY_MAGIC = b"\x93NUMPY"


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
