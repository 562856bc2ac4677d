"""MLP VAE with a Bernoulli likelihood over a pluggable latent family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models.latents import Latent, build_latent


@dataclass
class VAEOutput:
    """One forward pass. Scalars are batch means; the per-sample tensors let callers sum exactly."""

    loss: Tensor  # recon + kl (the negative ELBO), mean over batch
    recon: Tensor  # Bernoulli NLL summed over pixels, mean over batch
    kl: Tensor  # KL summed over latent variables, mean over batch
    kl_per_variable: Tensor  # [num_kl_terms], mean over batch
    logits: Tensor  # reconstruction logits [B, D]
    params: Tensor  # latent posterior params [B, param_size], still in the graph
    z: Tensor  # sampled code [B, code_size]
    recon_per_sample: Tensor  # [B]
    kl_per_sample: Tensor  # [B]


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers through ``widths`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], latent: Latent) -> None:
        super().__init__()
        if input_dim < 1 or not hidden:
            raise ValueError("input_dim must be positive and hidden non-empty")
        self.input_dim = input_dim
        self.latent = latent
        self.encoder = _mlp([input_dim, *hidden, latent.param_size])
        self.decoder = _mlp([latent.code_size, *reversed(hidden), input_dim])

    def encode(self, x: Tensor) -> Tensor:
        """Posterior parameters [B, param_size] for inputs x [B, D]."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits [B, D] for codes z [B, code_size]."""
        return self.decoder(z)

    def forward(self, x: Tensor, temperature: float = 1.0) -> VAEOutput:
        params = self.encode(x)
        z = self.latent.rsample(params, temperature)
        logits = self.decode(z)
        recon_per_sample = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)
        kl_terms = self.latent.kl(params)
        kl_per_sample = kl_terms.sum(dim=-1)
        recon = recon_per_sample.mean()
        kl = kl_per_sample.mean()
        return VAEOutput(
            loss=recon + kl,
            recon=recon,
            kl=kl,
            kl_per_variable=kl_terms.mean(dim=0),
            logits=logits,
            params=params,
            z=z,
            recon_per_sample=recon_per_sample,
            kl_per_sample=kl_per_sample,
        )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Pixel probabilities [n, D] decoded from prior samples."""
        z = self.latent.sample_prior(n, generator=generator)
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities [B, D] decoded from the posterior mode (categorical) or mean (gaussian)."""
        z = self.latent.mode(self.encode(x))
        return torch.sigmoid(self.decode(z))


def build_vae(cfg: ModelConfig, input_dim: int) -> VAE:
    if cfg.arch != "mlp":
        raise ValueError(f"unsupported model.arch {cfg.arch!r} (only 'mlp')")
    return VAE(input_dim, list(cfg.hidden), build_latent(cfg.latent))
