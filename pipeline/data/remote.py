"""Opening shards on object storage (s3://, gs://, http(s)://, any fsspec URL) with retries.

One retry layer, ours, and it is counted: transient errors (connection reset or refused,
timeouts, truncated bodies, HTTP 5xx) are retried with exponential backoff and jitter, and
a read that fails part-way reopens the object at the byte offset already consumed, so the
tar stream above never notices. For s3:// the lower layers' own silent retries (botocore,
s3fs) are turned down to one attempt so that every retry shows up in `retry_count()`.

Credentials and endpoints come from the environment and fsspec configuration
(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.config/fsspec, ...): nothing here takes them
from the run config, which is logged.
"""

from __future__ import annotations

import errno
import http.client
import random
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

import fsspec
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

# Errno values of OSErrors that mean "the service or network hiccuped", not "the object is bad".
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EBUSY, errno.EAGAIN, getattr(errno, "EREMOTEIO", 121)}
_TRANSIENT_TYPE_NAMES = {  # matched by name so optional libraries need not be importable
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",  # aiohttp
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError",  # botocore
    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
    "FSTimeoutError",  # fsspec
}
READ_BLOCK_BYTES = 8 << 20  # ranged GETs of 8 MiB: bounded memory per open shard, few requests


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``retries`` consecutive retries per operation, backoff doubling from ``backoff_s``."""

    retries: int = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def delay(self, attempt: int) -> float:
        # Full jitter on the upper half: concurrent readers that failed together do not retry together.
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def retrying(self, before_retry: Callable[[BaseException], None] = lambda err: None) -> Retrying:
        """The project's retry loop (tenacity) under this policy: transient errors only, each retry
        counted (`retry_count`) and announced to ``before_retry`` before the backoff; the last
        error is re-raised unchanged."""
        def count(state: RetryCallState) -> None:
            err = state.outcome.exception()  # type: ignore[union-attr]
            _COUNTER.add(err)
            before_retry(err)

        return Retrying(stop=stop_after_attempt(self.retries + 1), retry=retry_if_exception(is_transient),
                        wait=lambda state: self.delay(state.attempt_number - 1), before_sleep=count, reraise=True)


class _RetryCounter:
    """Process-wide count of retried operations (per Ray worker / DataLoader process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.last_error = ""

    def add(self, err: BaseException) -> None:
        with self._lock:
            self.retries += 1
            self.last_error = f"{type(err).__name__}: {err}"[:300]


_COUNTER = _RetryCounter()


def retry_count() -> int:
    """Transient read errors this process has retried so far (cumulative)."""
    return _COUNTER.retries


def reset_retry_count() -> None:
    _COUNTER.retries, _COUNTER.last_error = 0, ""


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: network drops, timeouts, truncated bodies, HTTP 5xx (anywhere in the
    chain of causes). A 404/403 without such a cause is final."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # A missing or forbidden object does not come back by asking again, but fsspec's http
        # filesystem reports an unreachable host as FileNotFoundError: so look at the whole chain.
        if isinstance(current, ConnectionError | TimeoutError | socket.timeout | http.client.IncompleteRead):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_TYPE_NAMES for cls in type(current).__mro__):
            return True
        if _http_status(current) >= 500:
            return True
        current = current.__cause__ or current.__context__
    return False


def _http_status(err: BaseException) -> int:
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    status = getattr(err, "status", None)  # aiohttp ClientResponseError (http:// filesystems)
    return status if isinstance(status, int) else 0


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith(("file://", "local://"))


def call_with_retries(what: str, func: Any, policy: RetryPolicy) -> Any:
    """``func()`` (``what`` it does), retried on transient errors; the last error is re-raised unchanged."""
    return policy.retrying()(func)


@lru_cache(maxsize=None)
def reader_filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """A filesystem instance of our own for reading shards (the writer's cached instance is untouched).

    For s3 the inner retry loops are set to a single attempt: with botocore's 5 and s3fs's 5
    on top of ours, one bad minute would cost 125 silent attempts per read.
    """
    if protocol in ("s3", "s3a"):
        options: dict[str, Any] = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
        options.update(fsspec.config.conf.get(protocol, {}))  # the user's fsspec config wins
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        fs.retries = 1  # s3fs's own loop (a class attribute, not a constructor argument)
        return fs
    return fsspec.filesystem(protocol, skip_instance_cache=True, **fsspec.config.conf.get(protocol, {}))


def split_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    fs = reader_filesystem(protocol)
    return fs, fs._strip_protocol(url)


class RetryingReader:
    """A forward-reading binary file over an fsspec URL that survives transient errors.

    On a transient error it closes the handle, backs off, reopens and seeks to the offset
    already handed out: callers see one uninterrupted byte stream.
    """

    def __init__(self, url: str, policy: RetryPolicy | None = None, block_size: int = READ_BLOCK_BYTES) -> None:
        self.url = url
        self.policy = policy or RetryPolicy()
        self.block_size = block_size
        self.fs, self.path = split_url(url)
        self.offset = 0
        self._file: Any = None
        self._reopen()

    def _reopen(self) -> None:
        def open_at_offset() -> Any:
            handle = self.fs.open(self.path, "rb", block_size=self.block_size, cache_type="readahead")
            if self.offset:
                handle.seek(self.offset)
            return handle

        self._close_quietly()
        self._file = call_with_retries(f"open {self.url}", open_at_offset, self.policy)

    def read(self, size: int = -1) -> bytes:
        # A failed read drops the handle; the next attempt (after the backoff) reopens at the offset.
        return self.policy.retrying(before_retry=lambda err: self._close_quietly())(self._read_once, size)

    def _read_once(self, size: int) -> bytes:
        if self._file is None:
            self._reopen()
        data = self._file.read(size)
        self.offset += len(data)
        return data

    def readable(self) -> bool:
        return True

    def _close_quietly(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may also fail to close
                pass
            self._file = None

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def open_for_reading(url: str, policy: RetryPolicy | None = None) -> Iterator[Any]:
    """A binary stream of ``url``: plain ``open`` for local files, a RetryingReader otherwise."""
    if is_local(url):
        with fsspec.open(url, "rb") as local:
            yield local
        return
    with RetryingReader(url, policy) as remote:
        yield remote


# --- Ray Train storage ---------------------------------------------------------------------------


def ray_storage_kwargs(url: str) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem``) for Ray Train's RunConfig.

    Local paths pass through. Any other fsspec URL (s3://, gs://, ...) is handed to Ray through
    pyarrow's FSSpecHandler, so Ray uses the same fsspec/s3fs stack and configuration
    (AWS_ENDPOINT_URL, credentials from the environment) as the data layer; the filesystem
    object is pickled to Ray's controller and workers, which resolve credentials from their
    own environment.
    """
    if is_local(url):
        return {"storage_path": url.removeprefix("file://")}
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(url)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def storage_url(storage: str, path: str | None) -> str | None:
    """A checkpoint path Ray reports (scheme-less on a custom filesystem) as a full URL again."""
    if path is None or is_local(storage) or "://" in path:
        return path
    return f"{storage.split('://', 1)[0]}://{path}"


def local_checkpoint_dir(checkpoint: Any) -> str | None:
    """A local directory with the contents of a Ray checkpoint: its own path when it is on local
    disk, else a download into a temp dir (removed when the process exits)."""
    if checkpoint is None:
        return None
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    import atexit
    import shutil
    import tempfile

    target = tempfile.mkdtemp(prefix="checkpoint-")
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    return checkpoint.to_directory(target)
