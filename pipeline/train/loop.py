"""The per-worker training loop: DDP minibatch SGD on the -ELBO, run by every Ray Train rank.

Read `train_loop_per_worker` top to bottom: `setup` (data, model, the `TrainState` restored from
the latest checkpoint or started fresh, the DDP wrapper, rank 0's logger), then per epoch a fixed
number of steps (the same on every rank, from the manifest), each one `Worker.train_step`, train
metrics every `log_every` steps, checkpoints every `checkpoint_every_steps`, and at the epoch's end
validation, data health and a checkpoint (`Worker.end_epoch`). Every collective call (a point every
rank must reach together) is written in `train_loop_per_worker` itself. Only rank 0 talks to MLflow
and writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

import ray.train
import ray.train.torch

from pipeline.config import RunConfig
from pipeline.data import partitions_of_rank, read_manifest, steps_per_epoch, train_batches
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.stats import ReadStats
from pipeline.data.stream import prefetch
from pipeline.models import build_vae
from pipeline.runs.logger import RunLogger, load_pending, log_data_health
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.code_init import code_pool, init_codes_from_data, restart_dead_codes
from pipeline.train.collectives import all_gather, all_reduce
from pipeline.train.hooks import HookSpec, Hooks
from pipeline.train.progress import ProgressReporter
from pipeline.train.state import TrainState
from pipeline.train.step import StepStats, train_step
from pipeline.train.validate import SplitScore, score_split


class NonFiniteLossError(RuntimeError):
    """The loss or its gradient became NaN/inf; carries the global step."""

    def __init__(self, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(f"non-finite loss at step {step} (loss={loss}, grad_norm={grad_norm})")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm

    def __reduce__(self):  # Ray pickles worker errors back to the driver
        return type(self), (self.step, self.loss, self.grad_norm)


@dataclass
class WorkerArgs:
    """What the driver sends to every worker (plain data: it crosses process boundaries)."""

    config: dict[str, Any]
    dataset_url: str  # absolute, so workers need not share the driver's cwd
    tracking_uri: str
    run_id: str
    resumed_run: bool = False  # the driver resumed an existing run (`pipeline train --resume`)
    fallback_dir: str | None = None  # where undeliverable metrics are written
    hooks: list[HookSpec] = field(default_factory=list)  # callbacks installed in every worker (train/hooks.py)
    # The driver's progress board (a Ray actor's name) when it draws a live line; None: the per-epoch
    # lines only. The driver decides, as only its stdout can be a terminal (train/progress.py).
    progress: str | None = None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    worker = setup(WorkerArgs(**loop_config))
    cfg, state = worker.cfg, worker.state
    # Collective: every rank reaches it once, at the start (the Ray node of every rank, in rank order).
    node_ids = all_gather(ray.get_runtime_context().get_node_id(), worker.world_size)
    worker.start_logging(node_ids)
    stopped: StepStats | None = None
    for epoch in range(state.position.epoch, cfg.train.epochs):
        window = _Window()
        for batch in worker.batches(epoch):  # the same number of batches on every rank
            window.data_wait += time.perf_counter() - window.tic
            # Collective: every rank reaches every step (DDP all-reduces the gradients; under fp16
            # the loss's finiteness is all-reduced too, so the non-finite verdict is the same everywhere).
            stats = worker.train_step(batch)
            if stats.nonfinite and cfg.train.on_nonfinite == "stop":
                stopped = stats  # every rank stops here, at the same step
                break
            worker.after_step(stats, window, epoch, batch.keys)
            worker.show_progress(epoch, stats)  # rank 0, to the driver's live line; no collective
            if stats.step + 1 == 1 or (stats.step + 1) % cfg.train.log_every == 0:
                # Collective: every rank reaches it at the same steps (the window's sums over the global batch).
                sums = all_reduce(window.sums_tensor(), worker.device)
                worker.log_train(stats, window.means(sums / worker.world_size))
                window = _Window()
            if worker.checkpoint_due():
                # Collective: ray.train.report is a barrier every rank reaches at the same steps.
                worker.report({"epoch": epoch, "step": state.position.step})
            window.tic = time.perf_counter()
        if stopped:
            break
        state.position.next_epoch(epoch)
        # No collective: every rank edits its replica alike (the same pool, weights and draws).
        worker.restart_dead_codes()
        score = worker.score_validation()  # this rank's share of the split; no collective inside
        # Collective: every rank reaches it once per epoch (the validation sums over all ranks).
        val_sums = all_reduce(score.pack(), worker.device)
        # Collective: every rank reaches these once per epoch (read statistics summed, skipped shards gathered).
        health = all_reduce(_read_counts(worker.reader.stats), worker.device)
        skipped_shards = all_gather(sorted(worker.reader.stats.skipped_shards), worker.world_size)
        report = worker.end_epoch(epoch, score, val_sums, health, skipped_shards)
        # Collective: ray.train.report is a barrier every rank reaches at the epoch's end.
        worker.report(report)
    if stopped:
        # Collective: every rank reports the failure together. Ending with a report instead of an
        # exception: Ray would retry a raising worker group, and the same batch would fail the same
        # way max_failures times.
        ray.train.report(worker.failure(stopped))


@dataclass
class Worker:
    """One rank's run: what `setup` builds, and the loop's seams (`train_step`, `end_epoch`)."""

    args: WorkerArgs
    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    manifest: Any
    decoder: SampleDecoder
    reader: ShardReader
    state: TrainState
    steps: int  # per epoch, the same on every rank
    partitions: range  # this rank's data partitions
    hooks: Hooks
    entered: float  # when setup began (perf/worker_setup_s)
    checkpoint: Any = None  # the ray.train.Checkpoint this run continues from
    logger: RunLogger | None = None  # rank 0's
    progress: ProgressReporter | None = None  # rank 0's, when the driver draws a live line
    preview: torch.Tensor | None = None  # rank 0's validation images, the same every epoch
    code_pool: torch.Tensor | None = None  # model.restart_dead_codes: the train images codes are counted on
    codes_restarted: int = 0  # this worker group's restarts so far (logged at each epoch's end)
    skipped_nonfinite: int = 0
    setup_logged: bool = False

    @property
    def total_steps(self) -> int:
        return self.steps * self.cfg.train.epochs  # the cosine learning-rate horizon

    def batches(self, epoch: int) -> Iterator[Any]:
        """This rank's batches of ``epoch`` from the current position: same batches, same order,
        prepared ahead in a background thread."""
        cfg, world_size = self.cfg, self.world_size
        return prefetch(train_batches(
            self.manifest, self.args.dataset_url, epoch=epoch, seed=cfg.train.seed, rank=self.rank,
            world_size=world_size, batch_per_rank=cfg.train.batch_size // world_size,
            shuffle_buffer=cfg.data.shuffle_buffer, start_step=self.state.position.step_in_epoch,
            reader=self.reader.with_options(verify=cfg.data.verify), partitions=self.state.partitions,
        ), cfg.data.prefetch_batches, pin_memory=self.device.type == "cuda")

    def train_step(self, batch: Any) -> StepStats:
        if not self.setup_logged:  # once per worker group: the first batch is at hand
            if self.logger:
                self.logger.log_metrics({"perf/worker_setup_s": time.perf_counter() - self.entered},
                                        self.state.position.step + 1)
            self.setup_logged = True
        x = batch.x.to(self.device, non_blocking=True)
        return train_step(self.state, x, self.cfg, self.partitions, self.total_steps, self.hooks)

    def after_step(self, stats: StepStats, window: "_Window", epoch: int, keys: list[str]) -> None:
        """A step that did not stop the run: the skip policy's count, the window, the hooks."""
        if stats.nonfinite:  # on_nonfinite=skip_batch: the update was not applied
            self.skipped_nonfinite += 1
            if self.logger:
                self.logger.log_metrics({"train/nonfinite_skipped": self.skipped_nonfinite}, stats.step + 1)
                self.logger.set_tags({"nonfinite.last_step": stats.step})
        window.add(stats, self.cfg.train.batch_size)
        self.hooks.on_step_end(epoch, stats.step + 1, keys)

    def show_progress(self, epoch: int, stats: StepStats) -> None:
        """Rank 0 tells the driver's live line where training stands (at most twice a second)."""
        if self.progress:
            position = self.state.position
            self.progress.step(epoch, position.step_in_epoch, position.step, stats.loss)

    def log_train(self, stats: StepStats, means: dict[str, float]) -> None:
        """Rank 0 logs the window's means (already reduced over ranks) and this step's values."""
        if self.logger:
            self.logger.log_metrics(means | {
                "train/temperature": stats.temperature,
                "train/straight_through": float(stats.straight_through),
                "train/kl_weight": stats.kl_weight,
                "train/lr": stats.lr,  # the schedule's rate (param group 0 may be the scaled encoder's)
                "train/grad_norm": stats.grad_norm,
            }, stats.step + 1)

    def checkpoint_due(self) -> bool:
        """A mid-epoch checkpoint after this step (the epoch's last step is checkpointed by `end_epoch`)."""
        every, position = self.cfg.train.checkpoint_every_steps, self.state.position
        return bool(every) and position.step % every == 0 and position.step_in_epoch < self.steps

    def restart_dead_codes(self) -> None:
        """``model.restart_dead_codes``: the codes the pool's positions no longer pick restart (train/code_init.py)."""
        if self.code_pool is not None:
            self.codes_restarted += restart_dead_codes(self.state, self.code_pool, self.cfg.train.seed)

    def score_validation(self) -> SplitScore:
        return score_split(self.state.evaluated, self.manifest, self.args.dataset_url, "val", rank=self.rank,
                           world_size=self.world_size, batch_size=self.cfg.train.batch_size // self.world_size,
                           cfg=self.cfg, step=self.state.position.step, options=self.reader, decoder=self.decoder)

    def end_epoch(self, epoch: int, score: SplitScore, val_sums: torch.Tensor, health: torch.Tensor,
                  skipped_shards: list[list[str]]) -> dict[str, Any]:
        """Epoch ``epoch`` is validated (``val_sums``, ``health`` and ``skipped_shards`` already reduced
        over ranks): rank 0 logs it; returns what the epoch's report says."""
        stats: dict[str, Any] = {}  # the all-reduced arrays behind the code-use plots
        val, step = score.metrics(val_sums, stats), self.state.position.step
        if self.code_pool is not None:
            val["latent/codes_restarted"] = float(self.codes_restarted)
        report = {"epoch": epoch + 1, "step": step, **val}
        if self.logger:
            log_data_health(self.logger, step, dict(zip(_READ_COUNTS, health.tolist())),
                            set().union(*map(set, skipped_shards)))
            self.logger.log_metrics(val, step)
            _log_epoch_images(self.logger, self.state.evaluated, self.preview, stats, self.cfg.train.seed, step)
            bits = f", {val['val/bits_per_dim']:.3f} bits/dim" if "val/bits_per_dim" in val else ""
            print(f"[rank 0] epoch {epoch + 1}/{self.cfg.train.epochs} step {step}: val -ELBO "
                  f"{val['val/loss']:.3f} (recon {val['val/recon']:.3f}, kl {val['val/kl']:.3f}{bits})")
            if epoch + 1 == self.cfg.train.epochs:
                report |= {f"tracking/{k}": v for k, v in self.logger.close().items()}
        return report

    def report(self, metrics: dict[str, Any]) -> None:
        """ray.train.report (a barrier): only rank 0 (the one with a logger) uploads a checkpoint, with
        the metrics MLflow does not have yet: a checkpoint is never ahead of the metrics it covers."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.logger is not None:
                self.logger.save_pending(tmp)
                save_checkpoint(Path(tmp), self.state, self.args.config)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def failure(self, stats: StepStats) -> dict[str, Any]:
        """The non-finite step that stops the run, as rank 0 tags it and every rank reports it."""
        error = NonFiniteLossError(stats.step, stats.loss, stats.grad_norm)
        if self.logger:
            self.logger.set_tags({"failure": str(error), "failure.step": stats.step})
            self.logger.close()
        return {"failure": str(error), "failure.step": stats.step}

    def start_logging(self, node_ids: list[str]) -> None:
        """Rank 0's logger (delivering first what the checkpoint's rank 0 had not), the run's tags."""
        if self.rank != 0:
            return
        cfg, position, nodes = self.cfg, self.state.position, len(set(node_ids))
        self.logger = RunLogger(self.args.tracking_uri, self.args.run_id,
                                resumed=bool(self.checkpoint) or self.args.resumed_run,
                                fallback_dir=self.args.fallback_dir, pending=load_pending(self.checkpoint))
        self.logger.set_tags({"schedule.lr_horizon_steps": self.total_steps,  # the cosine rate's, from this start
                              "cluster.nodes": nodes, "cluster.node_ids": ",".join(node_ids),
                              "cluster.resources_per_worker": json.dumps({"CPU": cfg.train.cpus_per_worker,
                                                                          "GPU": int(cfg.train.use_gpu)})})
        if self.checkpoint and not self.args.resumed_run:
            self.logger.count_restart(f"worker group restarted at step {position.step}")
        print(f"[rank 0] {self.world_size} workers x batch {cfg.train.batch_size // self.world_size} on {nodes} "
              f"node(s), {self.steps} steps/epoch, from epoch {position.epoch + 1} step {position.step_in_epoch}")
        if self.args.progress:
            self.progress = ProgressReporter.connect(self.args.progress, steps=self.steps, epochs=cfg.train.epochs,
                                                     global_batch=cfg.train.batch_size)
        # The same validation images every epoch (reconstruction grids at their step).
        self.preview = _preview_images(self.manifest, self.args.dataset_url, self.reader)


