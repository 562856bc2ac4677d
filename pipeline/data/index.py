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
import math
import re
from typing import Callable, Sequence

import fsspec
import numpy as np
from braceexpand import braceexpand

from pipeline.data.contract import IMAGE_FORMATS, SampleSpec
from pipeline.data.errors import DataError, ShardError
from pipeline.data.shards import Manifest, ShardInfo, SplitInfo, begin_dataset, finish_dataset
from pipeline.data.scan import ShardScan, scan_shards

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# When several image members are in every sample, the first of these is the image.
IMAGE_PREFERENCE = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "npy")
DEFAULT_VAL_FRACTION = 0.01  # of the shards, when the user names no val split
_GLOB = re.compile(r"[*?\[]")


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
