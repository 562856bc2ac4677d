"""`pipeline bench data|train` run on small data and emit every field; the fast loader path equals the reference.

The benches are not timed here: the machines are shared. What is checked is that each command
runs end to end (bench train with a real local Ray cluster) and that its JSON carries the fields
checks rely on; and that the numpy fast decode path and the prefetch thread give exactly the
samples, order, labels and pixels (uint8, after the position-seeded flips) of the reference
(tarfile) path, and the same errors and skips on damaged shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import Manifest, ShardError, ShardInfo, SplitInfo, load_digits_splits, read_manifest, write_shards
from pipeline.data import fasttar
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.sources import Split
from pipeline.data.stream import eval_batches, prefetch, train_batches

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory) -> str:
    """28x28 random images, labels incl. two-digit and negative ones, uneven shard sizes."""
    rng = np.random.default_rng(0)
    n = 1234
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.choice([-1, 0, 3, 9, 12], size=n).astype(np.int64)
    out = tmp_path_factory.mktemp("mnist-like") / "data"
    write_shards({"train": Split(images, labels), "val": Split(images[:300], labels[:300])}, str(out),
                 source="test", samples_per_shard=97, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "data"
    write_shards(load_digits_splits(), str(out), source="digits", samples_per_shard=200, progress=False)
    return str(out)


def _all_train(url: str, fast: bool, hflip: bool = False, verify: bool = False, **kwargs) -> list:
    manifest = read_manifest(url)
    spec = manifest.spec
    decoder = SampleDecoder(spec, ImageTarget(spec.channels, tuple(spec.size), hflip=hflip))
    return list(train_batches(manifest, url, options=ReadOptions(fast_path=fast, verify=verify), decoder=decoder,
                              **kwargs))


@pytest.mark.parametrize("dataset", ["mnist_like", "digits"])
@pytest.mark.parametrize("world_size,rank,start_step", [(1, 0, 0), (2, 0, 0), (2, 1, 0), (1, 0, 3), (2, 1, 2)])
def test_fast_path_equals_reference(request, dataset, world_size, rank, start_step):
    url = request.getfixturevalue(dataset)
    kwargs = dict(epoch=1, seed=7, rank=rank, world_size=world_size, batch_per_rank=40 // world_size,
                  shuffle_buffer=50, start_step=start_step, partitions=2, verify=True, hflip=start_step > 0)
    fast, slow = _all_train(url, True, **kwargs), _all_train(url, False, **kwargs)
    assert len(fast) == len(slow) > 0
    for a, b in zip(fast, slow):
        assert a.keys == b.keys
        assert a.x.dtype == b.x.dtype == torch.uint8 and a.x.shape[1] == 1
        assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)


def test_fast_path_is_taken_and_eval_matches(mnist_like):
    manifest = read_manifest(mnist_like)
    shard = manifest.splits["train"].shards[0]
    data = Path(mnist_like, shard.path).read_bytes()
    found = fasttar._fast_samples(data, 0, shard.samples, (28, 28), np.dtype("uint8"), {"npy", "cls"}, 1 << 20)
    assert found is not None and len(found[0]) == shard.samples
    outs = []
    for fast in (True, False):
        outs.append(list(eval_batches(manifest, mnist_like, split="val", rank=0, world_size=1, batch_size=64,
                                      options=ReadOptions(fast_path=fast))))
    assert len(outs[0]) == len(outs[1]) == 5
    for (x1, y1), (x2, y2) in zip(*outs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _members(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"train-{i:07d}.npy", _npy(np.full((2, 2), i, np.uint8))), (f"train-{i:07d}.cls", b"%d" % (i % 10))]
    return out


def _damaged() -> dict[str, bytes]:
    good = _tar(_members(6))
    flipped = bytearray(good)
    flipped[512 * 7 + 3] ^= 0xFF  # inside the 3rd sample's first header
    pickled = _members(6)
    pickled[4] = ("train-0000002.pyd", b"\x80\x04K\x01.")
    bad_label = _members(6)
    bad_label[5] = ("train-0000002.cls", b"x1")
    bad_shape = _members(6)
    bad_shape[6] = ("train-0000003.npy", _npy(np.zeros((3, 2), np.uint8)))
    return {"good": good, "header_flip": bytes(flipped), "truncated": good[: 512 * 9], "pickle": _tar(pickled),
            "label": _tar(bad_label), "shape": _tar(bad_shape), "garbage": b"not a tar at all" * 100}


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("kind", list(_damaged()))
def test_damaged_shards_same_outcome_on_both_paths(tmp_path, mode, kind):
    data = _damaged()[kind]
    (tmp_path / "train-00000.tar").write_bytes(data)
    manifest = Manifest(source="t", image_shape=[2, 2], created="2026-01-01T00:00:00+00:00",
                        splits={"train": SplitInfo(samples=6, shards=[ShardInfo(
                            path="train-00000.tar", samples=6, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())])})
    outcomes = []
    for fast in (True, False):
        reader = ShardReader(ReadOptions(on_corrupt=mode, fast_path=fast, verify=True))
        got, error = [], None
        try:
            for key, image, label in reader.read_shard(manifest, str(tmp_path), manifest.splits["train"].shards[0],
                                                       start=1):
                got.append((key, image.tobytes(), label))
        except ShardError as err:
            error = str(err)
        health = reader.stats
        outcomes.append((got, error, health.skipped_samples, health.skipped_shards))
    assert outcomes[0] == outcomes[1]


def _names_ok_reference(image: np.ndarray, label: np.ndarray) -> bool:
    """The per-name loop `fasttar._names_ok` replaced."""
    names = np.ascontiguousarray(np.concatenate([image, label])).view("S100").ravel().tolist()
    for image_name, label_name in zip(names[: len(image)], names[len(image):]):
        key = image_name[:-4]
        if (not image_name.endswith(b".npy") or label_name != key + b".cls" or b"\0" in key
                or not key.rsplit(b"/", 1)[-1] or b"." in key.rsplit(b"/", 1)[-1]):
            return False
    return True


def test_vectorised_name_check_equals_the_per_name_loop():
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"a/.\0npycls-0", np.uint8)
    def field(name: bytes) -> np.ndarray:
        return np.frombuffer(name[:100].ljust(100, b"\0"), np.uint8)
    outcomes = set()
    for _ in range(3000):
        rows = 1 + int(rng.integers(0, 3))
        images, labels = [], []
        for _ in range(rows):
            key = rng.choice(alphabet, size=int(rng.integers(0, 12))).tobytes()
            if rng.random() < 0.6:
                key = key.replace(b"\0", b"").replace(b".", b"")
            if rng.random() < 0.05:
                key = key.ljust(96, b"k")  # names that fill the whole field: no trailing NUL
            image, label = key + b".npy", key + b".cls"
            twist = rng.random()
            if twist < 0.1:
                label = key + b".clt"
            elif twist < 0.2:
                image = key + [b".np", b".npz", b"npy", b""][int(rng.integers(0, 4))]
            elif twist < 0.3:
                label = label + b"\0x"
            elif twist < 0.35:
                label = b"b" + label[1:]
            images.append(field(image))
            labels.append(field(label))
        image, label = np.stack(images), np.stack(labels)
        expected = _names_ok_reference(image, label)
        outcomes.add(expected)
        assert fasttar._names_ok(image, label) == expected, (image, label)
    assert outcomes == {True, False}


def test_prefetch_same_order_errors_in_place_and_close():
    assert list(prefetch(iter(range(100)), 3)) == list(range(100))
    assert list(prefetch(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield 1
        yield 2
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for item in prefetch(failing(), 2):
            got.append(item)
    assert got == [1, 2]
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = set(threading.enumerate())
    stream = prefetch(endless(), 2)
    assert next(stream) == 0
    stream.close()
    deadline = time.monotonic() + 5
    while (producers := [t for t in set(threading.enumerate()) - before if t.is_alive()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert producers == []  # the producer thread stopped (it notices within its 0.1 s put timeout)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count <= 5  # nothing produced after it stopped; at most depth + 3 before


def _bench(*args: str, timeout: int, env: dict[str, str] | None = None) -> dict:
    env = os.environ | {"PYTHONWARNINGS": "ignore"} | (env or {})
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "bench", *args, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_bench_data_emits_every_field():
    report = _bench("data", "--source", "digits", "--samples", "0", "--repeats", "1", timeout=300)
    for field in ("loader_vs_raw", "loader_vs_memory", "loader_vs_raydata", "samples_per_s", "mb_per_s"):
        assert report[field] is not None, field
    assert set(report["samples_per_s"]) >= {"raw", "loader", "memory", "raydata"}
    assert all(v > 0 for v in report["samples_per_s"].values())


@pytest.mark.slow  # ~45 s of Ray runs; `pipeline bench data` keeps the default run's bench end to end
def test_bench_train_emits_every_field(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:train:start -->\nold\n<!-- bench:train:end -->\ny\n")
    users_store = tmp_path / "users-mlflow.db"  # a user's MLFLOW_TRACKING_URI: the bench's runs stay out of it
    report = _bench("train", "--source", "digits", "-o", "train.log_every=5", "--readme", str(readme), timeout=600,
                    env={"MLFLOW_TRACKING_URI": f"sqlite:///{users_store}"})
    assert not users_store.exists()
    for field in ("ray_vs_plain", "scaling_2v1", "data_wait_frac", "startup_s"):
        assert report[field] is not None, field
    assert report["ray1"]["steps"] == report["ray2"]["steps"] > 0
    assert 0 <= report["data_wait_frac"] <= 1 and report["startup_s"] > 0
    # our part of the startup, measured inside the worker, is part of the time to the first step
    assert 0 < report["ray1"]["worker_setup_s"] < report["ray1"]["to_first_step_s"]
    text = readme.read_text()
    assert "old" not in text and "| (b) `pipeline train`, 2 Ray worker(s)" in text and text.endswith("y\n")


# --- bench train on an image config (configs/images-dvae.yaml: patch grid, RGB 32x32, Gaussian) ---

TINY_DVAE = ["model.channels=[8]", "model.codebook_dim=48", "model.latent.categories=16",
             "model.entropy_weight=0.1"]  # entropy_weight: the objective is not out.loss


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """Real photographs cut into 32x32 RGB tiles (48 train, 12 val), as `pipeline data photos` writes them."""
    out = tmp_path_factory.mktemp("photos") / "data"
    done = subprocess.run([sys.executable, "-m", "pipeline", "data", "photos", "--out", str(out), "--scale", "64"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(out)


@pytest.mark.parametrize("config,dataset,partitions", [("images-dvae.yaml", "photos", 1),
                                                       ("images-dvae.yaml", "photos", 2),
                                                       ("digits-categorical.yaml", "digits", 2)])
def test_bench_train_plain_loop_runs_the_training_objective(request, config, dataset, partitions):
    from pipeline.bench.train import batch_indices, plain_loop, train_images
    from pipeline.config import load_config
    from pipeline.models import build_vae
    from pipeline.train.schedules import kl_weight, temperature
    from pipeline.train.step import noise_seed

    url = request.getfixturevalue(dataset)
    image = config == "images-dvae.yaml"
    cfg = load_config(REPO / "configs" / config,
                      [f"data.url={url}", "train.workers=1", "train.batch_size=8", f"data.partitions={partitions}",
                       "train.log_every=2", *(TINY_DVAE if image else ["model.hidden=[16]"])])
    images = train_images(cfg, url)
    shape = (3, 32, 32) if image else (1, 8, 8)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (read_manifest(url).splits["train"].samples,) + shape
    assert len(train_images(cfg, url, limit=20)) == 20

    result = plain_loop(cfg, url, images, steps=4, window=2)
    assert set(result) >= {"samples_per_s", "steps_per_s", "windows", "threads", "batch", "partitions", "steps",
                           "parameters", "first_objective"}
    assert result["samples_per_s"] > 0 and len(result["windows"]) == 2 and result["threads"] == 1
    assert (result["batch"], result["partitions"], result["steps"]) == (8, partitions, 4)

    # Step 0 recomputed by hand: the model as training builds it, the batch, one forward per partition
    # with its noise seed (train/step.py), the schedules at step 0 and VAE.objective (beta, entropy term).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_vae(cfg.model, image_shape=shape, binarize=cfg.model.binarize)
        if image:
            assert type(model.likelihood).__name__ == "Gaussian" and model.entropy_weight == 0.1
            assert cfg.model.code_init == "kmeans"  # as shipped: the K-means quantizer of the first train images
            from pipeline.data.contract import ImageTarget, SampleDecoder
            from pipeline.data.reader import ReadOptions, ShardReader
            from pipeline.train.code_init import code_pool, init_codes_from_data

            manifest = read_manifest(url)
            target = ImageTarget.from_config(manifest.spec, cfg.data)
            reader = ShardReader(ReadOptions.from_config(cfg.data),
                                 SampleDecoder(manifest.spec, target, cfg.data.decode_workers))
            init_codes_from_data(model, code_pool(model, manifest, url, cfg, reader), cfg)
        assert result["parameters"] == sum(p.numel() for p in model.parameters())
        x = images[next(batch_indices(len(images), 8, cfg.train.seed))]
        tau, beta = temperature(0, cfg.model.latent), kl_weight(0, cfg.train)
        objectives, losses = [], []
        for partition, chunk in enumerate(x.chunk(partitions)):
            torch.random.default_generator.manual_seed(noise_seed(cfg.train.seed, 0, partition))
            out = model(chunk, temperature=tau)  # uint8 in: the likelihood prepares it (binarizes for digits)
            objectives.append(model.objective(out, beta, 1.0).item())
            losses.append(out.loss.item())
    finally:
        torch.set_num_threads(before)
    expected = sum(objectives) / partitions  # the objective is linear in the partition means it is given
    assert result["first_objective"] == pytest.approx(expected, rel=1e-5)
    if image:  # beta = 0 at step 0 (KL warm-up) and an entropy term: not the plain -ELBO (out.loss)
        assert expected != pytest.approx(sum(losses) / partitions, rel=1e-3)


def test_bench_train_dataset_from_override():
    from pipeline.bench.train import _dataset_override

    assert _dataset_override(["train.epochs=1", "data.url=/d", "model.hidden=[8]"]) == ("/d", ["train.epochs=1",
                                                                                         "model.hidden=[8]"])
    assert _dataset_override(["train.epochs=1"]) == (None, ["train.epochs=1"])


def test_bench_train_says_where_the_extra_time_goes():
    from pipeline.bench.train import _gap_words, step_time

    one = {"samples_per_s": 800, "data_wait_frac": 0.05, "perf": {"perf/data_wait_frac": 0.05}}
    gap = step_time({"samples_per_s": 1000}, one, 100)
    assert gap == {"plain_ms": 100.0, "ray_ms": 125.0, "extra_ms": 25.0, "data_wait_ms": 6.25, "other_ms": 18.75}
    text = _gap_words({"step_time": gap, "ray1": one, "slower_than_plain": True})
    assert "more than 10% slower" in text and "data wait 6.25 ms (perf/data_wait_frac 5.00%)" in text


@pytest.mark.slow  # a local Ray cluster and two `pipeline train` runs (1 and 2 workers): 60-80 s on 2 busy cores
def test_bench_train_on_an_image_config_end_to_end(photos):
    from pipeline.bench.train import train_markdown

    report = _bench("train", "--config", "configs/images-dvae.yaml", "-o", f"data.url={photos}", "-o", "train.epochs=1",
                    "-o", "train.batch_size=16", "-o", "train.log_every=1", *[a for o in TINY_DVAE for a in ("-o", o)],
                    timeout=600)
    assert report["dataset"]["url"] == photos and report["model"]["arch"] == "resnet"
    assert report["model"]["image_shape"] == [3, 32, 32] and report["model"]["likelihood"] == "logit-laplace"
    assert report["plain"]["batch"] == 16 and report["plain"]["partitions"] == 2
    for field in ("ray_vs_plain", "scaling_2v1", "data_wait_frac", "startup_s", "step_time"):
        assert report[field] is not None, field
    assert report["ray1"]["steps"] == report["ray2"]["steps"] == 3  # 48 tiles / 16
    assert "perf/data_wait_frac" in report["ray1"]["perf"]
    assert set(report["step_time"]) == {"plain_ms", "ray_ms", "extra_ms", "data_wait_ms", "other_ms"}
    text = train_markdown(report, report["command"])
    assert "model resnet [8, 8, 8] categorical, logit-laplace likelihood, 3x32x32 images" in text
    assert "Ray (1 worker)/plain **" in text and "(perf/data_wait_frac " in text
