"""WebDataset tar shards plus a manifest.json, written and read through fsspec.

Layout of a dataset folder (local path, file://, memory://, s3://, gs://):

    manifest.json            written last: its presence means the dataset is complete
    train-00000.tar ...      one tar per ``samples_per_shard`` samples of a split
    val-00000.tar ...

What a sample holds is the manifest's `contract.SampleSpec` (format 2); a format-1 manifest
implies two members per sample, ``{key}.npy`` (``np.save`` of the uint8 H x W image) and
``{key}.cls`` (the label as ASCII decimal). Shard paths are relative to the manifest's folder,
or absolute URLs when `pipeline data index` adopted shards that live elsewhere. Datasets are
written through pipeline/data/writer.py (shard names, resumable tasks, the manifest last).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import contextlib
from datetime import datetime, timezone
from typing import Any, BinaryIO, Callable, Iterable, Literal

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.data.contract import UNSAFE, SampleSpec, encode_image, v1_spec
from pipeline.data.errors import DataError

MANIFEST_NAME = "manifest.json"
# Keys a shard may ever declare: formats that decode without running code. Pickle-based
# suffixes (pyd, pickle, pkl, pth) can never be declared, whatever a manifest says.
SAFE_KEYS = frozenset({"npy", "cls", "png", "json"})  # format 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Model):
    path: str  # relative to the manifest's folder, or an absolute URL (shards adopted where they are)
    samples: int
    bytes: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _stays_inside_dataset(cls, path: str) -> str:
        # A manifest is untrusted input too: a relative path must not climb out of its folder
        # (an absolute URL names its shard outright, as `pipeline data index --out ELSEWHERE` writes).
        if not path or ".." in path.split("/") or (path.startswith("/") and "://" not in path):
            raise ValueError(f"shard path {path!r} must be relative to the manifest (without '..') or a URL")
        return path


class SplitInfo(_Model):
    samples: int
    shards: list[ShardInfo]

    @model_validator(mode="after")
    def _counts_agree(self) -> "SplitInfo":
        # Readers size epochs from these counts; a disagreement would break the lockstep rule.
        if self.samples != sum(shard.samples for shard in self.shards):
            raise ValueError(f"split has samples={self.samples} but its shards hold {sum(s.samples for s in self.shards)}")
        return self


class TokenInfo(_Model):
    """A token dataset's provenance and layout (`pipeline encode`, pipeline/encode.py): each sample's
    ``.npy`` is the posterior mode of a categorical latent as uint16 class indices in [0, categories)."""

    run_id: str  # the MLflow run whose model wrote the tokens
    model_version: str  # "models:/<name>/<version>" when the run's model is registered, else "runs:/<run_id>"
    source: str  # URL of the encoded dataset
    source_sha256: str  # its manifest's digest()
    categories: int  # K
    grid: list[int] | None = None  # [h, w] of a grid latent (arch resnet); None: N flat variables
    shape: list[int]  # the stored array: [h, w] for a grid, [N] otherwise
    image_shape: list[int]  # [C, H, W] the model reads and its decoder renders


class Manifest(_Model):
    format_version: Literal[1, 2] = 2
    source: str
    image_shape: list[int] | None = None  # format 1: [H, W]; format 2: stored [C, H, W] (None: varies)
    dtype: Literal["uint8", "uint16"] = "uint8"  # uint16: token shards only (``tokens`` set)
    keys: list[str] = ["npy", "cls"]  # every member suffix a sample may carry
    sample: SampleSpec | None = None  # format 2: the sample contract
    tokens: TokenInfo | None = None  # token datasets (`pipeline encode`) only
    splits: dict[str, SplitInfo]
    created: str  # ISO 8601, UTC

    @model_validator(mode="before")
    @classmethod
    def _version(cls, values: Any) -> Any:
        # A manifest that names no version is format 2 when it carries a sample spec, else format 1.
        if isinstance(values, dict) and "format_version" not in values:
            values = {**values, "format_version": 2 if values.get("sample") else 1}
        return values

    @model_validator(mode="after")
    def _contract(self) -> "Manifest":
        if self.format_version == 1:
            if self.sample is not None or not self.image_shape:
                raise ValueError("a format-1 manifest has image_shape and no sample spec")
            unsafe = sorted(set(self.keys) - SAFE_KEYS)
        else:
            if self.sample is None:
                raise ValueError("a format-2 manifest needs a 'sample' spec")
            unsafe = sorted(set(self.keys) - self.sample.declared | set(self.keys) & UNSAFE)
        if unsafe:
            raise ValueError(f"keys {unsafe} are not allowed (declared: {sorted(self.spec.declared)}; never pickles)")
        return self

    @model_validator(mode="after")
    def _tokens_are_uint16(self) -> "Manifest":
        # uint16 arrays are token grids, never images: image readers refuse them (contract: uint8 npy).
        if (self.dtype == "uint16") != (self.tokens is not None) or (self.tokens and self.spec.image != "npy"):
            raise ValueError("dtype uint16 is for token datasets: it needs a 'tokens' section and .npy samples")
        return self

    @property
    def spec(self) -> SampleSpec:
        """The sample contract (format 1 manifests imply grey .npy + .cls)."""
        return self.sample if self.sample is not None else v1_spec(self.image_shape or [])

    def digest(self) -> str:
        """sha256 of the canonical JSON: the dataset version tag.

        ``created`` is left out, so rewriting the same data gives the same tag; the shards'
        own sha256 values are in, so any change to any sample changes the tag. Unset fields
        (None) are left out too, so a format-1 manifest keeps the tag it always had.
        """
        canonical = json.dumps(self.model_dump(exclude={"created"}, exclude_none=True), sort_keys=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class _HashingWriter:
    """Write-through file wrapper that hashes and counts bytes, so a shard is never held in memory."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        self.inner.write(data)
        return len(data)


