"""Residual encoder/decoder for a grid of categorical codes (a DALL-E-dVAE-like image tokenizer).

The encoder maps images [B, C, H, W] through ``log2(f) + 1`` stages of residual blocks, halving the
resolution between stages (f = ``model.downsample`` in {4, 8, 16}), to logits over K classes at
every position of an h x w = (H/f) x (W/f) grid. The grid IS the existing `CategoricalLatent` with
N = h * w variables: its parameter vector [B, N * K] is the logits laid out position-major, class
last (position n = i * w + j), so Gumbel-Softmax, straight-through, the analytic / relaxed KL, the
learned prior, importance sampling and enumeration all work unchanged on it. The decoder reads a
(relaxed or one-hot) code [B, N * K], embeds it through a learned codebook [K, d] (the relaxed
one-hot times the codebook: a convex mix of code vectors, exactly the embedding for a one-hot code)
into [B, d, h, w], and mirrors the encoder up to the likelihood's [B, C * P, H, W].

Block: van den Oord / DALL-E's pre-activation bottleneck (relu-3x3-relu-3x3-relu-3x3-relu-1x1,
hidden width out/4) on a 1x1 (or identity) skip, the residual branch scaled by 1 / (blocks total)^2
so that a deep stack starts close to the identity (DALL-E's ``post_gain``).

Memory at large K. The grid's latent tensors have B * N * K entries: for DALL-E's 32 x 32 grid of
8192 classes that is 8.39 M floats = 32 MiB per image *per copy* in float32, far more than any conv
activation (the widest encoder map at 256 x 256 x 128 channels is 8.4 M floats too, but the
latent's copies add up). So the layout avoids copies where it can: the encoder's last layer is a
linear map applied channel-last, which writes the logits directly in the latent's [B, h, w, K]
order (a 1x1 conv would write [B, K, h, w] and need a permuted copy); the decoder's codebook
product reads the code as a view. What remains is the latent's own arithmetic (log-softmax, the
Gumbel noise, the softmax sample, the KL's products), whose tensors autograd keeps for the
backward pass: `GRID_COPIES` counts them (measured by tests/test_resnet.py with autograd's
saved-tensor hooks) and `grid_batch_bytes` turns that into a figure per batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

DOWNSAMPLE_FACTORS = (4, 8, 16)
# The std of a position's code logits across the K codes after `ResNetEncoder.init_codes`: well above
# the Gumbel noise's 1.28 at tau = 1, so the sampled code is the nearest centre most of the time.
CODE_INIT_SPREAD = 5.0
# Tensors of B * N * K floats alive for the backward pass of one training step: the encoder's logits
# plus what autograd keeps of CategoricalLatent.sample_and_kl and the codebook product, by (sample,
# KL) mode; measured with a saved-tensor hook over unique storages (tests/test_resnet.py checks them).
# The backward pass briefly adds about two more (the gradients of the largest of them).
GRID_COPIES = {("soft", "analytic"): 7, ("hard", "analytic"): 8, ("soft", "relaxed"): 9, ("hard", "relaxed"): 10}


def grid_batch_bytes(batch: int, grid: tuple[int, int], categories: int, *, hard: bool = False,
                     kl: str = "analytic", dtype_bytes: int = 4) -> int:
    """Bytes the grid latent's B x N x K tensors cost in one training step (forward activations kept
    for backward), excluding the conv stacks. DALL-E's setup, 32 x 32 x 8192 in float32:
    8.39 M entries = 32 MiB per image per copy, x `GRID_COPIES` (7 for a soft sample with the
    analytic KL) = 224 MiB per image, so DALL-E's per-GPU batch of 8 (512 over 64 GPUs) keeps
    1.75 GiB in the latent alone, and a batch of 64 14 GiB (bf16 autocast does not shrink it: the
    softmax and the KL run in float32)."""
    mode = ("hard" if hard else "soft", kl)
    copies = GRID_COPIES.get(mode, max(GRID_COPIES.values()))
    return batch * grid[0] * grid[1] * categories * dtype_bytes * copies


def grid_shape(image_shape: tuple[int, int, int], downsample: int) -> tuple[int, int]:
    """(h, w) = (H / f, W / f) of the code grid; H and W must be multiples of f."""
    _, height, width = image_shape
    if height % downsample or width % downsample:
        raise ValueError(f"image size {height}x{width} is not a multiple of model.downsample={downsample}")
    return height // downsample, width // downsample


def params_to_grid(params: Tensor, grid: tuple[int, int]) -> Tensor:
    """Latent parameters (or a code) [B, N * K] -> [B, K, h, w] (a view, channel-last strides)."""
    h, w = grid
    return params.reshape(params.shape[0], h, w, -1).permute(0, 3, 1, 2)


def grid_to_params(logits: Tensor) -> Tensor:
    """[B, K, h, w] logits -> the latent's [B, N * K] layout (position-major, class last)."""
    return logits.permute(0, 2, 3, 1).reshape(logits.shape[0], -1)


