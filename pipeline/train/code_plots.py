"""Code-use pictures of a categorical latent, from the all-reduced validation statistics.

`evaluate_split(..., stats=stats)` (train/validate.py) fills ``stats`` with the exact sums over the
whole split on every rank; rank 0 turns them into PNG-ready PIL images here and logs them per
epoch (e.g. ``images/code_use/kl_heatmap_step<step>.png``):

- `kl_heatmap`: the mean KL of each grid position [h, w] (a grid latent), where the code spends
  its bits (DALL-E's dVAE: high on edges/texture, low on flat background);
- `usage_histogram`: how often each of the K classes is some position's argmax, classes sorted by
  use (a rank-frequency plot, log counts), with the dead (never used) classes marked; at K = 8192
  the bars are binned to the picture's width so every class is counted.

Pure numpy + Pillow (no matplotlib): the pictures are made inside the training worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_BACKGROUND = (255, 255, 255)
_INK = (40, 40, 40)
_BAR = (52, 101, 164)
_DEAD = (204, 0, 0)


def _viridis_like(values: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> [..., 3] uint8 along a dark-blue -> green -> yellow ramp (perceptually ordered)."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
    position = np.clip(values, 0.0, 1.0) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).round().astype(np.uint8)


def kl_heatmap(kl_per_variable: np.ndarray, grid: tuple[int, int], *, cell: int = 0) -> Image.Image:
    """Mean KL (nats) of each grid position as a colour map, with a legend line giving its range.
    ``kl_per_variable`` [h * w] (row-major, the latent's variable order), ``cell``: pixels per
    position (default: picture about 256 pixels wide)."""
    h, w = grid
    values = np.asarray(kl_per_variable, dtype=np.float64).reshape(h, w)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    cell = cell or max(1, 256 // max(h, w))
    pixels = np.repeat(np.repeat(_viridis_like(scaled), cell, axis=0), cell, axis=1)
    legend = 14
    canvas = Image.new("RGB", (max(w * cell, 160), h * cell + legend), _BACKGROUND)
    canvas.paste(Image.fromarray(pixels, "RGB"), (0, legend))
    ImageDraw.Draw(canvas).text((2, 1), f"KL/position {low:.3g}..{high:.3g} nats", fill=_INK)
    return canvas


def usage_histogram(code_counts: np.ndarray, *, width: int = 512, height: int = 200) -> Image.Image:
    """Rank-frequency plot of the K classes' argmax counts (sorted, most used left; bar height
    log(1 + count)), classes binned to at most ``width`` bars (the largest count of a bin), the
    dead classes (count 0) as a red strip at the right end; the title gives used/K."""
    counts = np.sort(np.asarray(code_counts, dtype=np.float64))[::-1]
    k = len(counts)
    used = int((counts > 0).sum())
    bars = min(k, width)
    edges = np.linspace(0, k, bars + 1).round().astype(int)
    binned = np.array([counts[a:b].max() if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])])
    heights = np.log1p(binned)
    top = heights.max() if heights.max() > 0 else 1.0
    title, axis = 14, 2
    canvas = Image.new("RGB", (width, height + title + axis), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    bar_width = width / bars
    for i, value in enumerate(heights):
        x0, x1 = int(i * bar_width), max(int(i * bar_width), int((i + 1) * bar_width) - 1)
        if binned[i] == 0:
            draw.rectangle([x0, title + height - 3, x1, title + height], fill=_DEAD)
        else:
            draw.rectangle([x0, title + height - int(value / top * (height - 4)) - 1, x1, title + height], fill=_BAR)
    draw.line([0, title + height + 1, width, title + height + 1], fill=_INK)
    draw.text((2, 1), f"codes used {used}/{k} ({100 * (k - used) / k:.1f}% dead), max {int(counts[0])}", fill=_INK)
    return canvas


def code_use_images(stats: dict[str, Any]) -> dict[str, Image.Image]:
    """The pictures `evaluate_split`'s ``stats`` allow: {"kl_heatmap": ..., "code_usage": ...}
    (a heat map only for a grid latent, a histogram only for a categorical one)."""
    images: dict[str, Image.Image] = {}
    if stats.get("grid") is not None and stats.get("kl_per_variable") is not None:
        images["kl_heatmap"] = kl_heatmap(stats["kl_per_variable"], stats["grid"])
    if stats.get("code_counts") is not None:
        images["code_usage"] = usage_histogram(stats["code_counts"])
    return images
