"""A grid model's codes from data: the initialisation before the first step, and dead-code restarts.

Both read the same pool: the first images of the train split (manifest order, center crops), read
by every rank alike. Every rank then computes the same centres, counts and draws, so the replicas
stay identical without a collective.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.data import eval_batches
from pipeline.data.reader import ShardReader
from pipeline.models.code_restart import Split
from pipeline.models.vae import VAE

MIN_IMAGES = 256  # the centres are drawn from this many images at least (more when K needs them)
# kmeans and restarts: grid positions per code in the pool (from as many train images as that takes,
# or the whole split), at most MAX_KMEANS_POSITIONS in all: the fit stays within seconds to a minute,
# and counting a restart's dead codes within a second or two.
KMEANS_POSITIONS_PER_CODE = 256
MAX_KMEANS_POSITIONS = 1 << 17
_RESTART_STREAM = 0x7E57A47  # the restarts' draws, apart from the Gumbel noise's (train/step.noise_seed)


def code_pool(model: VAE, manifest: Any, dataset_url: str, cfg: RunConfig, reader: ShardReader) -> torch.Tensor:
    """The first train images, uint8 [P, C, H, W]: 2 positions per code for ``code_init: data``;
    `KMEANS_POSITIONS_PER_CODE` (at most `MAX_KMEANS_POSITIONS` in all) for kmeans and restarts."""
    grid_positions = math.prod(model.encoder.grid)
    positions = 2 * model.latent.categories
    if cfg.model.code_init == "kmeans" or cfg.model.restart_dead_codes:
        positions = min(KMEANS_POSITIONS_PER_CODE * model.latent.categories, MAX_KMEANS_POSITIONS)
    needed = max(MIN_IMAGES, math.ceil(positions / grid_positions))
    images: list[torch.Tensor] = []
    for x, _ in eval_batches(manifest, dataset_url, split="train", rank=0, world_size=1,
                             batch_size=min(needed, 256), reader=reader):
        images.append(x)
        if sum(len(i) for i in images) >= needed:
            break
    return torch.cat(images)[:needed]


def init_codes_from_data(model: VAE, pool: torch.Tensor, cfg: RunConfig) -> None:
    """Set the code head (``model.code_init`` data or kmeans) from the pool. Every rank draws with
    the same seed, so all start from one model (DDP broadcasts rank 0's weights as well)."""
    model.init_codes_from_data(pool, cfg.train.seed, cfg.model.code_init, cfg.model.code_init_spread)


def restart_dead_codes(state: Any, pool: torch.Tensor, seed: int) -> int:
    """``model.restart_dead_codes``: split busy codes into the codes no position of the pool picks,
    in the trained model and its EMA alike, and copy the optimizer's moments of the edited rows
    (a fresh Adam row would take a step several times the usual size). Draws are seeded by (seed,
    global step): deterministic on every rank. Returns the number of codes restarted."""
    model = state.model
    entropy = np.random.SeedSequence([seed, state.position.step, _RESTART_STREAM]).generate_state(1)[0]
    copies = (state.ema.module,) if state.ema is not None else ()
    splits = model.split_dead_codes(pool, torch.Generator().manual_seed(int(entropy)), copies=copies)
    copy_optimizer_rows(state.optimizer, [model.encoder.to_logits.weight, model.encoder.to_logits.bias,
                                          model.decoder.codebook], splits)
    return len(splits)


@torch.no_grad()
def copy_optimizer_rows(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], splits: list[Split]) -> None:
    """Row k of each of ``params``' optimizer state (Adam's moments) becomes row j's."""
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                for s in splits:
                    value[s.dead] = value[s.donor]
