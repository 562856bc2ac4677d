"""Reading through fsspec with counted retries (a real moto S3 server behind a fault-injecting proxy)
and the local shard cache."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from moto_s3 import FaultyProxy, moto_server, s3_environment
from pipeline.data import ShardError, Split, read_manifest, write_shards
from pipeline.data.cache import ShardCache
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.remote import RetryingReader, is_transient
from pipeline.data.stats import ReadStats
from pipeline.data.stream import eval_batches
from pipeline.data.retry import RetryPolicy

FAST = RetryPolicy(retries=5, backoff_s=0.01)


@pytest.fixture(scope="module")
def s3():
    with moto_server() as endpoint, s3_environment(endpoint):
        fs = fsspec.filesystem("s3")
        fs.mkdir("remote-tests")
        yield endpoint


def test_transient_errors_are_told_from_final_ones() -> None:
    class ClientError(Exception):
        def __init__(self, status: int) -> None:
            self.response = {"ResponseMetadata": {"HTTPStatusCode": status}}

    wrapped = FileNotFoundError("http://host/x")
    wrapped.__cause__ = ConnectionRefusedError(111, "refused")
    translated = OSError(errno.EIO, "boom")
    translated.__cause__ = ClientError(503)
    for err in (ConnectionResetError(), TimeoutError(), OSError(121, "EREMOTEIO"), wrapped, translated):
        assert is_transient(err), err
    not_found = FileNotFoundError("s3://b/k")
    not_found.__cause__ = ClientError(404)
    for err in (FileNotFoundError("x"), PermissionError("x"), ValueError("x"), not_found):
        assert not is_transient(err), err


def test_reads_survive_a_faulty_server_and_count_retries(s3) -> None:
    data = os.urandom(1_500_000)
    fsspec.filesystem("s3").pipe("remote-tests/blob.bin", data)
    with FaultyProxy(s3, every=3) as proxy, s3_environment(proxy.endpoint):
        stats = ReadStats()
        reader = RetryingReader("s3://remote-tests/blob.bin", FAST, block_size=150_000, on_retry=stats.count_retry)
        got = b"".join(iter(lambda: reader.read(64_000), b""))
    assert got == data
    assert proxy.faults >= 4 and all(proxy.by_kind.values())  # 500s, resets and cut-off bodies all happened
    assert 1 <= stats.read_retries <= proxy.faults  # exact per kind of fault: the next test


class _OneKind(FaultyProxy):
    def __init__(self, kind: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.KINDS = (kind,)


@pytest.mark.parametrize("kind", ["500", "truncate", pytest.param("reset", marks=pytest.mark.xfail(
    strict=True, reason="a connection reset during a ranged GET is retried once below us (aiobotocore/aiohttp) "
                        "without being counted: pipeline/data/remote.py does not yet see or count it"))])
def test_every_failed_read_is_counted_exactly_once(s3, kind) -> None:
    """The README's claim: no silent retry below our counted one, so data/read_retries is the truth."""
    data = os.urandom(1_500_000)
    fsspec.filesystem("s3").pipe("remote-tests/exact.bin", data)
    with _OneKind(kind, s3, every=3, ranged_gets_only=True) as proxy, s3_environment(proxy.endpoint):
        stats = ReadStats()
        reader = RetryingReader("s3://remote-tests/exact.bin", FAST, block_size=150_000, on_retry=stats.count_retry)
        got = b"".join(iter(lambda: reader.read(64_000), b""))
    assert got == data and proxy.faults >= 2
    assert stats.read_retries == proxy.faults  # each fault is one failed read attempt, counted once


def digits_like(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 10, n))


def test_an_epoch_over_a_faulty_server_completes_with_the_same_samples(s3, tmp_path: Path) -> None:
    splits = {"train": digits_like(600, 0), "val": digits_like(50, 1)}
    url = "s3://remote-tests/faulty-epoch"
    write_shards(splits, url, source="random", samples_per_shard=100, progress=False)
    manifest = read_manifest(url)
    reader = ShardReader(ReadOptions(verify=True))

    def labels() -> list[int]:
        return [int(v) for _, y in eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=64,
                                                reader=reader) for v in y]

    clean = labels()
    assert clean == splits["train"].labels.tolist()
    with FaultyProxy(s3, every=2, max_faults=30) as proxy, s3_environment(proxy.endpoint):
        assert labels() == clean
    assert proxy.faults > 0 and reader.stats.read_retries > 0


