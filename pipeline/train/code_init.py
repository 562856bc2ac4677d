"""Data-dependent initialisation of a grid model's codes, before the first training step."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.data import eval_batches
from pipeline.data.reader import ShardReader
from pipeline.models.vae import VAE

MIN_IMAGES = 256  # the centres are drawn from this many images at least (more when K needs them)
# kmeans: grid positions per code that K-means is fitted on (from as many train images as that takes,
# or the whole split), at most MAX_KMEANS_POSITIONS in all: the fit stays within seconds to a minute.
KMEANS_POSITIONS_PER_CODE = 256
MAX_KMEANS_POSITIONS = 1 << 17


def init_codes_from_data(model: VAE, manifest: Any, dataset_url: str, cfg: RunConfig, reader: ShardReader) -> None:
    """Set the code head (``model.code_init`` data or kmeans) from the first images of the train split
    (manifest order, center crops). Every rank reads the same images and draws with the same seed,
    so all start from one model (DDP broadcasts rank 0's weights as well)."""
    grid_positions = math.prod(model.encoder.grid)
    positions = 2 * model.latent.categories
    if cfg.model.code_init == "kmeans":
        positions = min(KMEANS_POSITIONS_PER_CODE * model.latent.categories, MAX_KMEANS_POSITIONS)
    needed = max(MIN_IMAGES, math.ceil(positions / grid_positions))
    images: list[torch.Tensor] = []
    for x, _ in eval_batches(manifest, dataset_url, split="train", rank=0, world_size=1,
                             batch_size=min(needed, 256), reader=reader):
        images.append(x)
        if sum(len(i) for i in images) >= needed:
            break
    model.init_codes_from_data(torch.cat(images)[:needed], cfg.train.seed, cfg.model.code_init,
                               cfg.model.code_init_spread)
