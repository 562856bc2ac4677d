"""`pipeline bench memory`: peak RSS at 1x vs 10x the data, to show memory does not grow with it.

One deformed-MNIST dataset of ``samples x scale`` train samples is generated once; the 1x
dataset is a second manifest (``manifest-1x.json``) naming the first shards of the same
files (deformed sample i is a function of i alone, so it is the 1x dataset). Then, per scale,
in fresh processes:

- ``--mode train`` (default): ``pipeline train`` for one epoch on local Ray workers; the
  driver's and every Ray Train worker's peak RSS (Linux VmHWM, polled) are recorded;
- ``--mode stream``: one process streams the whole train split through `train_batches`
  as a single rank (no Ray, seconds): the data path alone.

The report (JSON) holds both scales and the ratios 10x / 1x; ``flat`` is true when every
ratio is <= ``--tolerance`` (default 1.05).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.bench import bench_app

REPO = Path(__file__).resolve().parents[2]

def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a live Linux process, in bytes; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def prepare_datasets(root: Path, source: str, samples: int, scale: int, samples_per_shard: int, workers: int,
                     eval_splits: bool = True) -> dict[int, str]:
    """{1: url of the 1x manifest, scale: url of the full one}; generation resumes if ``root`` is reused."""
    from pipeline.data.deformed import generate_deformed_mnist
    from pipeline.data.shards import MANIFEST_NAME, read_manifest

    if samples % samples_per_shard:
        raise typer.BadParameter(f"--samples {samples} must be a multiple of --samples-per-shard {samples_per_shard}")
    generate_deformed_mnist(source, str(root), samples * scale, samples_per_shard=samples_per_shard,
                            workers=workers, progress=False, eval_splits=eval_splits)
    full = read_manifest(str(root))
    train = full.splits["train"]
    small = train.model_copy(update={"samples": samples, "shards": train.shards[: samples // samples_per_shard]})
    one_x = full.model_copy(update={"splits": {**full.splits, "train": small}})
    (root / "manifest-1x.json").write_text(one_x.model_dump_json(indent=2))
    return {1: str(root / "manifest-1x.json"), scale: str(root / MANIFEST_NAME)}


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc: Ray's raylet and its workers are children of the driver)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _poll_tree(proc: subprocess.Popen, every_s: float = 0.2) -> dict[str, Any]:
    """Wait for ``proc``; meanwhile record peak RSS of it and of its Ray Train worker descendants."""
    driver, workers = 0, {}
    while proc.poll() is None:
        driver = max(driver, peak_rss_bytes(proc.pid))
        for child in _descendants(proc.pid):
            if "RayTrainWorker" in _cmdline(child):
                workers[child] = max(workers.get(child, 0), peak_rss_bytes(child))
        time.sleep(every_s)
    return {"driver_peak_rss": driver, "worker_peak_rss": sorted(workers.values(), reverse=True)}


def measure_train(url: str, config: str, work: Path, workers: int, epochs: int) -> dict[str, Any]:
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline", "train", config, "-o", f"data.url={url}", "-o", f"train.epochs={epochs}",
           "-o", f"train.workers={workers}", "-o", f"train.storage={work / 'ray'}", "-o", "tracking.experiment=bench-memory"]
    started = time.perf_counter()
    with open(work / "train.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        report = _poll_tree(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {work / 'train.log'}")
    return report | {"seconds": round(time.perf_counter() - started, 1)}


def measure_stream(url: str, batch: int, shuffle_buffer: int) -> dict[str, Any]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipeline.bench.memory", url, str(batch), str(shuffle_buffer)],
                         capture_output=True, text=True, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {"driver_peak_rss": child["peak_rss"], "worker_peak_rss": [], "samples_read": child["samples"],
            "samples_per_s": child["samples_per_s"], "seconds": round(time.perf_counter() - started, 1)}


def _ratio(big: float, small: float) -> float | None:
    return round(big / small, 4) if small else None


def memory_report(runs: dict[int, dict[str, Any]], scale: int, tolerance: float) -> dict[str, Any]:
    one, big = runs[1], runs[scale]
    ratios = {"driver": _ratio(big["driver_peak_rss"], one["driver_peak_rss"])}
    if one["worker_peak_rss"] and big["worker_peak_rss"]:
        ratios["worker_max"] = _ratio(max(big["worker_peak_rss"]), max(one["worker_peak_rss"]))
    flat = all(r is not None and r <= tolerance for r in ratios.values())
    return {"scales": {f"{k}x": v for k, v in runs.items()}, "ratio": ratios, "tolerance": tolerance, "flat": flat}


@bench_app.command("memory")
def bench_memory(
    samples: Annotated[int, typer.Option("--samples", min=1, help="Train samples at 1x")] = 10_000,
    scale: Annotated[int, typer.Option("--scale", min=2, help="The large run has this many times the data")] = 10,
    mode: Annotated[str, typer.Option("--mode", help="train: pipeline train on Ray; stream: the data path alone")] = "train",
    source: Annotated[Optional[str], typer.Option("--source", help="MNIST idx folder for the deformed-MNIST generator "
                                                  "(default: $PIPELINE_MNIST_DIR)")] = None,
    config: Annotated[str, typer.Option("--config", help="Training config (mode train)")] = str(REPO / "configs" / "mnist-categorical.yaml"),
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray Train workers, and generator processes")] = 2,
    samples_per_shard: Annotated[int, typer.Option("--samples-per-shard", min=1, help="Samples per shard of the datasets it writes")] = 1000,
    work_dir: Annotated[Optional[str], typer.Option("--work-dir", help="Keep the data here (default: a temp dir)")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest 10x/1x peak-RSS ratio called flat")] = 1.05,
    json_out: Annotated[Optional[str], typer.Option("--json-out", help="Also write the report here")] = None,
) -> None:
    """Peak RSS of the driver and of each worker at 1x vs SCALE x the data (JSON on stdout; exit 1 if not flat)."""
    if mode not in ("train", "stream"):
        raise typer.BadParameter("--mode must be train or stream")
    from pipeline.bench.common import MNIST_DIR_ENV, default_mnist

    source = source or default_mnist()
    if not source:
        raise typer.BadParameter(f"give --source MNIST_DIR (a folder of MNIST's idx files) or set ${MNIST_DIR_ENV}")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        urls = prepare_datasets(work / "data", source, samples, scale, samples_per_shard, workers,
                                eval_splits=mode == "train")  # stream mode reads the train split only
        runs = {}
        for factor, url in urls.items():
            if mode == "train":
                runs[factor] = measure_train(url, config, work, workers, epochs=1)
            else:
                runs[factor] = measure_stream(url, batch=100, shuffle_buffer=1000)
            runs[factor]["train_samples"] = samples * factor
        report = {"mode": mode, **memory_report(runs, scale, tolerance)}
    text = json.dumps(report, indent=2)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
    if not report["flat"]:
        raise typer.Exit(1)


def _stream_child(url: str, batch: int, shuffle_buffer: int) -> None:
    """Read the whole train split as one rank; print peak RSS (runs in a fresh process)."""
    from pipeline.data import read_manifest, train_batches

    manifest = read_manifest(url)
    started, samples = time.perf_counter(), 0
    for item in train_batches(manifest, url, epoch=0, seed=0, rank=0, world_size=1, batch_per_rank=batch,
                              shuffle_buffer=shuffle_buffer):
        samples += len(item[0])
    rate = samples / max(time.perf_counter() - started, 1e-9)
    print(json.dumps({"peak_rss": peak_rss_bytes(), "samples": samples, "samples_per_s": round(rate)}))


if __name__ == "__main__":
    _stream_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
