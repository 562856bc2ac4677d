"""Writing a dataset of shards: the one writer behind every command that writes one.

`data digits|photos|mnist|binarized-mnist` write splits held in memory (`write_shards`). The long
jobs (`data images`, `data deformed-mnist`, `encode`) are resumable (`ShardWriter`):

- a task (`ShardTask`) is one output shard, ``shard_name(split, number)``; its recipe is a digest
  of every setting and input that decides the shard's bytes;
- an executor (pipeline/data/executors.py) runs the tasks that are not finished yet: in this
  process, in spawned processes or as Ray tasks;
- a task writes its shard, then its finished-shard record ``OUT/_progress/<shard>.json`` with the
  recipe that made it (`write_finished_shard`); a re-run with the same recipe reuses a recorded
  shard whose file is still intact (same size) and redoes everything else, so an interrupted run
  resumes and a changed recipe never reuses a stale shard;
- one progress bar on stderr counts the work (samples or shards);
- ``manifest.json`` is written last (`ShardWriter.finish`): its presence means the dataset is complete.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import fsspec

from pipeline.data.contract import SampleSpec
from pipeline.data.errors import DataError
from pipeline.data.shards import (Manifest, ShardInfo, SplitInfo, TokenInfo, begin_dataset, finish_dataset,
                                  npy_members, write_shard)
from pipeline.data.sources import Split

PROGRESS_DIR = "_progress"  # finished-shard records
TMP_DIR = "_tmp"  # staged shards (`write_finished_shard(staged=True)`), removed when the dataset is finished
SHARD_NAME = "{split}-{number:05d}.tar"


def shard_name(split: str, number: int) -> str:
    """The file name of shard ``number`` of ``split``: ``train-00000.tar``."""
    return SHARD_NAME.format(split=split, number=number)


@dataclass(frozen=True)
class ShardTask:
    """One output shard; a command's task adds what its shard is made from."""

    split: str
    number: int  # within the split

    @property
    def path(self) -> str:
        return shard_name(self.split, self.number)


@dataclass
class Written:
    """A finished shard: its info and what its record holds besides (a task's own figures)."""

    info: ShardInfo
    extra: dict[str, Any] = field(default_factory=dict)


Task = TypeVar("Task", bound=ShardTask)
Finished = Callable[[Any, Written], None]
ExecuteTasks = Callable[[list, Finished], None]  # runs the tasks, telling `finished(task, written)` of each


# --- finished-shard records ------------------------------------------------------------------------

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


def write_finished_shard(out_url: str, path: str, samples: Iterable[tuple[str, dict[str, bytes]]], recipe: str, *,
                         staged: bool = False, check: Callable[[int], None] | None = None, **extra: Any) -> ShardInfo:
    """A task's one write: shard ``path`` under ``out_url`` from ``samples``, then its record (``extra``
    beside the recipe). ``staged``: streamed to ``_tmp/`` and moved to its name once complete (on an object
    store the final name then appears whole or not at all); ``check(count)`` may refuse it before that."""
    fs, root = fsspec.core.url_to_fs(out_url)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/{PROGRESS_DIR}", exist_ok=True)  # a task may run where the driver's folders are not
    final = f"{root}/{path}"
    target = f"{root}/{TMP_DIR}/{path}.{uuid.uuid4().hex}" if staged else final
    if staged:
        fs.makedirs(f"{root}/{TMP_DIR}", exist_ok=True)
    try:
        count, size, sha256 = write_shard(fs, target, samples)
        if check is not None:
            check(count)
        if staged:
            fs.mv(target, final)
    except BaseException:
        if staged:
            _remove_quietly(fs, target)
        raise
    info = ShardInfo(path=path, samples=count, bytes=size, sha256=sha256)
    # The record comes after the shard is complete: it is what makes a shard "finished" for a re-run.
    record_finished(fs, root, info, recipe, **extra)
    return info


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except OSError:
        pass


# --- the progress bar ------------------------------------------------------------------------------

@contextmanager
def progress_bar(enabled: bool, total: int, *, label: str = "writing shards", completed: int = 0,
                 note: str = "") -> Iterator[Callable[[int, str], None]]:
    """Yield ``advance(n, note)``: one rich progress bar on stderr (work done of ``total``, time, the last
    shard), or a no-op (tests, worker processes)."""
    if not enabled:
        yield lambda n, note="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=Console(stderr=True)) as bar:
        task = bar.add_task(note, total=total, completed=completed)
        yield lambda n, note="": bar.update(task, advance=n, description=note)


# --- a resumable dataset ---------------------------------------------------------------------------

