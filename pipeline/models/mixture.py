"""GMVAE-style latent: a categorical component y (K classes) and a Gaussian z | y.

Generative model: p(y) (uniform or learned logits), p(z | y) = N(m_y, diag exp(s_y)) with
learned means and log-variances per component, p(x | z) the decoder. Posterior (mean field):
q(y | x) q(z | x), so the decoder reads z only and both KL terms are analytic:

    KL[0] = KL(q(y|x) || p(y))
    KL[1] = sum_k q(y=k|x) KL(q(z|x) || p(z|y=k))      (summed over the dimensions of z)

``kl_per_variable`` of the VAE therefore has two entries: index 0 is y, index 1 is z
(MLflow: ``val/kl_latent_0`` = KL of y, ``val/kl_latent_1`` = KL of z).
A code is [one-hot y (K), z (D)]; the training pass puts q(y|x) in the y slot (unread).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.latents import LOGVAR_RANGE, Latent, gaussian_log_density, gumbel_like


class MixtureLatent(Latent):
    num_kl_terms = 2

    def __init__(self, dim: int, components: int, *, prior: str = "uniform") -> None:
        super().__init__()
        if dim < 1 or components < 2:
            raise ValueError(f"need dim >= 1 and components >= 2, got {dim}, {components}")
        self.dim = dim
        self.components = components
        self.param_size = components + 2 * dim  # y logits, z mean, z log-variance
        self.code_size = components + dim
        # Spread-out initial component means so the components start distinguishable.
        self.prior_means = nn.Parameter(torch.randn(components, dim))
        self.prior_logvars = nn.Parameter(torch.zeros(components, dim))
        self.prior_logits = nn.Parameter(torch.zeros(components)) if prior == "learned" else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, components={self.components}, prior={'learned' if self.prior_logits is not None else 'uniform'}"

    @property
    def decoder_size(self) -> int:
        return self.dim

    def decoder_input(self, z: Tensor) -> Tensor:
        return z[..., self.components:]

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, d = self.components, self.dim
        log_qy = F.log_softmax(params[:, :k], dim=-1).clamp_min(torch.finfo(params.dtype).min)
        mu, logvar = params[:, k : k + d], params[:, k + d :].clamp(*LOGVAR_RANGE)
        return log_qy, mu, logvar

    def log_prior_y(self) -> Tensor:
        if self.prior_logits is None:
            return torch.full((self.components,), -math.log(self.components), dtype=self._anchor.dtype,
                              device=self._anchor.device)
        return F.log_softmax(self.prior_logits, dim=-1)

    def _prior_logvars(self) -> Tensor:
        return self.prior_logvars.clamp(*LOGVAR_RANGE)

    def rsample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.cat([log_qy.exp(), z], dim=-1)

    def kl(self, params: Tensor) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        qy = log_qy.exp()
        kl_y = (qy * (log_qy - self.log_prior_y())).sum(-1)
        # KL(N(mu, v) || N(m_k, w_k)) per component, [B, K]
        m, s = self.prior_means, self._prior_logvars()
        per_component = 0.5 * (s - logvar[:, None] + (logvar[:, None].exp() + (mu[:, None] - m).pow(2)) * torch.exp(-s)
                               - 1.0).sum(-1)
        kl_z = (qy * per_component).sum(-1)
        return torch.stack([kl_y, kl_z], dim=-1)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        probs = self.log_prior_y().detach().exp().to(gen_device)
        y = torch.multinomial(probs, n, replacement=True, generator=generator).to(self._anchor.device)
        noise = torch.randn(n, self.dim, generator=generator, device=gen_device).to(self._anchor.device)
        m, s = self.prior_means.detach(), self._prior_logvars().detach()
        z = m[y] + noise * torch.exp(0.5 * s[y])
        return torch.cat([F.one_hot(y, self.components).to(z.dtype), z], dim=-1)

    def sample_posterior(self, params: Tensor, n: int) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        y = (log_qy + gumbel_like(log_qy.unsqueeze(0).expand(n, *log_qy.shape))).argmax(-1)  # Gumbel-max
        z = mu + torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device) * torch.exp(0.5 * logvar)
        return torch.cat([F.one_hot(y, self.components).to(z.dtype), z], dim=-1)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        log_qy, mu, logvar = self._split(params)
        y, code = z[..., : self.components], z[..., self.components :]
        return (y * log_qy).sum(-1) + gaussian_log_density(code, mu, logvar).sum(-1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        y, code = z[..., : self.components], z[..., self.components :]
        # log p(z | y=k) for every k, [..., K], then pick the one-hot y's component.
        per_component = gaussian_log_density(code.unsqueeze(-2), self.prior_means, self._prior_logvars()).sum(-1)
        return (y * (self.log_prior_y() + per_component)).sum(-1)

    def mode(self, params: Tensor) -> Tensor:
        log_qy, mu, _ = self._split(params)
        return torch.cat([F.one_hot(log_qy.argmax(-1), self.components).to(mu.dtype), mu], dim=-1)

    def posterior_mean(self, params: Tensor) -> Tensor:
        return self._split(params)[1]

    def usage(self, params: Tensor) -> Tensor:
        # Component usage as one "variable" of K classes, for the perplexity metric.
        return self._split(params.detach())[0].exp().sum(dim=0, keepdim=True)

    def cluster(self, params: Tensor) -> Tensor:
        return params[:, : self.components].argmax(dim=-1)
