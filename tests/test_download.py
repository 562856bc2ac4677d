"""`pipeline data mnist|binarized-mnist|fashion-mnist --download` against a real HTTP server on 127.0.0.1 serving
copies of the original files: the shards equal those made from the local copies, a wrong digest is refused with
nothing written, a partial download resumes with a Range request, and a server without ranges starts over."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import BINARIZED_MNIST_DIR, MNIST_DIR
from pipeline.cli import app
from pipeline.data import load_binarized_mnist_splits, load_mnist_splits, read_manifest, write_shards
from pipeline.data.download import BINARIZED_MNIST, FASHION_MNIST, MNIST, DownloadError, download_dataset
from pipeline.data.retry import RetryPolicy

QUICK = RetryPolicy(retries=3, backoff_s=0.0, jitter=False)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's folder; honours ``Range: bytes=N-`` unless told not to, can cut a body short once, and
    logs every request's path and Range header."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_head(self):  # noqa: ANN201 - http.server's signature
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "File not found")
            return None
        data = path.read_bytes()
        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested and server.ranges:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = server.cut_once.pop(path.name, None)
        if cut is not None:  # promise the whole body, send part of it, hang up
            self.wfile.write(body[:cut])
            self.close_connection = True
            return None
        import io

        return io.BytesIO(body)


@pytest.fixture
def server(tmp_path):
    """A ThreadingHTTPServer on 127.0.0.1 serving ``tmp_path / 'www'``; yields it (``.url``, ``.root``, ``.log``,
    ``.ranges``, ``.cut_once``)."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.root, httpd.log, httpd.ranges, httpd.cut_once = root, [], True, {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _serve_mnist(root: Path) -> None:
    for known in MNIST.files:
        shutil.copy(MNIST_DIR / known.name, root / known.name)