class ShardWriter(Generic[Task]):
    """A dataset of shards at ``out_url`` written by ``tasks``, resumably (module docstring).

    Opening it removes the old manifest (until `finish` the folder is not a complete dataset) and
    reuses every task whose record matches ``recipe(task)`` with ``samples(task)`` samples and an intact
    file (and that ``accept(task, record)``); `run` writes the rest; `finish` writes the manifest.
    """

    def __init__(self, out_url: str, tasks: Sequence[Task], *, recipe: Callable[[Task], str],
                 samples: Callable[[Task], int], accept: Callable[[Task, dict], bool] = lambda task, record: True):
        self.out_url, self.tasks, self._samples = out_url, list(tasks), samples
        self.fs, self.root, self._stale = begin_dataset(out_url)
        self.fs.makedirs(f"{self.root}/{PROGRESS_DIR}", exist_ok=True)
        self.done: dict[str, Written] = {}  # by shard path
        for task in self.tasks:
            found = read_finished(self.fs, self.root, task.path, recipe(task), samples=samples(task))
            if found is not None and accept(task, found[1]):
                self.done[task.path] = Written(found[0], found[1])
        self.reused = len(self.done)
        self.todo = [task for task in self.tasks if task.path not in self.done]

    def run(self, execute: ExecuteTasks, *, progress: bool, label: str = "writing shards", per: str = "sample",
            on_shard_done: Callable[[ShardInfo], None] | None = None) -> None:
        """Write the unfinished shards with ``execute``; the bar counts samples (``per="sample"``) or shards;
        ``on_shard_done(info)`` is called here after each new shard is recorded (tests interrupt a run with it)."""
        if not self.todo:
            return
        def work(task: Task) -> int:
            return self._samples(task) if per == "sample" else 1

        reused = f"({self.reused} reused)" if self.reused else ""
        with progress_bar(progress, sum(map(work, self.tasks)), label=label, note=reused,
                          completed=sum(work(task) for task in self.tasks if task.path in self.done)) as advance:
            def finished(task: Task, written: Written) -> None:
                self.done[task.path] = written
                advance(written.info.samples if per == "sample" else 1, task.path)
                if on_shard_done:
                    on_shard_done(written.info)

            execute(self.todo, finished)

    def split_infos(self, names: Iterable[str]) -> dict[str, SplitInfo]:
        """Each named split's shards, in task order."""
        infos = {}
        for name in names:
            shards = [self.done[task.path].info for task in self.tasks if task.split == name]
            infos[name] = SplitInfo(samples=sum(s.samples for s in shards), shards=shards)
        return infos

    def finish(self, *, source: str, spec: SampleSpec, split_infos: dict[str, SplitInfo],
               tokens: TokenInfo | None = None) -> Manifest:
        """Write the manifest (last), drop shards an older, larger write named and this one does not, and
        staged leftovers of killed tasks."""
        manifest = finish_dataset(self.fs, self.root, self._stale, source=source, spec=spec,
                                  split_infos=split_infos, tokens=tokens)
        if self.fs.exists(f"{self.root}/{TMP_DIR}"):
            self.fs.rm(f"{self.root}/{TMP_DIR}", recursive=True)
        return manifest


# --- splits held in memory -------------------------------------------------------------------------

def write_shards(
    splits: dict[str, Split],
    out_url: str,
    *,
    source: str,
    samples_per_shard: int = 5000,
    progress: bool = True,
) -> Manifest:
    """Write every split as tar shards under ``out_url`` and return the manifest.

    Each shard is streamed straight to its fsspec file, so memory stays at one sample
    (plus the filesystem's write buffer) however large the dataset. An existing
    manifest is removed first and the new one written last, so an interrupted write
    never leaves a folder that looks like a complete dataset.
    """
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    shapes = {tuple(split.images.shape[1:]) for split in splits.values()}
    if len(shapes) != 1:
        raise DataError(f"all splits must share one image shape, got {sorted(shapes)}")
    fs, root, stale = begin_dataset(out_url)

    split_infos: dict[str, SplitInfo] = {}
    with progress_bar(progress, total=sum(len(s) for s in splits.values())) as advance:
        for name, split in splits.items():
            shards = []
            for shard_number, first in enumerate(range(0, len(split), samples_per_shard)):
                last = min(first + samples_per_shard, len(split))
                shard_path = shard_name(name, shard_number)
                samples = ((f"{name}-{i:07d}", npy_members(split.images[i], split.labels[i]))
                           for i in range(first, last))
                count, size, sha256 = write_shard(fs, f"{root}/{shard_path}", samples, advance)
                shards.append(ShardInfo(path=shard_path, samples=count, bytes=size, sha256=sha256))
            split_infos[name] = SplitInfo(samples=len(split), shards=shards)

    shape = shapes.pop()  # [H, W] grey or [C, H, W]
    spec = SampleSpec(image="npy", channels=1 if len(shape) == 2 else shape[0], size=list(shape[-2:]), label="cls")
    return finish_dataset(fs, root, stale, source=source, spec=spec, split_infos=split_infos)
