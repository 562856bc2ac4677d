"""Opening shards on object storage (s3://, gs://, http(s)://, any fsspec URL) with retries.

One retry layer, ours, and it is counted: transient errors (connection reset or refused,
timeouts, truncated bodies, HTTP 5xx) are retried with exponential backoff and jitter, and
a read that fails part-way reopens the object at the byte offset already consumed, so the
tar stream above never notices. For s3:// the lower layers' own silent retries (botocore,
s3fs) are turned down to one attempt so that every retry reaches ``on_retry`` (a reader's
`ReadStats.count_retry`).

Credentials and endpoints come from the environment and fsspec configuration
(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.config/fsspec, ...): nothing here takes them
from the run config, which is logged.
"""

from __future__ import annotations

import errno
import http.client
import socket
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator

import fsspec
from tenacity import Retrying

from pipeline.data.retry import RetryPolicy

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


OnRetry = Callable[[BaseException], None]


def retrying_transient(policy: RetryPolicy, *on_retry: OnRetry | None) -> Retrying:
    """``policy``'s retry loop over transient errors only (`is_transient`); each retry is announced
    to every ``on_retry`` (a counter, a handle to drop) before the backoff."""
    listeners = [listener for listener in on_retry if listener is not None]

    def announce(err: BaseException) -> None:
        for listener in listeners:
            listener(err)

    return policy.retrying(when=is_transient, on_retry=announce)


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

    def __init__(self, url: str, policy: RetryPolicy | None = None, block_size: int = READ_BLOCK_BYTES,
                 on_retry: OnRetry | None = None) -> None:
        self.url = url
        self.policy = policy or RetryPolicy()
        self.on_retry = on_retry  # told of every retried error (a reader's stats count them)
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
        self._file = retrying_transient(self.policy, self.on_retry)(open_at_offset)

    def read(self, size: int = -1) -> bytes:
        # A failed read drops the handle; the next attempt (after the backoff) reopens at the offset.
        return retrying_transient(self.policy, self.on_retry, lambda err: self._close_quietly())(self._read_once, size)

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
def open_for_reading(url: str, policy: RetryPolicy | None = None, on_retry: OnRetry | None = None) -> Iterator[Any]:
    """A binary stream of ``url``: plain ``open`` for local files, a RetryingReader otherwise."""
    if is_local(url):
        with fsspec.open(url, "rb") as local:
            yield local
        return
    with RetryingReader(url, policy, on_retry=on_retry) as remote:
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
