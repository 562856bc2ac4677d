"""`pipeline encode` / `pipeline decode` on a real local Ray cluster and a real sqlite MLflow store:
token shards written exactly once in source order, a killed run resumed, tokens decoded back to the
model's own reconstruction."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import new_store
from pipeline.config import load_config
from pipeline.data import read_manifest
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ShardReader
from pipeline.data.shards import Manifest
from pipeline.data.writer import PROGRESS_DIR
from pipeline.tokens.decode import decode_tokens, safe_name
from pipeline.tokens.encode import encode_dataset
from pipeline.tokens.codes import EncodeError, load_run_model, pixels_of, read_tokens, token_layout, tokens_of
from pipeline.models import build_vae

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits-categorical.yaml"
# A tiny grid dVAE on 8x8 digits: f = 4 -> a 2 x 2 grid of 16-way codes; logit-Laplace (no binarization noise).
GRID = ["model.arch=resnet", "model.downsample=4", "model.channels=[4, 4, 4]", "model.blocks=1",
        "model.codebook_dim=4", "model.likelihood=logit-laplace", "model.latent.categories=16", "train.epochs=1",
        "model.binarize=none", "tracking.experiment=encode-test"]


@pytest.fixture(scope="module")
def store(empty_mlflow_db, tmp_path_factory) -> str:
    return new_store(empty_mlflow_db, tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture(scope="module")
def grid_run(ray_cluster, digits_dataset, store, tmp_path_factory) -> str:
    """A grid dVAE trained for one epoch on 2 workers (Ray Train), logged to the sqlite store."""
    from pipeline.train.trainer import train

    storage = tmp_path_factory.mktemp("ray")
    config = load_config(DIGITS_CONFIG, [f"data.url={digits_dataset}", f"tracking.uri={store}",
                                         f"train.storage={storage}", *GRID])
    return train(config).run_id


def _logged_run(store: str, tmp_path: Path, dataset: str, *overrides: str, seed: int = 0) -> str:
    """A run as `pipeline train` logs it (config.yaml + checkpoint/model.pt), with untrained weights."""
    from pipeline.runs.store import config_yaml

    config = load_config(DIGITS_CONFIG, [f"data.url={dataset}", f"tracking.uri={store}", *overrides])
    torch.manual_seed(seed)
    model = build_vae(config.model, image_shape=(1, 8, 8), binarize=config.model.binarize)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("encode-logged") or client.get_experiment(
        client.create_experiment("encode-logged"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    client.log_artifact(run_id, str(tmp_path / "config.yaml"))
    (tmp_path / "checkpoint").mkdir(exist_ok=True)
    torch.save(model.state_dict(), tmp_path / "checkpoint" / "model.pt")
    client.log_artifact(run_id, str(tmp_path / "checkpoint" / "model.pt"), "checkpoint")
    client.set_terminated(run_id)
    return run_id


def _source_samples(manifest: Manifest, url: str, shard, config) -> tuple[list[str], np.ndarray, np.ndarray]:
    decoder = SampleDecoder(manifest.spec, ImageTarget.from_config(manifest.spec, config.data))
    keys, images, labels = [], [], []
    for k, x, y in ShardReader(decoder=decoder).read_shard_chunks(manifest, url, shard):
        keys += k
        images.append(decoder.finish(x, None))
        labels.append(y)
    return keys, np.concatenate(images), np.concatenate(labels)


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def _manifest_body(root: Path) -> dict:
    body = json.loads((root / "manifest.json").read_text())
    body.pop("created")
    return body


@pytest.fixture(scope="module")
def reference(grid_run, digits_dataset, store, tmp_path_factory) -> tuple[Path, object]:
    """An uninterrupted encode of every split."""
    out = tmp_path_factory.mktemp("tokens") / "digits-tokens"
    result = encode_dataset(grid_run, digits_dataset, str(out), batch_size=100, tracking_uri=store, progress=False)
    return out, result


@pytest.fixture(scope="module")
def digits_1000(tmp_path_factory) -> str:
    """The digits in shards of 1,000 samples: train-00000's tokens (~2 MB) are more than the shard
    writer buffers (1 MiB), so part of that shard reaches the disk before its last sample is encoded."""
    from pipeline.data import load_digits_splits, write_shards

    out = tmp_path_factory.mktemp("digits-1000")
    write_shards(load_digits_splits(), str(out), source="sklearn digits", samples_per_shard=1000, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def reference_1000(grid_run, digits_1000, store, tmp_path_factory) -> Path:
    """An uninterrupted encode of digits_1000's train split (train-00000: 1,000 samples, train-00001: 297)."""
    out = tmp_path_factory.mktemp("tokens") / "digits-1000-tokens"
    encode_dataset(grid_run, digits_1000, str(out), splits=["train"], batch_size=100, tracking_uri=store,
                   progress=False)
    return out


