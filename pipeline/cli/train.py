"""`pipeline train`, `sweep`, `evaluate`, `config` and `plan`: a config becomes runs, runs become figures."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.cli.common import Overrides, RayAddress, TrackingUri, fail, load_config, ray_auth, tracking_uri_option


def train(
    config: Annotated[
        Optional[str], typer.Argument(help="YAML config, e.g. configs/digits-categorical.yaml (optional with --resume)")
    ] = None,
    override: Overrides = None,
    address: RayAddress = None,
    resume: Annotated[
        Optional[str],
        typer.Option("--resume", help="Continue this MLflow run (id or name) from its latest checkpoint, "
                     "with the config it logged (plus -o overrides, e.g. train.workers)"),
    ] = None,
    reschedule: Annotated[
        bool, typer.Option("--reschedule", help="With --resume: accept changed schedule settings (e.g. train.epochs "
                           "under a cosine learning rate, model.latent.tau_cosine.steps); the schedules continue from the "
                           "checkpoint's step on their new shape")
    ] = False,
    trigger: Annotated[str, typer.Option("--trigger", help="Tag the run with what started it: manual, cron, new-data")] = "manual",
    tracking_uri: tracking_uri_option(
        "MLflow store (default: $MLFLOW_TRACKING_URI, else the config's tracking.uri, else ./mlflow.db); with "
        "--resume, where the run is looked up") = None,
    warm_start: Annotated[
        bool, typer.Option("--warm-start", help="Start from the weights of the registered 'champion' (when compatible)")
    ] = False,
    progress: Annotated[
        Optional[bool], typer.Option("--progress/--no-progress", help="A live line of epoch, step, samples/s, loss "
                                     "and ETA while training; the per-epoch lines print either way (environment: "
                                     "$PIPELINE_PROGRESS=1 or 0)", show_default="on when stdout is a terminal")
    ] = None,
) -> None:
    """Train a VAE with Ray Train (DDP) and track it in MLflow; prints the run id and final val -ELBO."""
    ray_auth(address)  # before Ray is imported: a cluster started with `ray start` wants its token
    from pipeline.config import ConfigError
    from pipeline.ops.retrain import train_run
    from pipeline.train.trainer import TrainingError, resume_config

    if config is None and resume is None:
        fail("give a CONFIG file, or --resume RUN_ID_OR_NAME", code=2)
    if reschedule and not resume:
        fail("--reschedule applies to a resumed run (--resume RUN_ID_OR_NAME)", code=2)
    if tracking_uri:  # flag > $MLFLOW_TRACKING_URI > the config's tracking.uri > ./mlflow.db, here as everywhere:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the trainer and resume_config take no store of their own
    if progress is not None:  # flag > $PIPELINE_PROGRESS > is stdout a terminal: the trainer reads the variable
        os.environ["PIPELINE_PROGRESS"] = "1" if progress else "0"

    def report(result) -> None:
        print(f"run_id: {result.run_id}")
        print(f"val/loss (-ELBO): {result.val_loss:.4f} after {result.epochs} epochs, {result.steps} steps, "
              f"{result.seconds:.0f} s")

    try:
        if resume:
            cfg, run_id = resume_config(resume, config_path=config, overrides=override or [], reschedule=reschedule)
        else:
            cfg, run_id = load_config(config, override), None
        # naming, warm start, champion promotion: the run policy lives in pipeline/ops/retrain.py
        cfg, result = train_run(cfg, resume_run_id=run_id, warm_start=warm_start, address=address, trigger=trigger,
                                on_trained=report)
    except ConfigError as err:
        fail(str(err), code=2)
    except TrainingError as err:
        fail(str(err))
    store = result.tracking_uri
    hint = "pipeline ui" if store.startswith("sqlite:") else f"open {store}"
    print(f"view it: {hint}  (then open http://127.0.0.1:5000 -> experiment '{cfg.tracking.experiment}')")


def plan(
    samples: Annotated[int, typer.Option("--samples", help="Samples per epoch")],
    bytes_per_sample: Annotated[float, typer.Option("--bytes-per-sample", help="Stored bytes per sample")],
    workers: Annotated[int, typer.Option("--workers", help="Training workers")],
    samples_per_s_per_worker: Annotated[
        float, typer.Option("--samples-per-s-per-worker", help="One worker's throughput (pipeline bench train)")],
    batch_per_worker: Annotated[int, typer.Option(help="Batch per worker")] = 100,
    params: Annotated[int, typer.Option(help="Model parameters (fp32 gradients all-reduced each step)")] = 1_000_000,
    bandwidth_gbit_s: Annotated[float, typer.Option(help="Per-worker network for the all-reduce, Gbit/s")] = 10.0,
    shard_mb: Annotated[float, typer.Option(help="Target shard size, MB")] = 256.0,
    store_gbit_s_per_worker: Annotated[float, typer.Option(help="Per-worker object-store bandwidth, Gbit/s")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Capacity plan: epoch time, shards per worker, store request rate, all-reduce cost, bottleneck by scale."""
    import json

    from rich.table import Table

    from pipeline.plan import PlanInputs, as_dict, scaling_table, warnings_for

    inputs = PlanInputs(samples, bytes_per_sample, workers, samples_per_s_per_worker, batch_per_worker, params,
                        bandwidth_gbit_s, shard_mb, store_gbit_s_per_worker)
    rows = scaling_table(inputs)
    notes = warnings_for(inputs, rows[-1])
    if as_json:
        print(json.dumps({"inputs": inputs.__dict__, "plans": [as_dict(r) for r in rows], "warnings": notes}, indent=2))
        return
    table = Table(title=f"{samples:,} samples x {bytes_per_sample:g} B, {samples_per_s_per_worker:g} samples/s/worker")
    for column in ["workers", "epoch h", "steps", "compute ms", "all-reduce ms", "shards/worker", "store req/s",
                   "store Gbit/s", "bottleneck"]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r.workers), f"{r.epoch_hours:.2f}", f"{r.steps_per_epoch:,}", f"{r.compute_ms_per_step:.1f}",
                      f"{r.allreduce_ms_per_step:.2f}", f"{r.shards_per_worker:,.1f}", f"{r.store_requests_per_s:.2f}",
                      f"{r.store_gbit_s_total:.2f}", r.bottleneck)
    Console(width=150).print(table)
    last = rows[-1]
    print(f"{last.shards:,} shards of {last.samples_per_shard:,} samples (~{shard_mb:g} MB)")
    for note in notes:
        print(f"warning: {note}")


