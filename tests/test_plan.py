"""`pipeline plan`: the arithmetic, the bottleneck moving with scale, the CLI's JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.plan import PlanInputs, plan, scaling_table, warnings_for


def test_single_worker_epoch_is_samples_over_throughput():
    inputs = PlanInputs(samples=1_000_000, bytes_per_sample=1000, workers=1, samples_per_s_per_worker=1000,
                        batch_per_worker=100)
    one = plan(inputs)
    assert one.allreduce_ms_per_step == 0
    assert one.epoch_hours == pytest.approx(1_000_000 / 1000 / 3600)
    assert one.samples_per_shard == 256_000 and one.shards == 4  # 256 MB shards of 1 kB samples


def test_ring_allreduce_cost_and_the_bottleneck_moving_to_the_network():
    inputs = PlanInputs(samples=10**9, bytes_per_sample=800, workers=1024, samples_per_s_per_worker=100_000,
                        batch_per_worker=64, params=50_000_000, bandwidth_gbit_s=10)
    rows = scaling_table(inputs)
    assert [r.workers for r in rows] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    # 2 (w-1)/w x 50M params x 32 bit / 10 Gbit/s
    assert rows[1].allreduce_ms_per_step == pytest.approx(2 * 0.5 * 50e6 * 32 / 10e9 * 1e3)
    assert rows[0].bottleneck == "compute" and rows[-1].bottleneck == "all-reduce"
    assert any("all-reduce takes over 30%" in note for note in warnings_for(inputs, rows[-1]))


def test_too_few_shards_is_warned_about():
    inputs = PlanInputs(samples=100_000, bytes_per_sample=1000, workers=64, samples_per_s_per_worker=1000)
    assert any("only 1 shards for 64 workers" in note for note in warnings_for(inputs, plan(inputs)))


def test_cli_prints_json_plans():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--samples", "1000000000", "--bytes-per-sample",
                           "1000", "--workers", "64", "--samples-per-s-per-worker", "50000", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plans"][-1]["workers"] == 64 and out["plans"][0]["workers"] == 1
    assert {"epoch_hours", "shards_per_worker", "store_requests_per_s", "allreduce_ms_per_step",
            "bottleneck"} <= set(out["plans"][-1])
