"""`pipeline submit`, `jobs list|logs|stop`, `schedule`, `promote`, `compare`, `ui` and `replay-metrics`:
operating training on a cluster and its MLflow store. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.cli.common import (JobsAddress, StoreUri, console, fail, overrides_option, ray_auth,
                                 tracking_uri_option)

jobs_app = typer.Typer(help="Ray jobs on a cluster: list, logs, stop.", no_args_is_help=True)

Overrides = overrides_option("Dotted config override, repeatable")
WorkingDir = Annotated[Optional[str], typer.Option("--working-dir", help="Uploaded with the job (default: this checkout)")]
PassEnv = Annotated[Optional[list[str]], typer.Option("--env", help="Also pass this environment variable (name) to the job")]


def _client(address: str | None):
    from pipeline.ops.ray_jobs import JobsError, connect

    try:
        return connect(address)
    except JobsError as err:
        fail(str(err))


def _request(config, override, *, name=None, trigger="manual", warm_start=False, working_dir=None,
             tracking_uri=None, num_cpus=0.0, num_gpus=0.0, env=None):
    from pipeline.ops.submit import JobRequest

    return JobRequest(config=config, overrides=override or [], name=name, trigger=trigger, warm_start=warm_start,
                      working_dir=working_dir, tracking_uri=tracking_uri, entrypoint_cpus=num_cpus,
                      entrypoint_gpus=num_gpus, extra_env=env or [])


def _build(request):
    from pipeline.config import ConfigError
    from pipeline.ops.submit import SubmitError, build_submission

    try:
        return build_submission(request)
    except ConfigError as err:
        fail(str(err), code=2)
    except SubmitError as err:
        fail(str(err), code=2)


def submit(
    config: Annotated[str, typer.Argument(help="YAML config inside the working directory")],
    override: Overrides = None,
    address: JobsAddress = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's log; exit with its status")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="MLflow run name (default <dataset>-<latent>-<time>)")] = None,
    trigger: Annotated[str, typer.Option("--trigger", help="manual, cron or new-data (tag on the run)")] = "manual",
    warm_start: Annotated[bool, typer.Option("--warm-start", help="Start from the registered champion's weights")] = False,
    working_dir: WorkingDir = None,
    tracking_uri: StoreUri = None,
    num_cpus: Annotated[float, typer.Option("--num-cpus", help="CPUs reserved for the job's driver")] = 0.0,
    num_gpus: Annotated[float, typer.Option("--num-gpus", help="GPUs reserved for the job's driver")] = 0.0,
    env: PassEnv = None,
    run_timeout: Annotated[float, typer.Option("--run-timeout", help="Seconds to wait for the MLflow run id")] = 120.0,
) -> None:
    """Submit a training run as a Ray job; prints the job id and the MLflow run it creates."""
    ray_auth(always=True)  # before anything imports Ray
    from pipeline.ops.ray_jobs import find_run_id, follow as follow_job, wait_for_run_id
    from pipeline.ops.submit import submit as submit_job

    submission = _build(_request(config, override, name=name, trigger=trigger, warm_start=warm_start,
                                 working_dir=working_dir, tracking_uri=tracking_uri, num_cpus=num_cpus,
                                 num_gpus=num_gpus, env=env))
    client = _client(address)
    try:
        job_id = submit_job(client, submission)
    except RuntimeError as err:
        fail(f"submission refused: {err}")
    console.print(f"submitted; passing to the job: {', '.join(submission.passed_env) or 'no environment'} (values not shown)")
    print(f"job_id: {job_id}", flush=True)
    if follow:
        try:
            status = follow_job(client, job_id, lambda text: print(text, end="", flush=True))
        except KeyboardInterrupt:
            console.print(f"\nstopped following; the job goes on (`pipeline jobs stop {job_id}` ends it)")
            raise typer.Exit(130)
        run_id = find_run_id(client.get_job_logs(job_id))
        console.print(f"job {job_id}: {status}" + (f"; MLflow run {run_id}" if run_id else ""))
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)
    run_id, status = wait_for_run_id(client, job_id, run_timeout)
    if run_id:
        print(f"run_id: {run_id}")
    else:
        console.print(f"job {job_id} is {status}; no MLflow run yet (see `pipeline jobs logs {job_id}`)")
    console.print(f"follow it: pipeline jobs logs {job_id} --follow")


@jobs_app.command("list")
def jobs_list(address: JobsAddress = None, as_json: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON")] = False) -> None:
    """Jobs on the cluster, newest first."""
    ray_auth(always=True)  # before anything imports Ray
    from dataclasses import asdict

    from rich.table import Table

    from pipeline.ops.ray_jobs import list_jobs

    rows = list_jobs(_client(address))
    if as_json:
        print(json.dumps([asdict(r) | {"seconds": r.seconds} for r in rows], indent=2))
        return
    table = Table(title="Ray jobs")
    for column in ("submission id", "status", "trigger", "seconds"):
        table.add_column(column, no_wrap=True)
    table.add_column("entrypoint", overflow="fold")
    for r in rows:
        table.add_row(r.submission_id, r.status, r.metadata.get("pipeline.trigger", ""),
                      f"{r.seconds:.0f}" if r.seconds is not None else "-", r.entrypoint)
    Console(width=max(160, Console().width)).print(table)


@jobs_app.command("logs")
def jobs_logs(job_id: Annotated[str, typer.Argument(help="Ray job id (from `pipeline submit` or `jobs list`)")], address: JobsAddress = None,
              follow: Annotated[bool, typer.Option("--follow", help="Stream until the job ends; exit with its status")] = False) -> None:
    """The job's log (driver output)."""
    ray_auth(always=True)  # before anything imports Ray
    from pipeline.ops.ray_jobs import follow as follow_job

    client = _client(address)
    if not follow:
        print(client.get_job_logs(job_id), end="")
        return
    status = follow_job(client, job_id, lambda text: print(text, end="", flush=True))
    console.print(f"job {job_id}: {status}")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@jobs_app.command("stop")