def evaluate(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a finished training run")],
    split: Annotated[str, typer.Option("--split", help="Split of the run's dataset to evaluate")] = "test",
    importance_samples: Annotated[
        int, typer.Option("--importance-samples", "-k", min=1, help="Samples per input for the IS estimate of log p(x)")
    ] = 5000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Inputs per batch")] = 100,
    data_url: Annotated[
        Optional[str], typer.Option("--data", help="Dataset to read (default: the run's dataset.url tag)")
    ] = None,
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the posterior samples")] = 0,
) -> None:
    """-ELBO, importance-weighted -log p(x) (and exact -log p(x) when the code space is small) of a trained
    run on a whole split; logs them (test/loss, test/nll_is_k<K>, ...) into the same MLflow run."""
    import json

    from pipeline.evaluate.likelihood import EvaluationError, evaluate_run

    try:
        result = evaluate_run(run_id, split=split, importance_samples=importance_samples, batch_size=batch_size,
                              tracking_uri=tracking_uri, data_url=data_url, seed=seed)
    except EvaluationError as err:
        fail(str(err))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for line in result.lines():
            print(line)


SWEEP_HELP = (
    "Train every grid point x seed as its own run on Ray Tune, under one MLflow parent run.\n\n"
    "Each trial is a full `pipeline train` run (its own Ray Train workers, checkpoints and retries), logged as a "
    "child of the parent. The parent records the sweep's definition and, per grid point, the mean, sd and n of "
    "each trial's final val/* and latent/* figures (test/* too with --evaluate): metrics "
    "sweep/<point>/<figure>/mean|sd|n and the table sweep/aggregates.csv.\n\n"
    "A trial that fails for good is tagged sweep.outcome=failed, left out of the aggregates and counted. "
    "The same command again continues the sweep: finished trials are reused, interrupted ones resume from "
    "their checkpoints.\n\n"
    "Exit status 0: every trial finished; 3: some failed; 1: none finished.")


