"""`pipeline data images`: an image folder of real photo crops (ImageFolder classes, jpg/png/webp, varying
sizes, grey images) sharded deterministically, resumably, in parallel, and read back by the training reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from photos import crops, encode, write_image_folder
from pipeline.data import DataError, ImageTarget, ReadOptions, SampleDecoder, eval_batches, read_manifest
from pipeline.data.images import list_source, plan_jobs, shard_images
from pipeline.data.writer import PROGRESS_DIR


def read_back(url: str, split: str, size: tuple[int, int], channels: int = 3):
    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=channels, size=size))
    batches = list(eval_batches(manifest, url, split=split, rank=0, world_size=1, batch_size=16,
                                options=ReadOptions(verify=True), decoder=decoder))
    return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root, classes=("bird", "boat", "flower"), per_class=20)  # jpg/png/webp, 24-96 px, 2 grey each
    (root / "bird" / "notes.txt").write_text("not an image")
    (root / "bird" / "logo.svg").write_text("<svg/>")
    (root / "flower" / "annotations.xml").write_text("<a/>")
    (root / "flower" / "README").write_text("no extension")
    (root / "boat" / ".DS_Store").write_bytes(b"\0\1")
    return root


def test_image_folder_to_labelled_shards(folder, tmp_path) -> None:
    out, said = tmp_path / "out", []
    splits, reused, classes = shard_images(str(folder), str(out), size=24, samples_per_shard=8, progress=False,
                                           say=said.append)
    # what is not an image is named by extension and counted; hidden files (.DS_Store) pass unsaid
    assert len(said) == 1 and said[0].startswith("skipped 4 files that are not an image: 1 (none), 1 .svg, 1 .txt, 1 .xml")
    assert classes == ["bird", "boat", "flower"] and reused == 0
    assert json.loads((out / "classes.json").read_text()) == classes
    assert sum(split.samples for split in splits.values()) == 60 and set(splits) == {"train", "val", "test"}
    manifest = read_manifest(str(out))
    assert manifest.spec.model_dump() == {"image": "jpg", "channels": 3, "size": [24, 24], "label": "cls",
                                          "ignore": [], "compression": "none"}
    images, labels = read_back(str(out), "train", (24, 24))
    assert images.shape == (splits["train"].samples, 3, 24, 24) and images.std() > 20
    assert sorted(set(labels.tolist())) == [0, 1, 2]  # shards are not sorted by class
    # the labels are the class folders of the files that landed in train
    files, _ = list_source(str(folder))
    jobs = plan_jobs(files, seed=0, val_fraction=0.05, test_fraction=0.05, samples_per_shard=8)
    assert labels.tolist() == [f.label for job in jobs if job.split == "train" for f in job.files]


def test_split_is_a_function_of_each_path(folder) -> None:
    files, _ = list_source(str(folder))
    split_of = lambda jobs: {f.path: job.split for job in jobs for f in job.files}  # noqa: E731
    before = split_of(plan_jobs(files, seed=0, val_fraction=0.2, test_fraction=0.2, samples_per_shard=8))
    assert {s: list(before.values()).count(s) for s in ("train", "val", "test")} == {"train": 35, "val": 12, "test": 13}
    extra = [type(files[0])(f"bird/new-{i}.jpg", 1, "", 0) for i in range(30)]
    after = split_of(plan_jobs(files + extra, seed=0, val_fraction=0.2, test_fraction=0.2, samples_per_shard=8))
    assert all(after[path] == split for path, split in before.items())  # adding files moves none of the others
    other_seed = split_of(plan_jobs(files, seed=1, val_fraction=0.2, test_fraction=0.2, samples_per_shard=8))
    assert other_seed != before
    with pytest.raises(DataError, match="the val split is empty: 60 images and --val-fraction 0.001"):
        plan_jobs(files, seed=0, val_fraction=0.001, test_fraction=0.0, samples_per_shard=8)


def test_deterministic_and_parallel_equal(folder, tmp_path) -> None:
    digests = []
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):  # 2 spawned processes write the same bytes
        shard_images(str(folder), str(tmp_path / name), size=20, fmt="png", samples_per_shard=16, workers=workers,
                     progress=False)
        digests.append(read_manifest(str(tmp_path / name)).digest())
    assert digests[0] == digests[1] == digests[2]


def test_varying_sizes_kept_and_border_mode(folder, tmp_path) -> None:
    shard_images(str(folder), str(tmp_path / "asis"), resize="none", fmt="png", progress=False)
    assert read_manifest(str(tmp_path / "asis")).spec.size is None  # stored as they are: sizes vary
    wide = tmp_path / "wide"
    wide.mkdir()
    for i, crop in enumerate(crops(12, size=(20, 60), seed=5)):
        (wide / f"w{i}.png").write_bytes(encode(crop, "png"))
    shard_images(str(wide), str(tmp_path / "border"), size=30, resize="border", fmt="png", val_fraction=0.2,
                 test_fraction=0, progress=False)
    manifest = read_manifest(str(tmp_path / "border"))
    assert manifest.spec.size == [30, 30] and manifest.spec.label is None and list(manifest.splits) == ["train", "val"]
    images, labels = read_back(str(tmp_path / "border"), "train", (30, 30))
    assert (labels == -1).all()
    assert images[:, :, :5].max() == 0 and images[:, :, -5:].max() == 0  # 60x20 fit into 30x30: black bands
    assert images[:, :, 10:20].std() > 10


def test_grey_folder_stays_grey(tmp_path) -> None:
    write_image_folder(tmp_path / "digits", classes=("a", "b"), per_class=10, grey=10, formats=("png", "jpg"))
    shard_images(str(tmp_path / "digits"), str(tmp_path / "out"), size=16, fmt="png", val_fraction=0.3,
                 test_fraction=0, progress=False)
    assert read_manifest(str(tmp_path / "out")).spec.channels == 1
    images, _ = read_back(str(tmp_path / "out"), "train", (16, 16), channels=1)
    assert images.shape[1:] == (1, 16, 16)


def test_unreadable_file_named(tmp_path) -> None:
    write_image_folder(tmp_path / "src", classes=("x",), per_class=4)
    (tmp_path / "src" / "x" / "broken.jpg").write_bytes(encode(crops(1, size=(64, 64))[0], "jpg")[:300])
    with pytest.raises(DataError, match=r"src/x/broken\.jpg: unreadable image"):
        shard_images(str(tmp_path / "src"), str(tmp_path / "out"), size=16, channels=3, val_fraction=0.3,
                     test_fraction=0, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match="lies outside every class folder"):
        (tmp_path / "src" / "loose.png").write_bytes(encode(crops(1)[0], "png"))
        list_source(str(tmp_path / "src"))


def test_interrupted_run_resumes(folder, tmp_path) -> None:
    out = tmp_path / "out"
    written = []

    def crash_after_three(info) -> None:
        written.append(info.path)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shard_images(str(folder), str(out), size=16, samples_per_shard=6, progress=False, on_shard_done=crash_after_three)
    assert not (out / "manifest.json").exists() and len(list((out / PROGRESS_DIR).iterdir())) == 3
    files, _ = list_source(str(folder))
    jobs = plan_jobs(files, seed=0, val_fraction=0.05, test_fraction=0.05, samples_per_shard=6)
    resumed = []
    splits, reused, _ = shard_images(str(folder), str(out), size=16, samples_per_shard=6, progress=False,
                                     on_shard_done=lambda info: resumed.append(info.path))
    assert reused == 3 and len(resumed) == len(jobs) - 3  # the rest written once, the three finished ones not again
    assert not set(resumed) & set(written) and sum(len(split.shards) for split in splits.values()) == len(jobs)
    shard_images(str(folder), str(tmp_path / "whole"), size=16, samples_per_shard=6, progress=False)
    assert read_manifest(str(out)).digest() == read_manifest(str(tmp_path / "whole")).digest()
    # a changed setting changes every recipe: nothing is reused
    assert shard_images(str(folder), str(out), size=17, samples_per_shard=6, progress=False)[1] == 0


def test_killed_cli_run_resumes(tmp_path) -> None:
    src = tmp_path / "src"
    write_image_folder(src, classes=("a", "b"), per_class=200, formats=("jpg",))  # ~100 shards: still running at the kill
    args = [sys.executable, "-m", "pipeline", "data", "images", "--source", str(src), "--out", str(tmp_path / "out"),
            "--size", "32", "--samples-per-shard", "4", "--processes", "2"]  # spawned workers must die with it
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "out" / PROGRESS_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(progress.glob("*.json")) if progress.exists() else []) < 2:
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "the pool's processes were not found"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the workers die with the command, a moment later: count only once none is left to finish a shard
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"pool processes outlived the killed command: {[p.pid for p in alive]}"
    assert not (tmp_path / "out" / "manifest.json").exists()
    finished = len(list(progress.glob("*.json")))
    assert finished >= 2
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    text = " ".join(again.stderr.split())
    files, _ = list_source(str(src))  # the command's plan: its default splits, 4 images a shard
    jobs = plan_jobs(files, seed=0, val_fraction=0.05, test_fraction=0.05, samples_per_shard=4)
    counts = {split: sum(len(job.files) for job in jobs if job.split == split) for split in ("train", "val", "test")}
    assert f"wrote {len(jobs) - finished} shards, reused {finished} finished" in text
    assert f"(train {counts['train']}, val {counts['val']}, test {counts['test']}; 2 classes (classes.json))" in text
    manifest = read_manifest(str(tmp_path / "out"))
    assert {split: info.samples for split, info in manifest.splits.items()} == counts and sum(counts.values()) == 400


def test_folder_in_a_bucket(tmp_path) -> None:
    import fsspec

    from moto_s3 import moto_server, s3_environment

    write_image_folder(tmp_path / "src", classes=("cat", "dog"), per_class=6, formats=("jpg", "png"))
    with moto_server() as endpoint, s3_environment(endpoint):
        s3 = fsspec.filesystem("s3")
        s3.mkdir("pics")
        s3.put(str(tmp_path / "src"), "pics/src", recursive=True)
        splits, _, classes = shard_images("s3://pics/src", "s3://pics/out", size=16, val_fraction=0.3, test_fraction=0,
                                          progress=False)
        assert classes == ["cat", "dog"] and sum(s.samples for s in splits.values()) == 12
        assert json.loads(s3.cat_file("pics/out/classes.json")) == classes
        images, labels = read_back("s3://pics/out", "train", (16, 16))
        assert images.shape == (splits["train"].samples, 3, 16, 16) and set(labels.tolist()) <= {0, 1}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _late_worker(started: str) -> None:
    """A pool worker that reaches end_with_parent only after its parent has died (a slow start)."""
    import multiprocessing

    from pipeline.data.executors import end_with_parent

    Path(started).write_text(str(os.getpid()))
    parent = multiprocessing.parent_process().pid
    deadline = time.monotonic() + 30
    while not _gone(parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    end_with_parent()
    time.sleep(60)  # still here: end_with_parent did not notice the parent was gone


def _start_late_worker(started: str) -> None:
    """The pool's parent: starts the worker, then exits at once, before the worker arms its signal."""
    import multiprocessing

    multiprocessing.get_context("spawn").Process(target=_late_worker, args=(started,)).start()
    while not Path(started).exists():
        time.sleep(0.05)
    os._exit(0)


def _reaper(started: str) -> None:
    """A child subreaper above the pool's parent, as a Ray driver is (Ray makes its core workers
    subreapers): the orphaned worker is re-parented here, to a process that lives on."""
    import ctypes
    import multiprocessing

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    parent = multiprocessing.get_context("spawn").Process(target=_start_late_worker, args=(started,))
    parent.start()
    parent.join()
    while True:  # reap the worker when it exits; the test ends this process
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.1)


def test_a_worker_whose_parent_died_while_it_started_exits() -> None:
    """The killed-command test's race, made certain: the worker arms PR_SET_PDEATHSIG after its parent
    died (no signal will come) and is re-parented to a living subreaper, so it must see that it has
    been re-parented and exit by itself."""
    import multiprocessing
    import tempfile

    started = Path(tempfile.mkdtemp()) / "started"
    reaper = multiprocessing.get_context("spawn").Process(target=_reaper, args=(str(started),))
    reaper.start()
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        worker = int(started.read_text())
        while not _gone(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its parent"
            time.sleep(0.1)
    finally:
        reaper.kill()
        reaper.join()
