"""Code use counted on argmaxes (pipeline/models/code_use.py), on constructed logits and counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.code_use import argmax_counts, code_counts, code_perplexity, codes_used


def _logits(codes: list[list[int]], k: int, margin: float = 3.0) -> torch.Tensor:
    """Logits [B, N, K] whose argmax at every position is the given code, with noise below the margin."""
    index = torch.tensor(codes)
    noise = torch.rand(*index.shape, k, generator=torch.Generator().manual_seed(0))
    return noise + margin * F.one_hot(index, k).float()


def test_argmax_counts_used_share_and_perplexity_on_constructed_logits() -> None:
    # 2 inputs x 3 positions, K = 4: argmaxes 0,1,1 and 0,0,3 -> counts [3, 2, 0, 1]
    logits = _logits([[0, 1, 1], [0, 0, 3]], k=4)
    counts = argmax_counts(logits)
    assert counts.dtype == torch.float64 and counts.tolist() == [3.0, 2.0, 0.0, 1.0]
    assert codes_used(counts) == 0.75
    # p = (1/2, 1/3, 0, 1/6): exp(H) = 2^(1/2) * 3^(1/3) * 6^(1/6)
    assert code_perplexity(counts) == pytest.approx(2 ** 0.5 * 3 ** (1 / 3) * 6 ** (1 / 6), rel=1e-12)


def test_soft_mass_does_not_count_as_use() -> None:
    # Nearly flat posteriors: the soft perplexity would be close to K, but every argmax is code 2.
    logits = torch.zeros(5, 7, 8)
    logits[..., 2] = 1e-3
    counts = argmax_counts(logits)
    assert counts.tolist() == [0, 0, 35, 0, 0, 0, 0, 0]
    assert codes_used(counts) == 1 / 8 and code_perplexity(counts) == 1.0


def test_uniform_use_has_perplexity_k_and_counts_add_over_batches() -> None:
    k = 16
    grids = torch.arange(2 * 4 * 4).reshape(2, 4, 4) % k  # token grids [B, h, w]: every code twice
    whole = code_counts(grids, k)
    parts = code_counts(grids[:1], k) + code_counts(grids[1:], k)
    assert torch.equal(whole, parts) and whole.tolist() == [2.0] * k
    assert codes_used(whole) == 1.0
    assert code_perplexity(whole) == pytest.approx(k, rel=1e-12)
    assert code_perplexity(np.array([5, 0, 0, 5])) == pytest.approx(2.0, rel=1e-12)  # numpy counts too
    assert math.isnan(code_perplexity(np.zeros(4)))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="0..3"):
        code_counts(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match=r"vector \[K\]"):
        codes_used(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="expected 5"):
        argmax_counts(torch.zeros(2, 4), categories=5)
