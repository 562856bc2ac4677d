"""The `pipeline` command line (also `python -m pipeline`)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.cli_common import EXIT_CODES

app = typer.Typer(
    help="Distributed training of VAEs with a categorical (multinomial) prior: "
    "WebDataset shards -> Ray Train DDP -> MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
    epilog=EXIT_CODES,
)


def _print_version(value: bool) -> None:
    if value:
        import pipeline

        print(f"pipeline {pipeline.__version__} (distribution catvae-pipeline)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the installed version and exit")] = False,
) -> None:
    """Distributed training of VAEs with a categorical (multinomial) prior: WebDataset shards -> Ray Train
    DDP -> MLflow."""
from pipeline.data_commands import OutUrl, data_app  # noqa: E402 - `pipeline data ...`

app.add_typer(data_app, name="data")
from pipeline.bench import bench_app  # noqa: E402 - `pipeline bench ...` (one module per bench)

app.add_typer(bench_app, name="bench")
from pipeline.cli_common import console, fail as _fail, renamed_flags, with_exit_codes  # noqa: E402

Overrides = Annotated[
    Optional[list[str]],
    typer.Option("--override", "-o", help="Dotted config override, repeatable: -o train.epochs=3 -o model.latent.categories=10"),
]


def _load(config_path: str, overrides: list[str] | None):
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(config_path, overrides or [])
    except ConfigError as err:
        _fail(str(err), code=2)


@app.command()
def train(
    config: Annotated[
        Optional[str], typer.Argument(help="YAML config, e.g. configs/digits-categorical.yaml (optional with --resume)")
    ] = None,
    override: Overrides = None,
    address: Annotated[
        Optional[str], typer.Option("--address", help="Ray cluster to use (default $RAY_ADDRESS, else a local cluster)")
    ] = None,
    resume: Annotated[
        Optional[str],
        typer.Option("--resume", help="Continue this MLflow run (id or name) from its latest checkpoint, "
                     "with the config it logged (plus -o overrides, e.g. train.workers)"),
    ] = None,
    reschedule: Annotated[
        bool, typer.Option("--reschedule", help="With --resume: accept changed schedule settings (e.g. train.epochs "
                           "under a cosine learning rate, model.latent.tau_steps); the schedules continue from the "
                           "checkpoint's step on their new shape")
    ] = False,
    trigger: Annotated[str, typer.Option("--trigger", help="Tag the run with what started it: manual, cron, new-data")] = "manual",
    tracking_uri: Annotated[Optional[str], typer.Option(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the config's tracking.uri, else "
        "./mlflow.db); with --resume, where the run is looked up")] = None,
    warm_start: Annotated[
        bool, typer.Option("--warm-start", help="Start from the weights of the registered 'champion' (when compatible)")
    ] = False,
) -> None:
    """Train a VAE with Ray Train (DDP) and track it in MLflow; prints the run id and final val -ELBO."""
    if address or os.environ.get("RAY_ADDRESS"):
        from pipeline.ops.ray_jobs import enable_token_auth

        enable_token_auth()  # before Ray is imported: a cluster started with `ray start` wants its token
    from pipeline.config import ConfigError
    from pipeline.train.trainer import TrainingError, resume_config, train as run_training

    if config is None and resume is None:
        _fail("give a CONFIG file, or --resume RUN_ID_OR_NAME", code=2)
    if reschedule and not resume:
        _fail("--reschedule applies to a resumed run (--resume RUN_ID_OR_NAME)", code=2)
    if tracking_uri:  # flag > $MLFLOW_TRACKING_URI > the config's tracking.uri > ./mlflow.db, here as everywhere
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        if resume:
            cfg, run_id = resume_config(resume, config_path=config, overrides=override or [], reschedule=reschedule)
        else:
            cfg, run_id = _load(config, override), None
        if run_id is None:  # a new run: readable name, optional warm start (pipeline/ops/retrain.py)
            from pipeline.ops.retrain import prepare_run

            cfg = prepare_run(cfg, warm_start=warm_start)
        result = run_training(cfg, address=address, resume_run_id=run_id, trigger=trigger)
    except ConfigError as err:
        _fail(str(err), code=2)
    except TrainingError as err:
        _fail(str(err))
    print(f"run_id: {result.run_id}")
    print(f"val/loss (-ELBO): {result.val_loss:.4f} after {result.epochs} epochs, {result.steps} steps, {result.seconds:.0f} s")
    from pipeline.ops.retrain import after_training

    after_training(cfg, result)  # register the model; move 'champion' only to a better one
    store = result.tracking_uri
    hint = "pipeline ui" if store.startswith("sqlite:") else f"open {store}"
    print(f"view it: {hint}  (then open http://127.0.0.1:5000 -> experiment '{cfg.tracking.experiment}')")


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1")] = 5000,
    host: Annotated[str, typer.Option(help="Bind address; keep 127.0.0.1 unless you mean to expose it")] = "127.0.0.1",
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="Store to serve (default as for train)")] = None,
) -> None:
    """Serve the MLflow UI for the configured store (default: ./mlflow.db) on 127.0.0.1; stopping it
    (Ctrl-C, SIGTERM) stops every process of the server."""
    from pipeline.runs.store import resolve_tracking_uri

    store = resolve_tracking_uri(tracking_uri)
    if store.startswith(("http://", "https://")):
        _fail(f"{store} is already a tracking server: open it in a browser")
    console.print(f"MLflow UI for {store} on http://{host}:{port} (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", host,
           "--port", str(port), "--workers", "1"]
    from pipeline.ops.ui import serve

    raise typer.Exit(serve(cmd))  # its own process group, ended with us (pipeline/ops/ui.py)


@app.command("plan")
def plan_command(
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


@app.command("replay-metrics")
def replay_metrics(
    path: Annotated[str, typer.Argument(help="mlflow-pending-<run_id>.jsonl written when MLflow was unreachable")],
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="Deliver to this store instead")] = None,
) -> None:
    """Deliver metrics a run could not deliver to MLflow while it trained."""
    from pipeline.runs.logger import replay_metrics as replay

    count = replay(path, tracking_uri)
    console.print(f"delivered {count} metric values from {path}")


@app.command()
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
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store (default as for train)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the posterior samples")] = 0,
) -> None:
    """-ELBO, importance-weighted -log p(x) (and exact -log p(x) when the code space is small) of a trained
    run on a whole split; logs them (test/loss, test/nll_is_k<K>, ...) into the same MLflow run."""
    import json

    from pipeline.evaluate import EvaluationError, evaluate_run

    try:
        result = evaluate_run(run_id, split=split, importance_samples=importance_samples, batch_size=batch_size,
                              tracking_uri=tracking_uri, data_url=data_url, seed=seed)
    except EvaluationError as err:
        _fail(str(err))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for line in result.lines():
            print(line)


@app.command()
def encode(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a trained categorical VAE (e.g. a grid dVAE)")],
    data: Annotated[str, typer.Option("--data", help="Dataset to encode: a folder/URL with manifest.json")],
    out: OutUrl,
    splits: Annotated[Optional[str], typer.Option("--splits", help="Comma-separated splits (default: all)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass")] = 256,
    address: Annotated[
        Optional[str], typer.Option("--address", help="Ray cluster to use (default $RAY_ADDRESS, else a local cluster)")
    ] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store (default as for train)")] = None,
) -> None:
    """Token shards of a dataset: per sample the posterior mode's codes as uint16 (a grid model's h x w
    code grid) under the source key, one shard per input shard, as Ray tasks; a re-run resumes."""
    if address or os.environ.get("RAY_ADDRESS"):
        from pipeline.ops.ray_jobs import enable_token_auth

        enable_token_auth()
    from pipeline.tokens.encode import encode_dataset
    from pipeline.tokens.codes import EncodeError

    try:
        result = encode_dataset(run_id, data, out, splits=[s.strip() for s in splits.split(",") if s.strip()]
                                if splits else None, batch_size=batch_size, address=address, tracking_uri=tracking_uri)
    except EncodeError as err:
        _fail(str(err))
    counts = ", ".join(f"{name} {info.samples}" for name, info in result.manifest.splits.items())
    rate = f", {result.samples_per_s:.0f} samples/s" if result.encoded_samples else ""
    console.print(f"encoded {result.written} shards, reused {result.reused} finished ({counts}{rate}) + "
                  f"manifest.json to {out}")


@app.command()
def decode(
    run_id: Annotated[str, typer.Argument(help="MLflow run id whose model wrote the tokens")],
    tokens: Annotated[str, typer.Option("--data", help="Token dataset written by `pipeline encode`")],
    out: Annotated[str, typer.Option("--out", help="Directory (or fsspec URL) for <key>.png")],
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, help="Render at most N samples")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store (default as for train)")] = None,
) -> None:
    """Render token shards as images (PNG, named by sample key) through the run's decoder."""
    from pipeline.tokens.decode import decode_tokens
    from pipeline.tokens.codes import EncodeError

    try:
        result = decode_tokens(run_id, tokens, out, limit=limit, tracking_uri=tracking_uri)
    except EncodeError as err:
        _fail(str(err))
    console.print(f"rendered {result.images} images to {out}")


