"""Observation models p(x|z) behind one small interface, beside the latent families.

The data layer hands the model uint8 images [B, C, H, W]; a likelihood decides what the encoder
sees and what the decoder is scored against (`prepare`), how many decoder outputs it needs per
channel, and scores decoder outputs (`log_prob`, summed over C, H, W). So binarization lives
here, in the Bernoulli likelihood, not in the data layer.

- `Bernoulli`: binary pixels. ``binarize``: ``dynamic`` (x ~ Bernoulli(pixel / 255) each time a
  sample is seen, drawn from torch's default generator, which the training loop seeds per
  (seed, step, partition)), ``threshold`` (pixel > 127), ``none`` (grey levels as soft targets).
- `DiscretizedLogistic`: a true discrete likelihood over the 256 levels of each 8-bit channel
  (Salimans et al. 2017, PixelCNN++ without the mixture): per pixel and channel a logistic with
  mean mu and scale s, integrated over the level's bin of width 2/255 on [-1, 1], the edge
  levels taking the tails. Its -log-likelihood in bits per dimension is comparable across papers.
- `CausalLogistic`: the discretized logistic with each pixel conditioned on the pixels above and to
  its left (a small PixelCNN head, van den Oord et al. 2016) and each channel on the pixel's earlier
  channels (PixelCNN++'s linear coupling), beside the decoder's features. The code carries what the
  neighbourhood cannot predict; neighbouring pixels of a photograph share most of their bits.
- `LogitLaplace`: DALL-E's dVAE likelihood, a continuous density on pixels mapped into [0.1, 0.9].
- `Gaussian`: a normal density of fixed std around the decoder's mean, on pixels in [0, 1]: its
  -log p is the squared error / (2 std^2) plus a constant, so training minimises the MSE that PSNR
  reports (pythae's and taming's "mse" reconstruction loss, as a density).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor: a bin of 2/255 still has a finite density below it
_HALF_BIN = 1.0 / 255.0  # half the width of one level's bin on [-1, 1]


def _as_unit(x: Tensor) -> Tensor:
    """uint8 levels -> float in [0, 1]; a float tensor is taken to be in [0, 1] already."""
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


class Likelihood(nn.Module):
    """p(x|z) for images: decoder outputs [..., C * params_per_channel, H, W] score targets [..., C, H, W]."""

    params_per_channel: int = 1
    eight_bit: bool = False  # a discrete likelihood over 256 levels: -log p in bits/dim is meaningful

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(encoder input, target) for a batch of images (uint8 levels, or floats in [0, 1])."""
        raise NotImplementedError

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        """log p(target | decoder output), summed over C, H, W; leading dims broadcast. -> [...]"""
        raise NotImplementedError

    def mean(self, out: Tensor) -> Tensor:
        """The reconstruction's expected pixel values in [0, 1], [..., C, H, W]."""
        raise NotImplementedError

    def pairwise_log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        """log p(target_b | out_m) for every pair: out [M, ...], target [B, ...] -> [B, M] (exact enumeration)."""
        return torch.stack([self.log_prob(out, t.unsqueeze(0)) for t in target])

    # The decoder output that reproduces a prepared input v as the reconstruction, to first order:
    # location = slope * v + intercept, and the initial value of a learned scale (None: no scale
    # channels). A decoder can start as "the code's vector is the pixels" with it (models/patch.py).
    readout: tuple[float, float, float | None] = (1.0, 0.0, None)


class Bernoulli(Likelihood):
    params_per_channel = 1
    readout = (4.0, -2.0, None)  # logit(v) ~ 4 (v - 1/2) around the middle

    def __init__(self, binarize: str = "dynamic") -> None:
        super().__init__()
        if binarize not in ("dynamic", "threshold", "none"):
            raise ValueError(f"binarize must be dynamic, threshold or none, got {binarize!r}")
        self.binarize = binarize

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        unit = _as_unit(x)
        if self.binarize == "dynamic":
            unit = torch.bernoulli(unit)
        elif self.binarize == "threshold":
            unit = (unit > 0.5).float()
        return unit, unit

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        out, target = torch.broadcast_tensors(out, target)
        return -F.binary_cross_entropy_with_logits(out, target, reduction="none").flatten(-3).sum(-1)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)

    def pairwise_log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        # sum_d x log s(l) + (1 - x) log s(-l), for every (input, code) pair as two matmuls.
        logits, x = out.flatten(1), target.flatten(1)
        return x @ F.logsigmoid(logits).T + (1 - x) @ F.logsigmoid(-logits).T


