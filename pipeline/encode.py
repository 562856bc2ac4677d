"""`pipeline encode` and `pipeline decode`: a trained categorical VAE turns a dataset into token
shards (the training data of a downstream prior, e.g. a transformer), and tokens back into images.

Token format (a dataset like any other: WebDataset tars + manifest.json, any fsspec URL):
- one output shard per input shard, ``<split>-<nnnnn>.tar``, its samples in the source shard's
  order and under the SOURCE sample's key;
- per sample ``<key>.npy``: ``np.save`` (no pickle) of the posterior mode's class indices as
  uint16 — the code grid [h, w] of a grid latent (``model.arch: resnet``), or the N argmaxes [N]
  of a flat categorical latent — plus ``<key>.cls`` (the label, ASCII) when the source has labels;
- the manifest (format 2) declares ``dtype: uint16``, ``sample`` (npy, 1 channel, size [h, w], or
  [1, N] for a flat latent) and ``tokens``: the run id, the model version (the registered model
  version ``models:/<name>/<v>`` when the run's model is registered, else ``runs:/<run_id>``), the
  source URL and the source manifest's sha256 (`Manifest.digest`), K, the grid and the array shape.

How the work runs: one Ray task per input shard (1 CPU; 1 GPU each when the cluster has GPUs), at
most twice the cluster's slots in flight. Each task builds the model once per worker process, reads
its shard with the run's read options (sha256 verified, corruption is an error: every sample is
written exactly once), encodes in batches and streams the tar to ``OUT/_tmp/<shard>.<uuid>``, then
publishes it with one move to its final name (a rename on a file system; a copy + delete on object
stores, where the object appears only complete) and then records it in ``OUT/_progress/<shard>.json``
(sha256, samples, bytes and the recipe: run, weights, source shard). A re-run reuses every shard
whose record matches the recipe and whose file has the recorded size: a killed run resumes without
redoing finished shards. The manifest is written last. Dynamic binarization (``data.binarize:
dynamic``) draws its noise from a seed per (seed, split, shard), so tokens are reproducible.

`decode` reads token shards (declared members only, ``allow_pickle=False``, dtype/shape/range and
each shard's sha256 checked) and renders each sample through the run's decoder: tokens -> one-hot
(or the codebook lookup of a grid decoder: the same vectors) -> ``likelihood.mean`` -> PNG named by
key: the model's own reconstruction from the posterior mode.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import ConfigError, RunConfig, parse_config
from pipeline.data.contract import ImageTarget, SampleDecoder, SampleSpec, encode_image
from pipeline.data.errors import DataError
from pipeline.data.reader import ReadOptions
from pipeline.data.shards import (
    Manifest, ShardInfo, SplitInfo, TokenInfo, begin_dataset, finish_dataset, read_manifest, shard_url,
)
from pipeline.models import VAE

PROGRESS_DIR = "_progress"
TMP_DIR = "_tmp"
RECIPE_VERSION = 1
MAX_TOKENS = 1 << 16  # uint16 indices
# Test hook: a shard path (e.g. "train-00001.tar") whose task sleeps before writing, so a test can kill
# the run while that shard is in flight. Read by the driver and handed to the tasks explicitly.
HANG_ENV = "PIPELINE_ENCODE_TEST_HANG"


class EncodeError(RuntimeError):
    """A run, dataset or shard that cannot be encoded/decoded; the message names which and why."""


# --- the run's model ------------------------------------------------------------------------------


@dataclass
class RunModel:
    """What encoding or decoding needs of a finished training run."""

    run_id: str
    config: RunConfig
    model: VAE
    tags: dict[str, str]
    tracking_uri: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.image_shape


def load_run_model(run_id: str, image_shape: tuple[int, int, int] | None = None, *,
                   manifest: Manifest | None = None, tracking_uri: str | None = None) -> RunModel:
    """The run's VAE rebuilt from its config.yaml and raw weights (as `pipeline evaluate` does), for
    images of ``image_shape``, or of the shape the run's data settings make of ``manifest``'s samples."""
    from pipeline import evaluate_tracking as tracking
    from pipeline.evaluate import EvaluationError, rebuild_model

    uri = tracking.resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = tracking.run_for_evaluation(uri, run_id, Path(tmp))
        except tracking.RunNotFoundError as err:
            raise EncodeError(str(err)) from None
        if run["files"]["config"] is None:
            raise EncodeError(f"run {run_id} has no config.yaml artifact: not a `pipeline train` run")
        try:
            config = parse_config(yaml.safe_load(run["files"]["config"].read_text()) or {})
        except ConfigError as err:
            raise EncodeError(f"run {run_id}: its config.yaml no longer validates: {err}") from None
        if image_shape is None:
            assert manifest is not None
            try:
                image_shape = ImageTarget.from_config(manifest.spec, config.data).shape
            except ValueError as err:
                raise EncodeError(f"run {run_id}: {err}") from None
        try:
            model = rebuild_model(config, image_shape, run["files"]["weights"], tracking_uri=uri, run_id=run_id)
        except EvaluationError as err:
            raise EncodeError(str(err)) from None
        except (RuntimeError, ValueError) as err:  # weights that do not fit the config's shapes
            raise EncodeError(f"run {run_id}: cannot rebuild its model for images {list(image_shape)}: {err}") from None
    return RunModel(run_id, config, model, run["tags"], uri)


@dataclass(frozen=True)
class TokenLayout:
    """How a model's posterior mode is stored: uint16 ``shape`` ([h, w] grid, or [N])."""

    categories: int
    variables: int
    grid: tuple[int, int] | None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.grid if self.grid is not None else (self.variables,)

    @property
    def spec_size(self) -> list[int]:
        return list(self.grid) if self.grid is not None else [1, self.variables]


