"""Tokens: what a trained categorical VAE writes for a dataset (`pipeline encode`) and reads back
(`pipeline decode`) — the run's model rebuilt, how its posterior mode is stored, and reading token
shards through the data layer's reader.

Token format (a dataset like any other: WebDataset tars + manifest.json, any fsspec URL):
- one output shard per input shard, ``<split>-<nnnnn>.tar``, its samples in the source shard's
  order and under the SOURCE sample's key;
- per sample ``<key>.npy``: ``np.save`` (no pickle) of the posterior mode's class indices as
  uint16 — the code grid [h, w] of a grid latent (``model.arch: resnet`` or ``patch``), or the N argmaxes [N]
  of a flat categorical latent — plus ``<key>.cls`` (the label, ASCII) when the source has labels;
- the manifest (format 2) declares ``dtype: uint16``, ``sample`` (npy, 1 channel, size [h, w], or
  [1, N] for a flat latent) and ``tokens``: the run id, the model version (the registered model
  version ``models:/<name>/<v>`` when the run's model is registered, else ``runs:/<run_id>``), the
  source URL and the source manifest's sha256 (`Manifest.digest`), K, the grid and the array shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.errors import DataError, ShardError
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.shards import Manifest, ShardInfo, shard_url
from pipeline.models import VAE

if TYPE_CHECKING:
    from pipeline.runs.load import LoadedModel

MAX_TOKENS = 1 << 16  # uint16 indices


class EncodeError(RuntimeError):
    """A run, dataset or shard that cannot be encoded/decoded; the message names which and why."""


# --- the run's model ------------------------------------------------------------------------------


def load_run_model(run: str, image_shape: tuple[int, int, int] | None = None, *,
                   manifest: Manifest | None = None, tracking_uri: str | None = None) -> LoadedModel:
    """The model of ``run`` (a run id, or a runs:/ or models:/ URI) rebuilt from its config and raw weights
    (`pipeline.runs.load.load_model`), for images of ``image_shape``, or of the shape the run's data
    settings make of ``manifest``'s samples; errors as `EncodeError`."""
    from pipeline.runs.load import ModelLoadError, load_model

    try:
        return load_model(run, tracking_uri=tracking_uri, image_shape=image_shape, manifest=manifest)
    except ModelLoadError as err:
        raise EncodeError(str(err)) from None


@dataclass(frozen=True)
class TokenLayout:
    """How a model's posterior mode is stored: uint16 ``shape`` ([h, w] grid, or [N])."""

    categories: int
    variables: int
    grid: tuple[int, int] | None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.grid if self.grid is not None else (self.variables,)

    @property
    def spec_size(self) -> list[int]:
        return list(self.grid) if self.grid is not None else [1, self.variables]


def token_layout(model: VAE, run_id: str = "?") -> TokenLayout:
    from pipeline.models.latents import CategoricalLatent

    latent = model.latent
    if not isinstance(latent, CategoricalLatent):
        raise EncodeError(f"run {run_id}: its latent ({type(latent).__name__}) is not categorical: no tokens to write")
    if latent.categories > MAX_TOKENS:
        raise EncodeError(f"run {run_id}: K = {latent.categories} classes do not fit uint16 tokens")
    grid = tuple(model.encoder.grid) if model.is_grid else None
    return TokenLayout(latent.categories, latent.variables, grid)  # type: ignore[arg-type]


@torch.no_grad()
def tokens_of(model: VAE, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Posterior-mode class indices [B, *layout.shape] (int64) of uint8 images [B, C, H, W]."""
    inputs, _ = model.prepare(x)
    params = model.encode(inputs)
    return params.reshape(params.shape[0], layout.variables, layout.categories).argmax(-1).reshape(
        params.shape[0], *layout.shape)


@torch.no_grad()
def pixels_of(model: VAE, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Expected pixel values in [0, 1], [B, C, H, W], decoded from class indices [B, *layout.shape]."""
    tokens = tokens.long()
    if layout.grid is not None and hasattr(model.decoder, "decode_indices"):
        out = model.decoder.decode_indices(tokens)  # the codebook rows a one-hot code selects, no [B, N, K]
    else:
        one_hot = F.one_hot(tokens.reshape(tokens.shape[0], -1), layout.categories)
        out = model.decode(one_hot.to(next(model.parameters()).dtype).reshape(tokens.shape[0], -1))
    return model.likelihood.mean(out)


def read_tokens(manifest: Manifest, url: str, shard: ShardInfo,
                options: ReadOptions = ReadOptions()) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, uint16 tokens of `tokens.shape`, label or -1) of one token shard, in order: read by the data
    layer's reader (declared members only, no pickles, dtype and shape checked, sha256 verified), the
    indices checked to be below K. Errors name shard and member."""
    tokens = manifest.tokens
    if tokens is None:
        raise DataError(f"{url} is not a token dataset (its manifest has no 'tokens' section)")
    shape = tuple(tokens.shape)
    reader = ShardReader(replace(options, verify=True, on_corrupt="error"))
    for key, array, label in reader.read_shard(manifest, url, shard):
        if array.size and int(array.max()) >= tokens.categories:
            raise ShardError(shard_url(url, shard), f"token {int(array.max())} is outside the code book: tokens are below {tokens.categories} (K)",
                             member=f"{key}.npy")
        yield key, array.reshape(shape), label
