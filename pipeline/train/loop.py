"""The per-worker training loop: DDP minibatch SGD on the -ELBO, run by every Ray Train rank.

Read top to bottom: setup, resume, then per epoch a fixed number of steps (the same on
every rank, from the manifest), validation from all-reduced sums, a checkpoint report.
Only rank 0 (`is_master`) talks to MLflow and writes checkpoints.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ray.train
import ray.train.torch

from pipeline.config import RunConfig
from pipeline.data import read_manifest, steps_per_epoch, train_batches
from pipeline.models import build_vae, temperature_at
from pipeline.train.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from pipeline.train.tracking import RunLogger
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


def _quiet_ray_reports() -> None:
    # Ray Train logs every report (all metrics) at INFO on a logger named by its file path,
    # which LoggingConfig does not reach; rank 0's own epoch line says what matters.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    _quiet_ray_reports()
    args = WorkerArgs(**loop_config)
    cfg = RunConfig.model_validate(args.config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_master = rank == 0
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    manifest = read_manifest(args.dataset_url)
    input_dim = int(np.prod(manifest.image_shape))
    model = build_vae(cfg.model, input_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    latent = cfg.model.latent
    batch = cfg.train.batch_per_worker
    steps = steps_per_epoch(manifest.splits["train"].samples, world_size, batch)

    step, start_epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group continues from the last reported checkpoint
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state)
        step, start_epoch = state["step"], state["epoch"]

    ddp_model = ray.train.torch.prepare_model(model)  # moves to this rank's device, wraps in DDP
    device = ray.train.torch.get_device()
    logger = RunLogger(args.tracking_uri, args.run_id) if is_master else None
    if is_master:
        print(f"[rank 0] {world_size} workers x batch {batch}, {steps} steps/epoch, epochs {start_epoch + 1}..{cfg.train.epochs}")

    for epoch in range(start_epoch, cfg.train.epochs):
        ddp_model.train()
        window = _Window()
        batches = train_batches(
            manifest, args.dataset_url, epoch=epoch, seed=cfg.train.seed, rank=rank, world_size=world_size,
            batch_per_rank=batch, shuffle_buffer=cfg.data.shuffle_buffer, binarize=cfg.data.binarize,
            verify=cfg.data.verify,
        )
        tic = time.perf_counter()
        for x, _labels in batches:
            window.data_wait += time.perf_counter() - tic
            x = x.to(device, non_blocking=True)
            tau = temperature_at(step, latent.tau0, latent.tau_min, latent.anneal_rate, latent.anneal_every)
            out = ddp_model(x, temperature=tau)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            # DDP has averaged the gradients, so grad_norm is identical on every rank: all
            # ranks stop at the same step on NaN/inf without an extra collective.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), float("inf")))
            if not np.isfinite(grad_norm) or not np.isfinite(out.loss.item()):
                if logger:
                    logger.set_tags({"failure": "non-finite loss", "failure.step": step})
                raise NonFiniteLossError(step, out.loss.item(), grad_norm)
            optimizer.step()
            step += 1
            window.add(out, batch * world_size)
            if step % cfg.train.log_every == 0 or step == 1:
                elapsed = time.perf_counter() - window.start
                metrics = window.means() | {
                    "train/temperature": tau,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/grad_norm": grad_norm,
                    "perf/samples_per_s": window.samples / max(elapsed, 1e-9),
                    "perf/data_wait_frac": window.data_wait / max(elapsed, 1e-9),
                }
                if logger:
                    logger.log_metrics(metrics, step)
                window = _Window()
            tic = time.perf_counter()

        val = evaluate_split(ddp_model.module if hasattr(ddp_model, "module") else model, manifest, args.dataset_url,
                             "val", rank=rank, world_size=world_size, batch_size=batch, cfg=cfg, step=step)
        report = {"epoch": epoch + 1, "step": step, **val}
        if logger:
            logger.log_metrics(val, step)
            print(f"[rank 0] epoch {epoch + 1}/{cfg.train.epochs} step {step}: val -ELBO {val['val/loss']:.3f} "
                  f"(recon {val['val/recon']:.3f}, kl {val['val/kl']:.3f})")
        _report_with_checkpoint(report, is_master, model, optimizer, step, epoch + 1, args.config)


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
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _report_with_checkpoint(metrics: dict[str, Any], is_master: bool, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, step: int, epoch: int, config: dict[str, Any]) -> None:
    # ray.train.report is a barrier: every rank calls it once per epoch; only rank 0 uploads.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if is_master:
            save_checkpoint(Path(tmp), model=model, optimizer=optimizer, step=step, epoch=epoch, config=config)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
