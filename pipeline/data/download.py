"""Fetching the original files of the public datasets: MNIST, Larochelle's binarized MNIST, Fashion-MNIST.

Each file comes from its dataset's canonical location (the next known location when one is unreachable), or
only from the mirror a user names (``--mirror`` or the dataset's ``PIPELINE_*_MIRROR`` variable). It is written
to ``NAME.part``; a connection that breaks, or a run that was interrupted, continues from the bytes already
there with an HTTP Range request (from zero when the server does not honour ranges); transient network errors
are retried under `DOWNLOAD_RETRY`, the project's one retry loop (`pipeline/data/retry.py`). Only once the whole
file matches the digest known for it is it renamed to NAME. A file whose digest differs is deleted and refused
with an error naming the file, its URL and both digests; nothing is sharded from it.

A file already at NAME is checked, not fetched again: a match is used as it is, a mismatch is refused (it was
not written here, so it is not deleted). ``--checksums`` replaces the known digests with a ``sha256sum``-style
list, for a mirror that serves a re-packed copy (a re-gzipped file differs in bytes, not in content).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import fsspec

from pipeline.data.errors import DataError
from pipeline.data.remote import is_transient
from pipeline.data.retry import RetryPolicy

# Up to 6 attempts per file and location, waiting 1, 2, 4, 8, 15 s (jittered) between them: every attempt
# continues from the bytes already received, so a flaky link costs time, not the download.
DOWNLOAD_RETRY = RetryPolicy(retries=5, backoff_s=1.0, max_backoff_s=15.0)
TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole file
CHUNK_BYTES = 1 << 16
PART_SUFFIX = ".part"


class DownloadError(DataError):
    """A file that could not be fetched or did not match its digest; the message names file, URL and digests."""


@dataclass(frozen=True)
class KnownFile:
    """One original file: its name, size in bytes and the digests it must match (hex; each one given is checked)."""

    name: str
    bytes: int
    sha256: str | None = None
    md5: str | None = None

    def digests(self) -> dict[str, str]:
        return {kind: value for kind, value in (("sha256", self.sha256), ("md5", self.md5)) if value}


@dataclass(frozen=True)
class PublicDataset:
    """A public dataset: where its files live (canonical first, then fallbacks) and what they must be."""

    key: str  # the command name: mnist, binarized-mnist, fashion-mnist
    title: str
    locations: tuple[str, ...]  # base URLs, each ending in /
    files: tuple[KnownFile, ...]
    mirror_env: str  # environment variable naming a mirror (a base URL) instead of the locations
    notes: str = field(default="", compare=False)


# MNIST (LeCun, Cortes & Burges): the four idx .gz files as published. sha256 and sizes: computed here from
# byte-identical copies of the originals (their md5s equal the published ones: f68b3c2d..., d53e105e...,
# 9fb629c4..., ec29112d...), and equal to the sha256s and sizes TensorFlow Datasets checks its MNIST downloads
# against (tensorflow/datasets, tensorflow_datasets/url_checksums/mnist.txt). The publisher's site comes
# first; PyTorch's mirror (the same bytes) is the fallback.
MNIST = PublicDataset(
    key="mnist",
    title="MNIST",
    locations=("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    files=(
        KnownFile("train-images-idx3-ubyte.gz", 9_912_422,
                  sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        KnownFile("train-labels-idx1-ubyte.gz", 28_881,
                  sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        KnownFile("t10k-images-idx3-ubyte.gz", 1_648_877,
                  sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        KnownFile("t10k-labels-idx1-ubyte.gz", 4_542,
                  sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
    mirror_env="PIPELINE_MNIST_MIRROR",
)

# Larochelle & Murray's binarized MNIST: three plain-text .amat files (not compressed at the source).
# sha256 and sizes: computed here from the decompressed bytes of our gzipped copies, and equal to the ones
# TensorFlow Datasets checks these URLs against (tensorflow_datasets/url_checksums/binarized_mnist.txt).
BINARIZED_MNIST = PublicDataset(
    key="binarized-mnist",
    title="binarized MNIST",
    locations=("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",),
    files=(
        KnownFile("binarized_mnist_train.amat", 78_400_000,
                  sha256="ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
        KnownFile("binarized_mnist_valid.amat", 15_680_000,
                  sha256="1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
        KnownFile("binarized_mnist_test.amat", 15_680_000,
                  sha256="e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
    ),
    mirror_env="PIPELINE_BINARIZED_MNIST_MIRROR",
)

# Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): the publisher (zalandoresearch/fashion-mnist, README) gives md5
# sums, so md5 is what is checked (the same values torchvision's FashionMNIST checks). Sizes: as published by
# TensorFlow Datasets (tensorflow_datasets/url_checksums/fashion_mnist.txt). The files in the publisher's
# repository are the same bytes as on their S3 site, which comes first.
FASHION_MNIST = PublicDataset(
    key="fashion-mnist",
    title="Fashion-MNIST",
    locations=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
               "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    files=(
        KnownFile("train-images-idx3-ubyte.gz", 26_421_880, md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        KnownFile("train-labels-idx1-ubyte.gz", 29_515, md5="25c81989df183df01b3e8a0aad5dffbe"),
        KnownFile("t10k-images-idx3-ubyte.gz", 4_422_102, md5="bef4ecab320f06d8554ea6380940ec79"),
        KnownFile("t10k-labels-idx1-ubyte.gz", 5_148, md5="bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    mirror_env="PIPELINE_FASHION_MNIST_MIRROR",
)

DATASETS = {dataset.key: dataset for dataset in (MNIST, BINARIZED_MNIST, FASHION_MNIST)}

def download_dataset(dataset: PublicDataset, folder: str | Path, *, mirror: str | None = None,
                     checksums: dict[str, str] | None = None, progress: bool = False,
                     policy: RetryPolicy = DOWNLOAD_RETRY, say: Callable[[str], None] = lambda line: None) -> Path:
    """Fetch every file of ``dataset`` into the local ``folder`` (module docstring) and return it.

    ``mirror``: a base URL used instead of the dataset's locations. ``checksums``: file name -> sha256 that
    replaces the known digests (and size) of the files it names. ``say`` hears one line per file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [_expected(known, checksums or {}) for known in dataset.files]
    unknown = sorted(set(checksums or {}) - {known.name for known in dataset.files})
    if unknown:
        raise DownloadError(f"--checksums names files {dataset.title} does not have: {', '.join(unknown)} "
                            f"(its files: {', '.join(known.name for known in dataset.files)})")
    locations = [_base(mirror)] if mirror else list(dataset.locations)
    unreachable: dict[str, str] = {}  # location -> why: not asked again for the files after
    for known in files:
        target = folder / known.name
        if target.exists():
            _check(target, known, source=str(target), keep=True)
            say(f"{known.name}: already in {folder}, digest verified")
            continue
        url = _fetch_any(known, locations, unreachable, target, progress=progress, policy=policy)
        say(f"{known.name}: downloaded from {url}, digest verified")
    return folder


