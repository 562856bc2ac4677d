"""The latent interface and the helpers every family shares (no family lives here).

Split out of latents.py so the families can live in separate modules without an import circle:
latents.py (categorical, Gaussian, `build_latent`) and mixture.py both import this module, and
latents.py imports mixture.py, never the other way round.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

# Log-probabilities below this are "impossible" for relaxed densities: e^-100 is far below any
# probability float32 can tell from 0, and the floor keeps (log a - tau * y) finite at tau = 0.1.
RELAXED_LOG_FLOOR = -100.0
# Gaussian log-variances are clamped to this range: exp() stays finite for any encoder output.
LOGVAR_RANGE = (-30.0, 20.0)


def gumbel_like(tensor: Tensor) -> Tensor:
    """Standard Gumbel noise, finite: the uniform draw is kept inside (0, 1)."""
    info = torch.finfo(tensor.dtype)
    uniform = torch.rand_like(tensor).clamp_(min=info.tiny, max=1.0 - info.eps)
    return -torch.log(-torch.log(uniform))


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise log N(z; mu, exp(logvar)) (broadcasting)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))


class Latent(nn.Module, ABC):
    """Common interface of a latent family; subclasses set the three sizes in __init__."""

    param_size: int  # encoder output width
    code_size: int  # width of a code z
    num_kl_terms: int  # KL entries per sample (variables or dimensions)
    unit_size: int = 1  # posterior-mean entries per unit, for the active-units count

    def __init__(self) -> None:
        super().__init__()
        # Non-persistent anchor so prior samples land on the module's device without any parameters.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def decoder_size(self) -> int:
        """Width of what the decoder reads (``decoder_input`` of a code)."""
        return self.code_size

    def decoder_input(self, z: Tensor) -> Tensor:
        """The part of a code the decoder reads (all of it, except for the mixture's z)."""
        return z

    @abstractmethod
    def rsample(self, params: Tensor, temperature: float, straight_through: bool | None = None) -> Tensor:
        """Reparameterised sample z [B, code_size]. ``temperature`` and ``straight_through`` (the gradient
        estimator: one-hot forward, relaxed gradient) concern relaxed discrete codes; None: the latent's
        own default (`CategoricalLatent.hard`)."""

    @abstractmethod
    def kl(self, params: Tensor) -> Tensor:
        """Analytic KL(q(z|x) || p(z)) per variable, [B, num_kl_terms]."""

    def sample_and_kl(self, params: Tensor, temperature: float,
                      straight_through: bool | None = None) -> tuple[Tensor, Tensor]:
        """The training pass: a reparameterised code and the KL terms [B, num_kl_terms] to optimise."""
        return self.rsample(params, temperature, straight_through), self.kl(params)

    def sample_codes(self, params: Tensor, temperature: float,
                     straight_through: bool | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """The training pass as S codes per input with weights: (codes [S, B, code_size], weights [S, B]
        or None, KL terms [B, num_kl_terms]). The reconstruction term of the ELBO is
        sum_s weights[s] * (-log p(x | codes[s])) (`expected_over_codes`). S = 1 without weights
        (one reparameterised sample) for every family except one that sums a discrete variable out
        exactly: the marginal mixture returns one code per component y, weighted by q(y|x)."""
        z, kl = self.sample_and_kl(params, temperature, straight_through)
        return z.unsqueeze(0), None, kl

    @abstractmethod
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples from the prior, [n, code_size]."""

    @abstractmethod
    def sample_posterior(self, params: Tensor, n: int) -> Tensor:
        """n un-relaxed samples per input from q(z|x), [n, B, code_size] (the IS proposal)."""

    @abstractmethod
    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        """log q(z|x) for codes z [..., B, code_size], -> [..., B]."""

    @abstractmethod
    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z) for codes z [..., code_size], -> [...]."""

    @abstractmethod
    def mode(self, params: Tensor) -> Tensor:
        """Deterministic code for reconstruction: posterior mode (categorical) or mean (gaussian)."""

    @abstractmethod
    def posterior_mean(self, params: Tensor) -> Tensor:
        """E_q[z] [B, units * unit_size]: what Burda et al.'s active-units criterion looks at."""

    def enumerate_codes(self, limit: int) -> Tensor | None:
        """Every code [M, code_size] when the latent is discrete with M <= limit codes, else None."""
        return None

    def usage(self, params: Tensor) -> Tensor | None:
        """Posterior mass summed over the batch (for code-usage perplexity); None if not meaningful."""
        return None

    def cluster(self, params: Tensor) -> Tensor | None:
        """Most probable mixture component per input [B] (for cluster accuracy); None if no components."""
        return None


def expected_over_codes(values: Tensor, weights: Tensor | None) -> Tensor:
    """sum_s weights[s] * values[s] over the S codes of `Latent.sample_codes`: [S, B] -> [B]."""
    return values[0] if weights is None else (weights * values).sum(dim=0)


def pick_code(values: Tensor, weights: Tensor | None) -> Tensor:
    """Per input, the entry [S, B, ...] -> [B, ...] of its most probable code (the only one when S = 1)."""
    if weights is None:
        return values[0]
    index = weights.argmax(dim=0)
    return values[index, torch.arange(values.shape[1], device=values.device)]
