"""Memory flatness: peak RSS with 10x the data stays within 5% of the 1x figure (`pipeline bench memory`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def bench(*args: str, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "bench", "memory", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_streaming_memory_is_flat_at_10x_the_data(mnist_dir) -> None:
    """CI variant: the data path alone (one rank, no Ray), 2,000 vs 20,000 deformed-MNIST samples."""
    report = bench("--mode", "stream", "--samples", "2000", "--scale", "10", "--samples-per-shard", "500",
                   "--source", str(mnist_dir), timeout=300)
    one, ten = report["scales"]["1x"], report["scales"]["10x"]
    assert (one["samples_read"], ten["samples_read"]) == (2000, 20_000)
    assert report["flat"] and report["ratio"]["driver"] <= 1.05, report


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_memory_is_flat_at_10x_the_data(mnist_dir) -> None:
    """Full variant: `pipeline train` on 2 Ray workers, 10,000 vs 100,000 samples; driver and every worker."""
    report = bench("--mode", "train", "--samples", "10000", "--scale", "10", "--source", str(mnist_dir), timeout=900)
    assert len(report["scales"]["10x"]["worker_peak_rss"]) == 2
    assert report["flat"] and report["ratio"]["driver"] <= 1.05 and report["ratio"]["worker_max"] <= 1.05, report