def jobs_stop(job_id: Annotated[str, typer.Argument(help="Ray job id (from `pipeline submit` or `jobs list`)")], address: JobsAddress = None) -> None:
    """Ask the cluster to stop the job."""
    ray_auth(always=True)  # before anything imports Ray
    stopped = _client(address).stop_job(job_id)
    console.print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")


def schedule(
    config: Annotated[str, typer.Argument(help="YAML config inside the working directory")],
    cron: Annotated[Optional[str], typer.Option("--cron", help="Cron expression in UTC; a 6th field is seconds")] = None,
    on_new_data: Annotated[bool, typer.Option("--on-new-data", help="Also retrain when data.url's manifest changes")] = False,
    override: Overrides = None,
    address: JobsAddress = None,
    state: Annotated[Optional[Path], typer.Option("--state", help="State file (default .pipeline/schedule-<experiment>.json)")] = None,
    warm_start: Annotated[bool, typer.Option("--warm-start/--cold-start", help="Start from the champion")] = True,
    poll_seconds: Annotated[float, typer.Option("--poll-seconds", min=0.05, help="Seconds between looks at the clock and the data")] = 30.0,
    max_triggers: Annotated[Optional[int], typer.Option("--max-triggers", help="Exit after this many jobs")] = None,
    once: Annotated[bool, typer.Option("--once", help="Look once, then exit")] = False,
    working_dir: WorkingDir = None,
    tracking_uri: StoreUri = None,
    env: PassEnv = None,
) -> None:
    """Retrain on a cron and/or when new shards land; each job warm-starts from the champion."""
    ray_auth(always=True)  # before anything imports Ray
    from pipeline.ops.schedule import Scheduler, job_trigger
    from pipeline.ops.submit import slug

    if cron is None and not on_new_data:
        fail("give --cron EXPR and/or --on-new-data", code=2)
    request = _request(config, override, warm_start=warm_start, working_dir=working_dir,
                       tracking_uri=tracking_uri, env=env)
    submission = _build(request)  # checks config and environment now, not at the first tick
    data_url = _data_url(config, override)  # the scheduler reads the manifest itself (same credentials)
    state_path = state or Path(".pipeline") / f"schedule-{slug(submission.experiment)}.json"
    client = _client(address)
    try:
        scheduler = Scheduler(trigger=job_trigger(client, request), state_path=state_path, prefix=slug(submission.experiment),
                              cron=cron, data_url=data_url if on_new_data else None,
                              log=lambda line: print(line, flush=True))
    except ValueError as err:
        fail(str(err), code=2)
    console.print(f"scheduling {config}: cron={cron or '-'} on-new-data={on_new_data} state={state_path}")
    try:
        fired = scheduler.run(poll_seconds=poll_seconds, max_triggers=max_triggers, once=once)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    console.print(f"submitted {fired} job(s)")


