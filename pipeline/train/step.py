"""One training step (`train_step`: schedules, forward per data partition, the model's objective,
the update under the configured precision, the EMA), and its parts.

`PrecisionStep`: autocast, backward, grad norm, update.

fp32 and bf16 need no loss scaling; fp16 uses a gradient scaler, which itself skips the
updates whose scaled gradients overflow (normal while it finds its scale). So "non-finite"
means: the averaged gradient (fp32/bf16: identical on every rank after DDP's all-reduce),
or for fp16 the loss averaged over ranks — the same verdict on every rank either way.

Also here: the optimizer a config names (`build_optimizer`), gradient clipping to a global
norm (`train.grad_clip`, applied after the non-finite check; `train/grad_norm` is the norm
before clipping) and the exponential moving average of the weights (`WeightEMA`, `train.ema`).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.train.collectives import all_reduce
from pipeline.train.hardware import precision_for
from pipeline.train.schedules import schedules_at, set_learning_rate

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    grad_norm: float
    nonfinite: bool  # the update was not applied: the loss/gradient was NaN or inf


class PrecisionStep:
    def __init__(self, precision: str, device: torch.device, grad_clip: float | None = None) -> None:
        precision = precision_for(precision, device)  # "auto" (a config the driver did not resolve, e.g. a bench)
        self.device = device
        self.dtype = _DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.grad_clip = grad_clip

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> StepResult:
        """Backward, then the update unless the step is non-finite (never applied)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            grad_norm = _total_norm(model)
            if not np.isfinite(grad_norm):
                return StepResult(grad_norm, nonfinite=True)
            self._clip(model, grad_norm)
            optimizer.step()
            return StepResult(grad_norm, nonfinite=False)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        grad_norm = _total_norm(model)
        if not _finite_everywhere(loss.detach()):
            self.scaler.update()
            return StepResult(grad_norm, nonfinite=True)
        if np.isfinite(grad_norm):  # an overflowed fp16 step is skipped by the scaler anyway
            self._clip(model, grad_norm)
        self.scaler.step(optimizer)  # skips by itself when the scaled gradients overflowed
        self.scaler.update()
        return StepResult(grad_norm, nonfinite=False)

    def _clip(self, model: torch.nn.Module, grad_norm: float) -> None:
        """Scale every gradient by min(1, grad_clip / norm): the norm is already known, so no second pass."""
        if self.grad_clip is not None and grad_norm > self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None],
                                                 self.grad_clip, torch.tensor(grad_norm))

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def _finite_everywhere(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss).all())])
    return bool(all_reduce(flag, loss.device, op=dist.ReduceOp.MIN).item())


def _total_norm(model: torch.nn.Module) -> float:
    """The global gradient norm (for non-finite detection and train/grad_norm). Not
    clip_grad_norm_(inf): that also rescales every gradient by 1.0."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """`train.optimizer` over `params` (a model, or an iterable of parameters) at `train.lr` (the loop
    sets the scheduled rate every step). Adam's weight_decay is an L2 term in the gradient; AdamW's is
    decoupled (Loshchilov & Hutter).

    For a model with `train.encoder_lr_scale` != 1 the encoder's parameters form their own group whose
    rate is the schedule's times that scale (`lr_scale` in each group, applied by
    `schedules.set_learning_rate`)."""
    if isinstance(params, torch.nn.Module):
        module, scale = params, getattr(cfg, "encoder_lr_scale", 1.0)
        encoder = getattr(module, "encoder", None)
        if scale != 1.0 and encoder is not None:
            mine = {id(p) for p in encoder.parameters()}
            params = [{"params": list(encoder.parameters()), "lr_scale": scale},
                      {"params": [p for p in module.parameters() if id(p) not in mine], "lr_scale": 1.0}]
        else:
            params = module.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown train.optimizer {cfg.optimizer!r}")


class WeightEMA:
    """Exponential moving average of a model's weights: ema <- d * ema + (1 - d) * weights after
    every applied update. `module` is a full copy of the model (same class, no gradients) holding
    the averaged parameters and a copy of the buffers; validation and the logged model use it.
    Its state is `module.state_dict()` plus the update count, saved in the checkpoint.

    The decay warms up: d = min(decay, (1 + u) / (10 + u)) at update u (TensorFlow's
    ExponentialMovingAverage with num_updates). Without it a decay of 0.999 averages over ~1,000
    updates from the random initialisation, so the model of a run a few hundred steps long (a few
    epochs of a few thousand images) would be mostly its initialisation: 0.999^300 = 74%.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()

    @staticmethod
    def decay_at(updates: int, decay: float) -> float:
        """The decay applied at update number ``updates`` (0 for the first)."""
        return min(decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        averaged = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(self.updates, self.decay))
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, weights: dict, state: dict) -> None:
        self.module.load_state_dict(weights)
        self.updates = int(state.get("updates", 0))