@app.command(help=(
    "Train every grid point x seed as its own run on Ray Tune, under one MLflow parent run.\n\n"
    "Each trial is a full `pipeline train` run (its own Ray Train workers, checkpoints and retries), logged as a "
    "child of the parent. The parent records the sweep's definition and, per grid point, the mean, sd and n of "
    "each trial's final val/* and latent/* figures (test/* too with --evaluate): metrics "
    "sweep/<point>/<figure>/mean|sd|n and the table sweep/aggregates.csv.\n\n"
    "A trial that fails for good is tagged sweep.outcome=failed, left out of the aggregates and counted. "
    "The same command again continues the sweep: finished trials are reused, interrupted ones resume from "
    "their checkpoints.\n\n"
    "Exit status 0: every trial finished; 3: some failed; 1: none finished."))
def sweep(
    config: Annotated[str, typer.Argument(help="YAML config, e.g. configs/mnist-categorical.yaml")],
    seeds: Annotated[str, typer.Option("--seeds", help="train.seed of the trials: 0,1,2 or a range 0..4")],
    override: Overrides = None,
    grid: Annotated[
        Optional[list[str]],
        typer.Option("--grid", help="Settings to cross, repeatable: --grid train.lr=1e-3,3e-3 --grid "
                     "model.latent.hard=false,true (values in YAML; lists as [128],[256,128])"),
    ] = None,
    max_concurrent: Annotated[
        Optional[int], typer.Option("--max-concurrent", min=1, help="Trials at once (default: as many as the "
                                    "cluster's CPUs/GPUs hold, each taking train.workers x train.cpus_per_worker)")
    ] = None,
    address: Annotated[
        Optional[str], typer.Option("--address", help="Ray cluster to use (default $RAY_ADDRESS, else a local cluster)")
    ] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the "
                                    "config's tracking.uri, else ./mlflow.db)")
    ] = None,
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
    if address or os.environ.get("RAY_ADDRESS"):
        from pipeline.ops.ray_jobs import enable_token_auth

        enable_token_auth()
    import json

    from pipeline.config import ConfigError
    from pipeline.sweep import SweepError, build_spec, parse_grid, parse_seeds, run_sweep

    try:
        spec = build_spec(config, override or [], parse_seeds(seeds), parse_grid(grid or []), tracking_uri=tracking_uri)
    except ConfigError as err:
        _fail(str(err), code=2)
    try:
        result = run_sweep(spec, address=address, max_concurrent=max_concurrent,
                           evaluate_k=importance_samples if evaluate else None, fresh=fresh, retry_failed=retry_failed)
    except SweepError as err:
        _fail(str(err))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        from pipeline.sweep import render_summary

        Console(width=max(160, Console().width)).print(render_summary(result))
        print(f"parent_run_id: {result.parent_run_id}")
        print(f"trials: {result.finished} finished, {result.failed} failed, "
              f"{sum(o.reused for o in result.outcomes)} reused from earlier attempts; {result.seconds:.0f} s")
        for outcome in result.outcomes:
            if outcome.outcome == "failed":
                print(f"failed: {outcome.trial.name} (run {outcome.run_id}): {outcome.reason}")
    raise typer.Exit(0 if result.failed == 0 else 3 if result.finished else 1)


