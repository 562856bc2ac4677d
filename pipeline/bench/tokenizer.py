"""`pipeline bench tokenizer`: the K-means patch quantizer, the classical yardstick of an image
tokenizer at the same rate, beside a trained grid model's report.

Each image is cut into the h x w grid of patches that one grid position covers ((H/h) x (W/w)
pixels, all channels). scikit-learn's MiniBatchKMeans with K centres is fitted on the train
split's patches (pixels in [0, 1]); each patch of train and of the chosen split is then coded as
its nearest centre and the image rebuilt from those centres. That is h x w K-way codes per
image, so the same h * w * log2 K bits as a grid model with K codes, and it is scored by the
same function as the model (pipeline/evaluate/tokenizer_report.py): PSNR (mean and pooled), SSIM, codes
used, perplexity, bits per token. With ``--run``, the run's report on the same splits, read the
way the run reads them, goes in the same table.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Callable, Iterable, Optional

import numpy as np
import torch
import typer

from pipeline.bench import BenchError, bench_app


def patch_size(image_size: tuple[int, int], grid: tuple[int, int], where: str = "the images") -> tuple[int, int]:
    """(H/h, W/w): the pixels one grid position covers; the grid must divide the image."""
    (height, width), (h, w) = image_size, grid
    if h < 1 or w < 1 or height % h or width % w:
        raise BenchError(f"{where}: {height}x{width} images cannot be cut into a {h}x{w} grid of equal patches "
                         f"(the grid's sides must divide the image's)")
    return height // h, width // w


def to_patches(images: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 [N * h * w, C * ph * pw] in [0, 1], grid positions row-major."""
    images = torch.as_tensor(images)
    n, c, height, width = images.shape
    (h, w), (ph, pw) = grid, patch_size((height, width), grid)
    x = images.float().div(255.0).reshape(n, c, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(n * h * w, c * ph * pw).numpy())


