"""`pipeline export`: a trained model as a plain folder that loads without MLflow.

    DIR/config.yaml         the run's resolved config (what rebuilds the network)
    DIR/model.safetensors   the weights the run logged as its model (the EMA's when train.ema is on),
                            as safetensors: tensors only, nothing to unpickle
    DIR/model.json          what the model takes and gives: image shape, dtype, code grid and K
    DIR/README.md           the same, for people, with the lines that load it

`load_exported(DIR)` rebuilds the VAE from these alone (pipeline.models + safetensors + PyYAML);
`Tokenizer.load(DIR)` does too for a grid model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG, WEIGHTS, META, README = "config.yaml", "model.safetensors", "model.json", "README.md"


class ExportError(ValueError):
    """A folder that is not an exported model, or one that cannot be written; the message says why."""


@dataclass
class ExportedModel:
    model: Any  # the VAE, in eval mode
    config: Any  # its RunConfig
    meta: dict[str, Any]


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder `export_model` wrote."""
    folder = Path(path)
    return folder.is_dir() and (folder / WEIGHTS).is_file() and (folder / META).is_file()


def export_model(uri: str, out: str | Path, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Write the model at ``uri`` (a run id, ``runs:/RUN/model``, ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``) into the folder ``out``; returns what model.json holds. The files are
    written under temporary names and renamed last, so a failed export leaves no half model."""
    from safetensors.torch import save_file

    from pipeline.runs.load import load_model
    from pipeline.runs.store import config_yaml

    loaded = load_model(uri, tracking_uri=tracking_uri)
    model, config = loaded.model, loaded.config
    meta = _describe(model, config, source=uri, run_id=loaded.run_id)
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()) and not is_export(folder):
        raise ExportError(f"{folder} exists and holds other files: export into a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    texts = {CONFIG: config_yaml(config), META: json.dumps(meta, indent=2) + "\n", README: _readme(meta)}
    save_file(weights, str(folder / (WEIGHTS + ".partial")), metadata={"run_id": loaded.run_id, "arch": config.model.arch})
    for name, text in texts.items():
        (folder / (name + ".partial")).write_text(text)
    for name in (*texts, WEIGHTS):
        (folder / (name + ".partial")).replace(folder / name)
    return meta


def load_exported(path: str | Path, *, device: str | None = None) -> ExportedModel:
    """The VAE of an exported folder, rebuilt from config.yaml and model.safetensors (no MLflow)."""
    import yaml
    from safetensors.torch import load_file

    from pipeline.config import parse_config
    from pipeline.models import build_vae

    folder = Path(path)
    if not is_export(folder):
        raise ExportError(f"{folder} is not an exported model (it needs {WEIGHTS} and {META}: `pipeline export`)")
    meta = json.loads((folder / META).read_text())
    config = parse_config(yaml.safe_load((folder / CONFIG).read_text()) or {})
    shape = tuple(meta["image_shape"])
    model = build_vae(config.model, image_shape=shape, binarize=config.model.binarize)
    state = load_file(str(folder / WEIGHTS), device=device or "cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ExportError(f"{folder / WEIGHTS} does not fit the network {folder / CONFIG} describes: {err}") from None
    return ExportedModel(model.eval(), config, meta)


def _describe(model: Any, config: Any, *, source: str, run_id: str) -> dict[str, Any]:
    c, h, w = model.image_shape
    meta: dict[str, Any] = {"source": source, "run_id": run_id, "arch": config.model.arch,
                            "latent": config.model.latent.kind, "likelihood": config.model.likelihood,
                            "image_shape": [c, h, w], "image_dtype": "uint8",
                            "parameters": sum(p.numel() for p in model.parameters())}
    if config.model.is_grid:
        grid = list(model.encoder.grid)
        categories = config.model.latent.categories
        meta |= {"code_grid": grid, "codebook_size": categories, "code_dtype": "int64",
                 "bits_per_image": math.prod(grid) * math.log2(categories)}
    return meta


def _readme(meta: dict[str, Any]) -> str:
    c, h, w = meta["image_shape"]
    lines = [f"# {meta['arch']} VAE exported from {meta['source']} (run {meta['run_id']})", "",
             f"- input: uint8 images [B, {c}, {h}, {w}] (pixel values 0..255, channels first)",
             f"- latent: {meta['latent']}; likelihood: {meta['likelihood']}; {meta['parameters']:,} parameters"]
    if "code_grid" in meta:
        gh, gw = meta["code_grid"]
        lines += [f"- codes: int64 [B, {gh}, {gw}], each in 0..{meta['codebook_size'] - 1} "
                  f"({meta['bits_per_image']:g} bits per image)", "",
                  "```python", "from pipeline import Tokenizer",
                  "tok = Tokenizer.load(\"path/to/this/folder\")   # no MLflow needed",
                  f"codes = tok.encode(images)                     # uint8 [B, {c}, {h}, {w}] -> int64 [B, {gh}, {gw}]",
                  f"images = tok.decode(codes)                     # -> uint8 [B, {c}, {h}, {w}]", "```"]
    else:
        lines += ["", "```python", "from pipeline.runs.export import load_exported",
                  "vae = load_exported(\"path/to/this/folder\").model   # a pipeline.models.VAE, eval mode",
                  "reconstructions = vae.reconstruct(images)          # uint8 in, floats in [0, 1] out", "```"]
    lines += ["", f"Files: `{CONFIG}` (the resolved training config), `{WEIGHTS}` (weights only), `{META}`.", ""]
    return "\n".join(lines)
