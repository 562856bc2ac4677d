"""`pipeline bench train`: the same model, batch and thread count trained three ways, in one command.

- plain:  what one worker of `pipeline train` does, minus Ray, DDP, the streaming loader and
          logging: a single-process PyTorch loop over images held in memory (uint8 [B, C, H, W],
          read once through the project's reader: `eval_batches`, center crops), with the model
          built as the worker builds it (image shape from the manifest + config, the likelihood's
          binarization, code init), the same optimizer (`build_optimizer`), schedules
          (temperature, KL weight, learning rate, straight-through), and the worker's own step
          (`pipeline.train.step.train_step` on a `TrainState`: forward per data partition, noise
          seeded per partition, `VAE.objective`, precision step, EMA); per-worker batch and
          ``cpus_per_worker`` threads;
- ray1:   `pipeline train` (pipeline.train.trainer.train: MLflow run, Ray Train TorchTrainer, the
          streaming loader) with 1 worker;
- ray2:   the same with 2 workers (global batch unchanged, so 2 x half batches).

Any config works: MNIST/digits MLPs, and image configs (configs/images-dvae.yaml: a resnet grid
on RGB 32x32 with a logit-Laplace likelihood; configs/images-conv.yaml) on an image dataset given
by ``--source`` or ``-o data.url=...``. Steady state is the median of the loop's own
`perf/samples_per_s` windows (every ``train.log_every`` steps, the first window left out), read
back from the MLflow run; the plain loop is timed over windows of the same length. Startup is
reported separately: ``ray_init_s`` (local cluster, once) and, per run, the seconds from calling
train() to the end of the first step (MLflow run, trainer and worker start, data and model setup).
`data_wait_frac` is the loop's `perf/data_wait_frac` (time blocked on the loader / window time);
every other `perf/*` metric a run logs is reported beside it, and `step_time` splits the 1-worker
run's extra time per step over the plain loop into data wait and the rest (Ray, DDP, logging,
the other processes sharing the cores). The plain loop runs before and after the Ray runs; its
median is the reference.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from pipeline.bench import bench_app
from pipeline.bench.common import JsonOption, ReadmeOption, SamplesOption, SourceOption, REPO, command_line, default_source, emit, machine, median, prepare_dataset, ratio

PLAIN_IMAGES = 4096  # the plain loop holds at most this many train images in memory (it reshuffles them)
SLOWER = 0.9  # below this Ray/plain ratio the report says where the extra time per step goes


def train_images(cfg: Any, url: str, limit: int = PLAIN_IMAGES) -> Any:
    """Up to ``limit`` train images as the model is fed them: uint8 [N, C, H, W] (the config's
    image size and channels), read once through the project's reader (`eval_batches`: manifest
    order, center crops, no flips), as validation reads them."""
    import torch

    from pipeline.data import eval_batches, read_manifest
    from pipeline.data.contract import ImageTarget, SampleDecoder
    from pipeline.data.reader import ReadOptions

    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget.from_config(manifest.spec, cfg.data), cfg.data.decode_workers)
    chunks, count = [], 0
    batches = eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=min(limit, 512),
                           options=ReadOptions.from_config(cfg.data), decoder=decoder)
    for x, _ in batches:
        chunks.append(x)
        count += len(x)
        if count >= limit:
            batches.close()
            break
    return torch.cat(chunks)[:limit]


def build_like_training(cfg: Any, url: str) -> Any:
    """The model a worker builds (pipeline/train/loop.py setup): `torch.manual_seed(train.seed)`, then
    `build_vae(cfg.model, image_shape=target.shape, binarize=cfg.model.binarize)` with the target from
    the dataset's manifest and the config, and a grid's data-dependent code init (model.code_init:
    data). A warm start (train.init_from) only changes the weights' values and is not applied."""
    import torch

    from pipeline.data import read_manifest
    from pipeline.data.contract import ImageTarget, SampleDecoder
    from pipeline.data.reader import ReadOptions, ShardReader
    from pipeline.models import build_vae

    manifest = read_manifest(url)
    target = ImageTarget.from_config(manifest.spec, cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_vae(cfg.model, image_shape=target.shape, binarize=cfg.model.binarize)
    if cfg.model.code_init != "random":
        from pipeline.train.code_init import code_pool, init_codes_from_data

        reader = ShardReader(ReadOptions.from_config(cfg.data), SampleDecoder(manifest.spec, target, cfg.data.decode_workers))
        init_codes_from_data(model, code_pool(model, manifest, url, cfg, reader), cfg)
    return model


def batch_indices(count: int, batch: int, seed: int) -> Iterator[Any]:
    """Index batches into ``count`` in-memory images: a seeded permutation cut into full batches,
    a new permutation when fewer than ``batch`` are left."""
    import torch

    if count < batch:
        raise ValueError(f"{count} images in memory, fewer than one batch of {batch}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch + 1, batch):
            yield order[start: start + batch]


def plain_loop(cfg: Any, url: str, images: Any, steps: int, window: int,
               total_steps: int | None = None) -> dict[str, Any]:
    """What one worker of `pipeline train` does per step (pipeline/train/loop.py), in one process on
    in-memory uint8 images [N, C, H, W]; samples/s per window of ``window`` steps.

    The worker is rank 0 of ``cfg.train.workers``: batch ``batch_size / workers``, its share of the
    ``cfg.partitions`` data partitions (one forward per partition, noise seeded per partition), and
    ``cpus_per_worker`` threads. ``total_steps`` is the learning-rate schedule's horizon (default:
    ``steps``). ``first_objective`` is the objective of step 0, for checks."""
    import torch

    from pipeline.data import partitions_of_rank
    from pipeline.train.state import TrainState
    from pipeline.train.step import train_step

    threads = max(1, int(cfg.train.cpus_per_worker))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_like_training(cfg, url)
        state = TrainState(model, cfg.train, torch.device("cpu"), cfg.partitions)  # the worker's state, no DDP
        batch = cfg.train.batch_size // cfg.train.workers
        partitions = partitions_of_rank(cfg.partitions, cfg.train.workers, 0)
        order = batch_indices(len(images), batch, cfg.train.seed)
        model.train()
        rates, first_objective, nonfinite = [], None, 0
        started = time.perf_counter()
        for step in range(steps):
            stats = train_step(state, images[next(order)], cfg, partitions, total_steps or steps)  # the worker's step
            nonfinite += stats.nonfinite
            if step == 0:
                first_objective = stats.objective
            if (step + 1) % window == 0:
                now = time.perf_counter()
                rates.append(window * batch / (now - started))
                started = now
    finally:
        torch.set_num_threads(before)
    steady = rates[1:] or rates
    return {"samples_per_s": round(median(steady)), "steps_per_s": round(median(steady) / batch, 2),
            "windows": [round(r) for r in rates], "threads": threads, "batch": batch,
            "partitions": len(partitions), "steps": steps, "nonfinite_steps": nonfinite,
            "parameters": sum(p.numel() for p in model.parameters()), "first_objective": first_objective}


def ray_run(cfg: Any) -> dict[str, Any]:
    from pipeline.runs import store
    from pipeline.train.trainer import train

    called = time.time()
    result = train(cfg)
    ended = time.time()

    def history(name: str) -> list[Any]:
        return store.metric_history(result.tracking_uri, result.run_id, name)

    speed, wait = history("perf/samples_per_s"), history("perf/data_wait_frac")
    steady = [m.value for m in speed[1:]] or [m.value for m in speed]  # step 1 is warm-up
    first_step = speed[0].timestamp / 1000 if speed else ended
    last_step = speed[-1].timestamp / 1000 if speed else ended
    waits = [m.value for m in wait[1:]] or [m.value for m in wait]
    setup = history("perf/worker_setup_s")
    # Every other per-window perf/* metric the loop logs (medians over the same steady windows)
    perf = {}
    for name in sorted(store.get_run(result.tracking_uri, result.run_id).data.metrics):
        if name.startswith("perf/") and name not in ("perf/samples_per_s", "perf/worker_setup_s"):
            values = history(name)
            values = [m.value for m in values[1:]] or [m.value for m in values]
            perf[name] = round(median(values), 4)
    return {
        "run_id": result.run_id, "workers": cfg.train.workers, "steps": result.steps,
        "samples_per_s": round(median(steady)), "steps_per_s": round(median(steady) / cfg.train.batch_size, 2),
        "windows": [round(v) for v in steady], "data_wait_frac": round(median(waits), 4),
        "data_wait_frac_max": round(max(waits), 4) if waits else None, "perf": perf,
        "to_first_step_s": round(first_step - called, 2), "after_last_step_s": round(ended - last_step, 2),
        # of to_first_step_s, what our loop spent in the worker before its first batch (the rest is the
        # MLflow run, Ray Train's controller and worker processes, and the process group)
        "worker_setup_s": round(setup[0].value, 2) if setup else None,
        "total_s": round(ended - called, 2),
    }


def step_time(plain: dict[str, Any], run: dict[str, Any], batch: int) -> dict[str, Any] | None:
    """Milliseconds per step of the plain loop and a Ray run on the same per-worker batch, and the
    run's extra time split into data wait (perf/data_wait_frac of its step) and the rest."""
    if not plain["samples_per_s"] or not run["samples_per_s"]:
        return None
    plain_ms, ray_ms = 1000 * batch / plain["samples_per_s"], 1000 * batch / run["samples_per_s"]
    wait_ms = run["data_wait_frac"] * ray_ms
    return {"plain_ms": round(plain_ms, 2), "ray_ms": round(ray_ms, 2), "extra_ms": round(ray_ms - plain_ms, 2),
            "data_wait_ms": round(wait_ms, 2), "other_ms": round(ray_ms - plain_ms - wait_ms, 2)}


def _start_ray(cfg: Any) -> None:
    """The local cluster `pipeline train` starts, with the workers' output kept off this process's
    stdout, so --json prints nothing but the report."""
    from pipeline.train.trainer import connect_ray

    connect_ray(None, cfg, worker_output=False)


def run_train_bench(url: str, config: str, work: Path, *, epochs: int = 1, batch: int | None = None,
                    workers: list[int] = (1, 2), plain_repeats: int = 2, overrides: list[str] = ()) -> dict[str, Any]:
    """``epochs`` and ``batch`` come first, so ``overrides`` (-o train.epochs=...) win over them."""
    from pipeline.config import load_config
    from pipeline.data import read_manifest, steps_per_epoch

    # A local cluster and a scratch store of the bench's own: its runs never reach the user's cluster or
    # MLflow server (the environment would beat the config's tracking.uri).
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    base = [f"data.url={url}", f"train.epochs={epochs}", "train.cpus_per_worker=1", f"train.storage={work / 'ray'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=bench", "tracking.register_model=false",
            *([f"train.batch_size={batch}"] if batch else []), *overrides]
    configs = {w: load_config(config, [*base, f"train.workers={w}", f"data.partitions={max(workers)}"]) for w in workers}
    cfg = configs[workers[0]]  # the plain loop is rank 0 of this run
    manifest = read_manifest(url)
    partitions = cfg.partitions
    steps = steps_per_epoch(manifest.splits["train"].samples, partitions, cfg.train.batch_size // partitions)
    total = steps * cfg.train.epochs
    images = train_images(cfg, url)
    window = cfg.train.log_every

    plains = [plain_loop(cfg, url, images, total, window)]
    started = time.perf_counter()
    _start_ray(cfg)
    ray_init_s = time.perf_counter() - started
    runs = {f"ray{w}": ray_run(configs[w]) for w in workers}
    for _ in range(plain_repeats - 1):
        plains.append(plain_loop(cfg, url, images, total, window))
    first = plains[0]
    plain = {"samples_per_s": round(median([p["samples_per_s"] for p in plains])),
             "runs": [{k: p[k] for k in ("samples_per_s", "steps_per_s", "windows", "nonfinite_steps")}
                      for p in plains],
             **{k: first[k] for k in ("threads", "batch", "partitions", "steps")},
             "images_in_memory": len(images)}
    plain["steps_per_s"] = round(plain["samples_per_s"] / plain["batch"], 2)
    one = runs.get("ray1")
    two = runs.get("ray2")
    waits = [r["data_wait_frac"] for r in runs.values()]
    ray_vs_plain = ratio(one["samples_per_s"], plain["samples_per_s"]) if one else None
    m = cfg.model
    return {
        "bench": "train",
        "dataset": {"url": url, "train_samples": manifest.splits["train"].samples,
                    "stored": {"channels": manifest.spec.channels, "size": manifest.spec.size}},
        "config": config, "epochs": cfg.train.epochs, "batch": cfg.train.batch_size, "log_every": window,
        "model": {"arch": m.arch, "hidden": m.hidden if not m.is_grid else None,
                  "channels": m.channels if m.arch != "mlp" else None, "latent": m.latent.kind,
                  "likelihood": m.likelihood,
                  "binarize": cfg.model.binarize if m.likelihood == "bernoulli" else None,
                  "image_shape": list(images.shape[1:]),
                  "parameters": first["parameters"], "entropy_weight": m.entropy_weight},
        "train": {"optimizer": cfg.train.optimizer, "lr_schedule": cfg.train.lr_schedule,
                  "grad_clip": cfg.train.grad_clip, "ema": cfg.train.ema, "precision": cfg.train.precision},
        "plain": plain, **runs,
        "ray_vs_plain": ray_vs_plain,
        "scaling_2v1": ratio(two["samples_per_s"], one["samples_per_s"]) if one and two else None,
        "data_wait_frac": max(waits) if waits else None,
        # the 1-worker run's time per step against the plain loop's (same batch): where the extra goes
        "step_time": step_time(plain, one, cfg.train.batch_size) if one else None,
        "slower_than_plain": ray_vs_plain is not None and ray_vs_plain < SLOWER,
        "startup_s": round(ray_init_s + (one or next(iter(runs.values())))["to_first_step_s"], 2),
        "startup": {"ray_init_s": round(ray_init_s, 2),
                    **{f"{name}_to_first_step_s": r["to_first_step_s"] for name, r in runs.items()},
                    **{f"{name}_worker_setup_s": r["worker_setup_s"] for name, r in runs.items()},
                    **{f"{name}_after_last_step_s": r["after_last_step_s"] for name, r in runs.items()}},
        "targets": {"ray_vs_plain>=0.98": (ray_vs_plain or 0) >= 0.98 if one else None,
                    "data_wait_frac<=0.01": max(waits) <= 0.01 if waits else None},
        "machine": machine(),
    }


def _model_words(model: dict[str, Any]) -> str:
    shape = "x".join(str(s) for s in model["image_shape"])
    widths = model["hidden"] if model["arch"] == "mlp" else model["channels"]
    return (f"{model['arch']} {widths} {model['latent']}, {model['likelihood']} likelihood, {shape} images, "
            f"{model['parameters']:,} parameters")


def _gap_words(report: dict[str, Any]) -> str:
    """The extra time per step of the 1-worker run, beside the ratio: data wait, the rest, other perf/* metrics."""
    gap, one = report.get("step_time"), report.get("ray1")
    if not gap or not one:
        return ""
    others = ", ".join(f"{k} {v}" for k, v in one["perf"].items() if k != "perf/data_wait_frac")
    lead = f"**more than {1 - SLOWER:.0%} slower than plain**: " if report["slower_than_plain"] else ""
    return (f" {lead}per step {gap['ray_ms']} ms (1 worker) vs {gap['plain_ms']} ms plain, {gap['extra_ms']:+} ms: "
            f"data wait {gap['data_wait_ms']} ms (perf/data_wait_frac {one['data_wait_frac']:.2%}), the rest "
            f"{gap['other_ms']:+} ms (Ray, DDP, logging, the other processes on the cores)"
            + (f"; {others}" if others else "") + ".")


def train_markdown(report: dict[str, Any], command: str) -> str:
    m, p = report["machine"], report["plain"]
    lines = [
        f"`{command}` — {m['cpus']} cores ({m['cpu']}), load average {m['loadavg_1m']} at the end; "
        f"{report['dataset']['train_samples']} train samples, {report['epochs']} epoch(s), global batch "
        f"{report['batch']}, model {_model_words(report['model'])}, "
        f"{p['threads']} thread(s) per process; steady state = median of {report['log_every']}-step windows.",
        "",
        "| run | samples/s | steps/s | data wait | to first step (s) |",
        "|---|---:|---:|---:|---:|",
        f"| (a) plain PyTorch loop, {p['images_in_memory']:,} images in memory ({len(p['runs'])} runs, median) | "
        f"{p['samples_per_s']:,} | {p['steps_per_s']} | - | - |",
    ]
    for name in ("ray1", "ray2"):
        if name in report:
            r = report[name]
            lines.append(f"| (b) `pipeline train`, {r['workers']} Ray worker(s) | {r['samples_per_s']:,} | "
                         f"{r['steps_per_s']} | {r['data_wait_frac']:.2%} | {r['to_first_step_s']} |")
    wait = report["data_wait_frac"]
    lines += ["", f"Ray (1 worker)/plain **{report['ray_vs_plain']}** (target >= 0.98);{_gap_words(report)} "
              f"Scaling 2 vs 1 worker **{report['scaling_2v1']}**, data wait "
              f"**{'-' if wait is None else f'{wait:.2%}'}** of step time (target <= 1%); "
              f"startup: Ray cluster {report['startup']['ray_init_s']} s, then "
              f"{report.get('ray1', {}).get('to_first_step_s')} s to the first step (1 worker), of which "
              f"{report.get('ray1', {}).get('worker_setup_s')} s our setup inside the worker (manifest, model, "
              "MLflow logger, first batch)."]
    return "\n".join(lines)


def _dataset_override(overrides: list[str]) -> tuple[str | None, list[str]]:
    """(the value of a ``data.url=...`` override, the other overrides)."""
    url, rest = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "data.url":
            url = value.strip()
        else:
            rest.append(item)
    return url, rest


def _config_dataset(config: str) -> str | None:
    """The config's own data.url when it is a dataset here (a folder with manifest.json)."""
    from pipeline.config import load_config

    try:
        url = load_config(config).data.url
    except Exception:  # noqa: BLE001 - no usable default: fall back to MNIST/digits
        return None
    return url if "://" not in url and (Path(url) / "manifest.json").exists() else None


@bench_app.command("train")
def bench_train(
    source: SourceOption = "",
    samples: SamplesOption = 20_000,
    config: Annotated[Optional[str], typer.Option(
        "--config", help="Model/train config, e.g. configs/images-dvae.yaml (default: mnist-categorical, "
        "or digits-categorical for digits)")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs of each Ray run (the plain loop runs as many steps)")] = 1,
    batch: Annotated[Optional[int], typer.Option("--batch-size", min=2, help="Global batch (default: the config's)")] = None,
    override: Annotated[Optional[list[str]], typer.Option(
        "--override", "-o", help="Extra config override; -o data.url=DATASET is the same as --source DATASET")] = None,
    as_json: JsonOption = False,
    readme: ReadmeOption = None,
) -> None:
    """Plain PyTorch loop vs `pipeline train` on 1 and 2 Ray workers: steady-state speed, scaling, startup.

    Dataset: --source, else -o data.url=DIR, else the config's data.url if present, else MNIST or digits."""
    command = command_line()
    url_override, overrides = _dataset_override(override or [])
    if source and url_override and source != url_override:
        raise typer.BadParameter(f"--source {source} and -o data.url={url_override} name different datasets")
    source = source or url_override or (config and _config_dataset(config)) or default_source()
    config = config or str(REPO / "configs" / ("digits-categorical.yaml" if source == "digits" else "mnist-categorical.yaml"))
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        url, _ = prepare_dataset(source, work, samples)
        if "://" not in url:
            url = str(Path(url).resolve())
        report = run_train_bench(url, config, work, epochs=epochs, batch=batch, overrides=overrides)
    report["command"] = command
    emit(report, as_json, train_markdown(report, command), readme, "train")
