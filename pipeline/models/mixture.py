"""GMVAE-style latents: a categorical component y (K classes) and a Gaussian z | y.

Generative model (both variants): p(y) (uniform or learned logits), p(z | y) = N(m_y, diag exp(s_y))
with learned means and log-variances per component, p(x | z) the decoder. A code is
[one-hot y (K), z (D)]; the decoder reads z only. ``kl_per_variable`` of the VAE has two entries:
index 0 is y, index 1 is z (MLflow: ``val/kl_latent_0`` = KL of y, ``val/kl_latent_1`` = KL of z).

`MarginalMixtureLatent` (``model.latent.mixture_posterior: marginal``, the default): posterior
q(y|x) q(z|x,y), one Gaussian per component, and the ELBO summed over y exactly:

    -ELBO = sum_y q(y|x) [ -log p(x | z_y) + KL(q(z|x,y) || p(z|y)) ] + KL(q(y|x) || p(y)),
    z_y ~ q(z|x,y) reparameterised.

The decoder runs once per component (`sample_codes` returns K codes weighted by q(y|x)), so the
reconstruction of each component trains q(y|x): the component that explains x best gains mass.
Both variants collapse onto one component early on the plain ELBO; train with the KL(y)
annealing (`train.kl_y_anneal_steps`, train/schedules.py).

`MixtureLatent` (``mean_field``): q(y|x) q(z|x). The decoder never sees y, so nothing but the KL
terms reaches q(y|x); on MNIST every input ended on one component (perplexity 1.00, KL(y) = log K).
Kept as the cheap baseline (one decoder pass) that shows the collapse.

Only latent_base.py is imported here (latents.py imports this module for `build_latent`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.latent_base import LOGVAR_RANGE, Latent, gaussian_log_density, gumbel_like


class _GaussianMixturePrior(Latent):
    """p(y) p(z|y) and everything that only depends on the prior or on the code layout."""

    num_kl_terms = 2

    def __init__(self, dim: int, components: int, *, prior: str = "uniform", mean_scale: float = 1.0) -> None:
        super().__init__()
        if dim < 1 or components < 2:
            raise ValueError(f"need dim >= 1 and components >= 2, got {dim}, {components}")
        if prior not in ("uniform", "learned"):
            raise ValueError(f"prior must be uniform or learned, got {prior!r}")
        self.dim = dim
        self.components = components
        self.code_size = components + dim
        self.prior_means = nn.Parameter(torch.randn(components, dim) * mean_scale)
        self.prior_logvars = nn.Parameter(torch.zeros(components, dim))
        self.prior_logits = nn.Parameter(torch.zeros(components)) if prior == "learned" else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, components={self.components}, prior={'learned' if self.prior_logits is not None else 'uniform'}"

    @property
    def decoder_size(self) -> int:
        return self.dim

    def decoder_input(self, z: Tensor) -> Tensor:
        return z[..., self.components:]

    def log_prior_y(self) -> Tensor:
        if self.prior_logits is None:
            return torch.full((self.components,), -math.log(self.components), dtype=self._anchor.dtype,
                              device=self._anchor.device)
        return F.log_softmax(self.prior_logits, dim=-1)

    def _prior_logvars(self) -> Tensor:
        return self.prior_logvars.clamp(*LOGVAR_RANGE)

    def _log_qy(self, params: Tensor) -> Tensor:
        return F.log_softmax(params[:, : self.components], dim=-1).clamp_min(torch.finfo(params.dtype).min)

    def _kl_y(self, log_qy: Tensor) -> Tensor:
        return (log_qy.exp() * (log_qy - self.log_prior_y())).sum(-1)

    def _kl_to_components(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mu, exp(logvar)) || N(m_k, exp(s_k))) summed over D; mu, logvar [B, D] -> [B, K]
        against every component, or [B, K, D] -> [B, K] each against its own component."""
        if mu.dim() == 2:
            mu, logvar = mu[:, None], logvar[:, None]
        m, s = self.prior_means, self._prior_logvars()
        return 0.5 * (s - logvar + (logvar.exp() + (mu - m).pow(2)) * torch.exp(-s) - 1.0).sum(-1)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        probs = self.log_prior_y().detach().exp().to(gen_device)
        y = torch.multinomial(probs, n, replacement=True, generator=generator).to(self._anchor.device)
        noise = torch.randn(n, self.dim, generator=generator, device=gen_device).to(self._anchor.device)
        m, s = self.prior_means.detach(), self._prior_logvars().detach()
        z = m[y] + noise * torch.exp(0.5 * s[y])
        return torch.cat([F.one_hot(y, self.components).to(z.dtype), z], dim=-1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        y, code = z[..., : self.components], z[..., self.components :]
        # log p(z | y=k) for every k, [..., K], then pick the one-hot y's component.
        per_component = gaussian_log_density(code.unsqueeze(-2), self.prior_means, self._prior_logvars()).sum(-1)
        return (y * (self.log_prior_y() + per_component)).sum(-1)

    def _sample_y(self, log_qy: Tensor, n: int) -> Tensor:
        """n exact draws of y per input (Gumbel-max), [n, B]."""
        return (log_qy + gumbel_like(log_qy.unsqueeze(0).expand(n, *log_qy.shape))).argmax(-1)

    def usage(self, params: Tensor) -> Tensor:
        # Component usage as one "variable" of K classes, for the perplexity metric.
        return self._log_qy(params.detach()).exp().sum(dim=0, keepdim=True)

    def cluster(self, params: Tensor) -> Tensor:
        return params[:, : self.components].argmax(dim=-1)


class MarginalMixtureLatent(_GaussianMixturePrior):
    """q(y|x) q(z|x,y); ``params`` = [y logits (K), means (K*D), log-variances (K*D)]."""

    def __init__(self, dim: int, components: int, *, prior: str = "uniform") -> None:
        # Spread-out initial component means (N(0, 1)). Trained on the plain ELBO from the start, the
        # component that is cheapest for every input takes all of them within ~100 steps (perplexity
        # 1.01 on MNIST); the KL(y) annealing of train/schedules.py (`kl_y_weight`) prevents that.
        # Nearly equal means (N(0, 0.01^2)) avoided the collapse in 3 of 4 seeds without annealing,
        # but then the components stay interchangeable: q(y|x) stayed uniform after the annealing
        # (I(x; y) 0.07 nats after 400 steps vs 1.2-1.3 with spread-out means).
        super().__init__(dim, components, prior=prior, mean_scale=1.0)
        self.param_size = components + 2 * components * dim

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log q(y|x) [B, K], means and log-variances of q(z|x,y) [B, K, D]."""
        k, d = self.components, self.dim
        mu = params[:, k : k + k * d].reshape(-1, k, d)
        logvar = params[:, k + k * d :].reshape(-1, k, d).clamp(*LOGVAR_RANGE)
        return self._log_qy(params), mu, logvar

    def _kl_terms(self, log_qy: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        kl_z = (log_qy.exp() * self._kl_to_components(mu, logvar)).sum(-1)
        return torch.stack([self._kl_y(log_qy), kl_z], dim=-1)

    def kl(self, params: Tensor) -> Tensor:
        return self._kl_terms(*self._split(params))

    def sample_codes(self, params: Tensor, temperature: float = 1.0,
                     straight_through: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One code per component: codes [K, B, K + D] (z_y ~ q(z|x,y) reparameterised), weights
        q(y|x) [K, B] (in the graph: the decoder's per-component loss trains q(y|x)), KL terms [B, 2]."""
        log_qy, mu, logvar = self._split(params)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # [B, K, D]
        eye = torch.eye(self.components, dtype=z.dtype, device=z.device)  # [K(y), K]
        codes = torch.cat([eye[:, None, :].expand(-1, z.shape[0], -1), z.transpose(0, 1)], dim=-1)
        return codes, log_qy.exp().T, self._kl_terms(log_qy, mu, logvar)

    def _select(self, params: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Means and log-variances of q(z|x,y) for components y [n, B] -> [n, B, D] each."""
        _, mu, logvar = self._split(params)
        index = y.unsqueeze(-1).unsqueeze(-1).expand(*y.shape, 1, self.dim)  # [n, B, 1, D]
        pick = lambda t: torch.gather(t.unsqueeze(0).expand(y.shape[0], *t.shape), 2, index).squeeze(2)  # noqa: E731
        return pick(mu), pick(logvar)

    def rsample(self, params: Tensor, temperature: float = 1.0, straight_through: bool | None = None) -> Tensor:
        # One (y, z) draw; y is not reparameterised. Training uses `sample_codes` (all y, exactly).
        y = self._sample_y(self._log_qy(params), 1)
        mu, logvar = self._select(params, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.cat([F.one_hot(y, self.components).to(z.dtype), z], dim=-1)[0]

    def sample_posterior(self, params: Tensor, n: int) -> Tensor:
        y = self._sample_y(self._log_qy(params), n)
        mu, logvar = self._select(params, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.cat([F.one_hot(y, self.components).to(z.dtype), z], dim=-1)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        y, code = z[..., : self.components], z[..., self.components :]
        # log q(z | x, y=k) for every k, [..., B, K], then pick the one-hot y's component.
        per_component = gaussian_log_density(code.unsqueeze(-2), mu, logvar).sum(-1)
        return (y * (log_qy + per_component)).sum(-1)

    def mode(self, params: Tensor) -> Tensor:
        log_qy = self._log_qy(params)
        y = log_qy.argmax(-1)
        mu, _ = self._select(params, y.unsqueeze(0))
        return torch.cat([F.one_hot(y, self.components).to(mu.dtype), mu[0]], dim=-1)

    def posterior_mean(self, params: Tensor) -> Tensor:
        # E_q[z] = sum_y q(y|x) E[z | x, y]: what Burda's active-units criterion looks at.
        log_qy, mu, _ = self._split(params)
        return (log_qy.exp().unsqueeze(-1) * mu).sum(1)


class MixtureLatent(_GaussianMixturePrior):
    """Mean field q(y|x) q(z|x); ``params`` = [y logits (K), z mean (D), z log-variance (D)].

    KL[0] = KL(q(y|x) || p(y)), KL[1] = sum_k q(y=k|x) KL(q(z|x) || p(z|y=k)). The training pass
    puts q(y|x) in the y slot of the code (the decoder does not read it)."""

    def __init__(self, dim: int, components: int, *, prior: str = "uniform") -> None:
        # Spread-out initial component means: with equal ones nothing would ever tell the components
        # apart (q(z|x) is shared by all of them).
        super().__init__(dim, components, prior=prior, mean_scale=1.0)
        self.param_size = components + 2 * dim  # y logits, z mean, z log-variance

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, d = self.components, self.dim
        mu, logvar = params[:, k : k + d], params[:, k + d :].clamp(*LOGVAR_RANGE)
        return self._log_qy(params), mu, logvar

    def rsample(self, params: Tensor, temperature: float = 1.0, straight_through: bool | None = None) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.cat([log_qy.exp(), z], dim=-1)

    def kl(self, params: Tensor) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        kl_z = (log_qy.exp() * self._kl_to_components(mu, logvar)).sum(-1)
        return torch.stack([self._kl_y(log_qy), kl_z], dim=-1)

    def sample_posterior(self, params: Tensor, n: int) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        y = self._sample_y(log_qy, n)
        z = mu + torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device) * torch.exp(0.5 * logvar)
        return torch.cat([F.one_hot(y, self.components).to(z.dtype), z], dim=-1)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        y, code = z[..., : self.components], z[..., self.components :]
        return (y * log_qy).sum(-1) + gaussian_log_density(code, mu, logvar).sum(-1)

    def mode(self, params: Tensor) -> Tensor:
        log_qy, mu, _ = self._split(params)
        return torch.cat([F.one_hot(log_qy.argmax(-1), self.components).to(mu.dtype), mu], dim=-1)

    def posterior_mean(self, params: Tensor) -> Tensor:
        return self._split(params)[1]
