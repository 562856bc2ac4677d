"""Finished-shard records: what makes a long shard-writing job resumable.

A job that writes many shards (`deformed-mnist`, `data images`, `encode`) records each shard
in ``OUT/_progress/<shard>.json`` *after* the shard is complete, with the recipe that made it
(a digest of every setting and input that decides its bytes). A re-run with the same recipe
reuses a recorded shard whose file is still intact (same size) and redoes everything else, so
an interrupted run resumes and a changed recipe never reuses a stale shard.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Any, TypeVar

import fsspec

from pipeline.data.shards import ShardInfo

PROGRESS_DIR = "_progress"

Job = TypeVar("Job")


def record_finished(fs: fsspec.AbstractFileSystem, root: str, info: ShardInfo, recipe: str, **extra: Any) -> None:
    """Record shard ``info`` (written under ``root``) as finished by ``recipe``; call it after the shard is complete."""
    record = {"recipe": recipe, "shard": info.model_dump(), **extra}
    final = f"{root}/{PROGRESS_DIR}/{info.path}.json"
    # Written aside, then moved into place: a process killed mid-write leaves no half record
    # (an object store's put is atomic anyway; on a file system the move is a rename).
    partial = f"{final}.{uuid.uuid4().hex}.partial"
    fs.pipe_file(partial, json.dumps(record).encode())
    fs.mv(partial, final)


def read_finished(fs: fsspec.AbstractFileSystem, root: str, path: str, recipe: str,
                  samples: int | None = None) -> tuple[ShardInfo, dict[str, Any]] | None:
    """(the shard's info, its whole record) when ``path`` was finished by ``recipe`` (with ``samples``
    samples, when given) and its file is intact; None: (re)write it."""
    try:
        record = json.loads(fs.cat_file(f"{root}/{PROGRESS_DIR}/{path}.json"))
        info = ShardInfo.model_validate(record["shard"])
        intact = fs.size(f"{root}/{path}") == info.bytes
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("recipe") != recipe or (samples is not None and info.samples != samples) or not intact:
        return None
    return info, record


def end_with_parent() -> None:
    """In a worker process of a shard-writing pool: be killed when the process that started it dies,
    so a killed command leaves no worker writing (and recording) shards behind it. Linux only
    (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def run_bounded(pool: Executor, jobs: Iterable[Job], submit: Callable[[Executor, Job], Future],
                finished: Callable[[Job, Any], None], in_flight: int) -> None:
    """Run ``jobs`` on ``pool`` with at most ``in_flight`` submitted at once; ``finished(job, result)``
    in the calling process, in order of completion (the caller records the shard there). Memory
    stays flat however many jobs there are; after a failed job the ones not yet started are cancelled."""
    pending: dict[Future, Job] = {}
    queue = iter(jobs)
    for job in queue:
        pending[submit(pool, job)] = job
        if len(pending) >= in_flight:
            break
    try:
        while pending:
            complete, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in complete:
                finished(pending.pop(future), future.result())
                nxt = next(queue, None)
                if nxt is not None:
                    pending[submit(pool, nxt)] = nxt
    finally:
        for future in pending:
            future.cancel()
