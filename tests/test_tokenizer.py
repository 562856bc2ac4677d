"""The image tokenizer users load, call and serve: one tiny grid dVAE trained by `pipeline train` on
RGB photo crops (real Ray cluster, real sqlite MLflow store, registered as champion by the command;
the session's run, tests/conftest.py::grid_dvae_run, which tests/test_dvae_train.py reads too),
then loaded as `Tokenizer` by run id, runs:/ URI and registry alias, as an MLflow pyfunc, and
served by a real `mlflow models serve` process — all giving the codes `pipeline encode` writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.data import read_manifest
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ShardReader
from pipeline.models import build_vae
from pipeline.tokens.codes import read_tokens
from conftest import GRID_DVAE

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits-categorical.yaml"
EXPERIMENT = GRID_DVAE["experiment"]  # also the registered model's name


def _cli(*args: str, timeout: int) -> str:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


@pytest.fixture(scope="module")
def trained(ray_cluster, grid_dvae_run) -> dict:
    """The session's grid run (tests/conftest.py: configs/images-dvae.yaml at test widths, 16x16 RGB -> a 4x4
    grid of 32-way codes), trained and registered by `pipeline train`, and its dataset encoded by
    `pipeline encode`, both on the session's Ray cluster."""
    assert "champion: " in grid_dvae_run["stdout"], grid_dvae_run["stdout"]
    uri, run_id, dataset = grid_dvae_run["uri"], grid_dvae_run["run_id"], grid_dvae_run["dataset"]
    tokens = str(grid_dvae_run["root"] / "tokens")
    gcs = ray_cluster.get_runtime_context().gcs_address
    _cli("encode", run_id, "--data", dataset, "--out", tokens, "--address", gcs, "--tracking-uri", uri,
         "--batch-size", "7", timeout=300)
    return {"uri": uri, "run_id": run_id, "dataset": dataset, "tokens": tokens, "config": grid_dvae_run["config"],
            "root": grid_dvae_run["root"]}


@pytest.fixture(scope="module")
def images(trained) -> np.ndarray:
    """The dataset's train images, uint8 [n, 3, 16, 16], as `pipeline encode` decodes them."""
    manifest = read_manifest(trained["dataset"])
    decoder = SampleDecoder(manifest.spec, ImageTarget.from_config(manifest.spec, trained["config"].data))
    chunks = [decoder.finish(x, None) for shard in manifest.splits["train"].shards
              for _, x, _ in ShardReader(decoder=decoder).read_shard_chunks(manifest, trained["dataset"], shard)]
    return np.ascontiguousarray(np.concatenate(chunks))


@pytest.fixture(scope="module")
def tokenizer(trained):
    from pipeline import Tokenizer

    return Tokenizer.load(trained["run_id"], tracking_uri=trained["uri"])


def test_run_id_run_uri_and_registry_alias_load_the_same_tokenizer(trained, images, tokenizer, monkeypatch) -> None:
    from pipeline import Tokenizer

    assert (tokenizer.grid, tokenizer.codebook_size, tokenizer.image_shape) == ((4, 4), 32, (3, 16, 16))
    assert tokenizer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    codes = tokenizer.encode(images)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int64 and codes.shape == (len(images), 4, 4)
    assert codes.min() >= 0 and codes.max() < 32
    by_uri = Tokenizer.load(f"runs:/{trained['run_id']}/model", tracking_uri=trained["uri"], device="cpu", batch_size=5)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])  # the store from the environment
    champion = Tokenizer.load(f"models:/{EXPERIMENT}@champion")
    version = Tokenizer.load(f"models:/{EXPERIMENT}/1")
    for other in (by_uri, champion, version):
        np.testing.assert_array_equal(other.encode(images), codes)
    as_tensor = by_uri.encode(torch.from_numpy(images))  # a tensor in, a tensor out; batches of 5
    assert as_tensor.dtype == torch.int64 and torch.equal(as_tensor, torch.from_numpy(codes))


