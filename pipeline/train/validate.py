"""Evaluation of a model on a whole split inside the DDP worker group.

Each rank sums over its share of the split; a single all_reduce of the packed sums makes
every figure exact for the whole split, whatever the number of ranks: the -ELBO and its
terms, for categorical latents the one-hot -ELBO as well (``<split>/loss_onehot``: one un-relaxed
posterior sample and the analytic KL, the same figure whichever estimator trained the model), the
code use (on argmax codes: the share of codes used and their perplexity; the soft posterior's
perplexities as well), the sums behind Burda's active-units count, and for a
mixture latent the component x label counts behind the cluster accuracy.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.data import eval_batches
from pipeline.data.contract import SampleDecoder
from pipeline.data.reader import ReadOptions
from pipeline.models import CategoricalLatent, active_units, bits_per_dim, perplexity_from_usage
from pipeline.models.code_use import code_counts, code_perplexity, codes_used
from pipeline.train import schedules
from pipeline.train.collectives import all_reduce

# Labels 0..MAX_LABELS-1 enter the cluster-accuracy counts; others (e.g. -1 = unlabelled) do not.
MAX_LABELS = 256
_EVAL_NOISE = 3  # tags the validation noise stream apart from training's
RECONSTRUCT_CHUNK = 256  # images decoded per call of the likelihood's mean (see SplitScore.pending)


@contextlib.contextmanager
def _rng_seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's RNG seeded for one validation batch, the training stream restored afterwards (so
    validating does not change the noise training draws next)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _Sums:
    """Named float64 accumulators, packed into one flat tensor for the all_reduce."""

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        self.parts = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}

    def pack(self) -> torch.Tensor:
        return torch.cat([part.flatten() for part in self.parts.values()])

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, part in self.parts.items():
            out[name] = flat[start : start + part.numel()].view(part.shape)
            start += part.numel()
        return out


def cluster_accuracy(counts: np.ndarray) -> float:
    """Accuracy of the best one-to-one mapping of components to labels (Hungarian), from a
    [components, labels] count matrix. Components without a partner (K > labels) count as errors."""
    from scipy.optimize import linear_sum_assignment

    total = counts.sum()
    if total <= 0:
        return float("nan")
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / total)


class SplitScore:
    """One rank's sums over its share of a split (`add` per batch); `pack` flattens them for the
    all_reduce and `metrics` turns the reduced sums into the split's figures."""

    def __init__(self, model: torch.nn.Module, split: str, seed: int, rank: int, tau: float,
                 straight_through: bool = False) -> None:
        self.model, self.split, self.seed, self.rank, self.tau = model, split, seed, rank, tau
        self.straight_through = straight_through
        self.device = next(model.parameters()).device
        latent = self.latent = model.latent
        # The one-hot -ELBO (one un-relaxed posterior sample, analytic KL): what a straight-through pass
        # with the analytic KL already computes; a relaxed pass needs one more decoding of a one-hot sample.
        self.categorical = isinstance(latent, CategoricalLatent)
        self.onehot_is_loss = self.categorical and straight_through and latent.kl_mode == "analytic"
        probe = torch.zeros(1, latent.param_size, device=self.device)
        usage = latent.usage(probe)
        self.usage_shape = None if usage is None else tuple(usage.shape)
        self.has_clusters = latent.cluster(probe) is not None
        self.grid = getattr(getattr(model, "encoder", None), "grid", None)  # (h, w) for a grid (resnet or patch)
        mean_width = latent.posterior_mean(probe).shape[-1]
        shapes: dict[str, tuple[int, ...]] = {
            "totals": (3,),  # recon sum, kl sum, sample count
            "kl_terms": (latent.num_kl_terms,),
            "mean_sum": (mean_width,),
            "square_sum": (mean_width,),
        }
        if self.usage_shape is not None:
            shapes["usage"] = self.usage_shape
        if self.has_clusters:
            shapes["clusters"] = (getattr(latent, "components", 1), MAX_LABELS)
        # Code use: argmax uses per class pooled over positions, exact after the all_reduce;
        # reconstruction error (sum of per-image MSE and PSNR) of the posterior mode's decoding.
        if self.categorical:
            shapes["code_counts"] = (latent.categories,)
            shapes["onehot"] = (1,)  # sum of the one-hot -ELBO
        shapes["pixel_error"] = (2,)
        self.sums = _Sums(**shapes)
        # Reconstructions are decoded in chunks of RECONSTRUCT_CHUNK images, not per batch: a likelihood
        # that decodes pixel by pixel (causal-logistic) pays per call, not per image.
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, index: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Batch ``index`` of this rank's share: its noise is seeded by (seed, rank, index)."""
        model, latent, parts, device = self.model, self.latent, self.sums.parts, self.device
        seed = int(np.random.SeedSequence([self.seed % 2**64, self.rank, index, _EVAL_NOISE]).generate_state(1)[0])
        with _rng_seeded(seed, device):
            out = model(x.to(device), temperature=self.tau, straight_through=self.straight_through)
        n = x.shape[0]
        parts["totals"] += torch.tensor([out.recon_per_sample.sum().item(), out.kl_per_sample.sum().item(), n],
                                        dtype=torch.float64)
        parts["kl_terms"] += out.kl_per_variable.double().cpu() * n
        means = latent.posterior_mean(out.params).double().cpu()
        parts["mean_sum"] += means.sum(0)
        parts["square_sum"] += means.pow(2).sum(0)
        if self.usage_shape is not None:
            parts["usage"] += latent.usage(out.params).double().cpu()
        if self.categorical:
            codes = out.params.reshape(n, latent.variables, latent.categories).argmax(dim=-1)
            parts["code_counts"] += code_counts(codes, latent.categories)
        if self.categorical and not self.onehot_is_loss:
            # the forward pass's images (same seed: the same binarization), a one-hot code, the analytic KL
            with _rng_seeded(seed, device):
                _, target = model.prepare(x.to(device))
                z = latent.sample_posterior(out.params, 1)[0]
            recon_onehot = -model.likelihood.log_prob(model.decode(z), target).double().sum()
            parts["onehot"] += (recon_onehot + latent.kl(out.params).double().sum()).item()
        pixels = x.to(device).float().div(255.0) if x.dtype == torch.uint8 else x.to(device).float()
        self.pending.append((pixels, model.decode(latent.mode(out.params))))
        if sum(len(p) for p, _ in self.pending) >= RECONSTRUCT_CHUNK:
            self._add_pixel_error()
        if self.has_clusters:
            self._add_clusters(out.params, labels)

    def _add_pixel_error(self) -> None:
        """The pending batches' reconstructions (the posterior mode decoded): per-image MSE and PSNR summed."""
        if not self.pending:
            return
        pixels, decoded = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending = []
        recon = self.model.likelihood.mean(decoded)
        mse = (recon - pixels.reshape(recon.shape)).pow(2).flatten(1).mean(dim=1).double()
        psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))  # a perfect image counts as 100 dB, not inf
        self.sums.parts["pixel_error"] += torch.stack([mse.sum(), psnr.sum()]).cpu()

    def _add_clusters(self, params: torch.Tensor, labels: torch.Tensor) -> None:
        components = self.latent.cluster(params).cpu()
        labels = labels.long().cpu()
        known = (labels >= 0) & (labels < MAX_LABELS)
        flat_index = components[known] * MAX_LABELS + labels[known]
        self.sums.parts["clusters"].view(-1).index_add_(0, flat_index,
                                                        torch.ones(len(flat_index), dtype=torch.float64))

    def pack(self) -> torch.Tensor:
        """This rank's sums, flat (the last reconstructions decoded first): every rank all-reduces them
        exactly once, even with no samples."""
        with torch.no_grad():
            self._add_pixel_error()
        return self.sums.pack()

    def metrics(self, reduced: torch.Tensor, stats: dict[str, Any] | None = None) -> dict[str, float]:
        """The split's figures from the all-reduced ``pack()``; ``stats`` (see `evaluate_split`)."""
        total, split = self.sums.unpack(reduced), self.split
        recon_sum, kl_sum, count = total["totals"].tolist()
        if count == 0:
            raise RuntimeError(f"split {split!r} has no samples to evaluate")
        metrics = {f"{split}/loss": (recon_sum + kl_sum) / count, f"{split}/recon": recon_sum / count,
                   f"{split}/kl": kl_sum / count}
        if self.grid is None:  # a grid's per-position KL goes to the heat map (code_plots), not to h*w metrics
            metrics |= {f"{split}/kl_latent_{i}": float(v) for i, v in enumerate(total["kl_terms"] / count)}
        metrics[f"{split}/mse"], metrics[f"{split}/psnr"] = (total["pixel_error"] / count).tolist()
        if self.categorical:
            metrics |= self._code_metrics(total, metrics[f"{split}/loss"], count)
        if self.grid is not None and self.usage_shape is not None:  # the soft posterior's pooled use, named so
            metrics["latent/codebook_perplexity_soft"] = perplexity_from_usage(total["usage"].sum(0, keepdim=True))
        if stats is not None:
            stats.update(grid=self.grid, kl_per_variable=(total["kl_terms"] / count).numpy(),
                         code_counts=total["code_counts"].numpy() if self.categorical else None)
        metrics["latent/active_units"] = float(active_units(total["mean_sum"], total["square_sum"], count,
                                                            self.latent.unit_size))
        if getattr(self.model, "likelihood", None) is not None and self.model.likelihood.eight_bit:
            metrics[f"{split}/bits_per_dim"] = bits_per_dim(metrics[f"{split}/loss"], self.model.dims)
        if self.usage_shape is not None:
            metrics["latent/perplexity"] = perplexity_from_usage(total["usage"].float())
        if self.has_clusters and total["clusters"].sum() > 0:  # only when the split has labels
            metrics[f"{split}/cluster_acc"] = cluster_accuracy(total["clusters"].numpy())
        return metrics

    def _code_metrics(self, total: dict[str, torch.Tensor], loss: float, count: float) -> dict[str, float]:
        """The figure the model registry compares across estimators (the one-hot -ELBO), and code use on
        one basis, the argmax tokens: the used share, its complement and their perplexity."""
        used = codes_used(total["code_counts"])
        return {f"{self.split}/loss_onehot": loss if self.onehot_is_loss else float(total["onehot"][0]) / count,
                "latent/codes_used": used, "latent/dead_codes": 1.0 - used,
                "latent/code_perplexity": code_perplexity(total["code_counts"])}


