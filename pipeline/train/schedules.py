"""Learning-rate, KL-weight and temperature schedules: pure functions of the global step.

Nothing here keeps state: the value at step t depends only on t and the config, so every
rank agrees, and a resumed (or elastically resized) run continues exactly where the
interrupted one was. The loop sets them at the start of each step, before the forward pass.

- learning rate (`train.lr_schedule`): `constant`; `exponential` = step decay
  lr * rate^(t // every) (Jang et al.'s notebook: 0.9 every 1000 steps); `cosine` from lr down to
  `lr_min` over the run's total steps (Loshchilov & Hutter; DALL-E's dVAE). Each after an optional
  linear warm-up over `lr_warmup_steps`.
- KL weight beta (`train.kl_weight`): warmed up from 0 over `kl_warmup_steps`, linearly or along a
  half cosine (DALL-E: 0 -> 6.6 over 5k updates).
- a mixture's KL of y (`train.kl_y_anneal_from`, `kl_y_anneal_steps`): deterministic annealing,
  a weight above 1 falling to 1.
- Gumbel-Softmax temperature (`model.latent.tau_schedule`): `exponential` = Jang's staircase
  (`pipeline.models.latents.temperature_at`, its settings under `model.latent.tau_exponential`),
  `cosine` = DALL-E's anneal tau0 -> tau_min over `model.latent.tau_cosine.steps`.
- the categorical gradient estimator (`model.latent.estimator`, `straight_through_from_step`):
  Gumbel-Softmax samples, then straight-through from a step on, so the decoder's last phase trains on
  one-hot codes — the codes the strict one-sample -ELBO of `pipeline evaluate` decodes. The step passes
  it to the model's forward pass, as it does the temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import LatentConfig, RunConfig, TrainConfig
from pipeline.models.latents import temperature_at


def _cosine(progress: float) -> float:
    """1 -> 0 along a half cosine as progress goes 0 -> 1 (clamped)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of global step `step` (0-based); `total_steps` is the cosine horizon."""
    step = max(step, 0)
    warmup = cfg.lr_warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = step - warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "exponential":
        return max(cfg.lr_min, cfg.lr * cfg.lr_decay_rate ** (t // cfg.lr_decay_every))
    if cfg.lr_schedule == "cosine":
        horizon = max(total_steps - warmup, 1)
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * _cosine(t / horizon)
    raise ValueError(f"unknown train.lr_schedule {cfg.lr_schedule!r}")


def kl_weight(step: int, cfg: TrainConfig) -> float:
    """beta at global step `step`: `kl_weight` after the warm-up, rising from 0 during it."""
    if cfg.kl_warmup_steps <= 0:
        return cfg.kl_weight
    progress = min(max(step, 0) / cfg.kl_warmup_steps, 1.0)
    if cfg.kl_warmup == "linear":
        return cfg.kl_weight * progress
    if cfg.kl_warmup == "cosine":
        return cfg.kl_weight * (1.0 - _cosine(progress))
    raise ValueError(f"unknown train.kl_warmup {cfg.kl_warmup!r}")


def kl_y_weight(step: int, cfg: TrainConfig) -> float:
    """Weight of a mixture's KL(q(y|x) || p(y)) relative to its other KL term, at global step `step`.

    Deterministic annealing (Ueda & Nakano 1998, the classic cure for mixtures' bad local optima):
    from `kl_y_anneal_from` down to 1 (the ELBO) over `kl_y_anneal_steps`. A heavy weight holds
    q(y|x) near p(y) while every component is trained on every input; without it, the component
    that is cheapest for all inputs in the first ~100 steps takes all of them (perplexity 1).
    """
    if cfg.kl_y_anneal_steps <= 0:
        return 1.0
    progress = min(max(step, 0) / cfg.kl_y_anneal_steps, 1.0)
    return cfg.kl_y_anneal_from + (1.0 - cfg.kl_y_anneal_from) * progress


def temperature(step: int, cfg: LatentConfig) -> float:
    """The Gumbel-Softmax temperature at global step `step` (validation uses the same value)."""
    if cfg.tau_schedule == "exponential":
        return temperature_at(step, cfg.tau0, cfg.tau_min, cfg.tau_exponential.rate, cfg.tau_exponential.every)
    if cfg.tau_schedule == "cosine":
        return cfg.tau_min + (cfg.tau0 - cfg.tau_min) * _cosine(max(step, 0) / cfg.tau_cosine.steps)
    raise ValueError(f"unknown model.latent.tau_schedule {cfg.tau_schedule!r}")


def straight_through(step: int, cfg: LatentConfig) -> bool:
    """Whether global step `step` uses one-hot forward passes (straight-through Gumbel-Softmax)."""
    switch = cfg.straight_through_from_step
    return cfg.estimator == "straight-through" or (switch is not None and step >= switch)


@dataclass(frozen=True)
class ScheduleValues:
    """Every schedule's value at one global step: what the step trains with."""

    temperature: float
    kl_weight: float
    kl_y_weight: float  # 1 (the ELBO) unless a mixture anneals its KL of y
    straight_through: bool
    lr: float


def schedules_at(step: int, cfg: RunConfig, total_steps: int) -> ScheduleValues:
    """The schedules of global step ``step``; ``total_steps`` is the cosine learning rate's horizon."""
    latent = cfg.model.latent
    return ScheduleValues(
        temperature=temperature(step, latent),
        kl_weight=kl_weight(step, cfg.train),
        kl_y_weight=kl_y_weight(step, cfg.train) if latent.kind == "mixture" else 1.0,
        straight_through=straight_through(step, latent),
        lr=learning_rate(step, cfg.train, total_steps),
    )


def set_learning_rate(optimizer, lr: float) -> None:
    """Every parameter group gets the scheduled rate, times its `lr_scale` when it has one (the
    encoder's group under `train.encoder_lr_scale`); called at the start of each step."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# What shapes a schedule along the global step. A resumed run continues each schedule from its
# step, so a change of one of these bends the part already trained (a longer cosine horizon raises
# the learning rate of steps that already ran at a lower one).
SCHEDULE_KEYS = (
    "train.lr", "train.lr_min", "train.lr_schedule", "train.lr_warmup_steps", "train.lr_decay_rate",
    "train.lr_decay_every", "train.kl_weight", "train.kl_warmup_steps", "train.kl_warmup", "train.kl_y_anneal_from",
    "train.kl_y_anneal_steps", "model.latent.tau0", "model.latent.tau_min", "model.latent.tau_schedule",
    "model.latent.tau_exponential.rate", "model.latent.tau_exponential.every", "model.latent.tau_cosine.steps",
    "model.latent.estimator", "model.latent.straight_through_from_step",
)
# The cosine learning rate's horizon is steps per epoch x train.epochs (steps per epoch follow from the
# global batch): under that schedule these shape it too.
COSINE_HORIZON_KEYS = ("train.epochs", "train.batch_size")


def schedule_changes(before, after) -> dict[str, tuple]:
    """The schedule-shaping settings that differ between a run's config ``before`` and the config it
    is resumed with ``after`` (both `RunConfig`), as {key: (before, after)}."""
    old, new = before.flat(), after.flat()
    cosine = "cosine" in (old.get("train.lr_schedule"), new.get("train.lr_schedule"))
    keys = SCHEDULE_KEYS + (COSINE_HORIZON_KEYS if cosine else ())
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}
