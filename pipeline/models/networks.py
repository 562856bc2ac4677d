"""Encoder/decoder networks: the papers' MLP and a small conv net, for C x H x W images.

Encoders read images [B, C, H, W] and return latent parameters [B, out_size]; decoders read
codes [B, in_size] and return the likelihood's outputs [B, C_out, H, W] (C_out = C times the
likelihood's parameters per channel). The MLP flattens inside the network.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _linear_layers(widths: list[int], activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return layers


def mlp(widths: list[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers through ``widths`` with the activation between them (none after the last)."""
    return nn.Sequential(*_linear_layers(widths, activation))


class MLPEncoder(nn.Sequential):
    """Images [B, C, H, W] (or already flat [B, D]) -> flatten -> the MLP. A Sequential subclass,
    so its parameters keep the names of the flat MLP earlier runs were trained with."""

    def __init__(self, widths: list[int], activation: str = "relu") -> None:
        super().__init__(*_linear_layers(widths, activation))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(1))


class MLPDecoder(nn.Sequential):
    """Codes [N, in] -> the MLP -> [N, *out_shape] (out_shape = (C_out, H, W))."""

    def __init__(self, widths: list[int], out_shape: tuple[int, int, int], activation: str = "relu") -> None:
        super().__init__(*_linear_layers([*widths, math.prod(out_shape)], activation))
        self.out_shape = tuple(out_shape)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z).reshape(z.shape[0], *self.out_shape)


def _halvings(size: int, times: int) -> list[int]:
    """Spatial sizes after each 3x3 stride-2 padding-1 conv: ceil(s / 2) each time."""
    sizes = [size]
    for _ in range(times):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


class ConvEncoder(nn.Module):
    """[B, C, H, W] -> stride-2 3x3 convs (ReLU) -> flatten -> MLP through ``hidden`` -> [B, out_size]."""

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], hidden: list[int], out_size: int,
                 activation: str = "relu") -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)  # C, H, W
        layers: list[nn.Module] = []
        previous = self.image_shape[0]
        for c in channels:
            layers += [nn.Conv2d(previous, c, kernel_size=3, stride=2, padding=1), ACTIVATIONS[activation]()]
            previous = c
        self.convs = nn.Sequential(*layers)
        h, w = (_halvings(s, len(channels))[-1] for s in self.image_shape[1:])
        self.head = mlp([previous * h * w, *hidden, out_size], activation)

    def forward(self, x: Tensor) -> Tensor:
        images = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.convs(images).flatten(1))


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: MLP -> [c, h, w] -> stride-2 4x4 transposed convs -> crop to H x W ->
    [B, out_channels, H, W]."""

    def __init__(self, in_size: int, hidden: list[int], channels: list[int], image_shape: tuple[int, int],
                 activation: str = "relu", out_channels: int = 1) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)  # H, W
        self.start = (channels[-1], *(_halvings(s, len(channels))[-1] for s in self.image_shape))
        self.head = nn.Sequential(mlp([in_size, *reversed(hidden), math.prod(self.start)], activation),
                                  ACTIVATIONS[activation]())
        layers: list[nn.Module] = []
        outs = [*reversed(channels[:-1]), out_channels]
        previous = channels[-1]
        for i, c in enumerate(outs):
            layers.append(nn.ConvTranspose2d(previous, c, kernel_size=4, stride=2, padding=1))
            if i < len(outs) - 1:
                layers.append(ACTIVATIONS[activation]())
            previous = c
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        maps = self.deconvs(self.head(z).reshape(z.shape[0], *self.start))
        h, w = self.image_shape
        return maps[:, :, :h, :w]  # each doubling may overshoot odd sizes: crop
