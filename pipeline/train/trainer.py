"""Driver side of `pipeline train`: check inputs, connect to Ray, create the MLflow run,
run TorchTrainer, then log the final artifacts (grids, model) into the same run."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console

from pipeline.config import RunConfig
from pipeline.data import DataError, read_manifest
from pipeline.data.remote import local_checkpoint_dir, ray_storage_kwargs, storage_url
from pipeline.runs import store
from pipeline.runs.logger import replay_metrics
from pipeline.train import hooks
from pipeline.train.hardware import resolve_hardware
from pipeline.train.recovery import START_LOSS, RecoveryTally, failures_left, fit_with_recovery
from pipeline.train.loop import WorkerArgs, train_loop_per_worker
from pipeline.train.progress import live_progress, wants_progress

console = Console(stderr=True, soft_wrap=True)  # messages name paths and URLs: never break them


class TrainingError(RuntimeError):
    """Training did not finish; the message says why (and the MLflow run is marked FAILED)."""


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    val_loss: float
    epochs: int
    steps: int
    checkpoint_path: str | None
    seconds: float
    delivery: dict = field(default_factory=dict)  # rank 0's MLflow delivery report: late_batches, failed_attempts
    recoveries: list[str] = field(default_factory=list)  # why each worker-group recovery of this call was needed


def absolute_url(url: str) -> str:
    """Local paths become absolute (workers do not share our cwd); URLs pass through."""
    return url if "://" in url else str(Path(url).expanduser().resolve())


def connect_ray(address: str | None, config: RunConfig, *, worker_output: bool = True) -> bool:
    """Join RAY_ADDRESS/--address if given, else start a local cluster sized to this machine;
    True when this call started a local cluster (so it is ours to shut down). ``worker_output``
    False keeps the workers' output off this process's stdout (a benchmark's JSON report)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)  # the CLI has set token auth (cli.train)
        except (ConnectionError, RuntimeError) as err:
            raise TrainingError(f"cannot join the Ray cluster at {address}: {_root_cause(err)} (is it up, and does "
                                "this machine have its token: RAY_AUTH_TOKEN or ~/.ray/auth_token?)") from None
        return False
    cpus = os.cpu_count() or 1
    needed = config.train.workers * config.train.cpus_per_worker
    if needed > cpus:
        raise TrainingError(
            f"train.workers={config.train.workers} x train.cpus_per_worker={config.train.cpus_per_worker} "
            f"needs {needed:g} CPUs but this machine has {cpus}; lower them or pass --address to use a cluster"
        )
    # address="local": never attach to a stale cluster from /tmp/ray; 127.0.0.1 because Ray
    # was seen to pick an unreachable node address and hang otherwise. The dashboard (127.0.0.1
    # only, ~1 GiB) serves the state API that Ray Train's placement-group cleaner polls; without
    # it that actor logs a warning every few seconds.
    # The dashboard's address, fixed here and inherited by every Ray process through the
    # environment: Ray Train's placement-group cleaner otherwise looks for "the" cluster of this
    # machine and dies on "Found multiple active Ray instances" when another one runs.
    dashboard_port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # One machine is never preempted: no preemption watcher actor in any run on this cluster (nor its
    # start-up warning line). Set before the cluster starts, so a sweep's trials inherit it too.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray starts a local cluster with token authentication on and says so at WARNING on every start;
    # that is the setting we want (a user's RAY_AUTH_MODE still wins), so the line is not shown.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
             log_to_driver=worker_output)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown_local_ray_quietly() -> None:
    """Shut down the local cluster we started, after a run that finished, without its teardown noise.

    While the cluster goes away its actors print tracebacks that mean nothing after a success
    (PlacementGroupCleaner: "Timed out while waiting for GCS"; TrainController: GetTimeoutError;
    a raylet abort), and Ray echoes them on our console, where they read as a failure. So the echo of
    worker logs stops first. Ray has no public switch for that after `ray.init`: the handler name is
    Ray's own (ray/_private/worker.py).
    """
    import contextlib
    import io

    import ray
    from ray._private import worker as ray_worker

    with contextlib.suppress(Exception):
        ray_worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ray.shutdown()  # also flushes Ray's de-duplicated log lines: they go nowhere


