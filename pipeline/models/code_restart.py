"""Dead-code restarts for a grid model: every dead code takes over part of a busy code's positions.

A grid of categorical codes loses codes while it trains: the encoder's gradient through the code
choice moves positions onto the codes that already decode well, and a code no position picks gets no
gradient to come back (``model.restart_dead_codes`` turns restarts on). VQ-VAEs fight this with
restarts (a dead codebook vector is moved onto a recent encoder output). Here a restart is a k-means
*split* of a busy code.

The code head is linear over the encoder's feature f at a position: logit_k = w_k.f + b_k. Read
as distances (what `ResNetEncoder.init_codes` sets up exactly), w_k = 2 c_k / T and
b_k = -|c_k|^2 / T + r_k for centres c_k, a temperature T and offsets r_k, since then
logit_k = (|f|^2 - |f - c_k|^2) / T + r_k and |f|^2 is the same for every code. A split:

- a donor j is drawn among the busy codes (in proportion to its use) and one position f that
  picks j; f_bar is the mean feature of j's positions and u = f - f_bar;
- the dead code k becomes j with its centre moved from f_bar to f: w_k = w_j + (2/T) u and
  b_k = b_j - (2/T) u.(f_bar + f)/2, so logit_k - logit_j = (2/T) u.(x - (f_bar + f)/2): of j's
  positions, those nearer f than f_bar go to k (by |u|^2 / T nats at f itself); far from both,
  k and j lose to the other codes alike. (A split by a fixed margin instead, eps = m / |u|^2, is
  not local: for a tight cluster it makes k win or lose by a wide margin everywhere.)
- T is read off the head: at a distance head b_k = -T |w_k|^2 / 4, so T is the median over codes
  of -4 b_k / |w_k|^2 (codes where that is positive); a head far from that form (random init)
  falls back to the pool's own scale, T = median |u|^2.
- the decoder's codebook row k becomes row j: the split positions decode as before, and the
  two halves then learn apart;
- the optimizer's moments of row k become row j's (a fresh Adam row would take a step ~3x the
  usual size), and the weight average (EMA), when there is one, gets the same edit of its own
  rows, so the validated model has the code too.

What is dead is counted on a fixed pool of train images that every rank holds (the code-init
images, `train/code_init.py`): every rank computes the same features, counts and draws (seeded by
the step), so restarts need no collective and keep the DDP replicas identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Split:
    """Dead code ``dead`` takes the positions of ``donor`` nearer ``donor_centre + direction``
    than ``donor_centre``; ``scale`` is 2 / T."""

    dead: int
    donor: int
    direction: Tensor  # u = f - f_bar
    midpoint: Tensor  # (f_bar + f) / 2
    scale: float


def head_temperature(weight: Tensor, bias: Tensor) -> float | None:
    """T of a code head read as distances (b_k = -T |w_k|^2 / 4), or None when no code fits."""
    ratios = (-4.0 * bias / weight.pow(2).sum(dim=-1).clamp_min(1e-12)).detach()
    ratios = ratios[ratios > 0]
    return float(ratios.median()) if len(ratios) else None


def plan_splits(features: Tensor, head: nn.Linear, generator: torch.Generator) -> list[Split]:
    """Splits for the dead codes of a pool of ``features`` [P, c] (positions) under ``head``.
    A code is dead when no position of the pool picks it (argmax). Donors are drawn with
    replacement in proportion to their use, so a code holding many positions gives most."""
    assign = head(features).argmax(dim=-1)
    counts = torch.bincount(assign, minlength=head.out_features).cpu()  # draws on the CPU generator
    dead = torch.nonzero(counts == 0).flatten()
    if len(dead) == 0 or len(assign) < 2:
        return []
    donors = torch.multinomial(counts.double(), len(dead), replacement=True, generator=generator)
    picks = []
    for j in donors.tolist():
        members = torch.nonzero(assign == j).flatten()
        centre = features[members].mean(dim=0)
        f = features[members[torch.randint(len(members), (1,), generator=generator)]][0]
        picks.append((centre, f))
    temperature = head_temperature(head.weight, head.bias)
    if temperature is None:
        spreads = torch.stack([(f - c).pow(2).sum() for c, f in picks])
        temperature = float(spreads.median().clamp_min(1e-12))
    return [Split(k, j, f - c, (f + c) / 2, 2.0 / temperature)
            for k, j, (c, f) in zip(dead.tolist(), donors.tolist(), picks)]


@torch.no_grad()
def apply_splits(head: nn.Linear, codebook: Tensor, splits: list[Split]) -> None:
    """Edit one model's code head [K, c] + [K] and decoder codebook [K, d] in place."""
    for s in splits:
        head.weight[s.dead] = head.weight[s.donor] + s.scale * s.direction
        head.bias[s.dead] = head.bias[s.donor] - s.scale * torch.dot(s.direction, s.midpoint)
        codebook[s.dead] = codebook[s.donor]