def test_encode_writes_every_sample_once_in_source_order(grid_run, digits_dataset, store, reference) -> None:
    out, result = reference
    source = read_manifest(digits_dataset)
    tokens = read_manifest(str(out))
    assert result.written == 5 and result.reused == 0 and result.samples == 1797 == result.encoded_samples
    assert tokens.dtype == "uint16" and tokens.sample.image == "npy" and tokens.sample.size == [2, 2]
    info = tokens.tokens
    assert (info.run_id, info.model_version, info.source_sha256) == (grid_run, f"runs:/{grid_run}", source.digest())
    assert (info.categories, info.grid, info.shape, info.image_shape) == (16, [2, 2], [2, 2], [1, 8, 8])
    assert list(tokens.splits) == list(source.splits)

    run = load_run_model(grid_run, (1, 8, 8), tracking_uri=store)
    layout = token_layout(run.model)
    for name, split in source.splits.items():
        assert tokens.splits[name].samples == split.samples
        assert len(tokens.splits[name].shards) == len(split.shards)  # one output shard per input shard
        for src, dst in zip(split.shards, tokens.splits[name].shards):
            keys, images, labels = _source_samples(source, digits_dataset, src, run.config)
            read = list(read_tokens(tokens, str(out), dst))  # checks members, dtype, shape and sha256
            assert [k for k, _, _ in read] == keys  # every sample once, source keys, source order
            assert [y for _, _, y in read] == labels.tolist()
            expected = tokens_of(run.model, torch.from_numpy(images), layout).numpy()
            np.testing.assert_array_equal(np.stack([t for _, t, _ in read]), expected)
            record = json.loads((out / PROGRESS_DIR / f"{dst.path}.json").read_text())
            assert record["shard"] == dst.model_dump() and record["source_sha256"] == src.sha256
    assert not (out / "_tmp").exists()
    with tarfile.open(out / "train-00000.tar") as tar:  # WebDataset layout: <key>.npy, <key>.cls
        names = tar.getnames()[:2]
        array = np.load(io.BytesIO(tar.extractfile(names[0]).read()), allow_pickle=False)
    assert [n.rsplit(".", 1)[1] for n in names] == ["npy", "cls"] and array.dtype == np.uint16

    # A complete re-run redoes nothing; once the model is registered the manifest names its version.
    from pipeline.runs.registry import register_model_version

    register_model_version(store, "encode-test-model", grid_run)
    again = encode_dataset(grid_run, digits_dataset, str(out), tracking_uri=store, progress=False)
    assert (again.written, again.reused) == (0, 5)
    assert read_manifest(str(out)).tokens.model_version == "models:/encode-test-model/1"