def _member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a member with mode 0444, mtime 0, uid/gid 0 and
    no user names, built directly: tarfile's TarInfo costs ~0.15 ms a member, more than encoding a
    small sample (tests/test_encode.py checks the bytes are tarfile's)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100:  # tarfile splits long names into prefix + name
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        return info.tobuf(tarfile.USTAR_FORMAT)
    head = b"".join([raw.ljust(100, b"\0"), b"0000444\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
                     b"00000000000\0", b" " * 8, b"0", bytes(100), b"ustar\x0000", bytes(32 + 32 + 8 + 8 + 155)])
    head = head.ljust(512, b"\0")
    return head[:148] + b"%06o\0" % sum(head) + head[155:]


def npy_members(image: np.ndarray, label: int) -> dict[str, bytes]:
    """The members of one grey ``.npy`` + ``.cls`` sample (uint8 [H, W] image)."""
    return {"npy": encode_image(image[None], "npy"), "cls": str(int(label)).encode("ascii")}


def write_shard(fs: fsspec.AbstractFileSystem, path: str, samples: Iterable[tuple[str, dict[str, bytes]]],
                advance: Callable[[int], None] = lambda n: None, *, gzipped: bool = False) -> tuple[int, int, str]:
    """Stream (key, {suffix: bytes}) samples into one tar at ``path``: (samples, bytes, sha256).

    Memory stays at one sample plus the filesystem's write buffer, however long the shard.
    Members are written in a fixed order with fixed metadata (and gzip without a timestamp),
    so the same samples always give the same bytes and sha256.
    """
    count, written = 0, 0  # samples, tar bytes before compression
    buffer = bytearray()
    with fs.open(path, "wb") as out:
        writer = _HashingWriter(out)
        with contextlib.ExitStack() as stack:
            target: Any = writer
            if gzipped:
                target = stack.enter_context(gzip.GzipFile(fileobj=writer, mode="wb", mtime=0))  # type: ignore[arg-type]

            def flush() -> None:
                nonlocal written
                target.write(bytes(buffer))
                written += len(buffer)
                buffer.clear()

            for key, members in samples:
                for suffix, data in members.items():
                    buffer += _member_header(f"{key}.{suffix}", len(data))
                    buffer += data
                    buffer += bytes(-len(data) % 512)
                count += 1
                advance(1)
                if len(buffer) >= 1 << 20:
                    flush()
            buffer += bytes(1024)  # two zero blocks end the archive, then tarfile's record padding
            buffer += bytes(-(written + len(buffer)) % tarfile.RECORDSIZE)
            flush()
    return count, writer.bytes, writer.sha256.hexdigest()


def begin_dataset(out_url: str) -> tuple[fsspec.AbstractFileSystem, str, set[str]]:
    """(fs, root, shard paths of the previous manifest) for writing a dataset at ``out_url``.

    The old manifest is removed first: from here until `finish_dataset` the folder does not
    look like a complete dataset.
    """
    fs, root = fsspec.core.url_to_fs(out_url)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    manifest_path = f"{root}/{MANIFEST_NAME}"
    stale = _shard_paths_of_old_manifest(fs, manifest_path)
    if fs.exists(manifest_path):
        fs.rm(manifest_path)
    return fs, root, stale


def finish_dataset(fs: fsspec.AbstractFileSystem, root: str, stale: set[str], *, source: str,
                   spec: SampleSpec, split_infos: dict[str, SplitInfo], tokens: TokenInfo | None = None) -> Manifest:
    """Write the manifest (last), then delete shards of an older, larger write it no longer names.
    ``tokens``: a token dataset (`pipeline encode`): dtype uint16 and its provenance."""
    manifest = Manifest(
        source=source,
        image_shape=list(spec.shape) if spec.shape else None,
        dtype="uint16" if tokens is not None else "uint8",
        keys=sorted(spec.declared),
        sample=spec,
        tokens=tokens,
        splits=split_infos,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    fs.pipe_file(f"{root}/{MANIFEST_NAME}", manifest.model_dump_json(indent=2).encode())
    written = {info.path for split in split_infos.values() for info in split.shards}
    for path in stale - written:
        if fs.exists(f"{root}/{path}"):
            fs.rm(f"{root}/{path}")
    return manifest


def _shard_paths_of_old_manifest(fs: fsspec.AbstractFileSystem, manifest_path: str) -> set[str]:
    try:
        old = Manifest.model_validate_json(fs.cat_file(manifest_path))
    except (OSError, ValueError):  # absent or unreadable: nothing we can safely clean up
        return set()
    return {info.path for split in old.splits.values() for info in split.shards}


def manifest_location(url: str) -> tuple[str, str]:
    """(dataset folder URL, manifest.json URL) for a folder URL or a direct manifest.json URL."""
    url = url.rstrip("/")
    if url.endswith(".json"):
        return url.rsplit("/", 1)[0] if "/" in url else ".", url
    return url, f"{url}/{MANIFEST_NAME}"


def read_manifest(url: str, on_retry: Callable[[BaseException], None] | None = None) -> Manifest:
    """Load the manifest of the dataset at ``url`` (its folder, or the manifest.json itself); transient
    errors are retried (3 times), each retry told to ``on_retry`` (a worker's `ReadStats.count_retry`)."""
    _, path = manifest_location(url)
    from pipeline.data.remote import retrying_transient
    from pipeline.data.retry import RetryPolicy

    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
        raw = retrying_transient(RetryPolicy(retries=3), on_retry)(fs.cat_file, fs_path)
    except FileNotFoundError:
        raise DataError(
            f"no {MANIFEST_NAME} at {path} — create one with `pipeline data digits --out {manifest_location(url)[0]}`"
        ) from None
    except Exception as err:  # noqa: BLE001 - unreachable hosts raise library-specific errors
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()[:5])
        raise DataError(f"{path} is not a valid dataset manifest: {problems}") from None
    empty = [name for name, split in manifest.splits.items() if not split.shards]
    if empty:  # nothing to stream: fail here, on the driver, not as a hang or a starved rank later
        raise DataError(f"{path}: split(s) {', '.join(empty)} list no shards (empty shard list)")
    return manifest


def shard_url(dataset_url: str, shard: ShardInfo) -> str:
    """URL of one shard: its absolute URL, or the manifest's folder joined with its relative path."""
    if "://" in shard.path:
        return shard.path
    folder, _ = manifest_location(dataset_url)
    return f"{folder}/{shard.path}"
