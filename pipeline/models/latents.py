"""Latent families behind one small interface: categorical (Gumbel-Softmax) and Gaussian.

Every latent maps encoder output ``params`` [B, param_size] to a code ``z`` [B, code_size]
that the decoder reads, and knows its KL to the prior. For evaluation every latent also
draws un-relaxed samples from its posterior (the importance-sampling proposal), scores codes
under posterior and prior (codes may carry leading sample dims: z [..., B, code_size]) and,
when discrete and small, enumerates its whole code space. The interface is in latent_base.py, the
Gaussian mixture in mixture.py.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import LatentConfig
from pipeline.models.latent_base import (  # noqa: F401 - re-exported: the interface's historical home
    LOGVAR_RANGE,
    RELAXED_LOG_FLOOR,
    Latent,
    expected_over_codes,
    gaussian_log_density,
    gumbel_like,
    pick_code,
)
from pipeline.models.mixture import MarginalMixtureLatent, MixtureLatent

def temperature_at(step: int, tau0: float, tau_min: float, rate: float, every: int) -> float:
    """Gumbel-Softmax temperature at a global step (Jang et al. 2017 staircase schedule).

    A pure function of the step so every rank, and a resumed run, agrees on the value.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    t = (max(step, 0) // every) * every
    return max(tau_min, tau0 * math.exp(-rate * t))


def exp_concrete_log_density(y: Tensor, log_alpha: Tensor, tau: float) -> Tensor:
    """log density of the ExpConcrete (log-space Concrete) distribution at y, summed over the last dim.

    Maddison et al. 2017, eq. 20: log (K-1)! + (K-1) log tau + sum_k (log a_k - tau y_k)
    - K logsumexp_k (log a_k - tau y_k). Working with y = log z avoids the underflow of z
    itself at low temperature; the KL is invariant under this change of variables.
    """
    k = y.shape[-1]
    scores = log_alpha - tau * y
    return math.lgamma(k) + (k - 1) * math.log(tau) + scores.sum(-1) - k * torch.logsumexp(scores, dim=-1)


class CategoricalLatent(Latent):
    """N independent categorical variables with K classes each; uniform or learned prior.

    ``params`` are logits [B, N*K]; ``z`` is the (relaxed) one-hot code flattened to [B, N*K].
    ``kl="relaxed"`` trains on the Concrete estimate log q(y) - log p(y) at the sampled y
    (posterior at the sampling temperature, prior at ``prior_tau``, default the same).

    The gradient estimator is an argument of each training pass, as the temperature is
    (``straight_through``: the one-hot argmax forward, the relaxed gradient backward; else the
    Gumbel-Softmax sample). ``hard`` is the estimator of a pass that names none: the config's
    ``model.latent.estimator``.
    """

    def __init__(self, variables: int, categories: int, hard: bool = False, *, prior: str = "uniform",
                 kl: str = "analytic", prior_tau: float | None = None) -> None:
        super().__init__()
        if variables < 1 or categories < 2:
            raise ValueError(f"need variables >= 1 and categories >= 2, got {variables}, {categories}")
        if prior not in ("uniform", "learned") or kl not in ("analytic", "relaxed"):
            raise ValueError(f"prior must be uniform|learned and kl analytic|relaxed, got {prior!r}, {kl!r}")
        self.variables = variables
        self.categories = categories
        self.hard = hard
        self.kl_mode = kl
        self.prior_tau = prior_tau
        self.param_size = variables * categories
        self.code_size = variables * categories
        self.num_kl_terms = variables
        self.unit_size = categories
        # Learned prior: free logits per variable, starting at the uniform distribution.
        self.prior_logits = nn.Parameter(torch.zeros(variables, categories)) if prior == "learned" else None

    def extra_repr(self) -> str:
        prior = "learned" if self.prior_logits is not None else "uniform"
        return f"variables={self.variables}, categories={self.categories}, hard={self.hard}, prior={prior}, kl={self.kl_mode}"

    def _log_q(self, params: Tensor) -> Tensor:
        """Posterior log-probabilities [B, N, K], clamped to a finite floor.

        log_softmax avoids log(softmax) underflow; the floor keeps q*log q = 0*finite = 0 (not
        0*-inf = NaN) when a logit is -inf, and its gradient then is simply zero.
        """
        logits = params.reshape(params.shape[0], self.variables, self.categories)
        log_q = F.log_softmax(logits, dim=-1)
        return log_q.clamp_min(torch.finfo(log_q.dtype).min)

    def log_prior(self) -> Tensor:
        """Prior log-probabilities [N, K]."""
        if self.prior_logits is None:
            return torch.full((self.variables, self.categories), -math.log(self.categories),
                              dtype=self._anchor.dtype, device=self._anchor.device)
        return F.log_softmax(self.prior_logits, dim=-1)

    def _relaxed_log_sample(self, log_q: Tensor, temperature: float) -> Tensor:
        """y = log of a Gumbel-Softmax sample [B, N, K], computed in log space (finite at any tau)."""
        log_alpha = log_q.clamp_min(RELAXED_LOG_FLOOR)
        return F.log_softmax((log_alpha + gumbel_like(log_alpha)) / temperature, dim=-1)

    def _code_from_log_sample(self, y: Tensor, straight_through: bool | None) -> Tensor:
        relaxed = y.exp()
        if self.hard if straight_through is None else straight_through:
            one_hot = F.one_hot(relaxed.argmax(dim=-1), self.categories).to(relaxed.dtype)
            # one_hot + (relaxed - relaxed) is exactly one-hot forward, relaxed gradient backward.
            relaxed = one_hot + (relaxed - relaxed.detach())
        return relaxed.reshape(y.shape[0], self.code_size)

    def rsample(self, params: Tensor, temperature: float, straight_through: bool | None = None) -> Tensor:
        return self._code_from_log_sample(self._relaxed_log_sample(self._log_q(params), temperature),
                                          straight_through)

    def kl(self, params: Tensor) -> Tensor:
        # KL(q || p) = sum_k q_k (log q_k - log p_k); uniform p: log K - H(q)
        log_q = self._log_q(params)
        return (log_q.exp() * (log_q - self.log_prior())).sum(dim=-1)

    def relaxed_kl(self, params: Tensor, y: Tensor, temperature: float) -> Tensor:
        """Single-sample Concrete KL estimate log q(y|x) - log p(y) per variable, [B, N], at log-sample y."""
        log_alpha_q = self._log_q(params).clamp_min(RELAXED_LOG_FLOOR)
        log_alpha_p = self.log_prior().clamp_min(RELAXED_LOG_FLOOR)
        prior_tau = self.prior_tau or temperature
        return exp_concrete_log_density(y, log_alpha_q, temperature) - exp_concrete_log_density(y, log_alpha_p, prior_tau)

    def sample_and_kl(self, params: Tensor, temperature: float,
                      straight_through: bool | None = None) -> tuple[Tensor, Tensor]:
        if self.kl_mode == "analytic":
            # log q once for sample and KL (= rsample + kl): on a 32x32 grid of 8192-way codes every
            # [B, N, K] copy autograd keeps costs 32 MiB per image (models/resnet.py, grid_batch_bytes).
            log_q = self._log_q(params)
            z = self._code_from_log_sample(self._relaxed_log_sample(log_q, temperature), straight_through)
            return z, (log_q.exp() * (log_q - self.log_prior())).sum(dim=-1)
        y = self._relaxed_log_sample(self._log_q(params), temperature)
        return self._code_from_log_sample(y, straight_through), self.relaxed_kl(params, y, temperature)

    def _one_hot_from(self, log_probs: Tensor) -> Tensor:
        """Gumbel-max: exact categorical samples from log-probabilities [..., N, K], as one-hot."""
        index = (log_probs + gumbel_like(log_probs)).argmax(dim=-1)
        return F.one_hot(index, self.categories).to(log_probs.dtype)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if self.prior_logits is None:
            index = torch.randint(self.categories, (n, self.variables), generator=generator, device=gen_device)
        else:
            probs = self.log_prior().detach().exp().to(gen_device)
            index = torch.multinomial(probs, n, replacement=True, generator=generator).T  # [n, N]
        one_hot = F.one_hot(index, self.categories).to(device=self._anchor.device, dtype=self._anchor.dtype)
        return one_hot.reshape(n, self.code_size)

    def sample_posterior(self, params: Tensor, n: int) -> Tensor:
        log_q = self._log_q(params)
        one_hot = self._one_hot_from(log_q.unsqueeze(0).expand(n, *log_q.shape))
        return one_hot.reshape(n, params.shape[0], self.code_size)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        # For one-hot z this picks log q of the chosen class per variable, summed over variables.
        codes = z.reshape(*z.shape[:-1], self.variables, self.categories)
        return (codes * self._log_q(params)).sum(dim=(-2, -1))

    def prior_log_prob(self, z: Tensor) -> Tensor:
        codes = z.reshape(*z.shape[:-1], self.variables, self.categories)
        return (codes * self.log_prior().to(z.dtype)).sum(dim=(-2, -1))

    def mode(self, params: Tensor) -> Tensor:
        logits = params.reshape(params.shape[0], self.variables, self.categories)
        one_hot = F.one_hot(logits.argmax(dim=-1), self.categories).to(params.dtype)
        return one_hot.reshape(params.shape[0], self.code_size)

    def posterior_mean(self, params: Tensor) -> Tensor:
        # The mean of the one-hot code is q itself; a variable is one unit of K entries.
        return self._log_q(params).exp().reshape(params.shape[0], self.code_size)

    def enumerate_codes(self, limit: int) -> Tensor | None:
        if self.categories**self.variables > limit:
            return None
        index = torch.tensor(list(itertools.product(range(self.categories), repeat=self.variables)),
                             device=self._anchor.device)
        return F.one_hot(index, self.categories).to(self._anchor.dtype).reshape(len(index), self.code_size)

    def code_entropy(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """(mean entropy of one position's posterior, entropy of the posterior pooled over the batch and
        all variables), in nats. For a grid, whose positions share one codebook, their difference is
        MAGVIT-v2's entropy penalty: low when each position is confident and the batch as a whole
        spreads over many codes."""
        log_q = self._log_q(params)
        q = log_q.exp()
        per_position = -(q * log_q).sum(dim=-1).mean()
        # The pooled posterior in log space: with confident positions a code no position of the batch
        # takes has a pooled mass that underflows to 0, where x log x has an infinite slope (and
        # inf * 0 = NaN in the backward pass); log-sum-exp keeps its log finite.
        log_pooled = torch.logsumexp(log_q.flatten(0, 1), dim=0) - math.log(log_q.shape[0] * log_q.shape[1])
        return per_position, -(log_pooled.exp() * log_pooled).sum()

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
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def rsample(self, params: Tensor, temperature: float = 1.0, straight_through: bool | None = None) -> Tensor:
        # The temperature and the estimator only apply to relaxed discrete latents; accepted for a uniform call site.
        mu, logvar = self._split(params)
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def kl(self, params: Tensor) -> Tensor:
        mu, logvar = self._split(params)
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.dim, generator=generator, device=gen_device)
        return z.to(device=self._anchor.device, dtype=self._anchor.dtype)

    def sample_posterior(self, params: Tensor, n: int) -> Tensor:
        mu, logvar = self._split(params)
        return mu + torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device) * torch.exp(0.5 * logvar)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        mu, logvar = self._split(params)
        return gaussian_log_density(z, mu, logvar).sum(dim=-1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return (-0.5 * (math.log(2 * math.pi) + z.pow(2))).sum(dim=-1)

    def mode(self, params: Tensor) -> Tensor:
        mu, _ = self._split(params)
        return mu

    def posterior_mean(self, params: Tensor) -> Tensor:
        return self.mode(params)


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


def active_units(mean_sum: Tensor, square_sum: Tensor, count: float, unit_size: int, threshold: float = 0.01) -> int:
    """Burda et al. 2016: a unit is active when Cov_x(E_q[u|x]) > threshold.

    Takes sums over the data (so ranks can all-reduce them first): of the posterior means
    [U * unit_size] and of their squares. A categorical variable is one unit whose variance is
    summed over its K class probabilities.
    """
    if count <= 0:
        return 0
    mean = mean_sum.double() / count
    variance = (square_sum.double() / count - mean.pow(2)).clamp_min(0.0)
    per_unit = variance.reshape(-1, unit_size).sum(dim=-1)
    return int((per_unit > threshold).sum())


def build_latent(cfg: LatentConfig) -> Latent:
    if cfg.kind == "categorical":
        return CategoricalLatent(cfg.variables, cfg.categories, hard=cfg.estimator == "straight-through",
                                 prior=cfg.prior, kl=cfg.kl, prior_tau=cfg.prior_tau)
    if cfg.kind == "gaussian":
        return GaussianLatent(cfg.variables)
    if cfg.kind == "mixture":
        if cfg.mixture_posterior == "mean_field":
            return MixtureLatent(cfg.variables, cfg.categories, prior=cfg.prior)
        return MarginalMixtureLatent(cfg.variables, cfg.categories, prior=cfg.prior)
    raise ValueError(f"unknown latent kind {cfg.kind!r}")
