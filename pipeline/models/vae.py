"""VAE over images [B, C, H, W]: encoder -> a pluggable latent family -> decoder -> a pluggable likelihood.

The model takes the loader's uint8 images (floats in [0, 1] work too); its likelihood turns
them into encoder inputs and targets (binarization for Bernoulli, levels for the logistic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models.code_restart import Split, apply_splits, plan_splits
from pipeline.models.latents import Latent, build_latent, expected_over_codes, pick_code
from pipeline.models.likelihoods import Likelihood, build_likelihood
from pipeline.models.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from pipeline.models.patch import PatchDecoder, PatchEncoder
from pipeline.models.resnet import CODE_INIT_SPREAD, ResNetDecoder, ResNetEncoder, grid_shape


@dataclass
class VAEOutput:
    """One forward pass. Scalars are batch means; the per-sample tensors let callers sum exactly."""

    loss: Tensor  # recon + kl (the negative ELBO), mean over batch
    recon: Tensor  # -log p(x|z) summed over C, H, W, mean over batch
    kl: Tensor  # KL summed over latent variables, mean over batch
    kl_per_variable: Tensor  # [num_kl_terms], mean over batch
    decoded: Tensor  # the likelihood's parameters [B, C * params_per_channel, H, W]
    params: Tensor  # latent posterior params [B, param_size], still in the graph
    z: Tensor  # sampled code [B, code_size]
    recon_per_sample: Tensor  # [B]
    kl_per_sample: Tensor  # [B]
    # N * (mean per-position entropy - entropy of the batch's pooled posterior), nats per image; computed
    # only for a model with entropy_weight > 0 (a grid), else 0. See `VAE.objective`.
    code_entropy: Tensor | float = 0.0


class VAE(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], hidden: list[int], latent: Latent, *,
                 likelihood: Likelihood | None = None, arch: str = "mlp", channels: list[int] | None = None,
                 activation: str = "relu", downsample: int = 4, blocks: int = 2, codebook_dim: int = 64,
                 entropy_weight: float = 0.0) -> None:
        super().__init__()
        self.entropy_weight = float(entropy_weight)
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1 or not hidden:
            raise ValueError(f"image_shape must be (C, H, W) with positive sides and hidden non-empty, got {image_shape}")
        self.image_shape = image_shape
        self.latent = latent
        self.likelihood = likelihood or build_likelihood("bernoulli", "none")
        self.arch = arch
        c, h, w = image_shape
        out_shape = (c * self.likelihood.params_per_channel, h, w)
        if arch == "mlp":
            self.encoder = MLPEncoder([c * h * w, *hidden, latent.param_size], activation)
            self.decoder = MLPDecoder([latent.decoder_size, *reversed(hidden)], out_shape, activation)
        elif arch == "conv":
            channels = list(channels or [32, 64])
            self.encoder = ConvEncoder(image_shape, channels, hidden, latent.param_size, activation)
            self.decoder = ConvDecoder(latent.decoder_size, hidden, channels, (h, w), activation, out_shape[0])
        elif arch in ("resnet", "patch"):  # a grid latent: one categorical variable per position
            grid, k = grid_shape(image_shape, downsample), getattr(latent, "categories", None)
            if getattr(latent, "variables", None) != grid[0] * grid[1] or latent.param_size != grid[0] * grid[1] * k:
                raise ValueError(f"arch {arch} needs a categorical latent with {grid[0]}x{grid[1]} variables")
            if arch == "resnet":  # models/resnet.py
                widths = list(channels or [32, 64, 128])
                self.encoder = ResNetEncoder(image_shape, widths, k, downsample=downsample, blocks=blocks)
                self.decoder = ResNetDecoder(grid, widths, k, out_shape[0], downsample=downsample, blocks=blocks,
                                             codebook_dim=codebook_dim)
            else:  # models/patch.py
                width = (channels or [128])[0]
                self.encoder = PatchEncoder(image_shape, width, k, downsample=downsample, blocks=blocks)
                self.decoder = PatchDecoder(grid, width, k, out_shape[0], channels=c, downsample=downsample,
                                            blocks=blocks, codebook_dim=codebook_dim,
                                            readout=self.likelihood.readout)
        else:
            raise ValueError(f"unsupported model.arch {arch!r} (mlp, conv, resnet or patch)")

    @property
    def is_grid(self) -> bool:
        """A grid of categorical codes (arch resnet or patch): an image tokenizer."""
        return isinstance(self.encoder, ResNetEncoder)

    @property
    def dims(self) -> int:
        """C * H * W: the dimensions of one image (for bits/dim)."""
        return math.prod(self.image_shape)

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(encoder input, target) [B, C, H, W] of a batch (uint8 images, or floats in [0, 1] of any
        layout with C*H*W values per sample); draws dynamic binarization from torch's default RNG."""
        return self.likelihood.prepare(x.reshape(x.shape[0], *self.image_shape))

    def encode(self, inputs: Tensor) -> Tensor:
        """Posterior parameters [B, param_size] for prepared inputs [B, C, H, W]."""
        return self.encoder(inputs)

    def decode(self, z: Tensor) -> Tensor:
        """The likelihood's parameters [N, C * P, H, W] for codes z [N, code_size]."""
        return self.decoder(self.latent.decoder_input(z))

    def forward(self, x: Tensor, temperature: float = 1.0, straight_through: bool | None = None) -> VAEOutput:
        """The -ELBO of a batch on sampled codes, drawn at ``temperature`` with the gradient estimator
        ``straight_through`` (one-hot forward, relaxed gradient; else the Gumbel-Softmax sample; None: the
        latent's own, the config's `model.latent.estimator`): in training, the schedules' values at the
        step (train/schedules.py)."""
        inputs, target = self.prepare(x)
        params = self.encode(inputs)
        # Hook for latents that sum a discrete variable out exactly (the mixture's y, models/mixture.py):
        # S codes per input with weights; S = 1 and no weights for every other latent (same result as
        # one sample_and_kl code). The reconstruction term is the weighted sum over the S codes.
        codes, weights, kl_terms = self.latent.sample_codes(params, temperature, straight_through)
        decoded = self.decode(codes.flatten(0, 1)).unflatten(0, codes.shape[:2])  # [S, B, ...]
        recon_per_sample = expected_over_codes(-self.likelihood.log_prob(decoded, target), weights)
        z, decoded = pick_code(codes, weights), pick_code(decoded, weights)  # the most probable code's
        kl_per_sample = kl_terms.sum(dim=-1)
        recon = recon_per_sample.mean()
        kl = kl_per_sample.mean()
        code_entropy: Tensor | float = 0.0
        if self.entropy_weight:
            per_position, pooled = self.latent.code_entropy(params)
            code_entropy = self.latent.variables * (per_position - pooled)
        return VAEOutput(
            loss=recon + kl,
            recon=recon,
            kl=kl,
            kl_per_variable=kl_terms.mean(dim=0),
            decoded=decoded,
            params=params,
            z=z,
            recon_per_sample=recon_per_sample,
            kl_per_sample=kl_per_sample,
            code_entropy=code_entropy,
        )

    def objective(self, out: "VAEOutput", kl_weight: float = 1.0, kl_y_weight: float = 1.0) -> Tensor:
        """What training minimises: recon + beta * KL (the -ELBO at beta = 1), a mixture's KL of y
        (term 0) weighted by beta_y instead when annealed, plus ``entropy_weight`` times the code
        entropy term of a grid. ``out`` needs recon, kl, kl_per_variable and code_entropy (a
        `VAEOutput`, or the training loop's mean over partitions).

        The entropy term: the uniform prior's KL, log K - H(q) per position, rewards *uncertain*
        positions and is blind to which codes the batch uses, so alone it lets a grid collapse onto a
        few codes. The term N * (H(q) - H(pooled q)) rewards confident positions that spread over the
        whole codebook across a batch (MAGVIT-v2's entropy penalty)."""
        objective = out.recon + kl_weight * (out.kl + (kl_y_weight - 1.0) * out.kl_per_variable[0])
        if self.entropy_weight:
            objective = objective + self.entropy_weight * out.code_entropy
        return objective

    @torch.no_grad()
    def init_codes_from_data(self, x: Tensor, seed: int, method: str = "data",
                             spread: float = CODE_INIT_SPREAD) -> None:
        """A grid model's code head initialised from images x [B, C, H, W] (`ResNetEncoder.init_codes`,
        ``method`` data or kmeans), and for arch patch with kmeans the decoder's codebook too
        (`PatchDecoder.init_codebook`); deterministic in (x, seed), so every rank computes the same."""
        if not self.is_grid:
            raise ValueError(f"model.code_init: {method} needs a grid (arch resnet or patch), got arch {self.arch}")
        inputs, _ = self.prepare(x)
        centres = self.encoder.init_codes(inputs, seed, method=method, spread=spread)
        if method == "kmeans" and isinstance(self.decoder, PatchDecoder):
            self.decoder.init_codebook(centres[:, : self.decoder.cell_size])

    @torch.no_grad()
    def split_dead_codes(self, x: Tensor, generator: torch.Generator, *, copies: tuple["VAE", ...] = (),
                         chunk: int = 256) -> list[Split]:
        """Every code that no position of the images x [B, C, H, W] picks (argmax) takes over part of a
        busy code's positions (models/code_restart.py), in this model and in ``copies`` (the weight
        average) alike. Deterministic in (weights, x, generator). Returns the splits made (the caller
        copies the optimizer's moments of the edited rows)."""
        if not self.is_grid:
            raise ValueError(f"model.restart_dead_codes needs a grid (arch resnet or patch), got arch {self.arch}")
        device = self.encoder.to_logits.weight.device
        features = torch.cat([self.encoder.features(self.prepare(part.to(device))[0]).permute(0, 2, 3, 1).flatten(0, 2)
                              for part in x.split(chunk)])
        splits = plan_splits(features, self.encoder.to_logits, generator)
        for model in (self, *copies):
            apply_splits(model.encoder.to_logits, model.decoder.codebook, splits)
        return splits

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Expected pixel values in [0, 1], [n, C, H, W], decoded from prior samples."""
        z = self.latent.sample_prior(n, generator=generator)
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Expected pixel values in [0, 1], [B, C, H, W], decoded from the posterior mode (categorical)
        or mean (gaussian). Inputs as for `forward` (dynamic binarization draws from torch's RNG)."""
        inputs, _ = self.prepare(x)
        return self.likelihood.mean(self.decode(self.latent.mode(self.encode(inputs))))


