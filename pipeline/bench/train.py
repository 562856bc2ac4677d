"""`pipeline bench train`: the same model, batch and thread count trained three ways, in one command.

- plain:  a single-process PyTorch loop over in-memory tensors (shuffled slices, the same
          dynamic binarization, Adam, the same temperature schedule), ``cpus_per_worker`` threads;
- ray1:   `pipeline train` (pipeline.train.trainer.train: MLflow run, Ray Train TorchTrainer, the
          streaming loader) with 1 worker;
- ray2:   the same with 2 workers (global batch unchanged, so 2 x half batches).

Steady state is the median of the loop's own `perf/samples_per_s` windows (every
``train.log_every`` steps, the first window left out), read back from the MLflow run; the
plain loop is timed over windows of the same length. Startup is reported separately:
``ray_init_s`` (local cluster, once) and, per run, the seconds from calling train() to the
end of the first step (MLflow run, trainer and worker start, data and model setup).
`data_wait_frac` is the loop's `perf/data_wait_frac` (time blocked on the loader / window time).
The plain loop runs before and after the Ray runs; its median is the reference.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.bench import bench_app
from pipeline.bench.common import JsonOption, ReadmeOption, SamplesOption, SourceOption, REPO, command_line, default_source, emit, machine, median, prepare_dataset, ratio


def plain_loop(cfg: Any, images: Any, steps: int, window: int) -> dict[str, Any]:
    """Single-process training on in-memory uint8 images; samples/s per window of ``window`` steps."""
    import torch

    from pipeline.models import build_vae, temperature_at

    threads = max(1, int(cfg.train.cpus_per_worker))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_vae(cfg.model, int(images[0].numel()))
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        batch, latent = cfg.train.batch_size, cfg.model.latent
        generator = torch.Generator().manual_seed(cfg.train.seed)
        flat = images.reshape(len(images), -1)
        order = torch.randperm(len(flat), generator=generator)
        rates, started = [], time.perf_counter()
        position = 0
        for step in range(steps):
            if position + batch > len(flat):
                order, position = torch.randperm(len(flat), generator=generator), 0
            x = flat[order[position: position + batch]].float().div_(255)
            position += batch
            x = torch.bernoulli(x, generator=generator)
            tau = temperature_at(step, latent.tau0, latent.tau_min, latent.anneal_rate, latent.anneal_every)
            out = model(x, temperature=tau)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            out.loss.item()
            if (step + 1) % window == 0:
                now = time.perf_counter()
                rates.append(window * batch / (now - started))
                started = now
    finally:
        torch.set_num_threads(before)
    steady = rates[1:] or rates
    return {"samples_per_s": round(median(steady)), "steps_per_s": round(median(steady) / batch, 2),
            "windows": [round(r) for r in rates], "threads": threads}


def ray_run(cfg: Any) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from pipeline.train.trainer import train

    called = time.time()
    result = train(cfg)
    ended = time.time()
    client = MlflowClient(cfg.tracking.uri)
    speed = sorted(client.get_metric_history(result.run_id, "perf/samples_per_s"), key=lambda m: m.step)
    wait = sorted(client.get_metric_history(result.run_id, "perf/data_wait_frac"), key=lambda m: m.step)
    steady = [m.value for m in speed[1:]] or [m.value for m in speed]  # step 1 is warm-up
    first_step = speed[0].timestamp / 1000 if speed else ended
    last_step = speed[-1].timestamp / 1000 if speed else ended
    waits = [m.value for m in wait[1:]] or [m.value for m in wait]
    setup = client.get_metric_history(result.run_id, "perf/worker_setup_s")
    return {
        "run_id": result.run_id, "workers": cfg.train.workers, "steps": result.steps,
        "samples_per_s": round(median(steady)), "steps_per_s": round(median(steady) / cfg.train.batch_size, 2),
        "windows": [round(v) for v in steady], "data_wait_frac": round(median(waits), 4),
        "data_wait_frac_max": round(max(waits), 4) if waits else None,
        "to_first_step_s": round(first_step - called, 2), "after_last_step_s": round(ended - last_step, 2),
        # of to_first_step_s, what our loop spent in the worker before its first batch (the rest is the
        # MLflow run, Ray Train's controller and worker processes, and the process group)
        "worker_setup_s": round(setup[0].value, 2) if setup else None,
        "total_s": round(ended - called, 2),
    }


def _start_ray() -> None:
    """A local cluster as `pipeline train` starts one (trainer.connect_ray), but with worker output
    kept off this process's stdout, so --json prints nothing but the report."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)