def _shards(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    return {name: split for name, split in manifest["splits"].items()}


def _invoke(*args: str):
    return CliRunner().invoke(app, ["data", *args], env={"COLUMNS": "200"})  # help lines unbroken


# --- MNIST -----------------------------------------------------------------------------------------

def test_mnist_download_shards_exactly_as_the_local_copies(server, tmp_path) -> None:
    _serve_mnist(server.root)
    raw, out = tmp_path / "raw", tmp_path / "downloaded"
    result = _invoke("mnist", "--download", "--source", str(raw), "--mirror", server.url, "--out", str(out),
                     "--samples-per-shard", "20000")
    assert result.exit_code == 0, result.output
    for known in MNIST.files:
        assert (raw / known.name).read_bytes() == (MNIST_DIR / known.name).read_bytes()
        assert not (raw / (known.name + ".part")).exists()
    assert sorted(path for path, _ in server.log) == sorted(f"/{known.name}" for known in MNIST.files)
    local = tmp_path / "local"
    write_shards(load_mnist_splits(str(MNIST_DIR)), str(local), source="mnist", samples_per_shard=20_000, progress=False)
    assert _shards(out) == _shards(local)
    assert {n: s.samples for n, s in read_manifest(str(out)).splits.items()} == {"train": 50_000, "val": 10_000,
                                                                                 "test": 10_000}
    # A second run finds the files in place, checks them and asks the server for nothing.
    server.log.clear()
    again = _invoke("mnist", "--download", "--source", str(raw), "--mirror", server.url, "--out", str(tmp_path / "o2"))
    assert again.exit_code == 0, again.output
    assert server.log == [] and "already in" in again.output


def test_the_mirror_can_come_from_the_environment(server, tmp_path, monkeypatch) -> None:
    sums = _serve_synthetic_fashion(server.root, tmp_path)
    monkeypatch.setenv("PIPELINE_FASHION_MNIST_MIRROR", server.url.rstrip("/"))  # with or without the last slash
    result = _invoke("fashion-mnist", "--download", "--source", str(tmp_path / "raw"), "--checksums", str(sums),
                     "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert sorted(path for path, _ in server.log) == sorted(f"/{known.name}" for known in FASHION_MNIST.files)
    # The flag wins over the variable.
    monkeypatch.setenv("PIPELINE_FASHION_MNIST_MIRROR", "http://127.0.0.1:9/")
    server.log.clear()
    result = _invoke("fashion-mnist", "--download", "--source", str(tmp_path / "raw2"), "--checksums", str(sums),
                     "--mirror", server.url, "--out", str(tmp_path / "out2"))
    assert result.exit_code == 0, result.output
    assert len(server.log) == 4


def test_a_wrong_digest_is_refused_and_nothing_is_written(server, tmp_path) -> None:
    _serve_mnist(server.root)
    bad = server.root / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    bad.write_bytes(bytes(data))
    raw, out = tmp_path / "raw", tmp_path / "out"
    result = _invoke("mnist", "--download", "--source", str(raw), "--mirror", server.url, "--out", str(out))
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    actual = hashlib.sha256(bytes(data)).hexdigest()
    expected = next(k.sha256 for k in MNIST.files if k.name == bad.name)
    assert f"t10k-labels-idx1-ubyte.gz from {server.url}t10k-labels-idx1-ubyte.gz" in message
    assert f"sha256 {actual}, expected {expected}" in message and "nothing was sharded" in message
    assert not out.exists()
    assert not (raw / bad.name).exists() and not (raw / (bad.name + ".part")).exists()
    # The files that did match stay, so fixing the mirror costs only the bad file.
    assert (raw / "train-images-idx3-ubyte.gz").exists()


def test_a_file_already_there_with_a_wrong_digest_is_refused_and_kept(server, tmp_path) -> None:
    _serve_mnist(server.root)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    result = _invoke("mnist", "--download", "--source", str(raw), "--mirror", server.url, "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert "is not the expected train-labels-idx1-ubyte.gz (9 bytes, expected 28,881)" in " ".join(result.output.split())
    assert (raw / "train-labels-idx1-ubyte.gz").read_bytes() == b"not mnist"
    assert not (tmp_path / "o").exists()


def test_a_partial_file_resumes_with_a_range_request(server, tmp_path) -> None:
    _serve_mnist(server.root)
    raw = tmp_path / "raw"
    raw.mkdir()
    name = "train-images-idx3-ubyte.gz"
    original = (MNIST_DIR / name).read_bytes()
    (raw / (name + ".part")).write_bytes(original[:4_000_000])  # an interrupted earlier run
    download_dataset(MNIST, raw, mirror=server.url, policy=QUICK)
    assert (raw / name).read_bytes() == original and not (raw / (name + ".part")).exists()
    assert (f"/{name}", "bytes=4000000-") in server.log
    assert [r for p, r in server.log if p == f"/{name}"] == ["bytes=4000000-"]


def test_a_broken_connection_is_retried_from_where_it_stopped(server, tmp_path) -> None:
    _serve_mnist(server.root)
    name = "train-images-idx3-ubyte.gz"
    server.cut_once[name] = 3_000_000
    download_dataset(MNIST, tmp_path / "raw", mirror=server.url, policy=QUICK)
    assert (tmp_path / "raw" / name).read_bytes() == (MNIST_DIR / name).read_bytes()
    assert [r for p, r in server.log if p == f"/{name}"] == [None, "bytes=3000000-"]


def test_a_server_without_ranges_starts_the_file_over(server, tmp_path) -> None:
    _serve_mnist(server.root)
    server.ranges = False
    raw = tmp_path / "raw"
    raw.mkdir()
    name = "t10k-images-idx3-ubyte.gz"
    (raw / (name + ".part")).write_bytes(b"\x00" * 1000)  # not even a prefix: appending would corrupt it
    download_dataset(MNIST, raw, mirror=server.url, policy=QUICK)
    assert (raw / name).read_bytes() == (MNIST_DIR / name).read_bytes()
    assert [r for p, r in server.log if p == f"/{name}"] == ["bytes=1000-"]  # asked, got 200, wrote from zero


def test_a_part_that_is_not_a_prefix_is_deleted_not_kept(server, tmp_path) -> None:
    """A complete .part of the wrong bytes (a server that had range support and served another file)."""
    _serve_mnist(server.root)
    raw = tmp_path / "raw"
    raw.mkdir()
    name = "t10k-labels-idx1-ubyte.gz"
    (raw / (name + ".part")).write_bytes(b"\x00" * 4_542)
    with pytest.raises(DownloadError, match=f"{name} from {server.url}{name} does not match its known digest"):
        download_dataset(MNIST, raw, mirror=server.url, policy=QUICK)
    assert not (raw / (name + ".part")).exists()


def test_missing_files_and_an_unreachable_mirror_are_named(server, tmp_path) -> None:
    with pytest.raises(DownloadError, match=r"could not fetch train-images-idx3-ubyte.gz: .*HTTP 404"):
        download_dataset(MNIST, tmp_path / "raw", mirror=server.url, policy=QUICK)
    dead = "http://127.0.0.1:9/"  # discard port: connection refused
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1:9/train-images-idx3-ubyte.gz: .*[Cc]onnection refused"):
        download_dataset(MNIST, tmp_path / "raw", mirror=dead, policy=QUICK)


def test_the_next_location_serves_when_the_first_is_down(server, tmp_path, monkeypatch) -> None:
    import dataclasses

    _serve_mnist(server.root)
    two = dataclasses.replace(MNIST, locations=("http://127.0.0.1:9/", server.url))
    download_dataset(two, tmp_path / "raw", policy=QUICK)
    assert len(server.log) == 4  # the dead location was given up once, not once per file


# --- binarized MNIST -------------------------------------------------------------------------------

def test_binarized_mnist_download_shards_exactly_as_the_local_copies(server, tmp_path) -> None:
    for known in BINARIZED_MNIST.files:  # the publisher serves the .amat files uncompressed
        (server.root / known.name).write_bytes(gzip.decompress((BINARIZED_MNIST_DIR / (known.name + ".gz")).read_bytes()))
    raw, out = tmp_path / "raw", tmp_path / "downloaded"
    result = _invoke("binarized-mnist", "--download", "--source", str(raw), "--mirror", server.url, "--out", str(out),
                     "--samples-per-shard", "25000")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in raw.iterdir()) == sorted(k.name for k in BINARIZED_MNIST.files)
    local = tmp_path / "local"
    write_shards(load_binarized_mnist_splits(str(BINARIZED_MNIST_DIR)), str(local), source="b",
                 samples_per_shard=25_000, progress=False)
    assert _shards(out) == _shards(local)


# --- Fashion-MNIST ---------------------------------------------------------------------------------

def _idx(array: np.ndarray, magic: int) -> bytes:
    return gzip.compress(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def _serve_synthetic_fashion(root: Path, tmp_path: Path) -> Path:
    """Small files in Fashion-MNIST's names and format (train 10,012, test 5) under ``root``; returns a
    sha256sum-style list of them."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": (rng.integers(0, 256, (10_012, 28, 28)), 2051),
              "train-labels-idx1-ubyte.gz": (rng.integers(0, 10, 10_012), 2049),
              "t10k-images-idx3-ubyte.gz": (rng.integers(0, 256, (5, 28, 28)), 2051),
              "t10k-labels-idx1-ubyte.gz": (rng.integers(0, 10, 5), 2049)}
    sums = []
    for name, (array, magic) in arrays.items():
        data = _idx(array, magic)
        (root / name).write_bytes(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    path = tmp_path / "SHA256SUMS"
    path.write_text("# re-packed\n" + "\n".join(sums) + "\n")
    return path


def test_fashion_mnist_checks_the_published_md5_and_shards(server, tmp_path) -> None:
    """Small synthetic files in Fashion-MNIST's names and format; ``--checksums`` (the option for a mirror's
    re-packed copies) gives their sha256s. Without it the same files are refused by the published size and md5."""
    sums = _serve_synthetic_fashion(server.root, tmp_path)
    raw = tmp_path / "raw"
    refused = _invoke("fashion-mnist", "--download", "--source", str(raw), "--mirror", server.url,
                      "--out", str(tmp_path / "refused"))
    assert refused.exit_code == 1 and not (tmp_path / "refused").exists()
    assert "expected 26,421,880" in " ".join(refused.output.split())  # the size is checked before the md5
    out = tmp_path / "fashion"
    result = _invoke("fashion-mnist", "--download", "--source", str(raw), "--mirror", server.url,
                     "--checksums", str(sums), "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(out))
    assert {n: s.samples for n, s in manifest.splits.items()} == {"train": 12, "val": 10_000, "test": 5}
    assert manifest.source == f"fashion_mnist:{raw}"


def test_fashion_mnist_digests_are_the_published_md5s() -> None:
    """Pinned so that an edit of the table shows up in review: the publisher's md5s (zalandoresearch/fashion-mnist)."""
    assert {k.name: k.md5 for k in FASHION_MNIST.files} == {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
    assert all(k.sha256 is None for k in FASHION_MNIST.files)


def test_the_known_digests_match_the_local_copies() -> None:
    for known in MNIST.files:
        data = (MNIST_DIR / known.name).read_bytes()
        assert len(data) == known.bytes and hashlib.sha256(data).hexdigest() == known.sha256
    for known in BINARIZED_MNIST.files:
        data = gzip.decompress((BINARIZED_MNIST_DIR / (known.name + ".gz")).read_bytes())
        assert len(data) == known.bytes and hashlib.sha256(data).hexdigest() == known.sha256


# --- the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["mnist", "binarized-mnist", "fashion-mnist"])
def test_help_names_download_mirror_and_its_variable(command) -> None:
    result = _invoke(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for word in ("--download", "--mirror", "--checksums", "--source",
                 f"PIPELINE_{command.upper().replace('-', '_')}_MIRROR"):
        assert word in text, word


def test_usage_errors(tmp_path) -> None:
    assert _invoke("mnist", "--out", str(tmp_path / "o")).exit_code == 2  # neither --source nor --download
    assert _invoke("mnist", "--source", str(MNIST_DIR), "--checksums", "x", "--out", str(tmp_path / "o")).exit_code == 2
    result = _invoke("mnist", "--download", "--source", "s3://bucket/raw", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "local folder" in result.output