def token_layout(model: VAE, run_id: str = "?") -> TokenLayout:
    from pipeline.models.latents import CategoricalLatent

    latent = model.latent
    if not isinstance(latent, CategoricalLatent):
        raise EncodeError(f"run {run_id}: its latent ({type(latent).__name__}) is not categorical: no tokens to write")
    if latent.categories > MAX_TOKENS:
        raise EncodeError(f"run {run_id}: K = {latent.categories} classes do not fit uint16 tokens")
    grid = tuple(model.encoder.grid) if model.arch == "resnet" else None
    return TokenLayout(latent.categories, latent.variables, grid)  # type: ignore[arg-type]


@torch.no_grad()
def tokens_of(model: VAE, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Posterior-mode class indices [B, *layout.shape] (int64) of uint8 images [B, C, H, W]."""
    inputs, _ = model.prepare(x)
    params = model.encode(inputs)
    return params.reshape(params.shape[0], layout.variables, layout.categories).argmax(-1).reshape(
        params.shape[0], *layout.shape)


@torch.no_grad()
def pixels_of(model: VAE, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Expected pixel values in [0, 1], [B, C, H, W], decoded from class indices [B, *layout.shape]."""
    tokens = tokens.long()
    if layout.grid is not None and hasattr(model.decoder, "decode_indices"):
        out = model.decoder.decode_indices(tokens)  # the codebook rows a one-hot code selects, no [B, N, K]
    else:
        one_hot = F.one_hot(tokens.reshape(tokens.shape[0], -1), layout.categories)
        out = model.decode(one_hot.to(next(model.parameters()).dtype).reshape(tokens.shape[0], -1))
    return model.likelihood.mean(out)


def model_version(tracking_uri: str, run_id: str) -> str:
    """``models:/<name>/<version>`` of the run's newest registered model version, else ``runs:/<run_id>``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        versions = list(MlflowClient(tracking_uri).search_model_versions(f"run_id = '{run_id}'"))
    except MlflowException:
        versions = []
    if not versions:
        return f"runs:/{run_id}"
    newest = max(versions, key=lambda v: int(v.version))
    return f"models:/{newest.name}/{newest.version}"


# --- one shard (a Ray task) -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    source: ShardInfo

    @property
    def path(self) -> str:
        return f"{self.split}-{self.index:05d}.tar"


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
    hang: str | None = None


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
    digest = hashlib.sha256(f"{seed}/{job.split}/{job.index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header `shards.write_shard` (tarfile) writes for a member: mode 0444, mtime 0,
    uid/gid 0, no user names — built directly (tarfile's TarInfo costs ~0.15 ms a member, more than the
    model: tests/test_encode.py checks the bytes are tarfile's)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100:  # tarfile splits long names into prefix + name
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        return info.tobuf(tarfile.USTAR_FORMAT)
    head = b"".join([raw.ljust(100, b"\0"), b"0000444\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
                     b"00000000000\0", b" " * 8, b"0", bytes(100), b"ustar\x0000", bytes(32 + 32 + 8 + 8 + 155)])
    head = head.ljust(512, b"\0")
    return head[:148] + b"%06o\0" % sum(head) + head[155:]


def write_tar(fs: fsspec.AbstractFileSystem, path: str,
              samples: Iterator[tuple[str, dict[str, bytes]]]) -> tuple[int, int, str]:
    """`shards.write_shard` (plain tar, the same bytes), ~5x faster per member: (samples, bytes, sha256)."""
    digest, count, total = hashlib.sha256(), 0, 0
    buffer = bytearray()
    with fs.open(path, "wb") as out:
        def flush() -> None:
            nonlocal total
            digest.update(buffer)
            out.write(bytes(buffer))
            total += len(buffer)
            buffer.clear()

        for key, members in samples:
            for suffix, data in members.items():
                buffer += _ustar_header(f"{key}.{suffix}", len(data))
                buffer += data
                buffer += bytes(-len(data) % 512)
            count += 1
            if len(buffer) >= 1 << 20:
                flush()
        buffer += bytes(1024)  # two zero blocks end the archive, then tarfile's 10240-byte record padding
        buffer += bytes(-(total + len(buffer)) % tarfile.RECORDSIZE)
        flush()
    return count, total, digest.hexdigest()


def _token_samples(ctx: EncodeContext, job: ShardJob, model: VAE, manifest: Manifest,
                   device: torch.device) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(source key, {npy, cls}) of every sample of the job's source shard, in order."""
    from pipeline.data.reader import read_shard_chunks

    decoder = SampleDecoder(manifest.spec, ctx.target, ctx.decode_workers)
    empty = _npy(np.zeros(ctx.layout.shape, np.uint16))
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

    for keys, images, labels in read_shard_chunks(manifest, ctx.data_url, job.source, verify=True,
                                                  on_corrupt="error", options=ctx.options, decoder=decoder):
        pending_keys.extend(keys)
        pending_images.append(images)
        pending_labels.append(labels)
        yield from flush(ctx.batch_size)
    yield from flush(1)


def encode_shard(ctx: EncodeContext, job: ShardJob) -> dict:
    """Encode one source shard into ``OUT/<job.path>``, published atomically, then recorded."""
    started = time.perf_counter()
    model, manifest, device = _worker_state(ctx)
    if ctx.hang == job.path:
        time.sleep(3600)  # test hook (HANG_ENV): stay in flight until the test kills the run
    fs, root = fsspec.core.url_to_fs(ctx.out_url)
    root = root.rstrip("/")
    tmp = f"{root}/{TMP_DIR}/{job.path}.{uuid.uuid4().hex}"
    fs.makedirs(f"{root}/{TMP_DIR}", exist_ok=True)
    fs.makedirs(f"{root}/{PROGRESS_DIR}", exist_ok=True)
    source = shard_url(ctx.data_url, job.source)
    try:
        count, size, sha256 = write_tar(fs, tmp, _token_samples(ctx, job, model, manifest, device))
        if count != job.source.samples:
            raise EncodeError(f"{source}: read {count} samples, its manifest says {job.source.samples}")
        fs.mv(tmp, f"{root}/{job.path}")  # the final name appears complete, or not at all
    except DataError as err:
        _remove_quietly(fs, tmp)
        raise EncodeError(f"run {ctx.run_id}: shard {source}: {err}") from None
    except BaseException:
        _remove_quietly(fs, tmp)
        raise
    info = ShardInfo(path=job.path, samples=count, bytes=size, sha256=sha256)
    # The record comes after the publish: it is what makes a shard "finished" for a re-run.
    record = {"recipe": ctx.recipe, "source": job.source.path, "source_sha256": job.source.sha256,
              "shard": info.model_dump()}
    fs.pipe_file(f"{root}/{PROGRESS_DIR}/{job.path}.json", json.dumps(record, indent=1).encode())
    return {"shard": info.model_dump(), "seconds": time.perf_counter() - started, "device": str(device)}


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except OSError:
        pass


def _finished(fs: fsspec.AbstractFileSystem, root: str, job: ShardJob, recipe: str) -> ShardInfo | None:
    """The job's recorded output when a previous run finished it with this recipe, else None."""
    try:
        record = json.loads(fs.cat_file(f"{root}/{PROGRESS_DIR}/{job.path}.json"))
        info = ShardInfo.model_validate(record["shard"])
        intact = fs.size(f"{root}/{job.path}") == info.bytes
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("recipe") != recipe or record.get("source_sha256") != job.source.sha256 or not intact:
        return None
    if info.samples != job.source.samples:
        return None
    return info


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
                   on_shard_done: Callable[[ShardInfo], None] | None = None) -> EncodeResult:
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
    recipe = recipe_digest(run_id, weights, source.spec, target, seed, run.config.data.binarize)
    with_labels = source.spec.label is not None
    jobs = [ShardJob(name, i, shard) for name in names for i, shard in enumerate(source.splits[name].shards)]

    fs, root, stale = begin_dataset(out_url)
    done: dict[str, ShardInfo] = {}  # by output path
    for job in jobs:
        info = _finished(fs, root, job, recipe)
        if info is not None:
            done[job.path] = info
    reused = len(done)
    todo = [job for job in jobs if job.path not in done]
    ctx = EncodeContext(run_id=run_id, recipe=recipe, model_config=run.config.model.model_dump(),
                        image_shape=run.image_shape, binarize=run.config.data.binarize, weights=weights,
                        layout=layout, manifest_json=source.model_dump_json(), data_url=data_url, out_url=out_url,
                        options=ReadOptions.from_config(run.config.data), target=target,
                        decode_workers=run.config.data.decode_workers, batch_size=batch_size, seed=seed,
                        with_labels=with_labels, hang=os.environ.get(HANG_ENV) or None)
    started = time.perf_counter()
    devices: set[str] = set()
    if todo:
        with _shard_progress(progress, len(jobs), reused) as advance:
            def finished(job: ShardJob, result: dict) -> None:
                info = ShardInfo.model_validate(result["shard"])
                done[job.path] = info
                devices.add(result["device"])
                advance(job.path)
                if on_shard_done:
                    on_shard_done(info)

            _run_on_ray(todo, ctx, address, max_retries, finished)
    seconds = time.perf_counter() - started

    split_infos = {name: SplitInfo(samples=sum(done[j.path].samples for j in jobs if j.split == name),
                                   shards=[done[j.path] for j in jobs if j.split == name]) for name in names}
    spec = SampleSpec(image="npy", channels=1, size=layout.spec_size, label="cls" if with_labels else None)
    tokens = TokenInfo(run_id=run_id, model_version=model_version(run.tracking_uri, run_id), source=data_url,
                       source_sha256=source.digest(), categories=layout.categories,
                       grid=list(layout.grid) if layout.grid else None, shape=list(layout.shape),
                       image_shape=list(run.image_shape))
    manifest = finish_dataset(fs, root, stale, source=f"pipeline encode {run_id} {data_url}", spec=spec,
                              split_infos=split_infos, tokens=tokens)
    if fs.exists(f"{root}/{TMP_DIR}"):
        fs.rm(f"{root}/{TMP_DIR}", recursive=True)  # leftovers of killed tasks
    encoded = sum(done[j.path].samples for j in todo)
    return EncodeResult(manifest, out_url, len(todo), reused, sum(s.samples for s in split_infos.values()),
                        encoded, seconds, sorted(devices))


