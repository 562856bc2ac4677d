"""`pipeline encode`, `decode` and `export`: a trained model turns datasets into tokens and back, or leaves
MLflow as a plain folder."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pipeline.cli.common import OutUrl, RayAddress, TrackingUri, console, fail, ray_auth, tracking_uri_option


def encode(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a trained categorical VAE (e.g. a grid dVAE)")],
    data: Annotated[str, typer.Option("--data", help="Dataset to encode: a folder/URL with manifest.json")],
    out: OutUrl,
    splits: Annotated[Optional[str], typer.Option("--splits", help="Comma-separated splits (default: all)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass")] = 256,
    address: RayAddress = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Token shards of a dataset: per sample the posterior mode's codes as uint16 (a grid model's h x w
    code grid) under the source key, one shard per input shard, as Ray tasks; a re-run resumes."""
    ray_auth(address)
    from pipeline.tokens.codes import EncodeError
    from pipeline.tokens.encode import encode_dataset

    try:
        result = encode_dataset(run_id, data, out, splits=[s.strip() for s in splits.split(",") if s.strip()]
                                if splits else None, batch_size=batch_size, address=address, tracking_uri=tracking_uri)
    except EncodeError as err:
        fail(str(err))
    counts = ", ".join(f"{name} {info.samples}" for name, info in result.manifest.splits.items())
    rate = f", {result.samples_per_s:.0f} samples/s" if result.encoded_samples else ""
    console.print(f"encoded {result.written} shards, reused {result.reused} finished ({counts}{rate}) + "
                  f"manifest.json to {out}")


def decode(
    run_id: Annotated[str, typer.Argument(help="MLflow run id whose model wrote the tokens")],
    tokens: Annotated[str, typer.Option("--data", help="Token dataset written by `pipeline encode`")],
    out: Annotated[str, typer.Option("--out", help="Directory (or fsspec URL) for <key>.png")],
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, help="Render at most N samples")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Render token shards as images (PNG, named by sample key) through the run's decoder."""
    from pipeline.tokens.codes import EncodeError
    from pipeline.tokens.decode import decode_tokens

    try:
        result = decode_tokens(run_id, tokens, out, limit=limit, tracking_uri=tracking_uri)
    except EncodeError as err:
        fail(str(err))
    console.print(f"rendered {result.images} images to {out}")


def export(
    model: Annotated[str, typer.Argument(help="Run id, runs:/RUN_ID/model, models:/NAME@ALIAS or models:/NAME/VERSION")],
    out: Annotated[str, typer.Option("--out", help="Folder to write (new or empty)")],
    tracking_uri: tracking_uri_option("MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)") = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what the model takes and gives as JSON")] = False,
) -> None:
    """Write a trained model into a folder that loads without MLflow: config.yaml, model.safetensors (weights
    only), model.json and a README of its inputs and outputs. `Tokenizer.load(FOLDER)` loads a grid model from it."""
    import json

    from pipeline.runs.export import ExportError, export_model
    from pipeline.runs.load import ModelLoadError

    try:
        meta = export_model(model, out, tracking_uri=tracking_uri)
    except (ExportError, ModelLoadError) as err:
        fail(str(err))
    if as_json:
        print(json.dumps(meta, indent=2))
    console.print(f"exported {meta['arch']} model of run {meta['run_id']} to {out}")