def test_killed_run_resumes_redoing_only_unfinished_shards(ray_cluster, grid_run, digits_1000, store,
                                                          reference_1000, tmp_path) -> None:
    """`pipeline encode` killed (its task, then its driver, by SIGKILL) while train-00000's tokens are half on
    disk (the task's sample stream stalls by a hook once the writer has flushed part of the shard): the part
    is not under the shard's name; a re-run redoes only that shard, and the result is the uninterrupted
    run's, byte for byte."""
    import psutil

    import encode_hooks

    def encoding(pid: int) -> bool:
        """``pid`` is still an encode task (Ray titles a worker by its task)."""
        try:
            return any("ray::encode_shard" in part for part in psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            return False

    out, marker = tmp_path / "tokens", tmp_path / "stalled.json"
    gcs = ray_cluster.get_runtime_context().gcs_address
    env = os.environ | encode_hooks.env(encode_hooks.stall_mid_write("train-00000.tar", marker))
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "encode", grid_run, "--data", digits_1000, "--out", str(out),
         "--splits", "train", "--address", gcs, "--tracking-uri", store, "--batch-size", "100"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    progress = out / PROGRESS_DIR
    deadline = time.monotonic() + 150
    try:
        # train-00001 finished, and train-00000's task stalled with part of the shard written
        while not (progress / "train-00001.tar.json").exists() or not marker.exists():
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "train-00001 did not finish, or train-00000 never had bytes on disk"
            time.sleep(0.5)
        stalled = json.loads(marker.read_text())
        # The task dies at once (no cleanup runs in it: its part stays on disk), then its run.
        os.kill(stalled["pid"], signal.SIGKILL)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 60
    while encoding(stalled["pid"]):
        assert time.monotonic() < deadline, f"encode task {stalled['pid']} still running after SIGKILL"
        time.sleep(0.5)
    reference_out = reference_1000
    staged = Path(stalled["file"])
    assert staged.parent == out / "_tmp" and staged.name.startswith("train-00000.tar.")  # written aside
    assert 0 < staged.stat().st_size == stalled["bytes"] < (reference_out / "train-00000.tar").stat().st_size
    assert 0 < stalled["samples"] < 1000  # killed mid-shard, part of it on disk
    assert not (out / "train-00000.tar").exists()  # never under its final name before it is complete
    assert not (out / "manifest.json").exists()
    finished = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*.tar")}
    records = {p.name: p.stat().st_mtime_ns for p in progress.glob("*.json")}
    assert sorted(finished) == ["train-00001.tar"] and sorted(records) == ["train-00001.tar.json"]

    result = encode_dataset(grid_run, digits_1000, str(out), splits=["train"], batch_size=100, tracking_uri=store,
                            progress=False)
    assert (result.written, result.reused, result.encoded_samples) == (1, 1, 1000)
    for name, stamp in finished.items():  # finished shards untouched: not rewritten, not re-recorded
        assert ((out / name).stat().st_mtime_ns, (out / name).stat().st_ino) == stamp
        assert (progress / f"{name}.json").stat().st_mtime_ns == records[f"{name}.json"]
    assert _shard_bytes(out) == _shard_bytes(reference_out)  # identical to the uninterrupted run
    expected = _manifest_body(reference_out)
    assert _manifest_body(out) == expected | {"tokens": _manifest_body(out)["tokens"]}
    assert _manifest_body(out)["splits"] == expected["splits"] and not (out / "_tmp").exists()


def test_decode_renders_the_models_reconstruction(grid_run, digits_dataset, store, reference, tmp_path) -> None:
    out, _ = reference
    tokens = read_manifest(str(out))
    source = read_manifest(digits_dataset)
    run = load_run_model(grid_run, (1, 8, 8), tracking_uri=store)
    layout = token_layout(run.model)
    keys, images, _ = _source_samples(source, digits_dataset, source.splits["train"].shards[0], run.config)
    expected = run.model.reconstruct(torch.from_numpy(images))  # decoded from the posterior mode
    grids = torch.from_numpy(np.stack([t for _, t, _ in read_tokens(tokens, str(out), tokens.splits["train"].shards[0])]).astype(np.int64))
    torch.testing.assert_close(pixels_of(run.model, grids, layout), expected, rtol=0, atol=1e-6)

    result = decode_tokens(grid_run, str(out), str(tmp_path / "png"), limit=20, tracking_uri=store, progress=False)
    assert result.images == 20
    files = sorted((tmp_path / "png").iterdir())
    assert [f.name for f in files] == sorted(f"{safe_name(k)}.png" for k in keys[:20])
    for i, key in enumerate(keys[:20]):
        png = np.asarray(Image.open(tmp_path / "png" / f"{safe_name(key)}.png"))
        want = (expected[i, 0] * 255).round().to(torch.uint8).numpy()
        assert np.abs(png.astype(int) - want).max() <= 1, key


def test_flat_latent_tokens_are_n_argmaxes_and_reproducible(ray_cluster, digits_dataset, store, tmp_path) -> None:
    """An MLP categorical VAE (8 variables x 8 classes) with dynamic binarization: tokens uint16 [N], the
    binarization noise seeded per shard; the CLI's decode renders them."""
    run_id = _logged_run(store, tmp_path, digits_dataset)
    out = tmp_path / "flat"
    result = encode_dataset(run_id, digits_dataset, str(out), splits=["val", "test"], batch_size=64,
                            tracking_uri=store, progress=False)
    tokens = read_manifest(str(out))
    assert list(tokens.splits) == ["val", "test"] and result.samples == 500
    assert (tokens.tokens.grid, tokens.tokens.shape, tokens.sample.size) == (None, [8], [1, 8])
    source = read_manifest(digits_dataset)
    run = load_run_model(run_id, (1, 8, 8), tracking_uri=store)
    from pipeline.tokens.encode import ShardJob, _shard_seed

    keys, images, _ = _source_samples(source, digits_dataset, source.splits["val"].shards[0], run.config)
    torch.manual_seed(_shard_seed(0, ShardJob("val", 0, source.splits["val"].shards[0])))
    expected = np.concatenate([tokens_of(run.model, torch.from_numpy(images[i:i + 64]), token_layout(run.model)).numpy()
                               for i in range(0, len(images), 64)])
    read = list(read_tokens(tokens, str(out), tokens.splits["val"].shards[0]))
    np.testing.assert_array_equal(np.stack([t for _, t, _ in read]), expected)
    assert read[0][1].shape == (8,) and read[0][1].dtype == np.uint16

    proc = subprocess.run([sys.executable, "-m", "pipeline", "decode", run_id, "--data", str(out), "--out",
                           str(tmp_path / "png"), "--limit", "3", "--tracking-uri", store],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == sorted(f"{k}.png" for k in keys[:3])

    with pytest.raises(EncodeError, match=f"tokens of run {run_id}, not of run {'0' * 32}"):
        decode_tokens("0" * 32, str(out), str(tmp_path / "x"), tracking_uri=store, progress=False)


def test_clear_errors_name_the_run_and_the_shard(ray_cluster, digits_dataset, store, tmp_path) -> None:
    gaussian = _logged_run(store, tmp_path, digits_dataset, "model.latent.kind=gaussian", "model.latent.variables=4")
    with pytest.raises(EncodeError, match=f"run {gaussian}.*not categorical"):
        encode_dataset(gaussian, digits_dataset, str(tmp_path / "g"), tracking_uri=store, progress=False)
    with pytest.raises(EncodeError, match="the dataset's own folder"):
        encode_dataset(gaussian, digits_dataset, digits_dataset + "/", tracking_uri=store, progress=False)
    with pytest.raises(EncodeError, match="no MLflow run"):
        encode_dataset("f" * 32, digits_dataset, str(tmp_path / "g"), tracking_uri=store, progress=False)

    # A source shard changed after its manifest was written: the task fails naming run and shard.
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(digits_dataset, damaged)
    shard = damaged / "val-00000.tar"
    data = bytearray(shard.read_bytes())
    data[650] ^= 0xFF  # inside the first image's pixels (tar header 512 + npy header 128)
    shard.write_bytes(bytes(data))
    flat = _logged_run(store, tmp_path, str(damaged))
    with pytest.raises(EncodeError, match=f"run {flat}.*val-00000.tar.*sha256"):
        encode_dataset(flat, str(damaged), str(tmp_path / "d"), splits=["val", "test"], tracking_uri=store,
                       progress=False)
    assert (tmp_path / "d" / "test-00000.tar").exists() and not (tmp_path / "d" / "val-00000.tar").exists()
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_token_manifests_and_shards_are_checked(tmp_path) -> None:
    from pipeline.data.shards import write_shard
    from pipeline.data.errors import ShardError
    import fsspec

    base = {"source": "x", "sample": {"image": "npy", "channels": 1, "size": [2, 2], "label": None},
            "keys": ["npy"], "splits": {"train": {"samples": 1, "shards": [
                {"path": "train-00000.tar", "samples": 1, "bytes": 0, "sha256": "0"}]}}, "created": "now"}
    tokens = {"run_id": "r", "model_version": "runs:/r", "source": "s", "source_sha256": "d", "categories": 4,
              "grid": [2, 2], "shape": [2, 2], "image_shape": [1, 8, 8]}
    with pytest.raises(ValueError, match="uint16"):
        Manifest.model_validate(base | {"dtype": "uint16"})
    with pytest.raises(ValueError, match="uint16"):
        Manifest.model_validate(base | {"tokens": tokens})
    assert Manifest.model_validate(base).digest() == Manifest.model_validate(base | {"tokens": None}).digest()

    fs = fsspec.filesystem("file")
    for members, problem in [({"npy": np.zeros((2, 2), np.uint8)}, "uint16"),
                             ({"npy": np.full((2, 2), 4, np.uint16)}, "below 4"),
                             ({"npy": np.zeros((2, 2), np.uint16), "pyd": b"x"}, "undeclared")]:
        path = tmp_path / "train-00000.tar"
        encoded = {k: (v if isinstance(v, bytes) else _npy(v)) for k, v in members.items()}
        count, size, sha = write_shard(fs, str(path), [("k0", encoded)])
        body = json.loads(json.dumps(base))
        body["splits"]["train"]["shards"][0].update(bytes=size, sha256=sha)
        manifest = Manifest.model_validate(body | {"dtype": "uint16", "tokens": tokens})
        with pytest.raises(ShardError, match=problem):
            list(read_tokens(manifest, str(tmp_path), manifest.splits["train"].shards[0]))
    assert safe_name("../a/b c") == "_.._a_b_c" and safe_name("x-1.y") == "x-1.y"


def test_shard_writer_writes_tarfiles_bytes() -> None:
    """write_shard builds member headers itself (fast); the bytes are exactly what tarfile writes, long names too."""
    import tarfile

    import fsspec

    from pipeline.data.shards import write_shard

    fs = fsspec.filesystem("memory")
    samples = [(("long-folder/" * 11 if i == 3 else "") + f"k{i:05d}",
                {"npy": _npy(np.full((2, 3), i, np.uint16)), "cls": str(i).encode()}) for i in range(37)]
    write_shard(fs, "/fast.tar", iter(samples))
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
    assert fs.cat_file("/fast.tar") == reference.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