def setup(args: WorkerArgs) -> Worker:
    """Data, model and the training state: restored in one piece from the latest checkpoint (a
    restarted worker group or a resumed driver), else fresh (a warm start or a data-driven code
    init, before the state copies the weights into its EMA); then wrapped for DDP."""
    entered = time.perf_counter()  # our setup time, apart from Ray's worker start (perf/worker_setup_s)
    _quiet_worker_logs()
    cfg = RunConfig.model_validate(args.config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    read_stats = ReadStats()  # this worker's reads (the manifest's too): skips, retries, cache use
    manifest = read_manifest(args.dataset_url, on_retry=read_stats.count_retry)
    target = ImageTarget.from_config(manifest.spec, cfg.data)  # what the model is fed: [C, H, W]
    decoder = SampleDecoder(manifest.spec, target, cfg.data.decode_workers)
    reader = ShardReader(ReadOptions.from_config(cfg.data), decoder, stats=read_stats)  # retries, cache, on_corrupt
    model = build_vae(cfg.model, image_shape=target.shape, binarize=cfg.model.binarize)
    checkpoint = ray.train.get_checkpoint()
    init_codes = checkpoint is None and not cfg.train.init_from and cfg.model.code_init != "random"
    # The first train images: a fresh grid's code init and dead-code restarts (train/code_init.py).
    needs_pool = init_codes or cfg.model.restart_dead_codes
    pool = code_pool(model, manifest, args.dataset_url, cfg, reader) if needs_pool else None
    if checkpoint is None and cfg.train.init_from:  # warm start (e.g. from the champion)
        from pipeline.runs.load import load_initial_weights

        load_initial_weights(model, cfg.train.init_from, args.tracking_uri)
    elif init_codes:  # a fresh grid: every code in use (models/resnet.py)
        init_codes_from_data(model, pool, cfg)

    device = ray.train.torch.get_device()
    state = TrainState(model, cfg.train, device, cfg.partitions)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state.load_state_dict(load_checkpoint(directory))
    # Collective: every rank wraps the model at the same point (DDP broadcasts rank 0's weights).
    state.wrap(ray.train.torch.prepare_model)
    global_batch, partitions = cfg.train.batch_size, state.partitions
    return Worker(args=args, cfg=cfg, rank=rank, world_size=world_size, device=device, manifest=manifest,
                  decoder=decoder, reader=reader, state=state,
                  steps=steps_per_epoch(manifest.splits["train"].samples, partitions, global_batch // partitions),
                  partitions=partitions_of_rank(partitions, world_size, rank),
                  hooks=Hooks.load(args.hooks, cfg, rank), entered=entered, checkpoint=checkpoint,
                  code_pool=pool if cfg.model.restart_dead_codes else None)


def _quiet_worker_logs() -> None:
    # Ray Train logs every report (all metrics) at INFO on a logger named by its file path,
    # which LoggingConfig does not reach; rank 0's own epoch line says what matters. Ray workers
    # log at INFO, so botocore's "Found credentials..." would reach the driver from every worker.
    from ray.train.v2._internal.execution import context as train_context

    for name in (train_context.__file__, "botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _preview_images(manifest: Any, url: str, reader: ShardReader) -> torch.Tensor:
    """The first 16 validation images, uint8 [16, C, H, W]."""
    from pipeline.data import eval_batches

    images, _ = next(iter(eval_batches(manifest, url, split="val", rank=0, world_size=1, batch_size=16,
                                       reader=reader)))
    return images


def _log_epoch_images(logger: RunLogger, model: torch.nn.Module, preview: torch.Tensor | None, stats: dict[str, Any],
                      seed: int, step: int) -> None:
    """Per epoch, at its step (MLflow's image slider shows progress): the reconstruction grid of the
    preview images and, for categorical latents, the code-use plots (KL heat map, code usage)."""
    from pipeline.train.artifacts import reconstruction_grid
    from pipeline.train.code_plots import code_use_images

    if preview is not None:
        logger.log_image("reconstructions", reconstruction_grid(model, preview, seed), step)
    for name, image in code_use_images(stats).items():
        logger.log_image(name, image, step)


_READ_COUNTS = ("data/skipped_samples", "data/read_retries", "data/cache_hits", "data/cache_misses")


def _read_counts(stats: ReadStats) -> torch.Tensor:
    """This worker's read statistics (`_READ_COUNTS`), for the sum over ranks."""
    return torch.tensor([stats.skipped_samples, stats.read_retries, stats.cache_hits, stats.cache_misses],
                        dtype=torch.float64)


class _Window:
    """Running sums of the train metrics between two log steps, and the time they took."""

    def __init__(self) -> None:
        self.start = self.tic = time.perf_counter()
        self.data_wait = 0.0  # time blocked on the loader
        self.samples = 0
        self.count = 0
        self.sums = {"train/loss": 0.0, "train/recon": 0.0, "train/kl": 0.0}

    def add(self, stats: StepStats, global_samples: int) -> None:
        self.count += 1
        self.samples += global_samples
        self.sums["train/loss"] += stats.loss
        self.sums["train/recon"] += stats.recon
        self.sums["train/kl"] += stats.kl

    def sums_tensor(self) -> torch.Tensor:
        """This rank's sums, for the all_reduce over ranks."""
        return torch.tensor(list(self.sums.values()), dtype=torch.float64)

    def means(self, rank_mean: torch.Tensor) -> dict[str, float]:
        """Window means over the whole global batch (``rank_mean``: the sums averaged over ranks), and speed."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {k: float(v) / max(self.count, 1) for k, v in zip(self.sums, rank_mean)} | {
            "perf/samples_per_s": self.samples / elapsed, "perf/data_wait_frac": self.data_wait / elapsed}