def read_checksums(url: str) -> dict[str, str]:
    """A ``sha256sum``-style list (``HEX  NAME`` or ``HEX *NAME`` per line; # comments) -> {name: sha256}."""
    try:
        with fsspec.open(url, "rt") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DownloadError(f"cannot read the checksums file {url}: {err}") from None
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if match is None:
            raise DownloadError(f"{url}, line {number}: expected `SHA256  FILENAME` (as sha256sum prints), "
                                f"got {line[:80]!r}")
        found[Path(match.group(2).strip()).name] = match.group(1).lower()
    return found


# --- one file ----------------------------------------------------------------------------------------

def _expected(known: KnownFile, checksums: dict[str, str]) -> KnownFile:
    if known.name not in checksums:
        return known
    return KnownFile(known.name, bytes=-1, sha256=checksums[known.name])  # a re-packed copy: size unknown


def _base(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _fetch_any(known: KnownFile, locations: list[str], unreachable: dict[str, str], target: Path, *,
               progress: bool, policy: RetryPolicy) -> str:
    """Fetch ``known`` from the first location that serves it intact and return its URL. A location that could
    not be reached (after retries) goes into ``unreachable`` and is skipped for the files after this one (the
    publisher's site being down costs one round of retries, not one per file); one that served wrong bytes
    is not trusted for this file, and the error says so when no location is left."""
    part = target.with_name(target.name + PART_SUFFIX)
    failures = [f"{base}: {why}" for base, why in unreachable.items()]
    for base in locations:
        if base in unreachable:
            continue
        url = base + known.name
        try:
            with _progress(progress, known) as bar:
                policy.retrying(when=_worth_retrying)(_fetch, url, part, known.bytes, bar)
            _check(part, known, source=url, keep=False)
        except DownloadError as err:
            if len(locations) == 1:
                raise
            failures.append(str(err))
        except (OSError, http.client.HTTPException) as err:
            unreachable[base] = _describe(err)
            failures.append(f"{url}: {unreachable[base]}")
        else:
            os.replace(part, target)
            return url
    hint = " (--mirror names another location)" if len(locations) > 1 or not failures else ""
    raise DownloadError(f"could not fetch {known.name}: " + "; ".join(failures) + hint)


def _fetch(url: str, part: Path, size: int, bar: "_Bar") -> None:
    """One attempt: continue ``part`` from its length with a Range request, or write it from zero."""
    have = part.stat().st_size if part.exists() else 0
    if size >= 0 and have > size:  # longer than the file can be: not a prefix of it
        part.unlink()
        have = 0
    if size >= 0 and have == size:
        return  # complete; the digest says whether it is right
    headers = {"User-Agent": _user_agent()}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing after our bytes: complete, or not a prefix of this file
            total = _range_total(err.headers.get("Content-Range", ""))
            if total != have:
                part.unlink()
                return _fetch(url, part, size, bar)
            return None
        raise
    with response:
        start = 0
        if have and response.status == 206:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != have:
                response.close()
                part.unlink()
                return _fetch(url, part, size, bar)
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with open(part, "ab" if start else "wb") as out:
            bar.restart(start)
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                bar.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    if expected is not None and received < expected:  # http.client does not raise on a short body
        raise http.client.IncompleteRead(b"", expected - received)
    return None


def _check(path: Path, known: KnownFile, *, source: str, keep: bool) -> None:
    """Compare ``path`` with ``known``'s size and digests; on a mismatch delete it unless ``keep``, and refuse."""
    size = path.stat().st_size
    problem = None
    if known.bytes >= 0 and size != known.bytes:
        problem = f"{size:,} bytes, expected {known.bytes:,}"
    else:
        actual = _digests(path, known.digests())
        wrong = [kind for kind, value in known.digests().items() if actual[kind] != value]
        if wrong:
            problem = "; ".join(f"{kind} {actual[kind]}, expected {known.digests()[kind]}" for kind in wrong)
    if problem is None:
        return
    if keep:
        raise DownloadError(f"{path} is not the expected {known.name} ({problem}): it was left as it is; remove it "
                            f"to download it again")
    path.unlink(missing_ok=True)
    raise DownloadError(f"{known.name} from {source} does not match its known digest ({problem}): "
                        f"the download was deleted and nothing was sharded")


def _digests(path: Path, kinds: dict[str, str]) -> dict[str, str]:
    hashers = {kind: hashlib.new(kind) for kind in kinds}
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            for hasher in hashers.values():
                hasher.update(block)
    return {kind: hasher.hexdigest() for kind, hasher in hashers.items()}


def _worth_retrying(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in (408, 429)
    if isinstance(err, urllib.error.URLError):  # the cause sits in .reason (connection refused, reset, timeout)
        return isinstance(err.reason, BaseException) and is_transient(err.reason)
    return is_transient(err)


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    if isinstance(err, http.client.IncompleteRead):
        return f"the connection closed {err.expected:,} bytes short"
    return f"{type(err).__name__}: {err}"


def _range_start(header: str) -> int:
    match = re.match(r"bytes (\d+)-", header.strip())
    return int(match.group(1)) if match else -1


def _range_total(header: str) -> int:
    match = re.match(r"bytes [^/]*/(\d+)", header.strip())
    return int(match.group(1)) if match else -1


def _user_agent() -> str:
    import pipeline

    return f"pipeline/{pipeline.__version__} (catvae-pipeline)"


class _Bar:
    """Bytes of one file received: ``restart(n)`` when an attempt starts at byte n, ``advance(n)`` per chunk."""

    def restart(self, completed: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@contextmanager
def _progress(enabled: bool, known: KnownFile) -> Iterator[_Bar]:
    """A rich progress bar on stderr for ``known`` (size, speed, time left), or one that shows nothing."""
    if not enabled:
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn(known.name), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as progress:
        task = progress.add_task("", total=known.bytes if known.bytes >= 0 else None)

        class Shown(_Bar):
            def restart(self, completed: int) -> None:
                progress.update(task, completed=completed)

            def advance(self, n: int) -> None:
                progress.advance(task, n)

        yield Shown()
