"""`pipeline bench data` on a JPEG dataset (issue 12 item 8): every reader runs end to end on the same
shards and counts the same samples; the dataset maker is deterministic; the MNIST bench has the
WebDataset-pipeline row. No timing assertions: the machines are shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.bench.image_dataset import make_image_dataset
from pipeline.bench.images import ROWS, resize_center
from pipeline.data import read_manifest, shard_url
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ShardReader

REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: int = 300) -> dict:
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "bench", "data", *args, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("jpegs") / "data"
    make_image_dataset(str(out), 48, val_samples=4, samples_per_shard=12, sides=(40, 96), threads=2)
    return str(out)


def test_made_dataset_is_real_jpeg_crops_and_deterministic(jpegs, tmp_path):
    manifest = read_manifest(jpegs)
    spec = manifest.spec
    assert (spec.image, spec.channels, spec.size, spec.label) == ("jpg", 3, None, "cls")
    assert manifest.splits["train"].samples == 48 and len(manifest.splits["train"].shards) == 4
    assert manifest.splits["val"].samples == 4
    decoder = SampleDecoder(spec, ImageTarget(channels=3, size=(32, 32)))
    samples = list(ShardReader(decoder=decoder).read_shard(manifest, jpegs, manifest.splits["train"].shards[0]))
    assert len(samples) == 12 and {label for _, _, label in samples} <= {0, 1}
    assert all(image.shape == (3, 32, 32) and image.dtype == np.uint8 and image.std() > 5 for _, image, _ in samples)
    again = make_image_dataset(str(tmp_path / "again"), 48, val_samples=4, samples_per_shard=12, sides=(40, 96))
    assert [s.sha256 for s in again.splits["train"].shards] == [s.sha256 for s in manifest.splits["train"].shards]


def test_resize_center_matches_the_contract_decoder(jpegs):
    """The other rows' resize is the same cover + center crop as ours (draft mode aside: png-free check via npy)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(3, 50, 70), dtype=np.uint8)
    ours = SampleDecoder(read_manifest(jpegs).spec, ImageTarget(channels=3, size=(32, 32))).prepare_array(image)
    theirs = resize_center(Image.fromarray(image.transpose(1, 2, 0)), 32)
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert np.array_equal(ours, theirs)


def test_image_bench_end_to_end(jpegs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:data-images:start -->\nold\n<!-- bench:data-images:end -->\ny\n")
    report = _bench("--source", jpegs, "--image-size", "32", "--processes", "2", "--batch-size", "8", "--repeats", "1",
                    "--shuffle-buffer", "16", "--readme", str(readme))
    assert report["bench"] == "data-images"
    assert set(report["samples_per_s"]) == set(ROWS)
    assert report["samples"] == {row: 48 for row in ROWS}  # every reader saw every train sample once
    assert all(v > 0 for v in report["samples_per_s"].values())
    assert all(v > 0 for v in report["samples_per_cpu_s"].values())
    assert report["loader_vs_webdataset"] is not None and report["loader_vs_raw"] is not None
    text = readme.read_text()
    assert "old" not in text and "| (b) WebDataset" in text and "ours/WebDataset" in text


def test_make_images_option_writes_the_dataset_it_benches(tmp_path):
    out = tmp_path / "made"
    report = _bench("--make-images", "12", "--source", str(out), "--image-size", "32", "--processes", "2",
                    "--batch-size", "4", "--repeats", "1", "--no-raydata")
    assert read_manifest(str(out)).splits["train"].samples == 12
    assert set(report["samples"]) == set(ROWS) - {"raydata"}
    assert set(report["samples"].values()) == {12}
    assert all(Path(shard_url(str(out), s).removeprefix("file://")).exists()
               for s in read_manifest(str(out)).splits["train"].shards)


def test_mnist_bench_has_the_webdataset_row():
    report = _bench("--source", "digits", "--samples", "0", "--repeats", "1", "--no-raydata")
    assert report["samples_per_s"]["webdataset"] > 0
    assert report["loader_vs_webdataset"] is not None and report["webdataset_workers"] == 1


def test_webdataset_and_raw_rows_read_fsspec_urls(jpegs):
    """A dataset in a bucket: WebDataset has no s3:// opener of its own, the bench gives it fsspec's."""
    import fsspec

    from pipeline.bench.images import read_raw, read_webdataset

    memory = fsspec.filesystem("memory")
    urls = []
    for shard in read_manifest(jpegs).splits["train"].shards[:2]:
        memory.pipe(f"/bench-images/{shard.path}", Path(shard_url(jpegs, shard)).read_bytes())
        urls.append(f"memory://bench-images/{shard.path}")
    assert read_webdataset(urls, 32, processes=2, batch=5) == 24
    assert read_raw(urls, 32, processes=1, suffix=".jpg") == 24


def _batches(url: str, workers: int, stats: Any = None, **kwargs) -> list:
    from pipeline.data.reader import ReadOptions, ShardReader
    from pipeline.data.stream import train_batches

    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=3, size=(24, 24), resize="random-crop", hflip=True),
                            workers=workers)
    reader = ShardReader(ReadOptions(**kwargs), decoder, stats=stats)
    return list(train_batches(manifest, url, epoch=1, seed=3, rank=0, world_size=1, batch_per_rank=8,
                              shuffle_buffer=16, reader=reader))


def test_loader_row_decodes_the_same_with_any_number_of_threads(jpegs):
    """The image bench's loader row (decoding threads reading ahead of the tar) gives training's exact batches."""
    one = _batches(jpegs, 1)
    for workers in (2, 3):
        many = _batches(jpegs, workers)
        assert [b.keys for b in many] == [b.keys for b in one]
        assert all(np.array_equal(a.x.numpy(), b.x.numpy()) and np.array_equal(a.labels.numpy(), b.labels.numpy())
                   for a, b in zip(one, many))


def test_corrupt_jpeg_with_decoding_threads(jpegs, tmp_path):
    """A corrupt JPEG among threaded decoding: named in error mode, skipped and counted once in skip mode."""
    import shutil
    import tarfile

    from pipeline.data import ShardError
    from pipeline.data.shards import write_shard
    from pipeline.data.stats import ReadStats

    copy = tmp_path / "data"
    shutil.copytree(jpegs, copy)
    shard = read_manifest(str(copy)).splits["train"].shards[1]
    with tarfile.open(copy / shard.path) as tar:
        samples: dict[str, dict[str, bytes]] = {}
        for info in tar.getmembers():
            key, suffix = info.name.rsplit(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    bad = sorted(samples)[5]
    samples[bad]["jpg"] = samples[bad]["jpg"][:200] + b"\x00" * 50  # a header, then garbage
    import fsspec

    write_shard(fsspec.filesystem("file"), str(copy / shard.path), list(samples.items()))
    for workers in (1, 2):
        with pytest.raises(ShardError, match=f"{bad}.jpg"):
            _batches(str(copy), workers)
        stats = ReadStats()
        batches = _batches(str(copy), workers, stats, on_corrupt="skip")
        assert stats.skipped_samples == 1
        assert sum(len(b.keys) for b in batches) == 48  # the refill keeps every step
        assert bad not in {k for b in batches for k in b.keys}