# ---------------------------------------------------------------- the step


_TRAIN_NOISE = 1  # tags the training noise stream apart from validation's (train/validate.py)


def noise_seed(seed: int, step: int, partition: int) -> int:
    """The seed of the sampling noise of data partition ``partition`` at global step ``step``."""
    state = np.random.SeedSequence([seed % 2**64, step, partition, _TRAIN_NOISE]).generate_state(1, np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


def seed_noise(value: int, device: torch.device) -> None:
    """Seed the generator the sampling noise comes from on ``device``. `torch.manual_seed` seeds
    every backend's generators (~60 us per call here, a few % of a CPU step); this one only."""
    if device.type == "cuda":
        torch.cuda.manual_seed(value)
    else:
        torch.random.default_generator.manual_seed(value)


@dataclass
class StepOutput:
    """A forward pass's figures, averaged over the data partitions: what `VAE.objective` weighs."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_variable: torch.Tensor  # [num_kl_terms], batch means
    code_entropy: torch.Tensor | float = 0.0  # a grid's entropy term (VAE.objective)


def forward_by_partition(model: torch.nn.Module, x: torch.Tensor, partitions: range, temperature: float,
                         seed: int, step: int, straight_through: bool = False) -> StepOutput:
    """Forward each partition's chunk with sampling noise seeded by `noise_seed(seed, step, partition)`,
    at ``temperature`` with the estimator ``straight_through`` (the schedules' values at the step).

    The noise a sample gets then depends on where it sits in the global batch, not on which
    rank holds it: 1 and 2 workers compute the same global loss (up to reduction order),
    and a resumed run draws the noise the interrupted one would have. One chunk per rank
    (the default: partitions = workers) costs nothing extra.
    """
    outputs = []
    for partition, chunk in zip(partitions, x.chunk(len(partitions))):
        seed_noise(noise_seed(seed, step, partition), x.device)
        outputs.append(model(chunk, temperature=temperature, straight_through=straight_through))
    if len(outputs) == 1:
        first = outputs[0]
        return StepOutput(first.loss, first.recon, first.kl, first.kl_per_variable, first.code_entropy)
    mean = lambda name: torch.stack([torch.as_tensor(getattr(o, name)) for o in outputs]).mean(0)  # noqa: E731 - equal chunk sizes
    return StepOutput(mean("loss"), mean("recon"), mean("kl"), mean("kl_per_variable"), mean("code_entropy"))


@dataclass
class StepStats:
    """What one step did: its global step, figures, schedule values, and whether it was applied."""

    step: int
    loss: float
    recon: float
    kl: float
    objective: float
    temperature: float
    kl_weight: float
    straight_through: bool
    lr: float
    grad_norm: float
    nonfinite: bool  # not applied: the loss or the averaged gradient was NaN/inf (the same on every rank)


def train_step(state: Any, x: torch.Tensor, cfg: Any, partitions: range, total_steps: int,
               hooks: Any = None) -> StepStats:
    """One step of ``state`` (a `TrainState`) on this rank's batch ``x`` (on its device), whose data
    partitions are ``partitions``: the schedules of the global step, one forward per partition, the
    model's objective, backward (DDP all-reduces the gradients: every rank runs this at every step)
    and the update unless non-finite, the EMA; then the position advances."""
    step = state.position.step
    values = schedules_at(step, cfg, total_steps)  # pure functions of the global step (train/schedules.py)
    set_learning_rate(state.optimizer, values.lr)  # the encoder's group: x encoder_lr_scale
    with state.precision.autocast():
        out = forward_by_partition(state.ddp, x, partitions, values.temperature, cfg.train.seed, step,
                                   values.straight_through)
    if hooks is not None:
        out = hooks.on_output(step, out)
    objective = state.model.objective(out, values.kl_weight, values.kl_y_weight)  # the weighted -ELBO (models/vae.py)
    result = state.precision.backward_and_step(objective, state.ddp, state.optimizer)
    if state.ema is not None and not result.nonfinite:
        state.ema.update(state.model)
    state.position.advance()
    return StepStats(step, out.loss.item(), out.recon.item(), out.kl.item(), objective.item(), values.temperature,
                     values.kl_weight, values.straight_through, values.lr, result.grad_norm, result.nonfinite)