def test_persistent_failure_gives_up_naming_the_shard(s3) -> None:
    splits = {"train": digits_like(20, 2)}
    url = "s3://remote-tests/down"
    write_shards(splits, url, source="random", samples_per_shard=20, progress=False)
    manifest = read_manifest(url)
    with _OneKind("500", s3, every=1, ranged_gets_only=True) as proxy, s3_environment(proxy.endpoint):
        reader = ShardReader(ReadOptions(retries=2, retry_backoff_s=0.01))
        with pytest.raises(ShardError, match=r"^shard s3://remote-tests/down/train-00000\.tar: unreadable shard"):
            list(reader.read_shard(manifest, url, manifest.splits["train"].shards[0]))
    assert (proxy.faults, reader.stats.read_retries) == (3, 2)  # the first attempt and exactly 2 retries


# --- cache ------------------------------------------------------------------------------------------


@pytest.fixture
def memory_dataset():
    """A 'remote' dataset on fsspec's memory:// filesystem (not local, so it goes through the cache)."""
    url = f"memory://cache-tests/{os.urandom(4).hex()}"
    write_shards({"train": digits_like(300, 3)}, url, source="random", samples_per_shard=100, progress=False)
    yield url, read_manifest(url)
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def epoch(manifest, url: str, reader: ShardReader) -> list[int]:
    return [label for shard in manifest.splits["train"].shards
            for _, _, label in reader.read_shard(manifest, url, shard)]


def test_second_epoch_reads_from_the_cache(memory_dataset, tmp_path: Path) -> None:
    url, manifest = memory_dataset
    reader = ShardReader(ReadOptions(cache_dir=str(tmp_path / "cache")))
    first = epoch(manifest, url, reader)
    assert (reader.stats.cache_misses, reader.stats.cache_hits) == (3, 0)
    fsspec.filesystem("memory").rm(url.removeprefix("memory://") + "/train-00001.tar")  # the remote copy is gone ...
    assert epoch(manifest, url, reader) == first  # ... and not needed
    assert (reader.stats.cache_misses, reader.stats.cache_hits) == (3, 3)
    assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir()) == [f"train-0000{i}.tar" for i in range(3)]


def test_cache_evicts_least_recently_used_within_its_size(memory_dataset, tmp_path: Path) -> None:
    url, manifest = memory_dataset
    shard_bytes = manifest.splits["train"].shards[0].bytes
    reader = ShardReader(ReadOptions(cache_dir=str(tmp_path / "cache"), cache_max_bytes=int(2.5 * shard_bytes)))
    for _ in range(2):
        epoch(manifest, url, reader)
        held = list((tmp_path / "cache").iterdir())
        assert len(held) == 2 and sum(p.stat().st_size for p in held) <= reader.options.cache_max_bytes
    assert reader.stats.cache_misses == 6  # a cyclic scan larger than the cache misses every time (LRU)
    assert {p.name.split("-", 1)[1] for p in held} == {"train-00001.tar", "train-00002.tar"}


def test_cache_never_stores_a_shard_that_disagrees_with_the_manifest(memory_dataset, tmp_path: Path) -> None:
    url, manifest = memory_dataset
    path = url.removeprefix("memory://") + "/train-00000.tar"
    memory = fsspec.filesystem("memory")
    tampered = bytearray(memory.cat(path))
    tampered[700] ^= 0xFF  # one pixel of the first image: still a valid tar
    memory.pipe(path, bytes(tampered))
    with pytest.raises(ShardError, match=f"^shard {url}/train-00000.tar: sha256 mismatch"):
        epoch(manifest, url, ShardReader(ReadOptions(cache_dir=str(tmp_path / "cache"))))
    assert list((tmp_path / "cache").iterdir()) == []
    reader = ShardReader(ReadOptions(cache_dir=str(tmp_path / "cache"), on_corrupt="skip"))
    skipped = epoch(manifest, url, reader)
    assert len(skipped) == 200 and reader.stats.skipped_samples == 100


def test_concurrent_readers_share_one_complete_copy(memory_dataset, tmp_path: Path) -> None:
    url, manifest = memory_dataset
    shard = manifest.splits["train"].shards[0]
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    results, errors = [], []

    def fetch() -> None:
        try:
            results.append(Path(cache.fetch(f"{url}/{shard.path}", shard.sha256, shard.bytes, FAST)).read_bytes())
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 8
    assert {len(r) for r in results} == {shard.bytes}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.entry_path(f"{url}/{shard.path}", shard.sha256, shard.bytes).name]