def test_codes_are_what_pipeline_encode_wrote(trained, images, tokenizer) -> None:
    manifest = read_manifest(trained["tokens"])
    assert manifest.tokens.run_id == trained["run_id"] and manifest.tokens.model_version == f"models:/{EXPERIMENT}/1"
    written = np.stack([t for shard in manifest.splits["train"].shards
                        for _, t, _ in read_tokens(manifest, trained["tokens"], shard)])
    np.testing.assert_array_equal(tokenizer.encode(images), written.astype(np.int64))
    np.testing.assert_array_equal(tokenizer.decode(written), tokenizer.decode(written.astype(np.int64)))  # uint16 in


def test_decode_of_encode_is_the_models_reconstruction(trained, images, tokenizer, tmp_path) -> None:
    """Against the VAE rebuilt by hand from the run's own config.yaml and checkpoint/model.pt."""
    client = MlflowClient(trained["uri"])
    weights = client.download_artifacts(trained["run_id"], "checkpoint/model.pt", str(tmp_path))
    config = trained["config"]
    model = build_vae(config.model, image_shape=(3, 16, 16), binarize=config.model.binarize)
    model.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        expected = (model.eval().reconstruct(torch.from_numpy(images)).clamp(0, 1) * 255).round().to(torch.uint8)
    decoded = tokenizer.decode(tokenizer.encode(images))
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    np.testing.assert_array_equal(decoded, expected.numpy())


def test_logged_model_is_a_pyfunc_that_returns_the_codes(trained, images, tokenizer) -> None:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(trained["uri"])
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{trained['run_id']}/model")
        champion = mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    signature = model.metadata.signature
    (inputs,), (outputs,) = signature.inputs.inputs, signature.outputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype(np.uint8), (-1, 3, 16, 16))
    assert (outputs.type, outputs.shape) == (np.dtype(np.int64), (-1, 4, 4))
    predicted = model.predict(images)
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, tokenizer.encode(images))
    np.testing.assert_array_equal(champion.predict(images[:3]), predicted[:3])
    with pytest.raises(Exception, match="(?i)schema|dtype"):  # floats are refused by the signature
        model.predict(images.astype(np.float32) / 255)


