"""The tokenizer report: what a grid of K-way codes keeps of a split of images, and at what rate.

Any tokenizer that turns an image into an h x w grid of codes 0..K-1 and back into an image
is scored here by the same functions, from (codes, images, reconstructions) batches: a trained
grid model (`pipeline evaluate`, reconstructions decoded from the argmax codes, the tokens a
user gets) and the K-means patch quantizer (`pipeline bench tokenizer`). Per split:

- ``rate_bits_per_image``: h * w * log2 K, the bits a grid of codes costs written plainly;
- ``psnr``: the mean over images of 10 log10(1 / MSE) (pixels in [0, 1]); ``psnr_pooled``: the
  same from the MSE pooled over the whole split (``mse``). A perfect image counts as
  ``PSNR_CAP_DB`` (100 dB), not infinity, as in training's validation;
- ``ssim``: the mean structural similarity over images (torchmetrics, gaussian window 11,
  sigma 1.5, data range 1.0; images under 11 pixels a side: the widest odd window that fits, its
  sigma scaled down with it);
- ``codes_used``: the share of the K codes that are some position's code; ``code_perplexity``:
  exp of the entropy of the code histogram pooled over positions (pipeline/models/code_use.py);
- ``bits_per_token``: the cross-entropy, in bits, of this split's codes under a unigram model of
  the train split's codes, with add-one (Laplace) smoothing: p(k) = (n_k + 1) / (n + K). Shown
  beside log2 K, it says how much of the rate the codes really use: a tokenizer whose codes
  are spread evenly spends all log2 K bits, one that uses few codes far fewer.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from pipeline.models.code_use import code_counts, code_perplexity, codes_used

MSE_FLOOR = 1e-10
PSNR_CAP_DB = 10.0 * math.log10(1.0 / MSE_FLOOR)  # 100 dB: a perfect image


def rate_bits(grid: tuple[int, int], categories: int) -> float:
    """Bits per image of an h x w grid of K-way codes: h * w * log2 K."""
    return grid[0] * grid[1] * math.log2(categories)


def psnr_db(mse: Tensor | float) -> Tensor | float:
    """10 log10(1 / MSE) for pixels in [0, 1], capped at PSNR_CAP_DB."""
    if isinstance(mse, Tensor):
        return 10.0 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))
    return 10.0 * math.log10(1.0 / max(float(mse), MSE_FLOOR))


def unigram_bits_per_token(train_counts: Tensor | np.ndarray, counts: Tensor | np.ndarray) -> float:
    """Cross-entropy in bits per token of codes with histogram ``counts`` [K] under the add-one
    smoothed unigram model of ``train_counts`` [K]: p(k) = (n_k + 1) / (n + K)."""
    train = torch.as_tensor(train_counts).double().flatten()
    counts = torch.as_tensor(counts).double().flatten()
    if train.shape != counts.shape:
        raise ValueError(f"train counts have {train.numel()} codes, this split's {counts.numel()}")
    total = float(counts.sum())
    if total <= 0:
        return float("nan")
    log2_p = torch.log2((train + 1.0) / (train.sum() + train.numel()))
    return float(-(counts * log2_p).sum() / total)


SSIM_WINDOW = 11


def _ssim_per_image(reconstructions: Tensor, images: Tensor) -> Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(images.shape[-2:])
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {tuple(images.shape[-2:])}")
    window = min(SSIM_WINDOW, side if side % 2 else side - 1)  # odd, and no wider than the image
    # torchmetrics sizes the gaussian window from sigma (2 * round(3.5 sigma) + 1): 1.5 gives 11
    sigma = 1.5 if window == SSIM_WINDOW else (window - 1) / 7
    return structural_similarity_index_measure(reconstructions, images, data_range=1.0, kernel_size=window,
                                               sigma=sigma, reduction="none").double()


def as_unit_pixels(images: Tensor | np.ndarray) -> Tensor:
    """uint8 images (0..255) or floats already in [0, 1] -> float32 in [0, 1]."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float().div(255.0)
    return images.float().clamp(0.0, 1.0)


