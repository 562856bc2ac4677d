"""Image datasets keep the remote guarantees: gzip-compressed JPEG shards in S3 (moto on loopback)
read through a proxy that breaks every second body read (a 500 error or a body cut off half-way) —
each failed read retried and counted once, sha256-verified, cached — give exactly the batches
(random crops and flips included) a local copy gives; a cached second epoch makes no request at all.
(A reset connection is retried below the counted retry: tests/test_remote.py keeps that case.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import fsspec
import pytest
import torch

from moto_s3 import FaultyProxy, moto_server, s3_environment
from pipeline.data import read_manifest, train_batches
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.stats import ReadStats
from test_image_stream import photo_crops, write_image_dataset


class _CountedFaults(FaultyProxy):
    KINDS = ("500", "truncate")  # the faults each of which is exactly one failed, counted read attempt


def _epoch(url: str, epoch: int, options: ReadOptions, manifest=None,
           stats: ReadStats | None = None) -> list[tuple[torch.Tensor, list[str]]]:
    manifest = manifest or read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=3, size=(24, 24), resize="random-crop", hflip=True))
    reader = ShardReader(replace(options, verify=True), decoder, stats=stats)
    return [(b.x, b.keys) for b in train_batches(manifest, url, epoch=epoch, seed=3, rank=0, world_size=1,
                                                 batch_per_rank=6, shuffle_buffer=10, reader=reader)]


@pytest.mark.timeout(300)
def test_gzip_jpeg_shards_from_flaky_s3_read_exactly_as_local_and_cache(tmp_path: Path) -> None:
    images = photo_crops(36, seed=11)
    local = str(tmp_path / "local")
    write_image_dataset(local, images, per_shard=12, gzipped=True)
    expected = {epoch: _epoch(local, epoch, ReadOptions()) for epoch in (0, 1)}
    with moto_server() as endpoint, s3_environment(endpoint):
        fsspec.filesystem("s3").mkdir("images")
        url = "s3://images/photos"
        write_image_dataset(url, images, per_shard=12, gzipped=True)
        assert read_manifest(url).digest() == read_manifest(local).digest()  # same bytes, same sha256s
        options = ReadOptions(cache_dir=str(tmp_path / "cache"), retries=8, retry_backoff_s=0.01)
        health = ReadStats()  # the two epochs' reads, as one worker's reader counts them
        shards = len(read_manifest(url).splits["train"].shards)
        assert shards == 3
        with _CountedFaults(endpoint, every=2, ranged_gets_only=True) as proxy, s3_environment(proxy.endpoint):
            manifest = read_manifest(url)
            first = _epoch(url, 0, options, manifest, health)
            assert proxy.faults >= 2 and all(proxy.by_kind.values()), proxy.by_kind
            assert health.read_retries == proxy.faults  # each injected fault met, retried and counted once
            assert (health.cache_misses, health.cache_hits) == (shards, 0)  # each shard downloaded once
            received = proxy.received
            second = _epoch(url, 1, options, manifest, health)
            assert proxy.received == received  # not one request: every shard from the verified local cache
    assert (health.cache_misses, health.cache_hits, health.read_retries) == (shards, shards, proxy.faults)
    for got, want in ((first, expected[0]), (second, expected[1])):
        assert [keys for _, keys in got] == [keys for _, keys in want]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want))
