"""Likelihood evaluation of a trained VAE on a batch: discrete ELBO, importance-weighted
log p(x), and exact log p(x) / ELBO by enumerating a small discrete code space.

All functions take x [B, D] in {0, 1} and return per-sample values [B] in nats, so callers
sum them over a split exactly. Proposals are the *un-relaxed* posteriors (one-hot for
categorical latents): the estimates are of the discrete model, whatever relaxation trained it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.vae import VAE

# Rows (samples x inputs) decoded at once: bounds memory to ~rows * D floats (50k x 784 = 157 MB).
DECODE_ROWS = 50_000
ENUMERATION_LIMIT = 100_000


def bernoulli_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x | z) summed over pixels, broadcasting logits [..., D] against x [..., D]."""
    logits, x = torch.broadcast_tensors(logits, x)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)


@torch.no_grad()
def discrete_elbo(model: VAE, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log p(x|z), analytic KL) per sample with one un-relaxed posterior sample z; ELBO = sum."""
    params = model.encode(x)
    z = model.latent.sample_posterior(params, 1)[0]
    return bernoulli_log_likelihood(model.decode(z), x), model.latent.kl(params).sum(dim=-1)


@torch.no_grad()
def log_importance_weights(model: VAE, x: Tensor, k: int, params: Tensor | None = None) -> Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x) for k proposal samples z ~ q(z|x), [k, B]."""
    params = model.encode(x) if params is None else params
    latent = model.latent
    z = latent.sample_posterior(params, k)  # [k, B, code]
    logits = model.decode(z.reshape(k * x.shape[0], -1)).reshape(k, x.shape[0], -1)
    return bernoulli_log_likelihood(logits, x) + latent.prior_log_prob(z) - latent.log_prob(params, z)


@torch.no_grad()
def importance_log_px(model: VAE, x: Tensor, k: int) -> Tensor:
    """The importance-weighted bound L_k = log (1/k) sum_i w_i, [B]; -> log p(x) as k grows.

    Samples are drawn in chunks (at most DECODE_ROWS decoded rows at a time) and combined
    with a running logsumexp, so k = 5000 needs no more memory than one chunk.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    params = model.encode(x)
    chunk = max(1, DECODE_ROWS // x.shape[0])
    total = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        log_w = log_importance_weights(model, x, n, params=params)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += n
    return total - math.log(k)


def _code_scores(model: VAE, x: Tensor, params: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """For codes [M, code]: log p(x, z) and log q(z|x), each [B, M], decoding M codes once."""
    latent = model.latent
    logits = model.decode(codes)  # [M, D]
    # sum_d x log s(l) + (1 - x) log s(-l), for every (input, code) pair as two matmuls.
    log_px_z = x @ F.logsigmoid(logits).T + (1 - x) @ F.logsigmoid(-logits).T
    log_joint = log_px_z + latent.prior_log_prob(codes)[None, :]
    log_q = latent.log_prob(params, codes[:, None, :].expand(len(codes), x.shape[0], codes.shape[1])).T
    return log_joint, log_q


@torch.no_grad()
def exact_log_px_and_elbo(model: VAE, x: Tensor, limit: int = ENUMERATION_LIMIT,
                          codes: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """Exact log p(x) = logsumexp_z log p(x, z) and exact ELBO = sum_z q(z|x) (log p(x, z) - log q(z|x)),
    [B] each, by enumerating every code; None when the latent is not discrete or has more than ``limit``
    codes. Pass ``codes`` (``latent.enumerate_codes(limit)``) to enumerate them once for many batches."""
    codes = model.latent.enumerate_codes(limit) if codes is None else codes
    if codes is None:
        return None
    codes = codes.to(x.dtype)
    params = model.encode(x)
    log_px = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    elbo = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    chunk = max(1, DECODE_ROWS // x.shape[0])
    for start in range(0, len(codes), chunk):
        log_joint, log_q = _code_scores(model, x, params, codes[start : start + chunk])
        log_px = torch.logaddexp(log_px, torch.logsumexp(log_joint, dim=1))
        # q log q is 0 where q underflows to 0 (the clamped log q stays finite, so no 0 * -inf).
        elbo += (log_q.exp() * (log_joint - log_q)).sum(dim=1)
    return log_px, elbo