def _data_url(config: str, override: list[str] | None) -> str:
    from pipeline.config import load_config

    url = load_config(config, override or []).data.url
    return url if "://" in url else str(Path(url).expanduser().resolve())


def promote(
    run_id: Annotated[str, typer.Argument(help="MLflow run whose model should become champion")],
    model: Annotated[Optional[str], typer.Option("--model", help="Registered model (default: the run's)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Move 'champion' without comparing (e.g. roll back)")] = False,
    tracking_uri: StoreUri = None,
) -> None:
    """Register the run's model and make it champion if its un-relaxed validation -ELBO (val/loss_onehot
    for categorical latents, else val/loss) is lower than the champion's on the same validation data and
    likelihood (or with --force). Prints the decision as JSON, and why on stderr; exit 3 when not promoted."""
    from pipeline.ops.champion import register_and_decide
    from pipeline.runs.store import get_run, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        params = get_run(uri, run_id).data.params
    except Exception as err:  # noqa: BLE001 - MLflow's message names the missing run
        fail(f"run {run_id}: {err}")
    registered = params.get("tracking.registered_model")
    name = model or (registered if registered not in (None, "None") else params.get("tracking.experiment"))
    if not name:
        fail(f"run {run_id} names no experiment: pass --model")
    try:
        decision = register_and_decide(uri, run_id, name, force=force)
    except Exception as err:  # noqa: BLE001 - e.g. no logged model to register
        fail(str(err))
    console.print(decision.line(), markup=False, highlight=False)
    print(json.dumps(decision.as_dict()))
    raise typer.Exit(0 if decision.promoted else 3)


def compare(
    experiment: Annotated[Optional[str], typer.Option("--experiment", help="Default: the experiment of the latest run")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable rows")] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="Registered model whose champion is marked")] = None,
    tracking_uri: StoreUri = None,
) -> None:
    """One row per run, best val/loss first: latent, epochs, losses, speed, duration, trigger, champion."""
    from pipeline.ops.compare import compare_rows, render_table
    from pipeline.runs.store import latest_experiment_name, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    experiment = experiment or latest_experiment_name(uri)
    if experiment is None:
        fail(f"no runs in {uri}")
    rows = compare_rows(uri, experiment, model)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        Console(width=max(160, Console().width)).print(render_table(rows, f"{experiment} ({uri})"))



def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1")] = 5000,
    host: Annotated[str, typer.Option(help="Bind address; keep 127.0.0.1 unless you mean to expose it")] = "127.0.0.1",
    tracking_uri: tracking_uri_option("Store to serve (default as for train)") = None,
) -> None:
    """Serve the MLflow UI for the configured store (default: ./mlflow.db) on 127.0.0.1; stopping it
    (Ctrl-C, SIGTERM) stops every process of the server."""
    from pipeline.runs.store import resolve_tracking_uri

    store = resolve_tracking_uri(tracking_uri)
    if store.startswith(("http://", "https://")):
        fail(f"{store} is already a tracking server: open it in a browser")
    console.print(f"MLflow UI for {store} on http://{host}:{port} (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", host,
           "--port", str(port), "--workers", "1"]
    from pipeline.ops.ui import serve

    raise typer.Exit(serve(cmd))  # its own process group, ended with us (pipeline/ops/ui.py)


def replay_metrics(
    path: Annotated[str, typer.Argument(help="mlflow-pending-<run_id>.jsonl written when MLflow was unreachable")],
    tracking_uri: tracking_uri_option("Deliver to this store instead") = None,
) -> None:
    """Deliver metrics a run could not deliver to MLflow while it trained."""
    from pipeline.runs.logger import replay_metrics as replay

    count = replay(path, tracking_uri)
    console.print(f"delivered {count} metric values from {path}")
