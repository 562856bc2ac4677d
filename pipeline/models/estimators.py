"""Likelihood estimators for a trained VAE on a batch: discrete ELBO, importance-weighted
log p(x), and exact log p(x) / ELBO by enumerating a small discrete code space.

All functions take a batch of images x (uint8 [B, C, H, W], or floats in [0, 1]; prepared by
the model's likelihood, e.g. binarized) and return per-sample values [B] in nats, so callers
sum them over a split exactly. Proposals are the *un-relaxed* posteriors (one-hot for
categorical latents): the estimates are of the discrete model, whatever relaxation trained it.
Callers that draw dynamic binarization and want several estimators on the same binary images
prepare once (`model.prepare`) and pass ``prepared``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.models.vae import VAE

# Rows (samples x inputs) decoded at once: bounds memory to ~rows * D floats (50k x 784 = 157 MB).
DECODE_ROWS = 50_000
ENUMERATION_LIMIT = 100_000

Prepared = tuple[Tensor, Tensor]  # (encoder input, target), from VAE.prepare


def _prepared(model: VAE, x: Tensor, prepared: Prepared | None) -> Prepared:
    return model.prepare(x) if prepared is None else prepared


@torch.no_grad()
def discrete_elbo(model: VAE, x: Tensor, prepared: Prepared | None = None) -> tuple[Tensor, Tensor]:
    """(log p(x|z), analytic KL) per sample with one un-relaxed posterior sample z; ELBO = sum."""
    inputs, target = _prepared(model, x, prepared)
    params = model.encode(inputs)
    z = model.latent.sample_posterior(params, 1)[0]
    return model.likelihood.log_prob(model.decode(z), target), model.latent.kl(params).sum(dim=-1)


@torch.no_grad()
def log_importance_weights(model: VAE, target: Tensor, params: Tensor, k: int) -> Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x) for k proposal samples z ~ q(z|x), [k, B]."""
    latent = model.latent
    z = latent.sample_posterior(params, k)  # [k, B, code]
    batch = target.shape[0]
    decoded = model.decode(z.reshape(k * batch, -1))
    decoded = decoded.reshape(k, batch, *decoded.shape[1:])
    return model.likelihood.log_prob(decoded, target) + latent.prior_log_prob(z) - latent.log_prob(params, z)


@torch.no_grad()
def importance_log_px(model: VAE, x: Tensor, k: int, prepared: Prepared | None = None) -> Tensor:
    """The importance-weighted bound L_k = log (1/k) sum_i w_i, [B]; -> log p(x) as k grows.

    Samples are drawn in chunks (at most DECODE_ROWS decoded rows at a time) and combined
    with a running logsumexp, so k = 5000 needs no more memory than one chunk.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    inputs, target = _prepared(model, x, prepared)
    params = model.encode(inputs)
    chunk = max(1, DECODE_ROWS // x.shape[0])
    total = torch.full((x.shape[0],), -math.inf, dtype=params.dtype, device=params.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        log_w = log_importance_weights(model, target, params, n)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += n
    return total - math.log(k)


def _code_scores(model: VAE, target: Tensor, params: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """For codes [M, code]: log p(x, z) and log q(z|x), each [B, M], decoding M codes once."""
    latent = model.latent
    log_px_z = model.likelihood.pairwise_log_prob(model.decode(codes), target)
    log_joint = log_px_z + latent.prior_log_prob(codes)[None, :]
    log_q = latent.log_prob(params, codes[:, None, :].expand(len(codes), target.shape[0], codes.shape[1])).T
    return log_joint, log_q


@torch.no_grad()
def exact_log_px_and_elbo(model: VAE, x: Tensor, limit: int = ENUMERATION_LIMIT, codes: Tensor | None = None,
                          prepared: Prepared | None = None) -> tuple[Tensor, Tensor] | None:
    """Exact log p(x) = logsumexp_z log p(x, z) and exact ELBO = sum_z q(z|x) (log p(x, z) - log q(z|x)),
    [B] each, by enumerating every code; None when the latent is not discrete or has more than ``limit``
    codes. Pass ``codes`` (``latent.enumerate_codes(limit)``) to enumerate them once for many batches."""
    codes = model.latent.enumerate_codes(limit) if codes is None else codes
    if codes is None:
        return None
    inputs, target = _prepared(model, x, prepared)
    params = model.encode(inputs)
    codes = codes.to(params.dtype)
    log_px = torch.full((x.shape[0],), -math.inf, dtype=params.dtype, device=params.device)
    elbo = torch.zeros(x.shape[0], dtype=params.dtype, device=params.device)
    chunk = max(1, DECODE_ROWS // x.shape[0])
    for start in range(0, len(codes), chunk):
        log_joint, log_q = _code_scores(model, target, params, codes[start : start + chunk])
        log_px = torch.logaddexp(log_px, torch.logsumexp(log_joint, dim=1))
        # q log q is 0 where q underflows to 0 (the clamped log q stays finite, so no 0 * -inf).
        elbo += (log_q.exp() * (log_joint - log_q)).sum(dim=1)
    return log_px, elbo
