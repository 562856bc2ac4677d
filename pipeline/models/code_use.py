"""Code use of a categorical latent, counted on argmaxes: the tokens a user gets.

A code (class) is *used* when it is the argmax of some position of some input. Both figures
below come from one count vector [K] (argmax uses per class, pooled over positions and
inputs), so a share of used codes and a perplexity always describe the same tokens:

- `codes_used`: the share of the K codes with a nonzero count (1 - the dead share);
- `code_perplexity`: exp of the entropy of the normalised counts, from 1 (one code for
  everything) to K (all codes equally often).

Counts add up: sum them over batches and ranks first, then take the figures once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_counts(counts: Tensor | np.ndarray) -> Tensor:
    counts = torch.as_tensor(counts).detach().double().cpu()
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"code counts must be a non-empty vector [K], got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("code counts must be >= 0")
    return counts


def argmax_counts(logits: Tensor, categories: int | None = None) -> Tensor:
    """Argmax uses per class [K] (float64) of logits [..., K], pooled over every leading axis."""
    k = categories or logits.shape[-1]
    if logits.shape[-1] != k:
        raise ValueError(f"logits end in {logits.shape[-1]} classes, expected {k}")
    return code_counts(logits.detach().argmax(dim=-1), k)


def code_counts(codes: Tensor | np.ndarray, categories: int) -> Tensor:
    """Uses per class [K] (float64) of integer codes of any shape (e.g. token grids [B, h, w])."""
    codes = torch.as_tensor(codes).detach().long().flatten().cpu()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= categories):
        raise ValueError(f"codes must lie in 0..{categories - 1}, got {int(codes.min())}..{int(codes.max())}")
    return torch.bincount(codes, minlength=categories).double()


def codes_used(counts: Tensor | np.ndarray) -> float:
    """The share of the K codes that are some position's argmax (count > 0)."""
    counts = _as_counts(counts)
    return float((counts > 0).double().mean())


def code_perplexity(counts: Tensor | np.ndarray) -> float:
    """exp(entropy) of the code histogram ``counts`` [K]; NaN when nothing was counted."""
    counts = _as_counts(counts)
    total = float(counts.sum())
    if total <= 0:
        return float("nan")
    p = counts / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))