@dataclass
class TokenizerFigures:
    """One split's report; `metrics(prefix)` names the figures as logged."""

    images: int
    grid: tuple[int, int]
    categories: int
    rate_bits_per_image: float
    psnr: float
    psnr_pooled: float
    mse: float
    ssim: float
    codes_used: float
    code_perplexity: float
    bits_per_token: float | None  # None when there are no train codes to model

    @property
    def log2_codes(self) -> float:
        return math.log2(self.categories)

    LOGGED = ("rate_bits_per_image", "psnr", "psnr_pooled", "mse", "ssim", "codes_used", "code_perplexity",
              "bits_per_token")

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{name}": float(getattr(self, name)) for name in self.LOGGED
                if getattr(self, name) is not None}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"grid": list(self.grid), "log2_codes": self.log2_codes}


class TokenizerTally:
    """Sums over batches of (codes, images, reconstructions) for one split; `figures` reads them out."""

    def __init__(self, grid: tuple[int, int], categories: int) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.categories = int(categories)
        self.counts = torch.zeros(self.categories, dtype=torch.float64)
        self.images = 0
        self.squared_error = 0.0  # summed over every pixel value
        self.values = 0  # pixel values (C * H * W per image)
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0

    def add_codes(self, codes: Tensor | np.ndarray) -> None:
        """Codes only (no pixels): for the train split's histogram behind bits per token."""
        codes = torch.as_tensor(codes)
        h, w = self.grid
        if codes.ndim < 2 or codes[0].numel() != h * w:
            raise ValueError(f"codes must be [B, {h}, {w}] (or [B, {h * w}]), got {tuple(codes.shape)}")
        self.counts += code_counts(codes, self.categories)

    def add(self, codes: Tensor | np.ndarray, images: Tensor | np.ndarray,
            reconstructions: Tensor | np.ndarray) -> None:
        """One batch: codes [B, h, w] (integers 0..K-1), images [B, C, H, W] (uint8, or floats in
        [0, 1]) and their reconstructions from those codes (same shape; uint8 or floats)."""
        target, recon = as_unit_pixels(images), as_unit_pixels(reconstructions)
        if target.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got {tuple(target.shape)}")
        recon = recon.reshape(target.shape) if recon.numel() == target.numel() else recon
        if recon.shape != target.shape:
            raise ValueError(f"reconstructions {tuple(recon.shape)} do not match images {tuple(target.shape)}")
        if len(torch.as_tensor(codes)) != len(target):
            raise ValueError(f"{len(codes)} code grids for {len(target)} images")
        self.add_codes(codes)
        per_image = (recon.double() - target.double()).pow(2).flatten(1)
        self.squared_error += float(per_image.sum())
        self.values += per_image.numel()
        self.psnr_sum += float(psnr_db(per_image.mean(dim=1)).sum())
        self.ssim_sum += float(_ssim_per_image(recon, target).sum())
        self.images += len(target)

    def figures(self, train_counts: Tensor | np.ndarray | None = None) -> TokenizerFigures:
        """The report; ``train_counts`` (the train split's code histogram [K]) gives bits per token."""
        if self.images == 0:
            raise ValueError("no images were added to the report")
        mse = self.squared_error / self.values
        bits = None if train_counts is None else unigram_bits_per_token(train_counts, self.counts)
        return TokenizerFigures(
            images=self.images, grid=self.grid, categories=self.categories,
            rate_bits_per_image=rate_bits(self.grid, self.categories), psnr=self.psnr_sum / self.images,
            psnr_pooled=float(psnr_db(mse)), mse=mse, ssim=self.ssim_sum / self.images,
            codes_used=codes_used(self.counts), code_perplexity=code_perplexity(self.counts),
            bits_per_token=bits)


def tokenizer_figures(codes: Tensor | np.ndarray, images: Tensor | np.ndarray,
                      reconstructions: Tensor | np.ndarray, *, categories: int,
                      train_counts: Tensor | np.ndarray | None = None) -> TokenizerFigures:
    """The report of one split held in memory: codes [B, h, w], images and reconstructions [B, C, H, W]."""
    codes = torch.as_tensor(codes)
    if codes.ndim != 3:
        raise ValueError(f"codes must be [B, h, w], got {tuple(codes.shape)}")
    tally = TokenizerTally(tuple(codes.shape[1:]), categories)
    tally.add(codes, images, reconstructions)
    return tally.figures(train_counts)


