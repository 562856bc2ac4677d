"""Optional local cache of remote shards (``data.cache_dir``), so a second epoch does not re-download.

- Entries are named by a hash of (shard URL, manifest sha256, size): a rewritten shard gets a
  new entry, and the stale one ages out.
- A download streams into a temp file in the cache folder and is published with an atomic
  ``os.replace``: a concurrent reader (another Ray worker or DataLoader process on the node)
  either finds the whole file or none. Two readers missing together both download; the
  second rename wins, with identical bytes.
- The sha256 is computed while downloading and checked against the manifest before the
  file is published, so the cache never holds bytes the manifest disagrees with.
- Least-recently-used eviction (hits refresh the file's mtime) keeps the folder under
  ``max_bytes``; a file evicted while another process reads it stays readable to that
  process (POSIX unlink semantics). Shards larger than the whole cache are streamed, not cached.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from pipeline.data.errors import ShardError
from pipeline.data.remote import RetryingReader
from pipeline.data.stats import ReadStats
from pipeline.data.retry import RetryPolicy

_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600  # temp files this old belong to a crashed download
_CHUNK = 1 << 20


class ShardCache:
    """The cache folder as one reader uses it: hits, misses (downloads), evictions and the
    downloads' retries are counted in ``stats`` (the reader's)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, stats: ReadStats | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.max_bytes = max_bytes
        self.stats = ReadStats() if stats is None else stats
        self.directory.mkdir(parents=True, exist_ok=True)

    def entry_path(self, url: str, sha256: str, size: int) -> Path:
        key = hashlib.sha256(f"{url}\n{sha256}\n{size}".encode()).hexdigest()[:32]
        return self.directory / f"{key}-{url.rsplit('/', 1)[-1]}"

    def fits(self, size: int) -> bool:
        return 0 < size <= self.max_bytes

    def fetch(self, url: str, sha256: str, size: int, policy: RetryPolicy | None = None) -> Path:
        """Local path of the shard at ``url``, downloading (and verifying) it on a miss."""
        path = self.entry_path(url, sha256, size)
        try:
            os.utime(path)  # an LRU hit: refresh its age
            self.stats.count_cache("hits")
            return path
        except FileNotFoundError:
            pass
        self._download(url, sha256, path, policy)
        self.stats.count_cache("misses")
        self.evict(keep=path)
        return path

    def _download(self, url: str, sha256: str, path: Path, policy: RetryPolicy | None) -> None:
        digest, written = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as out, RetryingReader(url, policy, on_retry=self.stats.count_retry) as remote:
                while chunk := remote.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
            actual = digest.hexdigest()
            if sha256 and actual != sha256:
                raise ShardError(url, f"sha256 mismatch: manifest expects {sha256}, file has {actual} ({written} bytes)")
            os.replace(tmp, path)  # atomic publish: readers see all of it or nothing
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def evict(self, keep: Path | None = None) -> None:
        """Delete least-recently-used entries until the folder fits in ``max_bytes``."""
        entries, now = [], time.time()
        for item in self.directory.iterdir():
            try:
                stat = item.stat()
            except FileNotFoundError:  # another process evicted it first
                continue
            if item.name.startswith(_TMP_PREFIX):
                if now - stat.st_mtime > _STALE_TMP_S:
                    item.unlink(missing_ok=True)
                continue
            entries.append((stat.st_mtime, stat.st_size, item))
        total = sum(size for _, size, _ in entries)
        for _, size, item in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if item == keep:
                continue
            item.unlink(missing_ok=True)
            total -= size
            self.stats.count_cache("evicted")
