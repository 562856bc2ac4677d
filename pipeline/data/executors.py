"""Where shard tasks run (the executors `ShardWriter.run` takes; pipeline/data/writer.py): in this
process (`in_process`), in spawned processes that die with the command (`process_pool` + `in_pool`),
or as Ray tasks (`ray_tasks`). A bounded number is in flight, so memory stays flat however many
shards there are; each finished task is reported, in this process, as it completes."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from typing import Any

from pipeline.data.writer import ExecuteTasks, Finished, Written


def in_process(run: Callable[[Any], Written]) -> ExecuteTasks:
    """Run each task here, one after the other."""
    def execute(tasks: list, finished: Finished) -> None:
        for task in tasks:
            finished(task, run(task))
    return execute


def end_with_parent() -> None:
    """In a worker of a shard-writing pool: die with the process that started it, so a killed command
    leaves no worker writing shards. Linux only (prctl PR_SET_PDEATHSIG; elsewhere a no-op); a worker
    still starting when its parent died arms that too late, sees it has been re-parented, and exits."""
    import ctypes
    import multiprocessing
    import os
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            return
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:
            os._exit(1)


def _start_worker(initializer: Callable[..., None] | None, *initargs: Any) -> None:
    end_with_parent()
    if initializer is not None:
        initializer(*initargs)


def process_pool(workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` spawned processes that end with this one (``initializer(*initargs)`` in each first)."""
    # spawn, not fork: the parent may hold fsspec/s3fs event-loop threads that a fork would copy broken.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(initializer, *initargs))


def in_pool(pool: Executor, run: Callable[..., Written], *args: Any, in_flight: int) -> ExecuteTasks:
    """Run ``run(task, *args)`` in ``pool``, at most ``in_flight`` tasks submitted at once."""
    def execute(tasks: list, finished: Finished) -> None:
        run_bounded(pool, tasks, lambda p, task: p.submit(run, task, *args), finished, in_flight)
    return execute


def run_bounded(pool: Executor, jobs: Iterable[Any], submit: Callable[[Executor, Any], Future],
                finished: Callable[[Any, Any], None], in_flight: int) -> None:
    """Run ``jobs`` on ``pool`` with at most ``in_flight`` submitted at once; ``finished(job, result)``
    in the calling process, in order of completion (the caller records the shard there). Memory
    stays flat however many jobs there are; after a failed job the ones not yet started are cancelled."""
    pending: dict[Future, Any] = {}
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


def ray_tasks(run: Callable[[Any, Any], Written], shared: Any, *, address: str | None, max_retries: int,
              error: type[Exception], what: str, name: Callable[[Any], str]) -> ExecuteTasks:
    """One Ray task per shard (1 CPU; 1 GPU each when the cluster has GPUs), ``run(shared, task)`` with
    ``shared`` put in the object store once, at most twice the cluster's slots in flight. Joins the
    cluster at ``address`` ($RAY_ADDRESS, else a local one) unless Ray is up. A failed task is named
    (``name(task)``) after the others finish, in one ``error`` that starts with ``what``."""
    def execute(tasks: list, finished: Finished) -> None:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            cluster = address or os.environ.get("RAY_ADDRESS")
            try:
                if cluster:
                    ray.init(address=cluster, logging_level=logging.WARNING)
                else:
                    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                             logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as err:
                raise error(f"cannot join the Ray cluster at {cluster or 'local'}: {err}") from None
        try:
            _run_ray_tasks(ray, tasks, run, shared, max_retries, error, what, name, finished)
        finally:
            if started_here:
                ray.shutdown()
    return execute


def _run_ray_tasks(ray: Any, tasks: list, run: Callable, shared: Any, max_retries: int, error: type[Exception],
                   what: str, name: Callable[[Any], str], finished: Finished) -> None:
    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    slots = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1))
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=max_retries)(run)
    shared_ref = ray.put(shared)
    queue = iter(tasks)
    pending: dict[Any, Any] = {}
    failures: list[str] = []

    def submit() -> None:
        for task in queue:
            pending[remote.remote(shared_ref, task)] = task
            if len(pending) >= max(2, 2 * slots):
                break

    submit()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(ready[0])
        try:
            finished(task, ray.get(ready[0]))
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            reason = str(cause) if isinstance(cause, error) else (
                f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(err))
            failures.append(f"{name(task)}: {reason}")
        except ray.exceptions.RayError as err:  # the worker died (killed, out of memory) past its retries
            failures.append(f"{name(task)}: task died: {_first_line(err)}")
        if not failures:
            submit()
    if failures:
        raise error(f"{what}: {len(failures)} shard(s) failed (finished shards are recorded; a re-run redoes only "
                    "the rest): " + "; ".join(failures))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # A RayTaskError's text is a traceback: its last line is the exception itself.
    return (lines[-1] if lines and "Traceback" in text else (lines[0] if lines else type(err).__name__))[:500]