def _run_on_ray(todo: list[ShardJob], ctx: EncodeContext, address: str | None, max_retries: int,
                finished: Callable[[ShardJob, dict], None]) -> None:
    """One task per shard, a bounded number in flight; failures named by shard, after the others finish."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        address = address or os.environ.get("RAY_ADDRESS")
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                         logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as err:
            raise EncodeError(f"cannot join the Ray cluster at {address or 'local'}: {err}") from None
    try:
        resources = ray.cluster_resources()
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        slots = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1))
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=max_retries)(encode_shard)
        ctx_ref = ray.put(ctx)
        queue = iter(todo)
        pending: dict[Any, ShardJob] = {}
        failures: list[str] = []

        def submit() -> None:
            for job in queue:
                pending[task.remote(ctx_ref, job)] = job
                if len(pending) >= max(2, 2 * slots):
                    break

        submit()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                finished(job, ray.get(ready[0]))
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                what = str(cause) if isinstance(cause, EncodeError) else (
                    f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(err))
                failures.append(f"{job.path} ({shard_url(ctx.data_url, job.source)}): {what}")
            except ray.exceptions.RayError as err:  # the worker died (killed, out of memory) past its retries
                failures.append(f"{job.path} ({shard_url(ctx.data_url, job.source)}): task died: {_first_line(err)}")
            if not failures:
                submit()
        if failures:
            raise EncodeError(f"run {ctx.run_id}: {len(failures)} shard(s) failed (finished shards are recorded; "
                              f"a re-run redoes only the rest): " + "; ".join(failures))
    finally:
        if started_here:
            ray.shutdown()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # A RayTaskError's text is a traceback: its last line is the exception itself.
    return (lines[-1] if lines and "Traceback" in text else (lines[0] if lines else type(err).__name__))[:500]


class _shard_progress:
    """A rich progress bar over shards on stderr (``enabled``), else nothing."""

    def __init__(self, enabled: bool, total: int, reused: int) -> None:
        self.enabled, self.total, self.reused = enabled, total, reused
        self.bar: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda path: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("encoding shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task(f"({self.reused} reused)" if self.reused else "", total=self.total,
                                 completed=self.reused)
        return lambda path: self.bar.update(task, advance=1, description=path)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# --- reading tokens, decoding ------------------------------------------------------------------------


def read_tokens(manifest: Manifest, url: str, shard: ShardInfo) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, uint16 tokens, label or -1) of one token shard, in order; declared members only, no pickles,
    dtype, shape and range checked, the shard's sha256 checked at its end. Errors name shard and member."""
    from webdataset.tariterators import base_plus_ext

    from pipeline.data.errors import ShardError

    tokens = manifest.tokens
    if tokens is None:
        raise DataError(f"{url} is not a token dataset (its manifest has no 'tokens' section)")
    path = shard_url(url, shard)
    shape = tuple(tokens.shape)
    limit = 4096 + 2 * int(np.prod(shape))

    class Hashing:  # tarfile's stream mode only calls read(): hash every byte as it passes
        def __init__(self, inner: Any) -> None:
            self.inner, self.sha256 = inner, hashlib.sha256()

        def read(self, size: int = -1) -> bytes:
            data = self.inner.read(size)
            self.sha256.update(data)
            return data

    def finish(key: str, members: dict[str, bytes]) -> tuple[str, np.ndarray, int]:
        raw = members.get("npy")
        if raw is None or not raw.startswith(b"\x93NUMPY"):
            raise ShardError(path, "sample has no .npy token array", key=key)
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ShardError(path, f"undecodable .npy ({err})", member=f"{key}.npy") from None
        if array.dtype != np.uint16 or array.shape != shape or (array.size and int(array.max()) >= tokens.categories):
            raise ShardError(path, f"tokens are {array.dtype} {list(array.shape)}, the manifest declares uint16 "
                                   f"{list(shape)} below {tokens.categories}", member=f"{key}.npy")
        label = -1
        if "cls" in members:
            text = members["cls"].strip()
            if not text.lstrip(b"-").isdigit():
                raise ShardError(path, "label is not an ASCII integer", member=f"{key}.cls")
            label = int(text)
        return key, array, label

    count = 0
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
        with fs.open(fs_path, "rb") as raw, tarfile.open(fileobj=(hashing := Hashing(raw)), mode="r|") as tar:  # type: ignore[call-overload]
            key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                base, suffix = base_plus_ext(member.name)
                if suffix not in ("npy", "cls"):
                    raise ShardError(path, f"undeclared member .{suffix}", member=member.name)
                if member.size > limit:
                    raise ShardError(path, f"member of {member.size} bytes is too large for tokens", member=member.name)
                if base != key and key is not None:
                    yield finish(key, members)
                    count += 1
                    members = {}
                key = base
                members[suffix] = tar.extractfile(member).read()  # type: ignore[union-attr]
            if key is not None:
                yield finish(key, members)
                count += 1
            while hashing.read(1 << 20):
                pass  # the tar's end blocks count for the sha256 too
    except (tarfile.TarError, OSError) as err:
        raise ShardError(path, f"unreadable token shard ({type(err).__name__}: {err})") from None
    if count != shard.samples:
        raise ShardError(path, f"holds {count} samples, the manifest says {shard.samples}")
    if hashing.sha256.hexdigest() != shard.sha256:
        raise ShardError(path, "sha256 differs from the manifest's: the shard changed after it was written")