def from_patches(patches: np.ndarray, grid: tuple[int, int], shape: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of `to_patches`: [N * h * w, C * ph * pw] -> float32 [N, C, H, W]."""
    (h, w), (c, height, width) = grid, shape
    ph, pw = patch_size((height, width), grid)
    x = torch.as_tensor(np.asarray(patches, dtype=np.float32)).reshape(-1, h, w, c, ph, pw)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, c, height, width)


def fit_kmeans(train_images: Iterable[torch.Tensor], grid: tuple[int, int], codes: int, *, seed: int = 0,
               where: str = "the train split", status: Callable[[str], Any] | None = None) -> Any:
    """MiniBatchKMeans(n_clusters=codes, random_state=seed) fitted on every patch of the images."""
    from sklearn.cluster import MiniBatchKMeans

    patches = np.concatenate([to_patches(x, grid) for x in train_images]) if train_images else np.zeros((0, 1))
    if len(patches) < codes:
        raise BenchError(f"{where}: {len(patches)} patches, fewer than the {codes} K-means centres asked for")
    kmeans = MiniBatchKMeans(n_clusters=codes, random_state=seed, n_init="auto")
    if status is None:
        return kmeans.fit(patches)
    with status(f"fitting K-means, K={codes}, on {len(patches):,} patches of {patches.shape[1]} values"):
        return kmeans.fit(patches)


def kmeans_encode(kmeans: Any, images: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N, h, w] (each patch's nearest centre) of uint8 images [N, C, H, W], and the images
    rebuilt from those centres, float32 in [0, 1]."""
    labels = kmeans.predict(to_patches(images, grid))
    codes = torch.as_tensor(labels.astype(np.int64)).reshape(len(images), *grid)
    return codes, from_patches(kmeans.cluster_centers_[labels], grid, tuple(images.shape[1:]))


def kmeans_report(kmeans: Any, batches: Callable[[str], Iterable[tuple[torch.Tensor, Any]]], splits: list[str],
                  grid: tuple[int, int], codes: int, *, train_split: str = "train") -> dict[str, Any]:
    """The tokenizer report of the fitted quantizer on each split (the train split's codes give
    the unigram model behind bits per token)."""
    from pipeline.evaluate.tokenizer_report import TokenizerTally

    tallies = {split: TokenizerTally(grid, codes) for split in dict.fromkeys([train_split, *splits])}
    for split, tally in tallies.items():
        for x, _labels in batches(split):
            split_codes, reconstructions = kmeans_encode(kmeans, x, grid)
            tally.add(split_codes, x, reconstructions)
    return {split: tallies[split].figures(tallies[train_split].counts) for split in splits}


def _status_on_stderr() -> Callable[[str], Any]:
    """A spinner with the elapsed time on stderr, while a long step runs (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    class _Status:
        def __init__(self, text: str) -> None:
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=True)
            self.text = text

        def __enter__(self) -> None:
            self.progress.start()
            self.progress.add_task(self.text, total=None)

        def __exit__(self, *exc: Any) -> None:
            self.progress.stop()

    return _Status


def tokenizer_bench(data: str, grid: tuple[int, int] | None, codes: int | None, *, run_id: str | None = None,
                    split: str = "val", seed: int = 0, batch_size: int = 256, tracking_uri: str | None = None,
                    status: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """K-means on the dataset's train split at (grid, codes), its report on train and ``split``;
    with ``run_id`` the run's report beside it (grid and codes default to the run's)."""
    from pipeline.data import DataError, eval_batches, read_manifest
    from pipeline.evaluate.tokenizer_report import is_grid_model, model_report

    opened = None
    if run_id is not None:
        from pipeline.evaluate.likelihood import EvaluationError, open_run

        try:
            opened = open_run(run_id, tracking_uri=tracking_uri, data_url=data)
        except EvaluationError as err:
            raise BenchError(str(err)) from None
        if not is_grid_model(opened.model):
            raise BenchError(f"run {run_id} is not a grid model (model.arch {opened.config.model.arch!r}): "
                             f"no tokens to compare")
        run_grid, run_codes = tuple(opened.model.encoder.grid), opened.model.latent.categories
        if grid is not None and tuple(grid) != run_grid or codes is not None and codes != run_codes:
            raise BenchError(f"run {run_id} codes a {run_grid[0]}x{run_grid[1]} grid of {run_codes} codes, not "
                             f"--grid {grid[0] if grid else '?'} {grid[1] if grid else '?'} --codes {codes}: "
                             f"compare at the run's rate (leave out --grid/--codes)")
        grid, codes = run_grid, run_codes
        manifest = opened.manifest
    else:
        if grid is None or codes is None:
            raise BenchError("give --grid H W and --codes K (or --run RUN_ID to take them from a grid model)")
        try:
            manifest = read_manifest(data)
        except DataError as err:
            raise BenchError(f"dataset {data} not readable: {err}") from None
    if codes < 2:
        raise BenchError(f"--codes must be >= 2, got {codes}")
    for name in dict.fromkeys(["train", split]):
        if name not in manifest.splits:
            raise BenchError(f"{data} has no split {name!r} (splits: {', '.join(sorted(manifest.splits))})")

    def batches(name: str) -> Iterable[tuple[torch.Tensor, Any]]:
        if opened is not None:  # the pixels the run sees (its image size and channels)
            return opened.batches(name, batch_size)
        return eval_batches(manifest, data, split=name, rank=0, world_size=1, batch_size=batch_size)

    try:
        train_images = [x for x, _ in batches("train")]
        shape = tuple(train_images[0].shape[1:]) if train_images else None
        if shape is not None:
            patch_size(shape[1:], grid, where=f"{data} (split 'train')")
        started = time.perf_counter()
        kmeans = fit_kmeans(train_images, grid, codes, seed=seed, where=f"{data} (split 'train')", status=status)
        fit_seconds = time.perf_counter() - started
        del train_images
        baseline = kmeans_report(kmeans, batches, ["train", split] if split != "train" else ["train"], grid, codes)
        report: dict[str, Any] = {
            "data": data, "split": split, "grid": list(grid), "codes": codes, "seed": seed,
            "image_shape": list(shape) if shape else None, "patch": list(patch_size(shape[1:], grid)),
            "fit_seconds": round(fit_seconds, 1), "kmeans": baseline}
        if opened is not None:
            report["run_id"] = run_id
            report["run"] = model_report(opened.model, batches, list(dict.fromkeys(["train", split])))
            report["notes"] = opened.notes
    except DataError as err:
        raise BenchError(f"reading {data}: {err}") from None
    return report


def report_rows(report: dict[str, Any]) -> dict[str, Any]:
    """Table rows: K-means per split, then the run per split."""
    rows = {f"K-means, {name}": figures for name, figures in report["kmeans"].items()}
    if "run" in report:
        rows |= {f"run {report['run_id'][:8]}, {name}": figures for name, figures in report["run"].items()}
    return rows


def as_json(report: dict[str, Any]) -> dict[str, Any]:
    out = dict(report)
    out["kmeans"] = {name: f.as_dict() for name, f in report["kmeans"].items()}
    if "run" in report:
        out["run"] = {name: f.as_dict() for name, f in report["run"].items()}
    return out


@bench_app.command("tokenizer")
def tokenizer_command(
    data: Annotated[str, typer.Option("--data", help="Dataset folder/URL with manifest.json (its train split is fitted)")],
    grid: Annotated[Optional[tuple[int, int]], typer.Option("--grid", help="Code grid h w (default with --run: the run's)",
                                                            show_default=False)] = None,
    codes: Annotated[Optional[int], typer.Option("--codes", help="K codes, i.e. K-means centres (default with --run: "
                                                 "the run's)")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run", help="A trained grid model's MLflow run id: its report "
                                                  "goes beside the baseline")] = None,
    split: Annotated[str, typer.Option("--split", help="Split coded besides train")] = "val",
    seed: Annotated[int, typer.Option("--seed", help="MiniBatchKMeans random_state")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch")] = 256,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store of --run "
                                                        "(default as for train)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """The K-means patch quantizer at the same rate as an h x w grid of K codes (h*w*log2 K bits per
    image): PSNR, SSIM, codes used, perplexity and bits per token on train and a held-out split,
    beside a run's figures with --run."""
    from pipeline.evaluate.tokenizer_report import SMOOTHING_NOTE, render_table, report_table

    if grid is not None and None in grid:  # typer passes an unset tuple option as (None, None)
        grid = None
    report = tokenizer_bench(data, grid, codes, run_id=run_id, split=split, seed=seed, batch_size=batch_size,
                             tracking_uri=tracking_uri, status=_status_on_stderr())
    if json_out:
        print(json.dumps(as_json(report), indent=2))
        return
    h, w = report["grid"]
    title = (f"{data}: {h}x{w} grid of {report['codes']} codes = {h * w * np.log2(report['codes']):g} bits/image, "
             f"patches {report['patch'][0]}x{report['patch'][1]}, K-means fit {report['fit_seconds']:g} s")
    print(render_table(report_table(report_rows(report), title=title)))
    print(SMOOTHING_NOTE)
    for note in report.get("notes", []):
        print(note)