# ---------------------------------------------------------------- a trained grid model

def is_grid_model(model: Any) -> bool:
    """A model with a grid of categorical codes (arch resnet or patch): the report applies."""
    from pipeline.models import CategoricalLatent

    return isinstance(getattr(model, "latent", None), CategoricalLatent) and \
        getattr(getattr(model, "encoder", None), "grid", None) is not None


@torch.no_grad()
def model_codes_and_reconstructions(model: Any, x: Tensor, *, decode: bool = True) -> tuple[Tensor, Tensor | None]:
    """A grid model's tokens [B, h, w] (the posterior mode: argmax per position) for images
    [B, C, H, W], and (``decode``) the images decoded from those tokens, in [0, 1]."""
    device = next(model.parameters()).device
    h, w = model.encoder.grid
    inputs, _ = model.prepare(x.to(device))
    params = model.encode(inputs)
    codes = params.reshape(params.shape[0], h, w, model.latent.categories).argmax(dim=-1)
    if not decode:
        return codes.cpu(), None
    recon = model.likelihood.mean(model.decode(model.latent.mode(params)))
    return codes.cpu(), recon.float().cpu()


@torch.no_grad()
def model_report(model: Any, batches: Callable[[str], Iterable[tuple[Tensor, Any]]], splits: list[str], *,
                 train_split: str | None = "train",
                 progress: Callable[[str, int], None] | None = None) -> dict[str, TokenizerFigures]:
    """The report of a grid model on each of ``splits``; ``batches(split)`` yields (uint8 images
    [B, C, H, W], labels). The train split's codes (read, not decoded, when it is not one of
    ``splits``) are the unigram model behind bits per token; ``train_split=None``: no bits per
    token. ``progress(split, images_done)`` after each batch."""
    if not is_grid_model(model):
        raise ValueError("the tokenizer report needs a grid model (arch resnet or patch, a categorical latent)")
    model.eval()
    grid, k = tuple(model.encoder.grid), model.latent.categories
    tallies = {split: TokenizerTally(grid, k) for split in splits}
    order = list(splits)
    if train_split is not None and train_split not in tallies:
        tallies[train_split] = TokenizerTally(grid, k)
        order = [train_split, *order]
    for split in order:
        tally, decode = tallies[split], split in splits
        done = 0
        for x, _labels in batches(split):
            codes, recon = model_codes_and_reconstructions(model, x, decode=decode)
            if decode:
                tally.add(codes, x, recon)
            else:
                tally.add_codes(codes)
            done += len(x)
            if progress:
                progress(split, done)
    train_counts = tallies[train_split].counts if train_split is not None else None
    return {split: tallies[split].figures(train_counts) for split in splits}


# ---------------------------------------------------------------- the table

COLUMNS = ("bits/image", "PSNR mean", "PSNR pooled", "SSIM", "codes used", "perplexity", "bits/token", "log2 K")


def report_table(rows: dict[str, TokenizerFigures], title: str) -> Any:
    """A rich Table, one row per (tokenizer, split) label; PSNR in dB."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("tokenizer, split")
    table.add_column("images", justify="right")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for label, f in rows.items():
        bits = "-" if f.bits_per_token is None else f"{f.bits_per_token:.2f}"
        table.add_row(label, f"{f.images:,}", f"{f.rate_bits_per_image:g}", f"{f.psnr:.2f}", f"{f.psnr_pooled:.2f}",
                      f"{f.ssim:.4f}", f"{f.codes_used:.1%} of {f.categories}", f"{f.code_perplexity:.1f}", bits,
                      f"{f.log2_codes:g}")
    return table


def render_table(table: Any, width: int = 140) -> str:
    """A rich Table as plain text (no colour codes), for printing or writing to a file."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip("\n")


SMOOTHING_NOTE = ("bits/token: cross-entropy of the split's codes under a unigram model of the train split's "
                  "codes, add-one (Laplace) smoothed; log2 K is what a code costs when all K are equally likely")