def train(config: RunConfig, *, address: str | None = None, trigger: str = "manual",
          resume_run_id: str | None = None, tags: dict[str, str] | None = None,
          resume_reason: str = "driver resumed (pipeline train --resume)",
          progress: bool | None = None, callbacks: list[Any] = ()) -> TrainResult:
    """Train one run. With ``resume_run_id``, continue that MLflow run from its latest checkpoint.
    ``tags`` go on a new run when it is created (e.g. a sweep's parent run and trial key). ``progress``:
    the live line (`_fit`; None: $PIPELINE_PROGRESS, else whether stdout is a terminal). ``callbacks``:
    Ray Train callbacks added to the run's own (e.g. a ``ray.train.UserCallback`` of yours)."""
    started = time.perf_counter()
    dataset_url = absolute_url(config.data.url)
    manifest = _checked_manifest(config, dataset_url)
    _tune_ray_train_env()
    tracking_uri = store.resolve_tracking_uri(config=config.tracking.uri)
    storage = absolute_url(config.train.storage or "ray_results")
    # Ray first: a cluster that cannot take this run refuses it before an MLflow run exists.
    with console.status("starting Ray"):
        own_cluster = connect_ray(address, config)
    check_shared_storage(storage=storage, dataset_url=dataset_url, tracking_uri=tracking_uri)
    config = _resolved_hardware(config)
    if resume_run_id:
        run_id = resume_run_id
        store.reopen_run(tracking_uri, run_id, config)
        store.count_restart(tracking_uri, run_id, resume_reason)
    else:  # created before the workers, so sqlite schema creation never stalls rank 0 mid-DDP
        run_id = store.start_run(config, tracking_uri=tracking_uri, manifest_digest=manifest.digest(),
                                 trigger=trigger, extra_tags={**(tags or {}), "ray.storage_path": storage})
    ray_run_name = f"{config.tracking.experiment}-{run_id[:8]}"  # same name + storage = Ray resumes the run
    console.print(f"MLflow run [bold]{run_id}[/] in experiment '{config.tracking.experiment}' ({tracking_uri})")
    try:
        worker_args = WorkerArgs(config.model_dump(mode="json"), dataset_url, tracking_uri, run_id,
                                 resumed_run=bool(resume_run_id), fallback_dir=str(Path(storage) / ray_run_name)
                                 if "://" not in storage else None, hooks=hooks.specs_from_environment())
        result, recoveries = _fit(config, worker_args, storage, ray_run_name, progress, list(callbacks))
    except Exception as err:  # noqa: BLE001 - any failure must mark the run FAILED
        reason = _root_cause(err)
        store.end_run(tracking_uri, run_id, failed=True, reason=reason)
        raise TrainingError(f"training failed (MLflow run {run_id} marked FAILED): {reason}") from err

    metrics = result.metrics or {}
    _finish_run(config, result, tracking_uri, run_id, dataset_url, manifest)
    checkpoint_path = storage_url(storage, result.checkpoint.path) if result.checkpoint else None
    if own_cluster:
        shutdown_local_ray_quietly()
    return TrainResult(
        run_id=run_id, tracking_uri=tracking_uri, val_loss=float(metrics.get("val/loss", float("nan"))),
        epochs=int(metrics.get("epoch", 0)), steps=int(metrics.get("step", 0)), checkpoint_path=checkpoint_path,
        seconds=time.perf_counter() - started, recoveries=recoveries,
        delivery={k.removeprefix("tracking/"): v for k, v in metrics.items() if k.startswith("tracking/")},
    )


def _finish_run(config: RunConfig, result: Any, tracking_uri: str, run_id: str, dataset_url: str,
                manifest: Any) -> None:
    """After Ray's fit returned: a stop the workers asked for fails the run; else the final
    artifacts (logged model, tokenizer, images) go in and the run ends FINISHED."""
    _warn_about_late_metrics(result.metrics or {}, tracking_uri, run_id)
    stopped = store.get_run(tracking_uri, run_id).data.tags.get("failure")
    if stopped:  # the workers stopped on purpose (e.g. a non-finite loss) and said why in the run
        store.end_run(tracking_uri, run_id, failed=True)
        raise TrainingError(f"training stopped (MLflow run {run_id} marked FAILED): {stopped}")
    from pipeline.train.artifacts import log_final_artifacts

    try:
        log_final_artifacts(config, tracking_uri, run_id, local_checkpoint_dir(result.checkpoint), dataset_url,
                            manifest)
    except Exception as err:  # noqa: BLE001
        store.end_run(tracking_uri, run_id, failed=True, reason=f"final artifacts: {err}")
        raise
    store.end_run(tracking_uri, run_id)


