"""VAE models and latent families."""

from pipeline.models.latents import (
    CategoricalLatent,
    GaussianLatent,
    Latent,
    build_latent,
    perplexity_from_usage,
    temperature_at,
)
from pipeline.models.vae import VAE, VAEOutput, build_vae

__all__ = [
    "CategoricalLatent",
    "GaussianLatent",
    "Latent",
    "VAE",
    "VAEOutput",
    "build_latent",
    "build_vae",
    "perplexity_from_usage",
    "temperature_at",
]
