"""Reading one shard of `pipeline data index` (`scan_shard`, `scan_shards` for many, in threads):
every member's name, suffix and size, the image and npy headers (sizes, channels) without decoding
pixels, labels from `.cls` or a `.json` field, the sha256 of the bytes, and what is refused (unsafe
members, damage) named by shard and member."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.data.contract import (ENCODED_FORMATS, GREY_MODES, IGNORABLE, IMAGE_FORMATS, UNSAFE,
                                    upright_size)
from pipeline.data.errors import DataError, ShardError
from pipeline.data.remote import open_for_reading
from pipeline.data.retry import RetryPolicy
from pipeline.data.tarsamples import MAX_ENCODED_MEMBER, HashingReader

MISSING = "no such shard"  # the problem of a ShardError for a shard that is not there
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


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
        raise ShardError(url, MISSING) from None
    except READ_ERRORS as err:
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
                    if err.problem != MISSING:
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
