"""deformed-MNIST: deterministic per (seed, index), labelled by the source digit, resumable, flat memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from pipeline.data import read_manifest
from pipeline.data.deformed import deformed_sample, generate_deformed_mnist
from pipeline.data.writer import PROGRESS_DIR
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.sources import Split, load_mnist_splits


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> dict[str, Split]:
    return load_mnist_splits(str(mnist_dir))


@pytest.fixture(scope="module")
def small_source(mnist) -> dict[str, Split]:
    """A slice of real MNIST (fast in-process runs): 500 train digits, 100 val, 100 test."""
    return {name: Split(split.images[:n], split.labels[:n]) for (name, split), n in zip(mnist.items(), (500, 100, 100))}


def test_each_sample_is_a_function_of_seed_and_index(mnist) -> None:
    train = mnist["train"]
    image, label = deformed_sample(train, seed=7, index=123)
    again, label_again = deformed_sample(train, seed=7, index=123)
    assert np.array_equal(image, again) and label == label_again == train.labels[123]
    assert image.dtype == np.uint8 and image.shape == (28, 28)
    assert not np.array_equal(image, deformed_sample(train, seed=8, index=123)[0])
    same_digit = deformed_sample(train, seed=7, index=123 + len(train))  # same source digit, another deformation
    assert same_digit[1] == label and not np.array_equal(same_digit[0], image)
    assert not np.array_equal(image, train.images[123])
    # a deformation, not noise: the digit's ink stays where the digit is
    source = train.images[123].astype(float)
    assert np.corrcoef(source.ravel(), image.astype(float).ravel())[0, 1] > 0.3
    assert abs(image.astype(float).sum() / source.sum() - 1) < 0.5


def read_split(url: str, split: str) -> list[tuple[str, np.ndarray, int]]:
    """(key, grey uint8 [H, W] image, label): the reader's [1, H, W] images without their channel axis."""
    manifest = read_manifest(url)
    reader = ShardReader(ReadOptions(verify=True))
    samples = [s for shard in manifest.splits[split].shards for s in reader.read_shard(manifest, url, shard)]
    assert all(image.dtype == np.uint8 and image.shape[0] == 1 for _, image, _ in samples)
    return [(key, image[0], label) for key, image, label in samples]


def test_written_dataset_holds_the_deformed_train_and_untouched_val_test(tmp_path, small_source) -> None:
    out = str(tmp_path / "ds")
    splits, reused = generate_deformed_mnist("test-slice", out, 1100, seed=3, samples_per_shard=400,
                                             source_splits=small_source, progress=False)
    assert reused == 0 and [len(splits[s].shards) for s in ("train", "val", "test")] == [3, 1, 1]
    train = read_split(out, "train")
    assert len(train) == 1100
    for key, image, label in train[::97]:
        index = int(key.rsplit("-", 1)[1])
        expected, expected_label = deformed_sample(small_source["train"], 3, index)
        assert np.array_equal(image, expected) and label == expected_label == small_source["train"].labels[index % 500]
    val = read_split(out, "val")
    assert np.array_equal(np.stack([image for _, image, _ in val]), small_source["val"].images)


def test_interrupted_run_resumes_reusing_finished_shards(tmp_path, small_source) -> None:
    out = str(tmp_path / "ds")
    kwargs = dict(seed=1, samples_per_shard=200, source_splits=small_source, progress=False)

    class Crash(Exception):
        pass

    finished: list[str] = []

    def crash_after_three(info) -> None:
        finished.append(info.path)
        if len(finished) == 3:
            raise Crash

    with pytest.raises(Crash):
        generate_deformed_mnist("test-slice", out, 1000, on_shard_done=crash_after_three, **kwargs)
    assert not (tmp_path / "ds" / "manifest.json").exists()  # an interrupted write never looks like a dataset
    stamps = {p: (tmp_path / "ds" / p).stat().st_mtime_ns for p in finished}

    _, reused = generate_deformed_mnist("test-slice", out, 1000, **kwargs)
    assert reused == 3 and {p: (tmp_path / "ds" / p).stat().st_mtime_ns for p in finished} == stamps
    resumed = read_manifest(out)
    generate_deformed_mnist("test-slice", str(tmp_path / "clean"), 1000, **kwargs)
    assert resumed.digest() == read_manifest(str(tmp_path / "clean")).digest()

    # A different recipe (seed) must not reuse anything; a damaged shard file is rewritten.
    (tmp_path / "ds" / "train-00001.tar").write_bytes(b"cut")
    _, reused = generate_deformed_mnist("test-slice", out, 1000, **kwargs)
    assert reused == len(resumed.splits["train"].shards) + 2 - 1 and read_manifest(out).digest() == resumed.digest()
    _, reused = generate_deformed_mnist("test-slice", out, 1000, **(kwargs | {"seed": 2}))
    assert reused == 0


def test_killed_cli_run_resumes(tmp_path, mnist_dir) -> None:
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "pipeline", "data", "deformed-mnist", "--source", str(mnist_dir), "--samples", "6000",
           "--out", str(out), "--samples-per-shard", "500", "--seed", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / PROGRESS_DIR).glob("*.json")) if (out / PROGRESS_DIR).exists() else []) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = len(list((out / PROGRESS_DIR).glob("*.json")))
    assert recorded >= 3 and not (out / "manifest.json").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    reused = int(" ".join(again.stderr.split()).split("reused ")[1].split()[0])
    assert reused == recorded  # the killed command's worker processes died with it: nothing recorded after
    manifest = read_manifest(str(out))
    assert manifest.splits["train"].samples == 6000
    shard = manifest.splits["train"].shards[0]
    first = list(ShardReader(ReadOptions(verify=True)).read_shard(manifest, str(out), shard, stop=3))
    source = load_mnist_splits(str(mnist_dir))["train"]
    assert len(first) == 3 and all(image.shape == (1, 28, 28) for _, image, _ in first)
    assert all(np.array_equal(image[0], deformed_sample(source, 5, i)[0]) for i, (_, image, _) in enumerate(first))


def test_writer_memory_does_not_grow_with_the_dataset(tmp_path, small_source) -> None:
    """Peak Python/numpy allocations while writing 8x the samples stay those of writing 1x (tracemalloc
    sees numpy buffers), and far below the bytes written: nothing accumulates."""
    peaks = {}
    for n in (400, 3200):
        tracemalloc.start()
        generate_deformed_mnist("test-slice", str(tmp_path / f"n{n}"), n, samples_per_shard=200,
                                source_splits=small_source, progress=False)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    written = sum(p.stat().st_size for p in (tmp_path / "n3200").glob("train-*.tar"))
    assert written > 5 * peaks[3200], (written, peaks)
    assert peaks[3200] <= 1.05 * peaks[400] + (256 << 10), peaks
