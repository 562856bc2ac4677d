"""`pipeline data index`: adopt existing WebDataset shards (img2dataset, webdataset, ours) without rewriting them.

Every shard is streamed once, in parallel threads (the work is I/O plus hashing, which releases
the GIL): its sha256 and byte count for the manifest, its tar headers for the sample count and
the members present, and the *header* of every image member (Pillow reads only the header:
microseconds), so the stored size (upright: EXIF orientation applied, as the reader decodes)
and channels in the manifest are facts about every sample, not about the first few. Image data
is not decoded here: an image cut short inside its data is found when it is read (an error naming
shard and member, or a skipped sample counted with ``data.on_corrupt: skip``). Labels (``.cls``,
or an integer field of ``.json`` with ``--label``) are checked on every sample too: a shard
that would fail in epoch 7 on a label fails here, named.

Shards are untrusted: pickle-like members (`contract.UNSAFE`) are refused unread, members the
contract cannot declare are refused, truncated or garbage shards are named. The manifest is
written last; shard paths are relative when the shards live under ``--out``, absolute URLs
otherwise. Nothing next to the manifest is ever deleted: the shards are the user's.

Splits: ``--val``/``--test`` patterns, or a seeded hold-out of whole shards. Without either a
seeded hold-out of ~1% of the shards (at least one) becomes val, so the one-line command of
the README yields a trainable dataset; a single shard cannot be both, so it needs ``--no-val``
(a train-only manifest, e.g. for `pipeline encode`).
"""

from __future__ import annotations

import fnmatch
import io
import json
import math
import re
import tarfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Sequence

import fsspec
import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from pipeline.data.contract import (ENCODED_FORMATS, GREY_MODES, IGNORABLE, IMAGE_FORMATS, UNSAFE, SampleSpec,
                                    upright_size)
from pipeline.data.errors import DataError, ShardError
from pipeline.data.remote import open_for_reading
from pipeline.data.shards import Manifest, ShardInfo, SplitInfo, begin_dataset, finish_dataset
from pipeline.data.tarsamples import MAX_ENCODED_MEMBER, HashingReader
from pipeline.data.retry import RetryPolicy

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# When several image members are in every sample, the first of these is the image.
IMAGE_PREFERENCE = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "npy")
DEFAULT_VAL_FRACTION = 0.01  # of the shards, when the user names no val split
_GLOB = re.compile(r"[*?\[]")
_MISSING = "no such shard"
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