def test_warm_start_loads_a_grid_champion(trained) -> None:
    from pipeline.runs.load import load_initial_weights

    config = trained["config"]
    model = build_vae(config.model, image_shape=(3, 16, 16), binarize=config.model.binarize)
    load_initial_weights(model, f"models:/{EXPERIMENT}@champion", trained["uri"])
    from pipeline import Tokenizer

    reference = Tokenizer.load(trained["run_id"], tracking_uri=trained["uri"], device="cpu").model
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_mlflow_models_serve_tokenizes_over_rest(trained, images, tokenizer) -> None:
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # as in an activated environment: MLflow execs `uvicorn` by name
    env = os.environ | {"MLFLOW_TRACKING_URI": trained["uri"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", f"runs:/{trained['run_id']}/model",
                               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                              env=env, cwd=trained["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
            time.sleep(0.5)
        body = json.dumps({"inputs": images[:9].tolist()}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
        np.testing.assert_array_equal(np.asarray(answer["predictions"]), tokenizer.encode(images[:9]))
    finally:
        _end_group(server)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, 0)  # workers of the group still alive?
        except ProcessLookupError:
            return


def test_clear_errors(trained, tokenizer, digits_dataset, tmp_path) -> None:
    from pipeline import Tokenizer
    from pipeline.tokens.tokenizer import TokenizerError
    from pipeline.runs.store import config_yaml

    # a run of another architecture: config.yaml + raw weights as training logs them
    config = load_config(DIGITS_CONFIG, [f"data.url={digits_dataset}", "model.arch=conv"])
    client = MlflowClient(trained["uri"])
    experiment = client.get_experiment_by_name("tokenizer-errors") or client.get_experiment(
        client.create_experiment("tokenizer-errors"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    client.log_artifact(run_id, str(tmp_path / "config.yaml"))
    torch.save(build_vae(config.model, image_shape=(1, 8, 8)).state_dict(), tmp_path / "model.pt")
    client.log_artifact(run_id, str(tmp_path / "model.pt"), "checkpoint")
    with pytest.raises(TokenizerError, match=f"run {run_id} is not a grid model: model.arch conv"):
        Tokenizer.load(run_id, tracking_uri=trained["uri"])
    with pytest.raises(TokenizerError, match="no MLflow run"):
        Tokenizer.load("f" * 32, tracking_uri=trained["uri"])
    with pytest.raises(TokenizerError, match=f"no model models:/{EXPERIMENT}@nope"):
        Tokenizer.load(f"models:/{EXPERIMENT}@nope", tracking_uri=trained["uri"])

    good = np.zeros((2, 3, 16, 16), np.uint8)
    with pytest.raises(TokenizerError, match=r"uint8 \[B, 3, 16, 16\], got dtype float32"):
        tokenizer.encode(good.astype(np.float32))
    with pytest.raises(TokenizerError, match=r"uint8 \[B, 3, 16, 16\], got shape \[2, 1, 16, 16\]"):
        tokenizer.encode(good[:, :1])
    with pytest.raises(TokenizerError, match=r"\[B, 4, 4\], got shape \[2, 16\]"):
        tokenizer.decode(np.zeros((2, 16), np.int64))
    with pytest.raises(TokenizerError, match=r"in \[0, 32\) .*got values from 0 to 32"):
        tokenizer.decode(np.array([[[0, 1, 2, 32]] * 4]))
    with pytest.raises(TokenizerError, match="integers"):
        tokenizer.decode(np.zeros((1, 4, 4), np.float32))


def test_import_pipeline_stays_light() -> None:
    code = ("import sys, pipeline; assert 'torch' not in sys.modules and 'mlflow' not in sys.modules; "
            "from pipeline import Tokenizer; assert 'torch' in sys.modules; print(Tokenizer.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "Tokenizer", proc.stderr[-2000:]


def test_an_exported_folder_tokenizes_without_mlflow(trained, images, tokenizer, tmp_path) -> None:
    """`pipeline export` writes config.yaml + model.safetensors + model.json + README.md; a fresh process in
    which MLflow cannot be imported loads it with `Tokenizer.load(FOLDER)` and gives the same codes."""
    folder = tmp_path / "carried"
    out = _cli("export", trained["run_id"], "--out", str(folder), "--tracking-uri", trained["uri"], "--json", timeout=120)
    meta = json.loads(out[: out.rindex("}") + 1])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.yaml", "model.json", "model.safetensors"]
    assert meta["code_grid"] == list(tokenizer.grid) and meta["codebook_size"] == tokenizer.codebook_size
    assert meta["image_shape"] == list(tokenizer.image_shape) and meta["run_id"] == trained["run_id"]
    np.save(tmp_path / "images.npy", images)
    code = ("import sys; sys.modules['mlflow'] = None\n"  # any import of mlflow now fails
            "import numpy as np; from pipeline import Tokenizer\n"
            f"tok = Tokenizer.load({str(folder)!r}, device='cpu')\n"
            f"np.save({str(tmp_path / 'codes.npy')!r}, tok.encode(np.load({str(tmp_path / 'images.npy')!r})))\n"
            "assert 'mlflow' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "codes.npy"), tokenizer.encode(images))
    taken = subprocess.run([sys.executable, "-m", "pipeline", "export", trained["run_id"], "--out", str(trained["root"]),
                            "--tracking-uri", trained["uri"]], capture_output=True, text=True, timeout=120)
    assert taken.returncode == 1 and "holds other files" in " ".join(taken.stderr.split())