class DiscretizedLogistic(Likelihood):
    params_per_channel = 2  # mean, log-scale
    eight_bit = True
    readout = (1.0, 0.0, -3.0)  # mu = v on [-1, 1]; scale e^-3 ~ 6 levels

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scaled = _as_unit(x).mul(2.0).sub(1.0)  # level k -> k / 127.5 - 1, the bin centres on [-1, 1]
        return scaled, scaled

    def split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        channels = out.shape[-3] // 2
        return out[..., :channels, :, :], out[..., channels:, :, :].clamp(min=_LOG_SCALE_MIN)

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        mu, log_scale = self.split(out)
        centered = target - mu
        inv_scale = torch.exp(-log_scale)
        plus = inv_scale * (centered + _HALF_BIN)
        minus = inv_scale * (centered - _HALF_BIN)
        log_cdf_plus = F.logsigmoid(plus)  # the lowest level takes the whole left tail
        log_survival_minus = F.logsigmoid(-minus)  # the highest level takes the whole right tail
        delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        middle = inv_scale * centered
        # Far in a tail the difference of two sigmoids underflows: use the density at the centre x bin width.
        log_density = middle - log_scale - 2.0 * F.softplus(middle) + math.log(2 * _HALF_BIN)
        inner = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_density)
        log_p = torch.where(target < -0.999, log_cdf_plus, torch.where(target > 0.999, log_survival_minus, inner))
        return log_p.flatten(-3).sum(-1)

    def mean(self, out: Tensor) -> Tensor:
        mu, _ = self.split(out)
        return mu.clamp(-1.0, 1.0).add(1.0).div(2.0)


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution that sees only the pixels before the centre in raster order: the rows
    above and the same row's left part; type "A" excludes the centre (the first layer, on the image),
    type "B" includes it (later layers, whose centre already holds only earlier pixels)."""

    def __init__(self, fan_in: int, fan_out: int, kernel: int, kind: str) -> None:
        super().__init__(fan_in, fan_out, kernel, padding=kernel // 2)
        mask = torch.ones(kernel, kernel)
        centre = kernel // 2
        mask[centre, centre + (kind == "B"):] = 0.0
        mask[centre + 1:] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class CausalLogistic(DiscretizedLogistic):
    """Discretized logistic whose location and scale at pixel (i, j) also depend on the pixels before
    it in raster order, and whose channel c's location on the pixel's channels before c.

    The decoder's output per channel: a location and a log-scale (the factorized model's, read out
    exactly as `DiscretizedLogistic` reads them) and ``FEATURES`` features. A masked convolution
    stack (5x5 type A, then 3x3 type B: 3 rows above and 3 pixels to the left) reads the residual
    of the earlier pixels, target minus the code's location (what the code left unexplained: a
    neighbour's residual predicts a pixel's nearly linearly); a 1x1 layer mixes it with the
    features and outputs, per channel, a correction to the location and to the log-scale, plus three
    coupling coefficients (PixelCNN++, Salimans et al. 2017, here on the residuals r = x - location):
    mu_G += a r_R, mu_B += b r_R + c r_G. The output layer starts at zero, so at initialisation this
    is the factorized logistic (a patch decoder's K-means start carries over unchanged).

    Scoring (``log_prob``) reads the target as the context (teacher forcing): one pass. ``mean``
    decodes pixel by pixel in raster order, each channel set to its location given the pixels
    decoded so far (the mode of each conditional, not the expectation of the joint): H x W passes of
    the head, each on the window of pixels it can see."""

    FEATURES = 6  # decoder features per channel beside the location and the log-scale
    params_per_channel = 2 + FEATURES
    REACH = 3  # rows above (and pixels to the left) a pixel's parameters depend on: 5 // 2 + 3 // 2

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        self.channels = int(channels)
        self.context = nn.Sequential(MaskedConv2d(self.channels, width, 5, "A"), nn.ReLU(),
                                     MaskedConv2d(width, width, 3, "B"))
        self.features = nn.Conv2d(self.channels * self.FEATURES, width, 1)
        self.out = nn.Conv2d(width, 2 * self.channels + 3, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _head(self, out: Tensor, target: Tensor) -> Tensor:
        """Corrections [..., 2C + 3, H, W] for decoder outputs [..., C * P, H, W] given the target
        [..., C, H, W] (leading dims broadcast)."""
        c = self.channels
        residual = target - out[..., :c, :, :]  # what the code left unexplained, at the earlier pixels
        context = self.context(residual.reshape(-1, *residual.shape[-3:]))
        context = context.reshape(*residual.shape[:-3], *context.shape[-3:])
        features = out[..., 2 * c:, :, :]
        features = self.features(features.reshape(-1, *features.shape[-3:])).reshape(*out.shape[:-3], -1, *out.shape[-2:])
        hidden = F.relu(context + features)
        lead = hidden.shape[:-3]
        return self.out(hidden.reshape(-1, *hidden.shape[-3:])).reshape(*lead, -1, *hidden.shape[-2:])

    def _uncoupled(self, out: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Location and log-scale given the earlier pixels only, and the coupling coefficients."""
        c = self.channels
        head = self._head(out, target)
        mu = out[..., :c, :, :] + head[..., :c, :, :]
        log_scale = (out[..., c:2 * c, :, :] + head[..., c:2 * c, :, :]).clamp(min=_LOG_SCALE_MIN)
        return mu, log_scale, torch.tanh(head[..., 2 * c:, :, :])

    def _couple(self, mu: Tensor, coupling: Tensor, x: Tensor) -> Tensor:
        """Channel c's location plus the coupling with the residuals (x - location) of the pixel's
        channels before c (RGB only): mu_G += a r_R, mu_B += b r_R + c r_G."""
        if self.channels != 3:
            return mu
        r = x - mu
        return torch.cat([mu[..., :1, :, :], mu[..., 1:2, :, :] + coupling[..., :1, :, :] * r[..., :1, :, :],
                          mu[..., 2:, :, :] + coupling[..., 1:2, :, :] * r[..., :1, :, :]
                          + coupling[..., 2:, :, :] * r[..., 1:2, :, :]], dim=-3)

    def conditional(self, out: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The location [..., C, H, W] (in [-1, 1] units) and log-scale of every pixel and channel
        given the target's earlier pixels and the pixel's earlier channels."""
        mu, log_scale, coupling = self._uncoupled(out, target)
        return self._couple(mu, coupling, target), log_scale

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        mu, log_scale = self.conditional(out, target)
        return super().log_prob(torch.cat([mu, log_scale], dim=-3), target)

    @torch.no_grad()
    def mean(self, out: Tensor) -> Tensor:
        """Raster-order decoding. Per pixel the head runs on the window of pixels it can see (REACH
        rows above, REACH columns either side), its first layer's outputs outside the image zeroed
        as the whole-image pass's padding zeroes them: the same numbers as `conditional`, at a
        window's cost."""
        c, (height, width), reach = self.channels, out.shape[-2:], self.REACH
        lead = out.shape[:-3]
        out = out.reshape(-1, *out.shape[-3:])
        features = self.features(out[:, 2 * c:])  # [B, width, H, W]: reads the code only, once
        padded = out.new_zeros(out.shape[0], c, height + reach, width + 2 * reach)  # decoded pixels, zero margin
        located = torch.zeros_like(padded)  # the code's locations, the same margin
        located[:, :, reach:, reach:reach + width] = out[:, :c]
        inside = torch.zeros(1, 1, height + reach, width + 2 * reach, dtype=out.dtype, device=out.device)
        inside[..., reach:, reach:reach + width] = 1.0
        first, second = self.context[0], self.context[2]
        for i in range(height):
            for j in range(width):
                rows, cols = slice(i, i + reach + 1), slice(j, j + 2 * reach + 1)  # in padded coordinates
                hidden = F.relu(first(padded[:, :, rows, cols] - located[:, :, rows, cols])) * inside[:, :, rows, cols]
                hidden = second(hidden)[:, :, reach, reach]
                head = F.linear(F.relu(hidden + features[:, :, i, j]), self.out.weight[:, :, 0, 0], self.out.bias)
                mu = out[:, :c, i, j] + head[:, :c]
                coupling = torch.tanh(head[:, 2 * c:])
                pixel = padded[:, :, i + reach, j + reach]
                for channel in range(c):  # each channel's location reads the channels set before it
                    coupled = self._couple(mu[:, :, None, None], coupling[:, :, None, None], pixel[:, :, None, None])
                    pixel[:, channel] = coupled[:, channel, 0, 0].clamp(-1.0, 1.0)
        x = padded[:, :, reach:, reach:reach + width]
        return x.add(1.0).div(2.0).reshape(*lead, c, height, width)


class LogitLaplace(Likelihood):
    """DALL-E's logit-Laplace (Ramesh et al. 2021, sec. A.3): pixels x in [0, 1] are mapped to
    y = (1 - 2 eps) x + eps in [eps, 1 - eps] (eps = 0.1) so that the density, which vanishes or
    blows up at 0 and 1, is never evaluated there; per pixel and channel, with location mu (in
    logit space) and scale b = exp(log_b), y has the density on (0, 1)

        f(y) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)),

    a Laplace on logit(y) pushed through the sigmoid. log_prob scores the *pixels*: it adds the
    change of variables log(1 - 2 eps) per dimension, so it is the log-density of x on [0, 1]
    (which integrates to P(eps < y < 1 - eps) <= 1: the mass f puts outside the mapped range is lost).
    A continuous density on 8-bit data: -log p is not a code length, so no bits/dim (eight_bit False).
    """

    params_per_channel = 2  # mu (logit space), log b
    eps = 0.1
    readout = (4.0, -2.0, -1.0)  # logit(v) ~ 4 (v - 1/2) around the middle

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mapped = _as_unit(x).mul(1.0 - 2.0 * self.eps).add(self.eps)  # DALL-E's map_pixels; the encoder sees it too
        return mapped, mapped

    def split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        channels = out.shape[-3] // 2
        return out[..., :channels, :, :], out[..., channels:, :, :].clamp(min=_LOG_SCALE_MIN)

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        mu, log_b = self.split(out)
        log_y, log_1my = torch.log(target), torch.log1p(-target)
        log_f = -(log_y - log_1my - mu).abs() * torch.exp(-log_b) - log_b - math.log(2.0) - log_y - log_1my
        return (log_f + math.log(1.0 - 2.0 * self.eps)).flatten(-3).sum(-1)

    def mean(self, out: Tensor) -> Tensor:
        # DALL-E's reconstruction: unmap_pixels(sigmoid(mu)), the median of y mapped back (not E[x]).
        mu, _ = self.split(out)
        return torch.sigmoid(mu).sub(self.eps).div(1.0 - 2.0 * self.eps).clamp(0.0, 1.0)


class Gaussian(Likelihood):
    """x ~ Normal(mu, std^2) per pixel and channel, pixels in [0, 1], std fixed (``model.gaussian_std``):
    -log p = (x - mu)^2 / (2 std^2) + log(std sqrt(2 pi)), summed over C, H, W. The std sets the
    weight of the squared error against the KL: the ELBO of pixels blurred by that much noise.
    A continuous density on 8-bit data: -log p is not a code length, so no bits/dim."""

    params_per_channel = 1

    def __init__(self, std: float = 0.05) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"model.gaussian_std must be > 0, got {std}")
        self.std = float(std)

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        unit = _as_unit(x)
        return unit, unit

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor:
        squared = (target - out).square().flatten(-3).sum(-1)
        dims = math.prod(target.shape[-3:])
        return -squared / (2.0 * self.std**2) - dims * math.log(self.std * math.sqrt(2.0 * math.pi))

    def mean(self, out: Tensor) -> Tensor:
        return out.clamp(0.0, 1.0)


def build_likelihood(kind: str, binarize: str = "dynamic", *, gaussian_std: float = 0.05,
                     channels: int = 1) -> Likelihood:
    if kind == "bernoulli":
        return Bernoulli(binarize)
    if kind == "logistic":
        return DiscretizedLogistic()
    if kind == "causal-logistic":
        return CausalLogistic(channels)
    if kind == "logit-laplace":
        return LogitLaplace()
    if kind == "gaussian":
        return Gaussian(gaussian_std)
    raise ValueError(f"unknown model.likelihood {kind!r} (bernoulli, logistic, causal-logistic, logit-laplace "
                     "or gaussian)")


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """-log p(x) in nats per image -> bits per dimension (C * H * W dims)."""
    return nll_nats / (dims * math.log(2.0))