def _resolved_hardware(config: RunConfig) -> RunConfig:
    """train.use_gpu and train.precision as this cluster makes them (train/hardware.py)."""
    import ray

    def say(line: str) -> None:
        console.print(f"[yellow]note:[/] {line}")

    return resolve_hardware(config, ray.cluster_resources(), say=say)


def _fit(config: RunConfig, worker_args: WorkerArgs, storage: str, ray_run_name: str,
         progress: bool | None, callbacks: list[Any]) -> tuple[Any, list[str]]:
    """TorchTrainer.fit, under the live progress line when there is one (train/progress.py).

    Ray workers' stdout is never a terminal (Ray forwards it to us line by line), so the decision is
    made here, on the driver's stdout, and reaches rank 0 as `WorkerArgs.progress`: the name of the
    board it posts to. The driver draws the line; rank 0's per-epoch lines print above it, or alone.
    Returns Ray's result and the run's recoveries (train/recovery.py), one reason each."""
    def fit(tally: RecoveryTally, relaunched: bool) -> Any:
        # A relaunch resumes like a driver resume: the driver counted the restart, not rank 0.
        args = replace(worker_args, progress=board, resumed_run=worker_args.resumed_run or relaunched)
        return _torch_trainer(config, args, storage, ray_run_name, [tally, *callbacks]).fit(), tally.reasons()

    def relaunch(tally: int) -> None:
        store.count_restart(worker_args.tracking_uri, worker_args.run_id, START_LOSS)
        console.print(f"[yellow]note:[/] {START_LOSS}; going on from the latest checkpoint "
                      f"(recovery {tally} of train.max_failures={config.train.max_failures})")

    with live_progress(wants_progress(progress)) as board:  # board: None without a live line
        with store.system_metrics(worker_args.tracking_uri, worker_args.run_id):  # the driver machine's CPU, GPU
            return fit_with_recovery(fit, config.train.max_failures, relaunch)


def resume_config(run: str, *, config_path: str | None, overrides: list[str],
                  reschedule: bool = False) -> tuple[RunConfig, str]:
    """The config and run id to resume ``run`` (an MLflow run id or name).

    The run's own logged config is the default, so a resumed run trains what it started;
    its checkpoint storage comes from the run's `ray.storage_path` tag. A change of a setting that
    shapes a schedule (`schedules.schedule_changes`: e.g. train.epochs under a cosine learning rate,
    whose horizon it sets, or model.latent.tau_cosine.steps) is refused unless ``reschedule``.
    """
    import copy

    import yaml

    from pipeline.config import ConfigError, load_config, parse_config
    from pipeline.train.schedules import schedule_changes

    base = load_config(config_path, overrides) if config_path else None
    tracking_uri = store.resolve_tracking_uri(config=base.tracking.uri if base else None)
    try:
        found = store.find_run(tracking_uri, run, base.tracking.experiment if base else None)
    except LookupError as err:
        raise ConfigError(str(err)) from None
    logged = yaml.safe_load(store.download_config(tracking_uri, found.info.run_id))
    started = parse_config(copy.deepcopy(logged))  # what the run started with (overrides edit a tree in place)
    if base is None:
        base = parse_config(logged, overrides)
    changes = schedule_changes(started, base)
    if changes and not reschedule:
        listed = ", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in changes.items()))
        raise ConfigError(f"resuming run {found.info.run_id} with {listed} would bend the schedules where they "
                          f"already ran (each is a function of the global step; the cosine learning rate's horizon "
                          f"is steps per epoch x train.epochs). Resume with the run's settings, or pass --reschedule "
                          f"to continue on the new schedules from the checkpoint's step")
    storage = found.data.tags.get("ray.storage_path")
    if storage:
        base.train.storage = storage
    base.tracking.uri = tracking_uri
    return base, found.info.run_id


def _warn_about_late_metrics(metrics: dict, tracking_uri: str, run_id: str) -> None:
    """Say which metrics were late or still undelivered; replay a fallback file if MLflow is back."""
    late = int(metrics.get("tracking/late_batches", 0))
    if late:
        console.print(f"[yellow]warning:[/] MLflow was unreachable during training: {late} metric batches were "
                      f"delivered late ({int(metrics.get('tracking/failed_attempts', 0))} failed attempts)")
    fallback = metrics.get("tracking/fallback_file")
    if fallback:
        try:
            count = replay_metrics(fallback, tracking_uri)
            Path(fallback).unlink()
            console.print(f"[yellow]warning:[/] {count} metric values reached MLflow only after training ended")
        except Exception as err:  # noqa: BLE001 - still unreachable: keep the file, say how to deliver it
            console.print(f"[yellow]warning:[/] metrics not yet in MLflow run {run_id} are kept in {fallback}: "
                          f"deliver them with `pipeline replay-metrics {fallback}` ({err})")