@torch.no_grad()
def score_split(model: torch.nn.Module, manifest: Any, dataset_url: str, split: str, *, rank: int, world_size: int,
                batch_size: int, cfg: RunConfig, step: int, options: ReadOptions = ReadOptions(),
                decoder: SampleDecoder | None = None) -> SplitScore:
    """This rank's sums over its share of ``split`` (no collective: the caller all-reduces ``pack()``).

    Dynamic binarization (Bernoulli) is drawn from torch's RNG seeded by (seed, rank, batch index),
    so with a fixed world size every epoch is scored on the same binary images. The temperature and
    the estimator are the schedules' at ``step``, as training used them."""
    model.eval()
    latent = cfg.model.latent  # one-hot passes once straight-through
    score = SplitScore(model, split, cfg.train.seed, rank, schedules.temperature(step, latent),
                       schedules.straight_through(step, latent))
    for index, (x, labels) in enumerate(eval_batches(manifest, dataset_url, split=split, rank=rank,
                                                     world_size=world_size, batch_size=batch_size, options=options,
                                                     decoder=decoder)):
        score.add(index, x, labels)
    model.train()
    return score


def evaluate_split(model: torch.nn.Module, manifest: Any, dataset_url: str, split: str, *, rank: int,
                   world_size: int, batch_size: int, cfg: RunConfig, step: int, options: ReadOptions = ReadOptions(),
                   decoder: SampleDecoder | None = None, stats: dict[str, Any] | None = None) -> dict[str, float]:
    """-ELBO and latent statistics on a whole split: `score_split`, one all_reduce (a collective: every
    rank calls this at the same point), the figures.

    ``stats``, when given, receives the all-reduced arrays behind the code-use plots
    (train/code_plots.py): ``kl_per_variable`` [N] (mean KL per variable), ``code_counts`` [K]
    (argmax uses per class over all positions, categorical latents) and ``grid`` ((h, w) or None)."""
    score = score_split(model, manifest, dataset_url, split, rank=rank, world_size=world_size, batch_size=batch_size,
                        cfg=cfg, step=step, options=options, decoder=decoder)
    return score.metrics(all_reduce(score.pack(), score.device), stats)