def safe_name(key: str) -> str:
    """A file name for a (untrusted) sample key: characters outside [A-Za-z0-9._-] become '_', no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key)
    return "_" + name if name.startswith(".") or not name else name


@dataclass
class DecodeResult:
    images: int
    out: str
    seconds: float


def decode_tokens(run_id: str, tokens_url: str, out_dir: str, *, limit: int | None = None,
                  splits: list[str] | None = None, batch_size: int = 256, tracking_uri: str | None = None,
                  progress: bool = True) -> DecodeResult:
    """Render the token dataset at ``tokens_url`` (written by run ``run_id``) as PNGs ``OUT/<key>.png``,
    in manifest order, at most ``limit`` of them."""
    started = time.perf_counter()
    try:
        manifest = read_manifest(tokens_url)
    except DataError as err:
        raise EncodeError(str(err)) from None
    info = manifest.tokens
    if info is None:
        raise EncodeError(f"{tokens_url} is not a token dataset (no 'tokens' section in its manifest)")
    if info.run_id != run_id:
        raise EncodeError(f"{tokens_url} holds tokens of run {info.run_id}, not of run {run_id}: decode them with it")
    names = splits or list(manifest.splits)
    unknown = [name for name in names if name not in manifest.splits]
    if unknown:
        raise EncodeError(f"{tokens_url} has no split(s) {', '.join(unknown)}")
    run = load_run_model(run_id, tuple(info.image_shape), tracking_uri=tracking_uri)  # type: ignore[arg-type]
    layout = token_layout(run.model, run_id)
    if list(layout.shape) != list(info.shape) or layout.categories != info.categories:
        raise EncodeError(f"run {run_id}'s latent ({list(layout.shape)} x {layout.categories}) does not match the "
                          f"tokens ({info.shape} x {info.categories})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = run.model.to(device)
    fs, root = fsspec.core.url_to_fs(_absolute(out_dir) if "://" not in out_dir else out_dir)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    total = sum(manifest.splits[name].samples for name in names)
    total = min(total, limit) if limit is not None else total
    written = 0
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal written
        if not batch:
            return
        tokens = torch.from_numpy(np.stack([t.astype(np.int64) for _, t in batch])).to(device)
        pixels = (pixels_of(model, tokens, layout).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for (key, _), image in zip(batch, pixels):
            fs.pipe_file(f"{root}/{safe_name(key)}.png", encode_image(image, "png"))
        written += len(batch)
        batch.clear()

    from pipeline.data.errors import ShardError

    def samples() -> Iterator[tuple[str, np.ndarray, int]]:
        for name in names:
            for shard in manifest.splits[name].shards:
                yield from read_tokens(manifest, tokens_url, shard)

    with _image_progress(progress, total) as advance:
        try:
            for key, tokens, _label in itertools.islice(samples(), total):
                batch.append((key, tokens))
                if len(batch) >= batch_size:
                    flush()
                    advance(written)
            flush()
            advance(written)
        except (ShardError, DataError) as err:
            raise EncodeError(f"reading tokens of {tokens_url}: {err}") from None
    return DecodeResult(written, out_dir, time.perf_counter() - started)


class _image_progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda done: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("decoding tokens", total=self.total)
        return lambda done: self.bar.update(task, completed=done)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
