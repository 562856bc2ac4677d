"""The per-worker training loop: DDP minibatch SGD on the -ELBO, run by every Ray Train rank.

Read top to bottom: setup, resume from the latest checkpoint (model, optimizer, RNG and
the exact position in the epoch), then per epoch a fixed number of steps (the same on
every rank, from the manifest), checkpoints every `checkpoint_every_steps` and at the
epoch's end, validation from all-reduced sums. Only rank 0 (`is_master`) talks to MLflow
and writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ray.train
import ray.train.torch

from pipeline.config import RunConfig
from pipeline.data import partitions_of_rank, read_manifest, steps_per_epoch, train_batches
from pipeline.data.stream import prefetch
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.stats import ReadStats
from pipeline.models import build_vae
from pipeline.train.collectives import all_gather, all_reduce
from pipeline.train.code_init import init_codes_from_data
from pipeline.train.checkpoint import load_checkpoint, restore_ema, save_checkpoint, training_weights
from pipeline.runs.logger import RunLogger, load_pending, log_data_health
from pipeline.train.schedules import (kl_weight, kl_y_weight, learning_rate, set_learning_rate, straight_through,
                                      temperature)
from pipeline.train.step import PrecisionStep, WeightEMA, build_optimizer
from pipeline.train.validate import evaluate_split


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
    # Testing aids, from the driver's environment (trainer.testing_aids), never from the user's config:
    sample_log: str | None = None  # PIPELINE_SAMPLE_LOG: each rank appends the keys of every batch it trained
    debug_nan_step: int | None = None  # PIPELINE_DEBUG_NAN_STEP: the batch of this global step is made NaN


@dataclass
class Position:
    """Where training stands: `step` is global; `epoch`, `step_in_epoch` say what comes next."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def _quiet_worker_logs() -> None:
    # Ray Train logs every report (all metrics) at INFO on a logger named by its file path,
    # which LoggingConfig does not reach; rank 0's own epoch line says what matters. Ray workers
    # log at INFO, so botocore's "Found credentials..." would reach the driver from every worker.
    from ray.train.v2._internal.execution import context as train_context

    for name in (train_context.__file__, "botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    entered = time.perf_counter()  # our setup time, apart from Ray's worker start (perf/worker_setup_s)
    _quiet_worker_logs()
    args = WorkerArgs(**loop_config)
    cfg = RunConfig.model_validate(args.config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_master = rank == 0
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    options = ReadOptions.from_config(cfg.data)  # retries, cache, on_corrupt
    read_stats = ReadStats()  # this worker's reads (the manifest's too): skips, retries, cache use
    manifest = read_manifest(args.dataset_url, on_retry=read_stats.count_retry)
    target = ImageTarget.from_config(manifest.spec, cfg.data)  # what the model is fed: [C, H, W]
    decoder = SampleDecoder(manifest.spec, target, cfg.data.decode_workers)
    reader = ShardReader(options, decoder, stats=read_stats)
    model = build_vae(cfg.model, image_shape=target.shape, binarize=cfg.data.binarize)
    optimizer = build_optimizer(model, cfg.train)
    position, partitions = Position(), cfg.partitions
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group (or a resumed driver) continues from the last checkpoint
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        model.load_state_dict(training_weights(state))  # not the EMA's: see train/checkpoint.py
        optimizer.load_state_dict(state["optimizer"])
        position = Position(state["step"], state["epoch"], state["step_in_epoch"])
        partitions = state["partitions"]  # the sample order is defined by it: never changes mid-run
    elif cfg.train.init_from:  # warm start (e.g. from the champion); a checkpoint, when there is one, wins
        from pipeline.runs.load import load_initial_weights

        load_initial_weights(model, cfg.train.init_from, args.tracking_uri)
    elif cfg.model.code_init != "random":  # a fresh grid: every code starts in use (models/resnet.py)
        init_codes_from_data(model, manifest, args.dataset_url, cfg, reader)

    global_batch = cfg.train.batch_size
    steps = steps_per_epoch(manifest.splits["train"].samples, partitions, global_batch // partitions)
    ddp_model = ray.train.torch.prepare_model(model)  # moves to this rank's device, wraps in DDP
    device = ray.train.torch.get_device()
    precision = PrecisionStep(cfg.train.precision, device, grad_clip=cfg.train.grad_clip)
    ema = WeightEMA(model, cfg.train.ema) if cfg.train.ema else None  # validated and logged instead of model
    if checkpoint:
        precision.load_state_dict(state.get("grad_scaler", {}))
        if ema:
            restore_ema(ema, state)
    total_steps = steps * cfg.train.epochs  # the cosine learning-rate horizon
    node_ids = _node_ids(world_size)
    logger = None
    if is_master:
        # pending: what the checkpoint's rank 0 had not delivered yet, delivered first (runs/logger.py)
        logger = RunLogger(args.tracking_uri, args.run_id, resumed=bool(checkpoint) or args.resumed_run,
                           fallback_dir=args.fallback_dir, pending=load_pending(checkpoint))
        logger.set_tags({"schedule.lr_horizon_steps": total_steps,  # the cosine learning rate's, from this start
                         "cluster.nodes": len(set(node_ids)), "cluster.node_ids": ",".join(node_ids),
                         "cluster.resources_per_worker": json.dumps({"CPU": cfg.train.cpus_per_worker,
                                                                     "GPU": int(cfg.train.use_gpu)})})
        if checkpoint and not args.resumed_run:
            logger.count_restart(f"worker group restarted at step {position.step}")
        print(f"[rank 0] {world_size} workers x batch {global_batch // world_size} on {len(set(node_ids))} node(s), "
              f"{steps} steps/epoch, "
              f"from epoch {position.epoch + 1} step {position.step_in_epoch}")
    my_partitions = partitions_of_rank(partitions, world_size, rank)
    # Rank 0 shows the same validation images every epoch (reconstruction grids at their step).
    preview = _preview_images(manifest, args.dataset_url, reader) if is_master else None
    recorder = _SampleRecorder(args.sample_log, rank) if args.sample_log else None
    latent, skipped_nonfinite, setup_logged = cfg.model.latent, 0, False

    for epoch in range(position.epoch, cfg.train.epochs):
        ddp_model.train()
        window = _Window()
        batches = prefetch(train_batches(  # same batches, same order, prepared ahead in a background thread
            manifest, args.dataset_url, epoch=epoch, seed=cfg.train.seed, rank=rank, world_size=world_size,
            batch_per_rank=global_batch // world_size, shuffle_buffer=cfg.data.shuffle_buffer,
            start_step=position.step_in_epoch, reader=reader.with_options(verify=cfg.data.verify),
            partitions=partitions,
        ), cfg.data.prefetch_batches, pin_memory=device.type == "cuda")
        tic = time.perf_counter()
        for batch in batches:
            window.data_wait += time.perf_counter() - tic
            if not setup_logged:  # once per worker group: the first batch is at hand
                if logger:
                    logger.log_metrics({"perf/worker_setup_s": time.perf_counter() - entered}, position.step + 1)
                setup_logged = True
            x = batch.x.to(device, non_blocking=True)
            # Schedules: pure functions of the global step (train/schedules.py), so a resume continues them.
            tau, beta = temperature(position.step, latent), kl_weight(position.step, cfg.train)
            beta_y = kl_y_weight(position.step, cfg.train) if latent.kind == "mixture" else 1.0
            hard = straight_through(position.step, latent)  # relaxed, then one-hot from model.latent.hard_from_step
            if latent.kind == "categorical":
                model.latent.hard = hard
            lr = learning_rate(position.step, cfg.train, total_steps)  # the encoder's group: x encoder_lr_scale
            set_learning_rate(optimizer, lr)
            with precision.autocast():
                out = _forward_by_partition(ddp_model, x, my_partitions, tau, cfg.train.seed, position.step)
            if args.debug_nan_step == position.step:  # testing aid: a batch whose loss is NaN at a chosen step
                out = _StepOutput(out.loss * float("nan"), out.recon * float("nan"), out.kl, out.kl_per_variable,
                                  out.code_entropy)
            objective = model.objective(out, beta, beta_y)  # the weighted -ELBO (models/vae.py)
            result = precision.backward_and_step(objective, ddp_model, optimizer)
            grad_norm = result.grad_norm
            if result.nonfinite:  # the same verdict on every rank (see train/step.py)
                if cfg.train.on_nonfinite == "stop":
                    # All ranks end here together. Ending with a report instead of an exception:
                    # Ray would retry a raising worker group, and the same batch would fail the
                    # same way max_failures times.
                    error = NonFiniteLossError(position.step, out.loss.item(), grad_norm)
                    if logger:
                        logger.set_tags({"failure": str(error), "failure.step": position.step})
                        logger.close()
                    ray.train.report({"failure": str(error), "failure.step": position.step})
                    return
                skipped_nonfinite += 1
                if logger:
                    logger.log_metrics({"train/nonfinite_skipped": skipped_nonfinite}, position.step + 1)
                    logger.set_tags({"nonfinite.last_step": position.step})
            elif ema:
                ema.update(model)
            position.step += 1
            position.step_in_epoch += 1
            window.add(out, global_batch)
            if recorder:
                recorder.write(epoch, position.step, batch.keys)
            if position.step % cfg.train.log_every == 0 or position.step == 1:
                elapsed = time.perf_counter() - window.start
                metrics = window.means() | {  # means() is a collective: all ranks are here
                    "train/temperature": tau,
                    "train/straight_through": float(hard),
                    "train/kl_weight": beta,
                    "train/lr": lr,  # the schedule's rate (param group 0 may be the scaled encoder's)
                    "train/grad_norm": grad_norm,
                    "perf/samples_per_s": window.samples / max(elapsed, 1e-9),
                    "perf/data_wait_frac": window.data_wait / max(elapsed, 1e-9),
                }
                if logger:
                    logger.log_metrics(metrics, position.step)
                window = _Window()
            every = cfg.train.checkpoint_every_steps
            if every and position.step % every == 0 and position.step_in_epoch < steps:
                _report(logger, {"epoch": epoch, "step": position.step}, model, optimizer, position, partitions,
                        args.config, precision, ema)
            tic = time.perf_counter()

        position.epoch, position.step_in_epoch = epoch + 1, 0
        stats: dict[str, Any] = {}  # the all-reduced arrays behind the code-use plots
        val = evaluate_split(ema.module if ema else model, manifest, args.dataset_url, "val", rank=rank,
                             world_size=world_size, batch_size=global_batch // world_size, cfg=cfg, step=position.step,
                             options=reader, decoder=decoder, stats=stats)
        data_health = _data_health_across_ranks(world_size, reader.stats)  # a collective: every rank, same point
        if logger:
            log_data_health(logger, position.step, *data_health)
            logger.log_metrics(val, position.step)
            _log_epoch_images(logger, ema.module if ema else model, preview, stats, cfg.train.seed, position.step)
            print(f"[rank 0] epoch {epoch + 1}/{cfg.train.epochs} step {position.step}: val -ELBO "
                  f"{val['val/loss']:.3f} (recon {val['val/recon']:.3f}, kl {val['val/kl']:.3f})")
        report = {"epoch": epoch + 1, "step": position.step, **val}
        if epoch + 1 == cfg.train.epochs and logger:
            report |= {f"tracking/{k}": v for k, v in logger.close().items()}
        _report(logger, report, model, optimizer, position, partitions, args.config, precision, ema)


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


def _node_ids(world_size: int) -> list[str]:
    """The Ray node of every rank, in rank order (a collective: all ranks call it at start)."""
    return all_gather(ray.get_runtime_context().get_node_id(), world_size)


def _data_health_across_ranks(world_size: int, health: ReadStats) -> tuple[dict[str, float], set[str]]:
    """Skipped samples, read retries and cache use summed over ranks; the union of skipped shards."""
    keys = ["data/skipped_samples", "data/read_retries", "data/cache_hits", "data/cache_misses"]
    totals = all_reduce(torch.tensor([health.skipped_samples, health.read_retries, health.cache_hits,
                                      health.cache_misses], dtype=torch.float64), ray.train.torch.get_device())
    shards = all_gather(sorted(health.skipped_shards), world_size)
    return dict(zip(keys, totals.tolist())), set().union(*map(set, shards))


@dataclass
class _StepOutput:
    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_variable: torch.Tensor  # [num_kl_terms], batch means
    code_entropy: torch.Tensor | float = 0.0  # a grid's entropy term (VAE.objective)


def _forward_by_partition(model: torch.nn.Module, x: torch.Tensor, partitions: range, temperature: float,
                          seed: int, step: int) -> _StepOutput:
    """Forward each partition's chunk with sampling noise seeded by (seed, step, partition).

    The noise a sample gets then depends on where it sits in the global batch, not on which
    rank holds it: 1 and 2 workers compute the same global loss (up to reduction order),
    and a resumed run draws the noise the interrupted one would have. One chunk per rank
    (the default: partitions = workers) costs nothing extra.
    """
    outputs = []
    for partition, chunk in zip(partitions, x.chunk(len(partitions))):
        _seed_noise(hash((seed, step, partition)) & 0x7FFF_FFFF_FFFF_FFFF, x.device)
        outputs.append(model(chunk, temperature=temperature))
    if len(outputs) == 1:
        first = outputs[0]
        return _StepOutput(first.loss, first.recon, first.kl, first.kl_per_variable, first.code_entropy)
    mean = lambda name: torch.stack([torch.as_tensor(getattr(o, name)) for o in outputs]).mean(0)  # noqa: E731 - equal chunk sizes
    return _StepOutput(mean("loss"), mean("recon"), mean("kl"), mean("kl_per_variable"), mean("code_entropy"))


def _seed_noise(value: int, device: torch.device) -> None:
    """Seed the generator the sampling noise comes from on ``device``. `torch.manual_seed` seeds
    every backend's generators (~60 us per call here, a few % of a CPU step); this one only."""
    if device.type == "cuda":
        torch.cuda.manual_seed(value)
    else:
        torch.random.default_generator.manual_seed(value)


class _Window:
    """Running sums of the train metrics between two log steps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.count = 0
        self.sums = {"train/loss": 0.0, "train/recon": 0.0, "train/kl": 0.0}

    def add(self, out: Any, global_samples: int) -> None:
        self.count += 1
        self.samples += global_samples
        self.sums["train/loss"] += out.loss.item()
        self.sums["train/recon"] += out.recon.item()
        self.sums["train/kl"] += out.kl.item()

    def means(self) -> dict[str, float]:
        """Window means over the whole global batch: every rank calls this at the same step."""
        sums = torch.tensor(list(self.sums.values()), dtype=torch.float64)
        sums = all_reduce(sums, ray.train.torch.get_device()) / ray.train.get_context().get_world_size()
        return {k: float(v) / max(self.count, 1) for k, v in zip(self.sums, sums)}


class _SampleRecorder:
    """Testing aid: one JSON line per step with the keys this rank trained on (and its pid)."""

    def __init__(self, directory: str, rank: int) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(directory) / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115 - lives with the loop
        self.rank = rank
        self.node = ray.get_runtime_context().get_node_id()

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        self.file.write(json.dumps({"epoch": epoch, "step": step, "rank": self.rank, "pid": os.getpid(),
                                    "node": self.node, "keys": keys}) + "\n")


def _report(logger: RunLogger | None, metrics: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            position: Position, partitions: int, config: dict[str, Any], precision: PrecisionStep,
            ema: WeightEMA | None = None) -> None:
    # ray.train.report is a barrier: every rank calls it at the same steps; only rank 0 (the one
    # with a logger) uploads, with the metrics MLflow does not have yet: a checkpoint is never
    # ahead of the metrics it covers.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if logger is not None:
            logger.save_pending(tmp)
            save_checkpoint(Path(tmp), model=model, optimizer=optimizer, step=position.step, epoch=position.epoch,
                            step_in_epoch=position.step_in_epoch, partitions=partitions, config=config,
                            grad_scaler=precision.state_dict(), ema=ema)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
