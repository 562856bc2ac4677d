"""End-of-run artifacts, made on the driver from the last checkpoint: a reconstruction
grid and a prior-sample grid (PNG), the model itself and its raw weights ``checkpoint/model.pt``
(a state_dict: `pipeline.runs.load` rebuilds the model from the run's config.yaml and loads it with
``weights_only=True``, no unpickling of code).

The model: a grid model (``model.arch: resnet`` or ``patch``, categorical latent) is logged as its tokenizer, a
pyfunc that turns uint8 images [B, C, H, W] into int64 codes [B, h, w] (pipeline/tokens/serving.py);
the other models as the `Reconstructor` (MLflow pytorch flavour)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import RunConfig
from pipeline.data import eval_batches
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ReadOptions
from pipeline.models import VAE, Bernoulli
from pipeline.runs import registry, store
from pipeline.runs.load import WEIGHTS_ARTIFACT, rebuild_vae
from pipeline.train.checkpoint import load_checkpoint


WEIGHTS_FOLDER, _, WEIGHTS_FILE = WEIGHTS_ARTIFACT.rpartition("/")  # checkpoint/ model.pt: what runs/load reads


class Reconstructor(torch.nn.Module):
    """The logged model: images float32 [B, C, H, W] with pixels in [0, 1] -> the reconstruction's
    expected pixel values, same shape. A plain tensor -> tensor module so MLflow can infer a
    signature and serve it."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(x.float())


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 4) -> Image.Image:
    """Tile images [n, C, H, W] (C = 1 or 3) in [0, 1] into one grey or RGB PNG-ready image."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((c, rows * (h + 1) + 1, columns * (w + 1) + 1), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = image
    pixels = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[0], mode="L") if c == 1 else Image.fromarray(pixels.transpose(1, 2, 0), "RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


@torch.no_grad()
def reconstruction_grid(model: VAE, images: torch.Tensor, seed: int, columns: int = 16) -> Image.Image:
    """Inputs (as the model saw them: binarized for Bernoulli) beside their reconstructions from the
    posterior mode, alternating, for uint8 images [n, C, H, W]; binarization drawn from ``seed``."""
    device = next(model.parameters()).device
    x = images.to(device).float().div(255)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        inputs, _ = model.prepare(x)
    shown = inputs if isinstance(model.likelihood, Bernoulli) else x  # binarized as trained on, else the pixels
    recon = model.reconstruct(shown)
    return image_grid(torch.stack([shown, recon], 1).flatten(0, 1).float().cpu().numpy(), columns=columns)


def log_final_artifacts(config: RunConfig, tracking_uri: str, run_id: str, checkpoint_dir: str | None,
                        dataset_url: str, manifest: Any) -> None:
    if checkpoint_dir is None:
        raise RuntimeError("training reported no checkpoint")
    target = ImageTarget.from_config(manifest.spec, config.data)
    model = rebuild_vae(config, load_checkpoint(checkpoint_dir)["model"], target.shape)
    images, _ = next(iter(eval_batches(manifest, dataset_url, split="val", rank=0, world_size=1, batch_size=32,
                                       options=ReadOptions.from_config(config.data),
                                       decoder=SampleDecoder(manifest.spec, target))))
    x = images.float().div(255)  # the logged model's input: pixels in [0, 1]
    with torch.no_grad():
        samples = model.sample(32, generator=torch.Generator().manual_seed(config.train.seed))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "reconstructions.png", Path(tmp) / "prior_samples.png"]
        reconstruction_grid(model, images, config.train.seed).save(paths[0])
        image_grid(samples.numpy()).save(paths[1])
        store.log_artifact_files(tracking_uri, run_id, paths, artifact_path="images")
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save(model.state_dict(), weights)
        store.log_artifact_files(tracking_uri, run_id, [weights], artifact_path=WEIGHTS_FOLDER)
        if is_grid_tokenizer(model):
            registry.log_tokenizer_model(tracking_uri, run_id, config=config, weights=weights,
                                         image_shape=target.shape, grid=tuple(model.encoder.grid),
                                         categories=model.latent.categories, input_example=images[:2].numpy())
            return
    registry.log_model(tracking_uri, run_id, Reconstructor(model), x[:4].numpy())


def is_grid_tokenizer(model: VAE) -> bool:
    """A grid of categorical codes: logged as a tokenizer (images -> codes)."""
    from pipeline.models.latents import CategoricalLatent

    return model.is_grid and isinstance(model.latent, CategoricalLatent)