def _checked_manifest(config: RunConfig, dataset_url: str) -> Any:
    """The dataset's manifest, refused with a `TrainingError` before any worker starts when the path is
    bad, a split is missing or the images cannot be fed to the model; warns about the shard layout."""
    try:
        manifest = read_manifest(dataset_url)
    except DataError as err:
        raise TrainingError(str(err)) from None
    if "train" not in manifest.splits or "val" not in manifest.splits:
        raise TrainingError(f"{dataset_url}: manifest needs 'train' and 'val' splits, has {sorted(manifest.splits)}")
    from pipeline.data.contract import ImageTarget

    try:  # what the model will be fed: a dataset whose image sizes vary needs data.image_size
        ImageTarget.from_config(manifest.spec, config.data)
    except ValueError as err:
        raise TrainingError(f"{dataset_url}: {err}") from None

    from pipeline.data.stream import shard_layout_warning

    layout_warning = shard_layout_warning(len(manifest.splits["train"].shards), config.partitions)
    if layout_warning:
        console.print(f"[yellow]warning:[/] {layout_warning}")
    return manifest


def _torch_trainer(config: RunConfig, worker_args: WorkerArgs, storage: str, ray_run_name: str,
                   callbacks: list[Any]) -> Any:
    tally = next(c for c in callbacks if isinstance(c, RecoveryTally))
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(worker_args),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(config.train.min_workers, config.train.workers) if config.train.elastic
            else config.train.workers, use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.cpus_per_worker},
            placement_strategy=_placement_strategy(config),
        ),
        run_config=ray.train.RunConfig(
            name=ray_run_name, **ray_storage_kwargs(storage),  # s3:// etc. through fsspec
            # Ray's two budgets (worker failures; start-up failures) get what is left of the run's
            # one, and the tally stops the run when their sum would pass it (train/recovery.py).
            failure_config=ray.train.FailureConfig(max_failures=failures_left(tally),
                                                   controller_failure_limit=failures_left(tally)),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _placement_strategy(config: RunConfig) -> str:
    """SPREAD for CPU workers (one per node uses every node's cores and memory bandwidth),
    PACK for GPU workers (NVLink/PCIe neighbours all-reduce fastest)."""
    if config.train.placement == "auto":
        return "PACK" if config.train.use_gpu else "SPREAD"
    return config.train.placement.upper()


def check_shared_storage(*, storage: str, dataset_url: str, tracking_uri: str) -> None:
    """On a cluster of several nodes, refuse node-local shards and checkpoints before training starts.

    A worker on another node would not find the shards, and a restarted worker group would
    not find the latest checkpoint (each node would write its own copy). `file:///...` says
    "a filesystem mounted at this path on every node" and is accepted. Rank 0 logs to MLflow
    from whichever node it lands on: a file store or a loopback server only works if that is
    this machine, so that gets a warning.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    local = [f"{key}={value}" for key, value in (("data.url", dataset_url), ("train.storage", storage))
             if "://" not in value]
    if local:
        raise TrainingError(
            f"{' and '.join(local)}: a local path, but the cluster has {len(nodes)} nodes: shards and checkpoints "
            "must be on storage every node reaches (s3://, gs://, or a filesystem mounted at the same path on "
            "every node, written as file:///...)"
        )
    host = urlparse(tracking_uri).hostname
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri or host in ("127.0.0.1", "localhost"):
        console.print(f"[yellow]warning:[/] tracking URI {tracking_uri} is local to this machine, but rank 0 may run "
                      f"on any of the {len(nodes)} nodes: use an MLflow server every node reaches")


def _tune_ray_train_env() -> None:
    """Ray Train settings it propagates from the driver to its controller and workers.

    A report blocks until the controller has consumed the previous one, and the controller
    polls every 2 s by default: with short epochs that poll, not training, set the pace.
    Ray's print patch echoes every worker print twice on the driver console. User values win.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def _root_cause(err: BaseException) -> str:
    """The innermost error message: Ray wraps worker exceptions several layers deep."""
    seen = err
    for _ in range(10):
        nxt = seen.__cause__ or getattr(seen, "cause", None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip() or type(seen).__name__
    return text.splitlines()[-1] if len(text) > 500 else text