def run_train_bench(url: str, config: str, work: Path, *, epochs: int = 1, batch: int | None = None,
                    workers: list[int] = (1, 2), plain_repeats: int = 2, overrides: list[str] = ()) -> dict[str, Any]:
    from pipeline.bench.data import load_in_memory
    from pipeline.config import load_config
    from pipeline.data import read_manifest

    os.environ.pop("RAY_ADDRESS", None)
    base = [f"data.url={url}", f"train.epochs={epochs}", "train.cpus_per_worker=1", f"train.storage={work / 'ray'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=bench", "tracking.register_model=false",
            *([f"train.batch_size={batch}"] if batch else []), *overrides]
    configs = {w: load_config(config, [*base, f"train.workers={w}", f"data.partitions={max(workers)}"]) for w in workers}
    cfg = configs[workers[0]]
    if cfg.data.binarize != "dynamic":  # the plain loop binarizes dynamically; so must the runs compared with it
        configs = {w: load_config(config, [*base, f"train.workers={w}", f"data.partitions={max(workers)}",
                                           "data.binarize=dynamic"]) for w in workers}
        cfg = configs[workers[0]]
    manifest = read_manifest(url)
    steps = manifest.splits["train"].samples // cfg.train.batch_size * epochs
    images, _ = load_in_memory(url)
    window = cfg.train.log_every

    plains = [plain_loop(cfg, images, steps, window)]
    started = time.perf_counter()
    _start_ray()
    ray_init_s = time.perf_counter() - started
    runs = {f"ray{w}": ray_run(configs[w]) for w in workers}
    for _ in range(plain_repeats - 1):
        plains.append(plain_loop(cfg, images, steps, window))
    plain = {"samples_per_s": round(median([p["samples_per_s"] for p in plains])),
             "runs": plains, "threads": plains[0]["threads"]}
    plain["steps_per_s"] = round(plain["samples_per_s"] / cfg.train.batch_size, 2)
    one = runs.get("ray1")
    two = runs.get("ray2")
    waits = [r["data_wait_frac"] for r in runs.values()]
    return {
        "bench": "train",
        "dataset": {"url": url, "train_samples": manifest.splits["train"].samples},
        "config": config, "epochs": epochs, "batch": cfg.train.batch_size, "log_every": window,
        "model": {"arch": cfg.model.arch, "hidden": cfg.model.hidden, "latent": cfg.model.latent.kind},
        "plain": plain, **runs,
        "ray_vs_plain": ratio(one["samples_per_s"], plain["samples_per_s"]) if one else None,
        "scaling_2v1": ratio(two["samples_per_s"], one["samples_per_s"]) if one and two else None,
        "data_wait_frac": max(waits) if waits else None,
        "startup_s": round(ray_init_s + (one or next(iter(runs.values())))["to_first_step_s"], 2),
        "startup": {"ray_init_s": round(ray_init_s, 2),
                    **{f"{name}_to_first_step_s": r["to_first_step_s"] for name, r in runs.items()},
                    **{f"{name}_worker_setup_s": r["worker_setup_s"] for name, r in runs.items()},
                    **{f"{name}_after_last_step_s": r["after_last_step_s"] for name, r in runs.items()}},
        "targets": {"ray_vs_plain>=0.98": (ratio(one["samples_per_s"], plain["samples_per_s"]) or 0) >= 0.98
                    if one else None, "data_wait_frac<=0.01": max(waits) <= 0.01 if waits else None},
        "machine": machine(),
    }


def train_markdown(report: dict[str, Any], command: str) -> str:
    m, p = report["machine"], report["plain"]
    lines = [
        f"`{command}` — {m['cpus']} cores ({m['cpu']}), load average {m['loadavg_1m']} at the end; "
        f"{report['dataset']['train_samples']} train samples, {report['epochs']} epoch(s), global batch "
        f"{report['batch']}, model {report['model']['arch']} {report['model']['hidden']} {report['model']['latent']}, "
        f"1 thread per process; steady state = median of {report['log_every']}-step windows.",
        "",
        "| run | samples/s | steps/s | data wait | to first step (s) |",
        "|---|---:|---:|---:|---:|",
        f"| (a) plain PyTorch loop, in-memory tensors ({len(p['runs'])} runs, median) | {p['samples_per_s']:,} | "
        f"{p['steps_per_s']} | - | - |",
    ]
    for name in ("ray1", "ray2"):
        if name in report:
            r = report[name]
            lines.append(f"| (b) `pipeline train`, {r['workers']} Ray worker(s) | {r['samples_per_s']:,} | "
                         f"{r['steps_per_s']} | {r['data_wait_frac']:.2%} | {r['to_first_step_s']} |")
    lines += ["", f"Ray (1 worker)/plain **{report['ray_vs_plain']}** (target >= 0.98), scaling 2 vs 1 worker "
              f"**{report['scaling_2v1']}**, data wait **{report['data_wait_frac']:.2%}** of step time (target <= 1%); "
              f"startup: Ray cluster {report['startup']['ray_init_s']} s, then "
              f"{report.get('ray1', {}).get('to_first_step_s')} s to the first step (1 worker), of which "
              f"{report.get('ray1', {}).get('worker_setup_s')} s our setup inside the worker (manifest, model, "
              "MLflow logger, first batch)."]
    return "\n".join(lines)


@bench_app.command("train")
def bench_train(
    source: SourceOption = "",
    samples: SamplesOption = 20_000,
    config: Annotated[Optional[str], typer.Option("--config", help="Model/train config (default: "
                                                  "mnist-categorical, or digits-categorical for digits)")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    batch: Annotated[Optional[int], typer.Option("--batch", min=2, help="Global batch (default: the config's)")] = None,
    override: Annotated[Optional[list[str]], typer.Option("--override", "-o", help="Extra config override")] = None,
    as_json: JsonOption = False,
    readme: ReadmeOption = None,
) -> None:
    """Plain PyTorch loop vs `pipeline train` on 1 and 2 Ray workers: steady-state speed, scaling, startup."""
    command = command_line()
    source = source or default_source()
    config = config or str(REPO / "configs" / ("digits-categorical.yaml" if source == "digits" else "mnist-categorical.yaml"))
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        url, _ = prepare_dataset(source, work, samples)
        report = run_train_bench(url, config, work, epochs=epochs, batch=batch, overrides=override or [])
    report["command"] = command
    emit(report, as_json, train_markdown(report, command), readme, "train")