def sweep(
    config: Annotated[str, typer.Argument(help="YAML config, e.g. configs/mnist-categorical.yaml")],
    seeds: Annotated[str, typer.Option("--seeds", help="train.seed of the trials: 0,1,2 or a range 0..4")],
    override: Overrides = None,
    grid: Annotated[
        Optional[list[str]],
        typer.Option("--grid", help="Settings to cross, repeatable: --grid train.lr=1e-3,3e-3 --grid "
                     "model.latent.estimator=gumbel-softmax,straight-through (values in YAML; lists as "
                     "[128],[256,128])"),
    ] = None,
    max_concurrent: Annotated[
        Optional[int], typer.Option("--max-concurrent", min=1, help="Trials at once (default: as many as the "
                                    "cluster's CPUs/GPUs hold, each taking train.workers x train.cpus_per_worker)")
    ] = None,
    address: RayAddress = None,
    tracking_uri: tracking_uri_option("MLflow store (default: $MLFLOW_TRACKING_URI, else the config's "
                                      "tracking.uri, else ./mlflow.db)") = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="After training, evaluate every trial once on the test split "
                           "(as `pipeline evaluate RUN_ID -k K`); the parent gets the test aggregates too")
    ] = False,
    importance_samples: Annotated[
        int, typer.Option("--importance-samples", "-k", min=1, help="With --evaluate: samples per input of the "
                          "importance-weighted -log p(x)")
    ] = 1000,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start a new parent run even if this sweep ran before (default: "
                           "continue it, reusing its finished trials)")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Continue trials an earlier attempt gave up on (default: keep "
                           "them as failed)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as one JSON object")] = False,
) -> None:
    ray_auth(address)
    import json

    from pipeline.config import ConfigError
    from pipeline.ops.sweep.driver import SweepError, run_sweep
    from pipeline.ops.sweep.spec import build_spec, parse_grid, parse_seeds

    try:
        spec = build_spec(config, override or [], parse_seeds(seeds), parse_grid(grid or []), tracking_uri=tracking_uri)
    except ConfigError as err:
        fail(str(err), code=2)
    try:
        result = run_sweep(spec, address=address, max_concurrent=max_concurrent,
                           evaluate_k=importance_samples if evaluate else None, fresh=fresh, retry_failed=retry_failed)
    except SweepError as err:
        fail(str(err))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        from pipeline.ops.sweep.results import render_summary

        Console(width=max(160, Console().width)).print(render_summary(result))
        print(f"parent_run_id: {result.parent_run_id}")
        print(f"trials: {result.finished} finished, {result.failed} failed, "
              f"{sum(o.reused for o in result.outcomes)} reused from earlier attempts; {result.seconds:.0f} s")
        for outcome in result.outcomes:
            if outcome.outcome == "failed":
                print(f"failed: {outcome.trial.name} (run {outcome.run_id}): {outcome.reason}")
    raise typer.Exit(0 if result.failed == 0 else 3 if result.finished else 1)


def show_config(config: Annotated[str, typer.Argument(help="YAML config, e.g. configs/images-dvae.yaml")],
                override: Overrides = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from pipeline.runs.store import config_yaml

    print(config_yaml(load_config(config, override)), end="")