# --- listing ------------------------------------------------------------------------------------------


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated shard URLs of brace patterns, globs, folders or paths over any fsspec URL.

    Brace-expanded paths are not checked here (one request per shard on object storage): a
    missing one is named when the scan opens it. Globs and folders keep only tar shards, so
    img2dataset's ``.parquet`` and ``_stats.json`` files beside them are passed over.
    """
    urls: set[str] = set()
    for pattern in patterns:
        for one in braceexpand(pattern):
            fs, path = fsspec.core.url_to_fs(one)
            # A path named like a shard is taken as one without asking the store (a request per shard).
            if _GLOB.search(path) or (not is_shard(path) and fs.isdir(path)):
                found = [p for p in fs.glob(path if _GLOB.search(path) else f"{path.rstrip('/')}/*") if is_shard(p)]
                if not found:
                    raise DataError(f"{one} matches no shards (.tar, .tar.gz, .tgz)")
                urls.update(fs.unstrip_protocol(p) for p in found)
            else:
                urls.add(fs.unstrip_protocol(path))
    if not urls:
        raise DataError("no shards given")
    return sorted(urls)


def is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


# --- scanning one shard ----------------------------------------------------------------------------------


@dataclass
class ShardScan:
    """What one pass over a shard found."""

    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    gzip: bool = False
    members: Counter = field(default_factory=Counter)  # suffix -> samples that have it
    sizes: dict[str, set] = field(default_factory=dict)  # image suffix -> {(H, W)}, at most 2 kept
    colour: dict[str, bool] = field(default_factory=dict)  # image suffix -> some image is not grey
    bad_cls: str | None = None  # first .cls member that is not an integer
    bad_label: str | None = None  # first .json member without the integer --label field
    lacking: dict[str, str] = field(default_factory=dict)  # suffix -> key of the first sample without one

    def note_image(self, suffix: str, height: int, width: int, grey: bool) -> None:
        sizes = self.sizes.setdefault(suffix, set())
        if len(sizes) < 2:
            sizes.add((height, width))
        self.colour[suffix] = self.colour.get(suffix, False) or not grey


def scan_shard(url: str, label: str | None, policy: RetryPolicy = RetryPolicy()) -> ShardScan:
    """One streaming pass over the shard at ``url``; ShardError names the shard (and member) at fault."""
    scan = ShardScan(url=url)
    json_field = label.split(":", 1)[1] if label and label.startswith("json:") else None
    try:
        with open_for_reading(url, policy) as stream:
            hasher = HashingReader(stream)
            with tarfile.open(fileobj=hasher, mode="r|*") as tar:
                compression = getattr(tar.fileobj, "comptype", "tar")  # detected from the bytes, not the name
                if compression not in ("tar", "gz"):
                    raise ShardError(url, f"{compression} compression is not supported (plain tar or gzip)")
                scan.gzip = compression == "gz"
                _scan_members(tar, scan, json_field)
            while hasher.read(1 << 20):  # the end-of-archive blocks and padding count too
                pass
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError(url, _MISSING) from None
    except _READ_ERRORS as err:
        detail = str(err).split(" @ ")[0]
        raise ShardError(url, f"damaged shard: not a readable tar ({type(err).__name__}: {detail})") from None
    if scan.samples == 0:
        raise ShardError(url, "holds no samples")
    scan.bytes, scan.sha256 = hasher.bytes, hasher.sha256.hexdigest()
    return scan


def _scan_members(tar: tarfile.TarFile, scan: ShardScan, json_field: str | None) -> None:
    key: str | None = None
    seen: set[str] = set(IGNORABLE)  # no sample before the first: it lacks nothing
    for info in tar:
        if not info.isfile():
            continue
        prefix, suffix = base_plus_ext(info.name)  # the reader's grouping rule
        if prefix is None or suffix is None:
            raise ShardError(scan.url, "member is not named KEY.SUFFIX (a WebDataset sample member)", member=info.name)
        suffix = suffix.lower()
        if suffix in UNSAFE or suffix.rsplit(".", 1)[-1] in UNSAFE:
            raise ShardError(scan.url, "pickle-like member refused (never unpickled; rewrite the shard without it)",
                             member=info.name)
        if suffix not in IGNORABLE:
            raise ShardError(scan.url, f"member .{suffix} is not part of the sample contract (allowed: "
                                       f"{', '.join(sorted(IGNORABLE))})", member=info.name)
        if key is None or prefix != key or suffix in seen:  # the reader's rule: a new sample starts
            scan.lacking.update(dict.fromkeys(IGNORABLE - seen - scan.lacking.keys(), key))
            scan.samples += 1
            key, seen = prefix, set()
        seen.add(suffix)
        scan.members[suffix] += 1
        if suffix in IMAGE_FORMATS or suffix == "cls" or (suffix == "json" and json_field):
            if info.size > MAX_ENCODED_MEMBER:
                raise ShardError(scan.url, f"member of {info.size} bytes refused (limit {MAX_ENCODED_MEMBER})",
                                 member=info.name)
            raw = tar.extractfile(info).read()  # type: ignore[union-attr]
            if len(raw) != info.size:
                raise ShardError(scan.url, "damaged shard: truncated inside a member", member=info.name)
            _check_member(scan, info.name, suffix, raw, json_field)
    scan.lacking.update(dict.fromkeys(IGNORABLE - seen - scan.lacking.keys(), key))


def _check_member(scan: ShardScan, name: str, suffix: str, raw: bytes, json_field: str | None) -> None:
    if suffix == "cls":
        text = raw.strip()
        if scan.bad_cls is None and not (text.lstrip(b"-").isdigit() and text.count(b"-") <= 1):
            scan.bad_cls = name
    elif suffix == "json":
        try:
            value = json.loads(raw).get(json_field)
        except (ValueError, AttributeError, UnicodeDecodeError):
            value = None
        if scan.bad_label is None and (isinstance(value, bool) or not isinstance(value, int)):
            scan.bad_label = name
    elif suffix == "npy":
        scan.note_image(suffix, *_npy_header(scan.url, name, raw))
    else:
        scan.note_image(suffix, *_image_header(scan.url, name, suffix, raw))


def _npy_header(url: str, name: str, raw: bytes) -> tuple[int, int, bool]:
    try:
        stream = io.BytesIO(raw)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)  # the header only: the array (and any pickle) is never loaded
    except (ValueError, OSError, EOFError) as err:
        raise ShardError(url, f"not an .npy array ({err})", member=name) from None
    if dtype != np.uint8 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] not in (1, 3)):
        raise ShardError(url, f"npy image is {dtype} {list(shape)}; the contract wants uint8 [H, W] or [C, H, W]",
                         member=name)
    return shape[-2], shape[-1], len(shape) == 2 or shape[0] == 1


def _image_header(url: str, name: str, suffix: str, raw: bytes) -> tuple[int, int, bool]:
    from PIL import Image, UnidentifiedImageError

    fmt = ENCODED_FORMATS[suffix]
    if not raw:
        raise ShardError(url, "empty member (0 bytes), not an image", member=name)
    try:
        image = Image.open(io.BytesIO(raw), formats=[fmt])  # the header only
    except UnidentifiedImageError:  # its message is the repr of a file object: say it plainly
        raise ShardError(url, f"not a readable {fmt} image (Pillow cannot identify it)", member=name) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ShardError(url, f"not a readable {fmt} image ({err})", member=name) from None
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise ShardError(url, f"image of {width}x{height} pixels exceeds the decompression-bomb limit", member=name)
    width, height = upright_size(image)  # the size the reader decodes: EXIF orientation applied
    return height, width, image.mode in GREY_MODES


def scan_shards(urls: Sequence[str], label: str | None, workers: int = 8,
                advance: Callable[[ShardScan], None] = lambda scan: None) -> list[ShardScan]:
    """Scan every shard, ``workers`` at a time; results in the order of ``urls``. The first damaged
    shard stops the scan (pending ones are cancelled) and its error is raised."""
    results: dict[str, ShardScan] = {}
    missing: list[str] = []  # collected, not fatal at once: a brace range with gaps is worth one full report
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="pipeline-index") as pool:
        futures = {pool.submit(scan_shard, url, label): url for url in urls}
        try:
            for future in as_completed(futures):
                try:
                    scan = future.result()
                except ShardError as err:
                    if err.problem != _MISSING:
                        raise
                    missing.append(err.shard)
                    continue
                results[scan.url] = scan
                advance(scan)
        except BaseException:
            for pending in futures:
                pending.cancel()
            raise
    if missing:
        missing.sort()
        raise DataError(f"{len(missing)} of {len(urls)} shards do not exist: {', '.join(missing[:5])}"
                        + (", ..." if len(missing) > 5 else ""))
    return [results[url] for url in urls]


# --- the sample contract of the whole dataset --------------------------------------------------------------


def infer_spec(scans: Sequence[ShardScan], label: str | None = "auto", image: str | None = None) -> SampleSpec:
    """The SampleSpec every scanned sample satisfies (``label``: 'auto', 'cls', 'json:FIELD' or None)."""
    everywhere = set.intersection(*({s for s, n in scan.members.items() if n == scan.samples} for scan in scans))
    if image is None:
        candidates = [fmt for fmt in IMAGE_PREFERENCE if fmt in everywhere]
        if not candidates:
            present = sorted(set().union(*(scan.members for scan in scans)) & IMAGE_FORMATS) or ["none"]
            raise DataError(_missing(scans, present[0], f"no image member is in every sample (seen: {present})"))
        image = candidates[0]
    elif image not in everywhere:
        raise DataError(_missing(scans, image, f"--image {image}: not in every sample"))
    if label == "auto":
        label = "cls" if "cls" in everywhere else None
    if label is not None:
        member = label.split(":", 1)[0]
        if member not in everywhere:
            raise DataError(_missing(scans, member, f"--label {label}: not every sample has a .{member} member"))
        for scan in scans:
            bad = scan.bad_cls if member == "cls" else scan.bad_label
            if bad:
                what = "not an integer" if member == "cls" else f"has no integer field {label.split(':', 1)[1]!r}"
                raise ShardError(scan.url, f"label {what}", member=bad)
    sizes = set().union(*(scan.sizes.get(image, set()) for scan in scans))
    read = {image} | ({label.split(":", 1)[0]} if label else set())
    present = set().union(*(scan.members for scan in scans))
    return SampleSpec(
        image=image,  # type: ignore[arg-type]
        channels=3 if any(scan.colour.get(image) for scan in scans) else 1,
        size=list(sizes.pop()) if len(sizes) == 1 else None,
        label=label,
        ignore=sorted(present - read),
        compression="gzip" if any(scan.gzip for scan in scans) else "none",
    )


def _missing(scans: Sequence[ShardScan], member: str, problem: str) -> str:
    for scan in scans:
        if scan.members.get(member, 0) < scan.samples:
            return (f"{problem}: shard {scan.url} has {scan.members.get(member, 0)} .{member} members "
                    f"in {scan.samples} samples (the first without one: key {scan.lacking.get(member)})")
    return problem


# --- splits ----------------------------------------------------------------------------------------------


def assign_splits(urls: Sequence[str], *, val: Sequence[str] = (), test: Sequence[str] = (),
                  val_shards: int | None = None, test_shards: int = 0, seed: int = 0,
                  require_val: bool = True) -> dict[str, list[str]]:
    """{split: shard URLs}. Patterns first (a pattern without '/' matches shard file names, else it is
    expanded like SHARDS and may name shards outside them), then a seeded hold-out of whole shards
    from what is left; the rest is train."""
    chosen: dict[str, list[str]] = {}
    rest = list(urls)
    for name, patterns in (("test", test), ("val", val)):
        picked = _matching(patterns, rest) if patterns else []
        if patterns and not picked:
            raise DataError(f"--{name} {' '.join(patterns)} matches no shards")
        chosen[name] = picked
        rest = [u for u in rest if u not in set(picked)]
    if val_shards is None:  # nothing said about val: hold out ~1% of the shards
        val_shards = 0 if val or not require_val else max(1, math.ceil(len(rest) * DEFAULT_VAL_FRACTION))
    order = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
    if test_shards + val_shards >= len(rest) and (test_shards or val_shards):
        raise DataError(f"holding out {val_shards} val + {test_shards} test shards leaves no train shards "
                        f"({len(rest)} to split)" + ("; for a one-shard dataset pass --no-val" if len(urls) == 1 else ""))
    chosen["test"] = sorted(chosen["test"] + order[:test_shards])
    chosen["val"] = sorted(chosen["val"] + order[test_shards: test_shards + val_shards])
    held = set(chosen["test"]) | set(chosen["val"])
    splits = {"train": [u for u in rest if u not in held], "val": chosen["val"], "test": chosen["test"]}
    if not splits["train"]:
        raise DataError("no train shards left after the val/test splits")
    if require_val and not splits["val"]:
        raise DataError("the val split is empty: training needs one (--val PATTERN or --val-shards N); "
                        "pass --no-val for a train-only manifest")
    return {name: shards for name, shards in splits.items() if shards}


def _matching(patterns: Sequence[str], urls: Sequence[str]) -> list[str]:
    picked: set[str] = set()
    for pattern in patterns:
        if "/" in pattern:
            picked.update(expand_shards([pattern]))
        else:
            names = list(braceexpand(pattern))
            picked.update(u for u in urls if any(fnmatch.fnmatchcase(u.rsplit("/", 1)[-1], n) for n in names))
    return sorted(picked)


# --- the command ------------------------------------------------------------------------------------------


def index_shards(patterns: Sequence[str], out_url: str, *, val: Sequence[str] = (), test: Sequence[str] = (),
                 val_shards: int | None = None, test_shards: int = 0, seed: int = 0, require_val: bool = True,
                 label: str | None = "auto", image: str | None = None, workers: int = 8,
                 progress: bool = True) -> Manifest:
    """Scan the shards of ``patterns`` and write a manifest over them at ``out_url`` (see the module doc)."""
    if label not in ("auto", "cls", None) and not (label.startswith("json:") and len(label) > 5):
        raise DataError(f"--label must be auto, cls, json:FIELD or none, got {label!r}")
    urls = expand_shards(patterns)
    splits = assign_splits(urls, val=val, test=test, val_shards=val_shards, test_shards=test_shards, seed=seed,
                           require_val=require_val)
    every = sorted({u for shards in splits.values() for u in shards})
    with _ScanProgress(progress, len(every)) as advance:
        scans = {scan.url: scan for scan in scan_shards(every, label, workers, advance)}
    spec = infer_spec(list(scans.values()), label, image)
    fs, root, _ = begin_dataset(out_url)
    folder = fs.unstrip_protocol(root).rstrip("/") + "/"
    infos = {}
    for name, shards in splits.items():
        listed = [ShardInfo(path=u[len(folder):] if u.startswith(folder) else u, samples=scans[u].samples,
                            bytes=scans[u].bytes, sha256=scans[u].sha256) for u in shards]
        infos[name] = SplitInfo(samples=sum(s.samples for s in listed), shards=listed)
    # stale=set(): the shards are the user's; an older manifest's extra shards are never deleted.
    return finish_dataset(fs, root, set(), source=f"index {' '.join(patterns)}", spec=spec, split_infos=infos)


class _ScanProgress:
    """A rich progress bar over shards (samples and bytes so far in its text), or a no-op."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.samples = self.bytes = 0

    def __enter__(self) -> Callable[[ShardScan], None]:
        if not self.enabled:
            return lambda scan: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("indexing shards"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[note]}"), TimeElapsedColumn())
        self.task = self.bar.add_task("index", total=self.total, note="")
        self.bar.__enter__()
        return self.advance

    def advance(self, scan: ShardScan) -> None:
        self.samples += scan.samples
        self.bytes += scan.bytes
        self.bar.update(self.task, advance=1, note=f"{self.samples:,} samples, {self.bytes / 1e6:,.1f} MB")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