def build_vae(cfg: ModelConfig, input_dim: int | None = None, *, image_shape: tuple[int, ...] | None = None,
              binarize: str = "none") -> VAE:
    """The VAE a config describes, for images of ``image_shape`` (C, H, W), or (H, W) for grey ones.
    ``input_dim`` alone (flat vectors) means one row of D pixels; ``arch: conv`` then assumes a
    square grey image (28x28 for 784, 8x8 for 64). ``binarize`` (a run's `model.binarize`) goes to a
    Bernoulli likelihood."""
    if image_shape is None:
        if input_dim is None:
            raise ValueError("build_vae needs image_shape or input_dim")
        side = math.isqrt(input_dim)
        if cfg.arch == "conv":
            if side * side != input_dim:
                raise ValueError(f"arch 'conv' needs image_shape: {input_dim} pixels is not a square image")
            image_shape = (1, side, side)
        else:
            image_shape = (1, 1, input_dim)
    if len(image_shape) == 2:
        image_shape = (1, *image_shape)
    latent_cfg = cfg.latent
    if cfg.is_grid:  # the grid: N = (H/f) * (W/f) variables, whatever latent.variables says
        gh, gw = grid_shape(tuple(image_shape), cfg.downsample)
        latent_cfg = cfg.latent.model_copy(update={"variables": gh * gw})
    return VAE(tuple(image_shape), list(cfg.hidden), build_latent(latent_cfg),
               likelihood=build_likelihood(cfg.likelihood, binarize, gaussian_std=cfg.gaussian_std,
                                                  channels=image_shape[0]), arch=cfg.arch,
               channels=list(cfg.channels), activation=cfg.activation, downsample=cfg.downsample, blocks=cfg.blocks,
               codebook_dim=cfg.codebook_dim, entropy_weight=cfg.entropy_weight)
