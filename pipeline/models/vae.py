"""VAE (MLP or conv encoder/decoder) with a Bernoulli likelihood over a pluggable latent family."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models.latents import Latent, build_latent
from pipeline.models.networks import ConvDecoder, ConvEncoder, mlp


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


_mlp = mlp  # kept for callers of the old private name


class VAE(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], latent: Latent, *, arch: str = "mlp",
                 image_shape: tuple[int, int] | None = None, channels: list[int] | None = None,
                 activation: str = "relu") -> None:
        super().__init__()
        if input_dim < 1 or not hidden:
            raise ValueError("input_dim must be positive and hidden non-empty")
        self.input_dim = input_dim
        self.latent = latent
        self.arch = arch
        if arch == "mlp":
            self.encoder = mlp([input_dim, *hidden, latent.param_size], activation)
            self.decoder = mlp([latent.decoder_size, *reversed(hidden), input_dim], activation)
        elif arch == "conv":
            if image_shape is None or math.prod(image_shape) != input_dim:
                raise ValueError(f"arch 'conv' needs image_shape with H*W = input_dim={input_dim}, got {image_shape}")
            channels = list(channels or [32, 64])
            self.encoder = ConvEncoder(tuple(image_shape), channels, hidden, latent.param_size, activation)
            self.decoder = ConvDecoder(latent.decoder_size, hidden, channels, tuple(image_shape), activation)
        else:
            raise ValueError(f"unsupported model.arch {arch!r} (mlp or conv)")

    def encode(self, x: Tensor) -> Tensor:
        """Posterior parameters [B, param_size] for inputs x [B, D]."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits [B, D] for codes z [B, code_size]."""
        return self.decoder(self.latent.decoder_input(z))

    def forward(self, x: Tensor, temperature: float = 1.0) -> VAEOutput:
        params = self.encode(x)
        z, kl_terms = self.latent.sample_and_kl(params, temperature)
        logits = self.decode(z)
        recon_per_sample = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)
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


def build_vae(cfg: ModelConfig, input_dim: int | None = None, *, image_shape: tuple[int, int] | None = None) -> VAE:
    """The VAE a config describes. ``image_shape`` (H, W) is needed by ``arch: conv``; without it a
    square image of ``input_dim`` pixels is assumed (28x28 for 784, 8x8 for 64)."""
    if input_dim is None:
        if image_shape is None:
            raise ValueError("build_vae needs input_dim or image_shape")
        input_dim = math.prod(image_shape)
    if cfg.arch == "conv" and image_shape is None:
        side = math.isqrt(input_dim)
        if side * side != input_dim:
            raise ValueError(f"arch 'conv' needs image_shape: {input_dim} pixels is not a square image")
        image_shape = (side, side)
    return VAE(input_dim, list(cfg.hidden), build_latent(cfg.latent), arch=cfg.arch,
               image_shape=tuple(image_shape) if image_shape is not None else None, channels=list(cfg.channels),
               activation=cfg.activation)