@app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="Run id, runs:/RUN_ID/model, models:/NAME@ALIAS or models:/NAME/VERSION")],
    out: Annotated[str, typer.Option("--out", help="Folder to write (new or empty)")],
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store (default: "
                                                        "$MLFLOW_TRACKING_URI, else ./mlflow.db)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what the model takes and gives as JSON")] = False,
) -> None:
    """Write a trained model into a folder that loads without MLflow: config.yaml, model.safetensors (weights
    only), model.json and a README of its inputs and outputs. `Tokenizer.load(FOLDER)` loads a grid model from it."""
    import json

    from pipeline.export import ExportError, export_model
    from pipeline.runs.load import ModelLoadError

    try:
        meta = export_model(model, out, tracking_uri=tracking_uri)
    except (ExportError, ModelLoadError) as err:
        _fail(str(err))
    if as_json:
        print(json.dumps(meta, indent=2))
    console.print(f"exported {meta['arch']} model of run {meta['run_id']} to {out}")


@app.command("config")
def show_config(config: Annotated[str, typer.Argument(help="YAML config, e.g. configs/images-dvae.yaml")],
                override: Overrides = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from pipeline.runs.store import config_yaml

    print(config_yaml(_load(config, override)), end="")


from pipeline.ops.commands import register as _register_ops_commands  # noqa: E402

_register_ops_commands(app)  # submit, jobs list|logs|stop, schedule, promote, compare (pipeline/ops/)

from pipeline.docs import docs_command  # noqa: E402

app.command("docs")(docs_command)  # docs/reference/config.md and cli.md, generated from the code


with_exit_codes(app)


def main() -> None:
    def warn(old: str, new: str) -> None:
        console.print(f"[yellow]warning:[/] {old} is deprecated here: use {new}")

    sys.argv[1:] = renamed_flags(sys.argv[1:], warn)
    app()


if __name__ == "__main__":
    main()
