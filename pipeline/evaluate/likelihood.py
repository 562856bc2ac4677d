"""`pipeline evaluate RUN_ID`: likelihood figures of a trained run on a whole split, in one process.

Rebuilds the model from the run's resolved config.yaml and its raw weights
(``checkpoint/model.pt``, loaded with ``weights_only=True``: `pipeline.runs.load`), reads the run's
dataset, and computes per input, summed over the split:

- the -ELBO with one un-relaxed (one-hot for categorical) posterior sample and the analytic KL
  (``<split>/loss``, ``<split>/recon``, ``<split>/kl``),
- the importance-weighted -log p(x) with K proposal samples from the un-relaxed posterior
  (``<split>/nll_is_k<K>``),
- when the code space has at most ENUMERATION_LIMIT codes: the exact -log p(x) and the exact
  -ELBO (``<split>/nll_exact``, ``<split>/loss_exact``),
- for a likelihood over 8-bit levels (logistic): both as bits per dimension
  (``<split>/bits_per_dim``, ``<split>/bits_per_dim_is_k<K>``),
- for a grid model (arch resnet or patch), the tokenizer report of its argmax tokens and the images decoded
  from them (pipeline/evaluate/tokenizer_report.py): ``<split>/rate_bits_per_image``, ``<split>/psnr``,
  ``<split>/psnr_pooled``, ``<split>/mse``, ``<split>/ssim``, ``<split>/codes_used``,
  ``<split>/code_perplexity`` and ``<split>/bits_per_token`` (under a unigram model of the train
  split's tokens), also printed as a table.

``<split>`` is ``test`` for the test split and ``eval/<name>`` for any other.

The dataset is read with the run's own read options (retries, cache, on_corrupt) and image
settings (size, channels, resize).

The figures go into the same MLflow run (at the run's last validation step) and are returned.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from pipeline.config import RunConfig
from pipeline.models import VAE, bits_per_dim, discrete_elbo, exact_log_px_and_elbo, importance_log_px
from pipeline.models.estimators import ENUMERATION_LIMIT


class EvaluationError(RuntimeError):
    """A run or dataset that cannot be evaluated; the message says which and why."""


@dataclass
class EvaluationResult:
    run_id: str
    split: str
    samples: int
    importance_samples: int
    seconds: float
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # label -> TokenizerFigures (grid models)

    def as_dict(self) -> dict[str, Any]:
        out = {"run_id": self.run_id, "split": self.split, "samples": self.samples,
               "importance_samples": self.importance_samples, "seconds": round(self.seconds, 2),
               "metrics": self.metrics, "notes": self.notes}
        if self.tokenizer:
            out["tokenizer"] = {label: figures.as_dict() for label, figures in self.tokenizer.items()}
        return out

    def lines(self) -> list[str]:
        head = (f"run {self.run_id}: {self.split} split, {self.samples} samples, "
                f"k={self.importance_samples}, {self.seconds:.0f} s")
        lines = [head, *(f"{name}: {value:.4f}" for name, value in self.metrics.items())]
        if self.tokenizer:
            from pipeline.evaluate.tokenizer_report import SMOOTHING_NOTE, render_table, report_table

            table = report_table(self.tokenizer, title=f"tokenizer report, run {self.run_id}")
            lines += [*render_table(table).splitlines(), SMOOTHING_NOTE]
        return [*lines, *self.notes]


@torch.no_grad()
def evaluate_model(model: VAE, batches: Iterable[tuple[torch.Tensor, Any]], *, split: str, importance_samples: int,
                   enumeration_limit: int = ENUMERATION_LIMIT, prefix: str | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[dict[str, float], int]:
    """Split-level figures (means over inputs, in nats) named ``<prefix>/...`` (default: the split's
    name), and the number of inputs."""
    model.eval()
    codes = model.latent.enumerate_codes(enumeration_limit)
    sums = {"recon": 0.0, "kl": 0.0, "nll_is": 0.0, "nll_exact": 0.0, "loss_exact": 0.0}
    count = 0
    for x, _labels in batches:
        prepared = model.prepare(x)  # once: every estimator sees the same (binarized) images
        log_px_z, kl = discrete_elbo(model, x, prepared)
        sums["recon"] -= float(log_px_z.double().sum())
        sums["kl"] += float(kl.double().sum())
        sums["nll_is"] -= float(importance_log_px(model, x, importance_samples, prepared).double().sum())
        if codes is not None:
            log_px, elbo = exact_log_px_and_elbo(model, x, codes=codes, prepared=prepared)
            sums["nll_exact"] -= float(log_px.double().sum())
            sums["loss_exact"] -= float(elbo.double().sum())
        count += x.shape[0]
        if progress:
            progress(count)
    if count == 0:
        raise EvaluationError(f"split {split!r} holds no samples")
    name = prefix or split
    metrics = {f"{name}/loss": (sums["recon"] + sums["kl"]) / count, f"{name}/recon": sums["recon"] / count,
               f"{name}/kl": sums["kl"] / count, f"{name}/nll_is_k{importance_samples}": sums["nll_is"] / count}
    if codes is not None:
        metrics[f"{name}/nll_exact"] = sums["nll_exact"] / count
        metrics[f"{name}/loss_exact"] = sums["loss_exact"] / count
    if model.likelihood.eight_bit:
        metrics[f"{name}/bits_per_dim"] = bits_per_dim(metrics[f"{name}/loss"], model.dims)
        metrics[f"{name}/bits_per_dim_is_k{importance_samples}"] = bits_per_dim(
            metrics[f"{name}/nll_is_k{importance_samples}"], model.dims)
    return metrics, count


@dataclass
class OpenedRun:
    """A finished run ready to be evaluated: its config, its model, and its dataset read its way."""

    run_id: str
    tracking_uri: str
    config: RunConfig
    model: VAE
    url: str
    manifest: Any
    target: Any  # ImageTarget: the run's image size and channels
    last_step: int
    tags: dict[str, str]
    notes: list[str]

    def batches(self, split: str, batch_size: int) -> Iterable[tuple[torch.Tensor, Any]]:
        """Every sample of ``split`` as the run saw them (its image settings and read options)."""
        from pipeline.data import eval_batches
        from pipeline.data.contract import SampleDecoder
        from pipeline.data.reader import ReadOptions

        if split not in self.manifest.splits:
            raise EvaluationError(f"{self.url} has no split {split!r} (splits: {', '.join(sorted(self.manifest.splits))})")
        return eval_batches(self.manifest, self.url, split=split, rank=0, world_size=1, batch_size=batch_size,
                            options=ReadOptions.from_config(self.config.data),
                            decoder=SampleDecoder(self.manifest.spec, self.target, self.config.data.decode_workers))


def open_run(run_id: str, *, tracking_uri: str | None = None, data_url: str | None = None) -> OpenedRun:
    """The run's config and model (rebuilt with its raw weights, `pipeline.runs.load`) and its
    dataset's manifest, or an EvaluationError naming the run, file or URL that is wrong."""
    from pipeline.runs import load, store

    try:
        loaded = load.load_run(run_id, tracking_uri=tracking_uri, data_url=data_url)
    except load.RunDataError as err:
        raise EvaluationError(f"{err} (pass --data)") from None
    except load.ModelLoadError as err:
        raise EvaluationError(str(err)) from None
    notes = []
    if loaded.tags.get("dataset.manifest_sha256") not in (None, loaded.manifest.digest()):
        notes.append(f"warning: {loaded.data_url} is not the dataset the run trained on (manifest digest differs)")
    # evaluation figures follow training's: at the last step the run logged val/loss at
    last_step = store.last_step(loaded.tracking_uri, loaded.run_id, "val/loss")
    return OpenedRun(loaded.run_id, loaded.tracking_uri, loaded.config, loaded.model, loaded.data_url,
                     loaded.manifest, loaded.target, last_step, loaded.tags, notes)


