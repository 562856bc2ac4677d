"""Latent families behind one small interface: categorical (Gumbel-Softmax) and Gaussian.

Every latent maps encoder output ``params`` [B, param_size] to a code ``z`` [B, code_size]
that the decoder reads, and knows its analytic KL to a fixed prior.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import LatentConfig


def temperature_at(step: int, tau0: float, tau_min: float, rate: float, every: int) -> float:
    """Gumbel-Softmax temperature at a global step (Jang et al. 2017 staircase schedule).

    A pure function of the step so every rank, and a resumed run, agrees on the value.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    t = (max(step, 0) // every) * every
    return max(tau_min, tau0 * math.exp(-rate * t))


class Latent(nn.Module, ABC):
    """Common interface of a latent family; subclasses set the three sizes in __init__."""

    param_size: int  # encoder output width
    code_size: int  # decoder input width
    num_kl_terms: int  # KL entries per sample (variables or dimensions)

    def __init__(self) -> None:
        super().__init__()
        # Non-persistent anchor so prior samples land on the module's device without any parameters.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @abstractmethod
    def rsample(self, params: Tensor, temperature: float) -> Tensor:
        """Reparameterised sample z [B, code_size]."""

    @abstractmethod
    def kl(self, params: Tensor) -> Tensor:
        """Analytic KL(q(z|x) || p(z)) per variable, [B, num_kl_terms]."""

    @abstractmethod
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples from the prior, [n, code_size]."""

    @abstractmethod
    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        """log q(z|x) per sample, [B]."""

    @abstractmethod
    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z) per sample, [B]."""

    @abstractmethod
    def mode(self, params: Tensor) -> Tensor:
        """Deterministic code for reconstruction: posterior mode (categorical) or mean (gaussian)."""

    def usage(self, params: Tensor) -> Tensor | None:
        """Posterior mass summed over the batch (for code-usage perplexity); None if not meaningful."""
        return None


class CategoricalLatent(Latent):
    """N independent categorical variables with K classes each, uniform prior.

    ``params`` are logits [B, N*K]; ``z`` is the (relaxed) one-hot code flattened to [B, N*K].
    """

    def __init__(self, variables: int, categories: int, hard: bool = False) -> None:
        super().__init__()
        if variables < 1 or categories < 2:
            raise ValueError(f"need variables >= 1 and categories >= 2, got {variables}, {categories}")
        self.variables = variables
        self.categories = categories
        self.hard = hard
        self.param_size = variables * categories
        self.code_size = variables * categories
        self.num_kl_terms = variables

    def extra_repr(self) -> str:
        return f"variables={self.variables}, categories={self.categories}, hard={self.hard}"

    def _log_q(self, params: Tensor) -> Tensor:
        """Posterior log-probabilities [B, N, K], clamped to a finite floor.

        log_softmax avoids log(softmax) underflow; the floor keeps q*log q = 0*finite = 0 (not
        0*-inf = NaN) when a logit is -inf, and its gradient then is simply zero.
        """
        logits = params.reshape(params.shape[0], self.variables, self.categories)
        log_q = F.log_softmax(logits, dim=-1)
        return log_q.clamp_min(torch.finfo(log_q.dtype).min)

    def rsample(self, params: Tensor, temperature: float) -> Tensor:
        log_q = self._log_q(params)
        # Clamp the uniform draw away from 0 so -log(-log(u)) stays finite (u<1 holds for torch.rand).
        tiny = torch.finfo(log_q.dtype).tiny
        uniform = torch.rand_like(log_q).clamp_(min=tiny, max=1.0 - torch.finfo(log_q.dtype).eps)
        gumbel = -torch.log(-torch.log(uniform))
        relaxed = F.softmax((log_q + gumbel) / temperature, dim=-1)
        if self.hard:
            one_hot = F.one_hot(relaxed.argmax(dim=-1), self.categories).to(relaxed.dtype)
            # one_hot + (relaxed - relaxed) is exactly one-hot forward, relaxed gradient backward.
            relaxed = one_hot + (relaxed - relaxed.detach())
        return relaxed.reshape(params.shape[0], self.code_size)

    def kl(self, params: Tensor) -> Tensor:
        # KL(q || Uniform(K)) = sum_k q_k (log q_k + log K) = log K - H(q)
        log_q = self._log_q(params)
        q = log_q.exp()
        return (q * (log_q + math.log(self.categories))).sum(dim=-1)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        index = torch.randint(self.categories, (n, self.variables), generator=generator, device=gen_device)
        one_hot = F.one_hot(index, self.categories).to(device=self._anchor.device, dtype=self._anchor.dtype)
        return one_hot.reshape(n, self.code_size)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        # For one-hot z this picks log q of the chosen class per variable, summed over variables.
        log_q = self._log_q(params)
        codes = z.reshape(z.shape[0], self.variables, self.categories)
        return (codes * log_q).sum(dim=(-2, -1))

    def prior_log_prob(self, z: Tensor) -> Tensor:
        value = -self.variables * math.log(self.categories)
        return torch.full((z.shape[0],), value, dtype=z.dtype, device=z.device)

    def mode(self, params: Tensor) -> Tensor:
        logits = params.reshape(params.shape[0], self.variables, self.categories)
        one_hot = F.one_hot(logits.argmax(dim=-1), self.categories).to(params.dtype)
        return one_hot.reshape(params.shape[0], self.code_size)

    def usage(self, params: Tensor) -> Tensor:
        # Summed (not averaged) so ranks can all-reduce and normalise once; a metric, so no graph.
        return self._log_q(params.detach()).exp().sum(dim=0)


class GaussianLatent(Latent):
    """Diagonal Gaussian posterior with a standard normal prior; ``params`` = (mu, logvar)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.param_size = 2 * dim
        self.code_size = dim
        self.num_kl_terms = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar

    def rsample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        # The temperature only applies to relaxed discrete latents; accepted for a uniform call site.
        mu, logvar = self._split(params)
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def kl(self, params: Tensor) -> Tensor:
        mu, logvar = self._split(params)
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.dim, generator=generator, device=gen_device)
        return z.to(device=self._anchor.device, dtype=self._anchor.dtype)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        mu, logvar = self._split(params)
        log_density = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))
        return log_density.sum(dim=-1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return (-0.5 * (math.log(2 * math.pi) + z.pow(2))).sum(dim=-1)

    def mode(self, params: Tensor) -> Tensor:
        mu, _ = self._split(params)
        return mu


def perplexity_from_usage(usage_sum: Tensor) -> float:
    """Mean over variables of exp(entropy) of each variable's aggregate posterior.

    ``usage_sum`` [N, K] is posterior mass summed over samples (and ranks); ranges from 1
    (every sample uses the same class) to K (all classes used equally).
    """
    usage_sum = usage_sum.detach().double()
    totals = usage_sum.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    p = usage_sum / totals
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return float(entropy.exp().mean())


def build_latent(cfg: LatentConfig) -> Latent:
    if cfg.kind == "categorical":
        return CategoricalLatent(cfg.variables, cfg.categories, hard=cfg.hard)
    if cfg.kind == "gaussian":
        return GaussianLatent(cfg.variables)
    raise ValueError(f"unknown latent kind {cfg.kind!r}")
