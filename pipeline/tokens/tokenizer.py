"""`Tokenizer`: a trained grid model (``model.arch: resnet`` or ``patch``) as an image tokenizer in Python.

    from pipeline import Tokenizer
    tok = Tokenizer.load("models:/images-dvae@champion")   # or "models:/NAME/3", "runs:/RUN_ID/model", RUN_ID
    codes = tok.encode(images)                             # uint8 [B, C, H, W] -> int64 [B, h, w]
    images = tok.decode(codes)                             # int64 [B, h, w] -> uint8 [B, C, H, W]

The codes are the argmax of the posterior at each grid position: what `pipeline encode` writes (as
uint16). Decoding renders the decoder's expected pixel values, rounded to uint8: `decode(encode(x))`
is the model's own reconstruction of x. The weights are loaded with ``torch.load(weights_only=True)``
by the project's one loader (`pipeline.runs.load.load_model`); no module is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.models import VAE
from pipeline.tokens.codes import TokenLayout, pixels_of, token_layout, tokens_of


class TokenizerError(ValueError):
    """A model that is not a tokenizer, or images or codes it cannot take; the message says why."""


class Tokenizer:
    """Encode uint8 images into code grids and decode code grids into uint8 images, in batches of
    ``batch_size``, on ``device`` (default: CUDA when available, else the CPU)."""

    def __init__(self, model: VAE, config: RunConfig, *, run_id: str = "?", device: str | torch.device | None = None,
                 batch_size: int = 256) -> None:
        if not config.model.is_grid:
            raise TokenizerError(f"run {run_id} is not a grid model: model.arch {config.model.arch}")
        if config.model.latent.kind != "categorical":
            raise TokenizerError(f"run {run_id} is not a grid model: its latent is {config.model.latent.kind}, "
                                 "not categorical")
        if batch_size < 1:
            raise TokenizerError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.config = config
        self.run_id = run_id
        self.batch_size = batch_size
        self.layout: TokenLayout = token_layout(model, run_id)

    @classmethod
    def load(cls, uri: str, *, device: str | torch.device | None = None, tracking_uri: str | None = None,
             batch_size: int = 256) -> "Tokenizer":
        """The grid model at ``uri``: ``models:/NAME@ALIAS`` (e.g. the champion), ``models:/NAME/VERSION``,
        ``runs:/RUN_ID/model`` or a bare RUN_ID, from the MLflow store ``tracking_uri`` (default:
        $MLFLOW_TRACKING_URI, else ./mlflow.db, as for `pipeline train`); or a folder `pipeline export`
        wrote, without MLflow."""
        from pipeline.runs.export import ExportError, is_export, load_exported

        if is_export(uri):
            try:
                exported = load_exported(uri)
            except ExportError as err:
                raise TokenizerError(str(err)) from None
            return cls(exported.model, exported.config, run_id=exported.meta.get("run_id", "?"), device=device,
                       batch_size=batch_size)
        from pipeline.runs.load import ModelLoadError, load_model

        try:
            loaded = load_model(uri, tracking_uri=tracking_uri)
        except ModelLoadError as err:
            raise TokenizerError(str(err)) from None
        return cls(loaded.model, loaded.config, run_id=loaded.run_id, device=device, batch_size=batch_size)

    @classmethod
    def from_files(cls, weights: str | Path, config: str | Path, image_shape: tuple[int, int, int], *,
                   device: str | torch.device | None = None, batch_size: int = 256) -> "Tokenizer":
        """A tokenizer from a weights file (a state_dict) and a resolved config.yaml, for images of
        ``image_shape`` (C, H, W): what the logged pyfunc model holds."""
        import yaml

        from pipeline.config import parse_config
        from pipeline.runs.load import ModelLoadError, rebuild_vae

        parsed = parse_config(yaml.safe_load(Path(config).read_text()) or {})
        try:
            model = rebuild_vae(parsed, Path(weights), tuple(image_shape))
        except ModelLoadError as err:
            raise TokenizerError(str(err)) from None
        return cls(model, parsed, run_id=parsed.tracking.run_name or "?", device=device, batch_size=batch_size)

    # --- what it is ----------------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w): the code grid of one image."""
        return self.layout.grid  # type: ignore[return-value]

    @property
    def codebook_size(self) -> int:
        """K: codes are integers in [0, K)."""
        return self.layout.categories

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it takes and makes."""
        return tuple(self.model.image_shape)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"Tokenizer(run={self.run_id}, images={list(self.image_shape)} uint8, codes={list(self.grid)} "
                f"of K={self.codebook_size}, device={self.device})")

    # --- encode, decode ----------------------------------------------------------------------------------

    def encode(self, images: Any) -> Any:
        """uint8 images [B, C, H, W] (torch or numpy) -> int64 codes [B, h, w], the same kind (a tensor
        comes back on the images' device)."""
        x, as_numpy = _tensor(images)
        c, h, w = self.image_shape
        if x.dtype != torch.uint8:
            raise TokenizerError(f"images must be uint8 [B, {c}, {h}, {w}], got dtype {_dtype_name(images)}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise TokenizerError(f"images must be uint8 [B, {c}, {h}, {w}], got shape {list(x.shape)}")
        with torch.inference_mode():
            parts = [tokens_of(self.model, chunk.to(self.device), self.layout).cpu()
                     for chunk in x.split(self.batch_size)]
        codes = torch.cat(parts) if parts else torch.zeros((0, *self.grid), dtype=torch.int64)
        return codes.numpy() if as_numpy else codes.to(x.device)

    def decode(self, codes: Any) -> Any:
        """Integer codes [B, h, w] in [0, K) (torch or numpy) -> uint8 images [B, C, H, W], the same kind."""
        z, as_numpy = _tensor(codes)
        h, w = self.grid
        if z.dtype.is_floating_point or z.dtype.is_complex or z.dtype == torch.bool:
            raise TokenizerError(f"codes must be integers [B, {h}, {w}], got dtype {_dtype_name(codes)}")
        if z.ndim != 3 or tuple(z.shape[1:]) != self.grid:
            raise TokenizerError(f"codes must be integers [B, {h}, {w}], got shape {list(z.shape)}")
        if z.numel():
            low, high = int(z.min()), int(z.max())
            if low < 0 or high >= self.codebook_size:
                raise TokenizerError(f"codes must lie in [0, {self.codebook_size}) (K = {self.codebook_size}), "
                                     f"got values from {low} to {high}")
        with torch.inference_mode():
            parts = [_to_uint8(pixels_of(self.model, chunk.to(self.device).long(), self.layout)).cpu()
                     for chunk in z.split(self.batch_size)]
        images = torch.cat(parts) if parts else torch.zeros((0, *self.image_shape), dtype=torch.uint8)
        return images.numpy() if as_numpy else images.to(z.device)


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Expected pixel values in [0, 1] -> uint8, as `pipeline decode` writes them."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def _tensor(value: Any) -> tuple[torch.Tensor, bool]:
    if isinstance(value, torch.Tensor):
        return value, False
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint16:  # token shards store codes as uint16, which torch reads poorly
            value = value.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(value)), True
    raise TokenizerError(f"expected a torch tensor or a numpy array, got {type(value).__name__}")


def _dtype_name(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.")
