"""`pipeline encode` and `pipeline decode`: a trained categorical VAE turns a dataset into token
shards (the training data of a downstream prior, e.g. a transformer), and tokens back into images.

The token format is described in pipeline/tokens/codes.py.

How the work runs (pipeline/data/writer.py): one Ray task per input shard (1 CPU; 1 GPU each when
the cluster has GPUs), at most twice the cluster's slots in flight. Each task builds the model once per worker process, reads
its shard with the run's read options (sha256 verified, corruption is an error: every sample is
written exactly once), encodes in batches and streams the tar to ``OUT/_tmp/<shard>.<uuid>``, then
publishes it with one move to its final name (a rename on a file system; a copy + delete on object
stores, where the object appears only complete) and then records it in ``OUT/_progress/<shard>.json``
(sha256, samples, bytes and the recipe: run, weights, source shard). A re-run reuses every shard
whose record matches the recipe and whose file has the recorded size: a killed run resumes without
redoing finished shards. The manifest is written last. Dynamic binarization (``model.binarize:
dynamic``) draws its noise from a seed per (seed, split, shard), so tokens are reproducible.

Hooks (never part of a config; pipeline/train/hooks.py): specs passed as ``hooks=`` or read from
``$PIPELINE_ENCODE_HOOKS`` travel to every task, which calls ``factory(out_url, shard_path, **args)``;
a factory returns None (no hook for this shard) or a function that wraps the shard's sample stream
(an iterator of (key, {suffix: bytes})) and returns the stream the shard is written from.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.data.contract import ImageTarget, SampleDecoder, SampleSpec
from pipeline.data.errors import DataError
from pipeline.data.reader import ReadOptions
from pipeline.data.shards import Manifest, ShardInfo, TokenInfo, read_manifest, shard_url
from pipeline.data.executors import ray_tasks
from pipeline.data.writer import ShardTask, ShardWriter, Written, write_finished_shard
from pipeline.models import VAE
from pipeline.runs.registry import registered_version
from pipeline.tokens.codes import EncodeError, TokenLayout, load_run_model, token_layout, tokens_of
from pipeline.train import hooks as train_hooks

RECIPE_VERSION = 1
HOOKS_ENV = "PIPELINE_ENCODE_HOOKS"  # the hook specs `pipeline encode` installs (module docstring)

# --- one shard (a Ray task) -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob(ShardTask):
    source: ShardInfo  # the input shard: one token shard per input shard


@dataclass
class EncodeContext:
    """Everything a task needs, shipped once through the object store."""

    run_id: str
    recipe: str
    model_config: dict
    image_shape: tuple[int, int, int]
    binarize: str
    weights: bytes  # torch.save of the state_dict (loaded with weights_only=True)
    layout: TokenLayout
    manifest_json: str
    data_url: str
    out_url: str
    options: ReadOptions
    target: ImageTarget
    decode_workers: int
    batch_size: int
    seed: int
    with_labels: bool
    hooks: list[train_hooks.HookSpec] = field(default_factory=list)


_WORKER_CACHE: dict[str, Any] = {}


def _worker_state(ctx: EncodeContext) -> tuple[VAE, Manifest, torch.device]:
    """The model (built once per worker process and recipe) and the source manifest."""
    if _WORKER_CACHE.get("recipe") != ctx.recipe:
        from pipeline.config import ModelConfig
        from pipeline.models import build_vae

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_vae(ModelConfig.model_validate(ctx.model_config), image_shape=ctx.image_shape,
                          binarize=ctx.binarize)
        model.load_state_dict(torch.load(io.BytesIO(ctx.weights), map_location="cpu", weights_only=True))
        _WORKER_CACHE.update(recipe=ctx.recipe, model=model.to(device).eval(), device=device,
                             manifest=Manifest.model_validate_json(ctx.manifest_json))
    return _WORKER_CACHE["model"], _WORKER_CACHE["manifest"], _WORKER_CACHE["device"]


def _shard_seed(seed: int, job: ShardJob) -> int:
    digest = hashlib.sha256(f"{seed}/{job.split}/{job.number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _token_samples(ctx: EncodeContext, job: ShardJob, model: VAE, manifest: Manifest,
                   device: torch.device) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(source key, {npy, cls}) of every sample of the job's source shard, in order."""
    from pipeline.data.reader import ShardReader

    decoder = SampleDecoder(manifest.spec, ctx.target, ctx.decode_workers)
    reader = ShardReader(replace(ctx.options, verify=True, on_corrupt="error"), decoder)
    # Stored as the manifest's [h, w] (a flat latent's [N] as [1, N]: the contract's 2-D npy).
    empty = _npy(np.zeros(ctx.layout.spec_size, np.uint16))
    npy_header = empty[: len(empty) - 2 * int(np.prod(ctx.layout.shape))]  # np.save's, for this shape and dtype
    torch.manual_seed(_shard_seed(ctx.seed, job))  # dynamic binarization: reproducible per shard
    pending_keys: list[str] = []
    pending_images: list[np.ndarray] = []
    pending_labels: list[np.ndarray] = []

    def flush(limit: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        while len(pending_keys) >= limit and pending_keys:
            n = min(len(pending_keys), ctx.batch_size)
            images = np.concatenate(pending_images) if len(pending_images) > 1 else pending_images[0]
            labels = np.concatenate(pending_labels) if len(pending_labels) > 1 else pending_labels[0]
            x = torch.from_numpy(np.ascontiguousarray(decoder.finish(images[:n], None))).to(device)
            tokens = tokens_of(model, x, ctx.layout).cpu().numpy().astype("<u2")
            for key, grid, label in zip(pending_keys[:n], tokens, labels[:n]):
                members = {"npy": npy_header + grid.tobytes()}  # = np.save(grid)
                if ctx.with_labels:
                    members["cls"] = str(int(label)).encode("ascii")
                yield key, members
            del pending_keys[:n]
            pending_images[:] = [images[n:]] if n < len(images) else []
            pending_labels[:] = [labels[n:]] if n < len(labels) else []

    for keys, images, labels in reader.read_shard_chunks(manifest, ctx.data_url, job.source):
        pending_keys.extend(keys)
        pending_images.append(images)
        pending_labels.append(labels)
        yield from flush(ctx.batch_size)
    yield from flush(1)


def encode_shard(ctx: EncodeContext, job: ShardJob) -> Written:
    """Encode one source shard into ``OUT/<job.path>``, published atomically, then recorded."""
    started = time.perf_counter()
    model, manifest, device = _worker_state(ctx)
    source = shard_url(ctx.data_url, job.source)
    samples = _token_samples(ctx, job, model, manifest, device)
    for spec in ctx.hooks:
        wrap = train_hooks.build(spec, ctx.out_url, job.path)
        samples = samples if wrap is None else wrap(samples)

    def check(count: int) -> None:
        if count != job.source.samples:
            raise EncodeError(f"{source}: read {count} samples, its manifest says {job.source.samples}")

    try:
        info = write_finished_shard(ctx.out_url, job.path, samples, ctx.recipe, staged=True, check=check,
                                    source=job.source.path, source_sha256=job.source.sha256)
    except DataError as err:
        raise EncodeError(f"run {ctx.run_id}: shard {source}: {err}") from None
    return Written(info, {"seconds": time.perf_counter() - started, "device": str(device)})


# --- the driver -----------------------------------------------------------------------------------


@dataclass
class EncodeResult:
    manifest: Manifest
    out_url: str
    written: int  # shards encoded by this run
    reused: int  # shards a previous run had finished
    samples: int  # samples in the token dataset
    encoded_samples: int  # samples encoded by this run
    seconds: float  # the tasks' wall time on the driver
    devices: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.encoded_samples / self.seconds if self.seconds > 0 else 0.0


def _absolute(url: str) -> str:
    """Local paths become absolute (Ray workers do not share our cwd); URLs pass through."""
    return url if "://" in url else str(Path(url).expanduser().resolve())


def recipe_digest(run_id: str, weights: bytes, spec: SampleSpec, target: ImageTarget, seed: int,
                  binarize: str) -> str:
    """What a token shard's bytes depend on besides its source shard's sha256."""
    recipe = {"version": RECIPE_VERSION, "run_id": run_id, "weights": hashlib.sha256(weights).hexdigest(),
              "spec": spec.model_dump(), "target": [target.channels, list(target.size), target.resize],
              "seed": seed, "binarize": binarize}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def encode_dataset(run_id: str, data_url: str, out_url: str, *, splits: list[str] | None = None,
                   batch_size: int = 256, address: str | None = None, tracking_uri: str | None = None,
                   seed: int = 0, progress: bool = True, max_retries: int = 3,
                   on_shard_done: Callable[[ShardInfo], None] | None = None,
                   hooks: list[train_hooks.HookSpec] | None = None) -> EncodeResult:
    """Write the token dataset of ``data_url`` under ``out_url`` with run ``run_id``'s model (module docstring)."""
    if batch_size < 1:
        raise EncodeError(f"batch size must be >= 1, got {batch_size}")
    data_url, out_url = _absolute(data_url), _absolute(out_url)
    from pipeline.data.shards import manifest_location

    if manifest_location(data_url)[0].rstrip("/") == out_url.rstrip("/"):
        raise EncodeError(f"--out {out_url} is the dataset's own folder: token shards would replace its shards")
    try:
        source = read_manifest(data_url)
    except DataError as err:
        raise EncodeError(str(err)) from None
    names = list(source.splits) if not splits else splits
    unknown = [name for name in names if name not in source.splits]
    if unknown:
        raise EncodeError(f"{data_url} has no split(s) {', '.join(unknown)} (splits: {', '.join(source.splits)})")
    run = load_run_model(run_id, manifest=source, tracking_uri=tracking_uri)
    layout = token_layout(run.model, run_id)
    target = ImageTarget.from_config(source.spec, run.config.data)
    buffer = io.BytesIO()
    torch.save(run.model.state_dict(), buffer)
    weights = buffer.getvalue()
    recipe = recipe_digest(run_id, weights, source.spec, target, seed, run.config.model.binarize)
    with_labels = source.spec.label is not None
    jobs = [ShardJob(name, i, shard) for name in names for i, shard in enumerate(source.splits[name].shards)]

    writer = ShardWriter(out_url, jobs, recipe=lambda job: recipe, samples=lambda job: job.source.samples,
                         accept=lambda job, record: record.get("source_sha256") == job.source.sha256)
    ctx = EncodeContext(run_id=run_id, recipe=recipe, model_config=run.config.model.model_dump(),
                        image_shape=run.image_shape, binarize=run.config.model.binarize, weights=weights,
                        layout=layout, manifest_json=source.model_dump_json(), data_url=data_url, out_url=out_url,
                        options=ReadOptions.from_config(run.config.data), target=target,
                        decode_workers=run.config.data.decode_workers, batch_size=batch_size, seed=seed,
                        with_labels=with_labels,
                        hooks=train_hooks.specs_from_environment(HOOKS_ENV) if hooks is None else hooks)
    todo = list(writer.todo)
    started = time.perf_counter()
    writer.run(ray_tasks(encode_shard, ctx, address=address, max_retries=max_retries, error=EncodeError,
                         what=f"run {run_id}", name=lambda job: f"{job.path} ({shard_url(data_url, job.source)})"),
               progress=progress, label="encoding shards", per="shard", on_shard_done=on_shard_done)
    seconds = time.perf_counter() - started

    split_infos = writer.split_infos(names)
    spec = SampleSpec(image="npy", channels=1, size=layout.spec_size, label="cls" if with_labels else None)
    tokens = TokenInfo(run_id=run_id, model_version=registered_version(run.tracking_uri, run_id), source=data_url,
                       source_sha256=source.digest(), categories=layout.categories,
                       grid=list(layout.grid) if layout.grid else None, shape=list(layout.shape),
                       image_shape=list(run.image_shape))
    manifest = writer.finish(source=f"pipeline encode {run_id} {data_url}", spec=spec, split_infos=split_infos,
                             tokens=tokens)
    encoded = sum(writer.done[job.path].info.samples for job in todo)
    devices = sorted({writer.done[job.path].extra["device"] for job in todo})
    return EncodeResult(manifest, out_url, len(todo), writer.reused, sum(s.samples for s in split_infos.values()),
                        encoded, seconds, devices)


# --- reading tokens, decoding ------------------------------------------------------------------------


