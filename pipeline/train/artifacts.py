"""End-of-run artifacts, made on the driver from the last checkpoint: a reconstruction
grid and a prior-sample grid (PNG), the model itself (MLflow pytorch flavour) and its raw
weights ``checkpoint/model.pt`` (a state_dict: `pipeline evaluate` rebuilds the model from the
run's config.yaml and loads it with ``weights_only=True``, no unpickling of code)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import RunConfig
from pipeline.data import eval_batches
from pipeline.models import VAE, build_vae
from pipeline.train import tracking
from pipeline.train.checkpoint import load_checkpoint


WEIGHTS_FILE = "model.pt"  # logged under checkpoint/


class Reconstructor(torch.nn.Module):
    """The logged model: pixels in [0, 1] -> reconstruction probabilities.

    A plain tensor -> tensor module so MLflow can infer a signature and serve it.
    """

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(x.float())


def image_grid(images: np.ndarray, shape: tuple[int, int], columns: int = 8, scale: int = 4) -> Image.Image:
    """Tile [n, H*W] images in [0, 1] into one greyscale PNG-ready image."""
    h, w = shape
    n = images.shape[0]
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1), dtype=np.float32)
    for i, flat in enumerate(images):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = flat.reshape(h, w)
    pixels = (np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


def load_vae(config: RunConfig, checkpoint_dir: str, input_dim: int, image_shape: tuple[int, int] | None = None) -> VAE:
    model = build_vae(config.model, input_dim, image_shape=image_shape)
    model.load_state_dict(load_checkpoint(checkpoint_dir)["model"])
    return model.eval()


def log_final_artifacts(config: RunConfig, tracking_uri: str, run_id: str, checkpoint_dir: str | None,
                        dataset_url: str, manifest: Any) -> None:
    if checkpoint_dir is None:
        raise RuntimeError("training reported no checkpoint")
    shape = tuple(manifest.image_shape)
    model = load_vae(config, checkpoint_dir, int(np.prod(shape)), image_shape=shape)
    x, _ = next(iter(eval_batches(manifest, dataset_url, split="val", rank=0, world_size=1, batch_size=32,
                                  binarize=config.data.binarize, seed=config.train.seed)))
    with torch.no_grad():
        recon = model.reconstruct(x)
        samples = model.sample(32, generator=torch.Generator().manual_seed(config.train.seed))
    # Reconstruction grid: rows alternate input / reconstruction.
    pairs = np.stack([x.numpy(), recon.numpy()], axis=1).reshape(-1, x.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "reconstructions.png", Path(tmp) / "prior_samples.png"]
        image_grid(pairs, shape, columns=16).save(paths[0])
        image_grid(samples.numpy(), shape).save(paths[1])
        tracking.log_artifact_files(tracking_uri, run_id, paths, artifact_path="images")
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save(model.state_dict(), weights)
        tracking.log_artifact_files(tracking_uri, run_id, [weights], artifact_path="checkpoint")
    tracking.log_model(tracking_uri, run_id, Reconstructor(model), x[:4].numpy())