def code_centres(features: Tensor, categories: int, seed: int, method: str = "data") -> Tensor:
    """K centres [K, D] for a code head from features [M, D] (`ResNetEncoder.init_codes`): ``data``
    draws K distinct rows; ``kmeans`` fits scikit-learn's MiniBatchKMeans (random_state = seed)."""
    if len(features) < categories:
        raise ValueError(f"code init from data needs at least K = {categories} grid positions, got {len(features)}")
    if method == "data":
        return features[torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:categories]]
    if method == "kmeans":
        from sklearn.cluster import MiniBatchKMeans

        kmeans = MiniBatchKMeans(n_clusters=categories, random_state=seed, n_init="auto")
        kmeans.fit(features.double().numpy())
        return torch.as_tensor(kmeans.cluster_centers_, dtype=features.dtype)
    raise ValueError(f"unknown code init method {method!r} (data or kmeans)")


class ResBlock(nn.Module):
    """x -> skip(x) + gain * (relu-3x3-relu-3x3-relu-3x3-relu-1x1)(x); skip is a 1x1 conv when widths differ."""

    def __init__(self, fan_in: int, fan_out: int, gain: float) -> None:
        super().__init__()
        hidden = max(1, fan_out // 4)
        self.skip = nn.Identity() if fan_in == fan_out else nn.Conv2d(fan_in, fan_out, 1)
        self.residual = nn.Sequential(
            nn.ReLU(), nn.Conv2d(fan_in, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, fan_out, 1),
        )
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.gain * self.residual(x)


def _stage(fan_in: int, fan_out: int, blocks: int, gain: float) -> list[nn.Module]:
    return [ResBlock(fan_in if i == 0 else fan_out, fan_out, gain) for i in range(blocks)]


def _check(widths: list[int], downsample: int, blocks: int) -> int:
    """The number of halvings log2(f); widths must name log2(f) + 1 stages."""
    if downsample not in DOWNSAMPLE_FACTORS:
        raise ValueError(f"model.downsample must be one of {DOWNSAMPLE_FACTORS}, got {downsample}")
    halvings = int(math.log2(downsample))
    if len(widths) != halvings + 1:
        raise ValueError(f"arch 'resnet' with model.downsample={downsample} needs {halvings + 1} stage widths in "
                         f"model.channels (one per resolution), got {widths}")
    if blocks < 1:
        raise ValueError(f"model.blocks must be >= 1, got {blocks}")
    return halvings


class ResNetEncoder(nn.Module):
    """[B, C, H, W] -> stem 3x3 conv -> stages (blocks, then a 2x max-pool except after the last) ->
    relu -> linear to K per position, written channel-last -> params [B, h * w * K]."""

    def __init__(self, image_shape: tuple[int, int, int], widths: list[int], categories: int, *,
                 downsample: int = 4, blocks: int = 2) -> None:
        super().__init__()
        halvings = _check(widths, downsample, blocks)
        self.grid = grid_shape(image_shape, downsample)
        gain = 1.0 / (len(widths) * blocks) ** 2
        layers: list[nn.Module] = [nn.Conv2d(image_shape[0], widths[0], 3, padding=1)]
        previous = widths[0]
        for i, width in enumerate(widths):
            layers += _stage(previous, width, blocks, gain)
            if i < halvings:
                layers.append(nn.MaxPool2d(2))
            previous = width
        layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.to_logits = nn.Linear(previous, categories)  # = a 1x1 conv, applied to [B, h, w, c]

    @torch.no_grad()
    def init_codes(self, inputs: Tensor, seed: int, *, method: str = "data",
                   spread: float = CODE_INIT_SPREAD) -> Tensor:
        """Data-dependent initialisation of the code head, like a VQ codebook's data init: K centres c_k
        in feature space, from the features of ``inputs`` [B, C, H, W] (prepared images), and the head
        set to the distance logits -||f - c_k||^2 / T (= 2 c_k.f / T - ||c_k||^2 / T up to a constant
        per position: exactly a linear layer). T makes the logits of a position spread by ``spread``
        (their std across the K codes, averaged over positions). ``method``: ``data``, K distinct
        grid positions' features; ``kmeans``, the K centres of scikit-learn's MiniBatchKMeans on all
        of them (every centre is the nearest of some of the features: every code in use, and each
        code's cell a cluster of similar ones). Deterministic in (inputs, seed). Returns the centres.

        Why: at random initialisation the head's logits spread by ~0.1 across codes while Gumbel noise
        at tau = 1 has std 1.28, and the encoder's features share one direction (ReLU outputs), so the
        sampled code carries no information about the image and the few codes that happen to align
        with that direction win everywhere. Nearest-centre logits start every code in use and
        informative well above the noise."""
        features = self.features(inputs).permute(0, 2, 3, 1).reshape(-1, self.to_logits.in_features)
        centres = code_centres(features, self.to_logits.out_features, seed, method)
        sample = features[: min(len(features), 2048)]
        temperature = torch.cdist(sample, centres).pow(2).std(dim=-1).mean().clamp_min(1e-8) / spread
        self.to_logits.weight.copy_(2.0 * centres / temperature)
        self.to_logits.bias.copy_(-centres.pow(2).sum(dim=-1) / temperature)
        return centres

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)  # [B, c, h, w]
        # Linear over the channel-last view writes [B, h, w, K] contiguously: the flat view below is free.
        return self.to_logits(features.permute(0, 2, 3, 1)).reshape(x.shape[0], -1)


