"""VAE models and latent families."""

from pipeline.models.latents import (
    CategoricalLatent,
    GaussianLatent,
    Latent,
    active_units,
    build_latent,
    perplexity_from_usage,
    temperature_at,
)
from pipeline.models.estimators import (
    discrete_elbo,
    exact_log_px_and_elbo,
    importance_log_px,
    log_importance_weights,
)
from pipeline.models.likelihoods import Bernoulli, DiscretizedLogistic, Likelihood, bits_per_dim, build_likelihood
from pipeline.models.likelihoods import LogitLaplace
from pipeline.models.resnet import ResNetDecoder, ResNetEncoder, grid_batch_bytes
from pipeline.models.mixture import MixtureLatent
from pipeline.models.vae import VAE, VAEOutput, build_vae

__all__ = [
    "Bernoulli",
    "CategoricalLatent",
    "DiscretizedLogistic",
    "Likelihood",
    "LogitLaplace",
    "ResNetDecoder",
    "ResNetEncoder",
    "grid_batch_bytes",
    "bits_per_dim",
    "build_likelihood",
    "GaussianLatent",
    "Latent",
    "MixtureLatent",
    "VAE",
    "VAEOutput",
    "active_units",
    "build_latent",
    "build_vae",
    "discrete_elbo",
    "exact_log_px_and_elbo",
    "importance_log_px",
    "log_importance_weights",
    "perplexity_from_usage",
    "temperature_at",
]