def metric_prefix(split: str) -> str:
    """test/* is evaluate's own; on another split the figures go under eval/<split>/, so they never
    add a second point to the histories training logged for it (e.g. val/loss at its last step)."""
    return split if split == "test" else f"eval/{split}"


def evaluate_run(run_id: str, *, split: str = "test", importance_samples: int = 5000, batch_size: int = 100,
                 tracking_uri: str | None = None, data_url: str | None = None, seed: int = 0,
                 enumeration_limit: int = ENUMERATION_LIMIT, log: bool = True) -> EvaluationResult:
    from pipeline.evaluate import tokenizer_report as report
    from pipeline.data import DataError
    from pipeline.runs import store

    started = time.perf_counter()
    opened = open_run(run_id, tracking_uri=tracking_uri, data_url=data_url)
    url, manifest, model, notes = opened.url, opened.manifest, opened.model, list(opened.notes)
    if split not in manifest.splits:
        raise EvaluationError(f"{url} has no split {split!r} (splits: {', '.join(sorted(manifest.splits))})")
    torch.manual_seed(seed)
    total = manifest.splits[split].samples
    prefix = metric_prefix(split)
    tokenizer: dict[str, report.TokenizerFigures] = {}
    try:
        metrics, count = evaluate_model(model, opened.batches(split, batch_size), split=split,
                                        importance_samples=importance_samples, prefix=prefix,
                                        enumeration_limit=enumeration_limit, progress=_progress_printer(total))
        if report.is_grid_model(model):  # the tokenizer report: the argmax tokens and their decoding
            train_split = "train" if "train" in manifest.splits else None
            if train_split is None:
                notes.append(f"{url} has no train split: no bits per token (it models the train split's codes)")
            figures = report.model_report(model, lambda name: opened.batches(name, batch_size), [split],
                                          train_split=train_split)[split]
            metrics |= figures.metrics(prefix)
            tokenizer[f"{split} (run {run_id[:8]})"] = figures
    except DataError as err:
        raise EvaluationError(f"reading {url}: {err}") from None
    result = EvaluationResult(run_id, split, count, importance_samples, time.perf_counter() - started, metrics, notes,
                              tokenizer)
    if log:
        store.log_summary(opened.tracking_uri, run_id, metrics, step=opened.last_step,
                          tags={f"eval.{split}.seconds": f"{result.seconds:.1f}", f"eval.{split}.seed": seed})
    return result


def _progress_printer(total: int) -> Callable[[int], None]:
    """Progress on stderr about every 10% (importance sampling a 10k split takes minutes)."""
    state = {"next": 0.1, "start": time.perf_counter()}

    def report(done: int) -> None:
        if total and done / total >= state["next"]:
            elapsed = time.perf_counter() - state["start"]
            print(f"  {done}/{total} samples, {elapsed:.0f} s", file=sys.stderr, flush=True)
            state["next"] += 0.1

    return report