class ResNetDecoder(nn.Module):
    """Code [B, h * w * K] -> codebook [K, d] -> [B, d, h, w] -> stages in reverse (blocks, then a 2x
    nearest upsample except after the last) -> relu -> 1x1 conv -> [B, out_channels, H, W]."""

    def __init__(self, grid: tuple[int, int], widths: list[int], categories: int, out_channels: int, *,
                 downsample: int = 4, blocks: int = 2, codebook_dim: int = 64) -> None:
        super().__init__()
        halvings = _check(widths, downsample, blocks)
        self.grid = tuple(grid)
        self.categories = categories
        # The learned embedding of the K classes; normal(0, 1) rows, like nn.Embedding's default init.
        self.codebook = nn.Parameter(torch.randn(categories, codebook_dim))
        gain = 1.0 / (len(widths) * blocks) ** 2
        layers: list[nn.Module] = []
        previous = codebook_dim
        for i, width in enumerate(reversed(widths)):
            layers += _stage(previous, width, blocks, gain)
            if i < halvings:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            previous = width
        layers += [nn.ReLU(), nn.Conv2d(previous, out_channels, 1)]
        self.body = nn.Sequential(*layers)

    def embed(self, z: Tensor) -> Tensor:
        """Code [B, h * w * K] (one-hot or relaxed) -> code vectors [B, d, h, w]; reads z as a view."""
        h, w = self.grid
        vectors = z.reshape(z.shape[0], h * w, self.categories) @ self.codebook  # [B, N, d]
        # contiguous: a channel-last input would make every conv below (and its weight gradients)
        # channel-last, which DDP's gradient buckets then copy (its "grad strides" warning); d << K.
        return vectors.reshape(z.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.embed(z))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Token grids [B, h, w] (class indices, e.g. `pipeline encode`'s uint16 tokens) -> decoder
        output, via an embedding lookup: no one-hot [B, N, K] is materialised."""
        vectors = F.embedding(indices.long(), self.codebook)  # [B, h, w, d]
        return self.body(vectors.permute(0, 3, 1, 2).contiguous())


def code_indices(params: Tensor, grid: tuple[int, int], categories: int) -> Tensor:
    """The posterior mode as a token grid [B, h, w] (argmax class per position)."""
    h, w = grid
    return params.reshape(params.shape[0], h, w, categories).argmax(dim=-1)
