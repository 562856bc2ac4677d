"""Evaluation of a model on a whole split inside the DDP worker group.

Each rank sums over its share of the split; a single all_reduce of the packed sums makes
every figure exact for the whole split, whatever the number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.data import eval_batches
from pipeline.models import perplexity_from_usage, temperature_at


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, manifest: Any, dataset_url: str, split: str, *, rank: int,
                   world_size: int, batch_size: int, cfg: RunConfig, step: int) -> dict[str, float]:
    """-ELBO on a whole split: each rank sums over its share, one all_reduce combines them."""
    model.eval()
    device = next(model.parameters()).device
    latent = model.latent
    tau = temperature_at(step, cfg.model.latent.tau0, cfg.model.latent.tau_min,
                         cfg.model.latent.anneal_rate, cfg.model.latent.anneal_every)
    # [recon sum, kl sum, sample count] + per-variable KL sums (+ code usage for categorical)
    totals = torch.zeros(3, dtype=torch.float64)
    kl_terms = torch.zeros(latent.num_kl_terms, dtype=torch.float64)
    usage = latent.usage(torch.zeros(1, latent.param_size, device=device))
    usage = None if usage is None else torch.zeros(usage.shape, dtype=torch.float64)
    for x, _ in eval_batches(manifest, dataset_url, split=split, rank=rank, world_size=world_size,
                             batch_size=batch_size, binarize=cfg.data.binarize, seed=cfg.train.seed):
        out = model(x.to(device), temperature=tau)
        n = x.shape[0]
        totals += torch.tensor([out.recon_per_sample.sum().item(), out.kl_per_sample.sum().item(), n],
                               dtype=torch.float64)
        kl_terms += out.kl_per_variable.double().cpu() * n
        if usage is not None:
            usage += latent.usage(out.params).double().cpu()
    flat = torch.cat([totals, kl_terms] + ([usage.flatten()] if usage is not None else []))
    if dist.is_available() and dist.is_initialized():
        flat = flat.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(flat)  # every rank calls this exactly once, even with no samples
        flat = flat.cpu()
    recon_sum, kl_sum, count = flat[:3].tolist()
    if count == 0:
        raise RuntimeError(f"split {split!r} has no samples to evaluate")
    metrics = {f"{split}/loss": (recon_sum + kl_sum) / count, f"{split}/recon": recon_sum / count,
               f"{split}/kl": kl_sum / count}
    per_variable = flat[3 : 3 + kl_terms.numel()] / count
    metrics |= {f"{split}/kl_latent_{i}": float(v) for i, v in enumerate(per_variable)}
    if usage is not None:
        metrics["latent/perplexity"] = perplexity_from_usage(flat[3 + kl_terms.numel():].view_as(usage).float())
    model.train()
    return metrics
