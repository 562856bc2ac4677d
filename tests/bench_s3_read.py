"""Read throughput: local files vs the loopback S3 server (moto), without and with the shard cache.

    .venv/bin/python tests/bench_s3_read.py [--mnist ../shared/data/mnist] [--passes 2]

Writes MNIST's 50,000 train samples (5,000 per shard) to a temp dir and to s3://bench-read/mnist,
then reads the whole train split in one process through `ShardReader.read_shard` (decode included), and
prints samples/s per source as JSON. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moto_s3 import moto_server, s3_environment  # noqa: E402


def rate(url: str, reader, passes: int) -> list[float]:
    from pipeline.data import read_manifest

    manifest = read_manifest(url)
    rates = []
    for _ in range(passes):
        started, count = time.perf_counter(), 0
        for shard in manifest.splits["train"].shards:
            for _ in reader.read_shard(manifest, url, shard):
                count += 1
        rates.append(round(count / (time.perf_counter() - started)))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mnist", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()

    import fsspec

    from pipeline.data import load_mnist_splits, write_shards
    from pipeline.data.reader import ReadOptions, ShardReader
    from pipeline.data.stats import ReadStats

    splits = {"train": load_mnist_splits(args.mnist)["train"]}
    report = {}
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint, s3_environment(endpoint):
        local = str(Path(tmp) / "mnist")
        write_shards(splits, local, source="mnist", samples_per_shard=5000, progress=False)
        fsspec.filesystem("s3").mkdir("bench-read")
        write_shards(splits, "s3://bench-read/mnist", source="mnist", samples_per_shard=5000, progress=False)
        stats = ReadStats()  # every reader's retries, together
        report["local_samples_per_s"] = rate(local, ShardReader(stats=stats), args.passes)
        report["s3_samples_per_s"] = rate("s3://bench-read/mnist", ShardReader(stats=stats), args.passes)
        cached = ShardReader(ReadOptions(cache_dir=str(Path(tmp) / "cache")), stats=stats)
        report["s3_cached_samples_per_s (pass 1 downloads)"] = rate("s3://bench-read/mnist", cached, args.passes)
        report["read_retries"] = stats.read_retries
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
