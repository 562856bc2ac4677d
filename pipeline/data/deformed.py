"""Deformed MNIST of any size (the InfiMNIST / MNIST-8M recipe), written as shards while streaming.

Train sample ``i`` is MNIST training digit ``i mod 50,000`` under a random elastic deformation
(Simard et al., 2003: a smoothed random displacement field) composed with a random affine map
(rotation, scale, shear, shift), drawn from ``numpy.random.default_rng([seed, i])``: every output
is a pure function of (source data, seed, index, deformation parameters), labelled with its
source digit. The val and test splits are MNIST's own, untouched (the last 10,000 training
images and t10k), so validation and test numbers stay comparable with plain MNIST runs.

Writing (pipeline/data/writer.py): memory is bounded by the source (55 MB) plus one sample per
process, whatever N; shards are independent tasks spread over ``workers`` processes; a re-run with
the same recipe (seed, parameters, shard size, source) reuses every finished shard whose file is
intact, so an interrupted run resumes, and growing N only writes the new shards; ``manifest.json``
is written last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from pipeline.data.errors import DataError
from pipeline.data.contract import SampleSpec
from pipeline.data.shards import ShardInfo, SplitInfo, npy_members
from pipeline.data.executors import in_pool, in_process, process_pool
from pipeline.data.writer import ShardTask, ShardWriter, Written, write_finished_shard
from pipeline.data.sources import Split, load_mnist_splits

RECIPE_VERSION = "deformed-mnist/1"


@dataclass(frozen=True)
class Deformation:
    """Strength of the random transforms (28 x 28 MNIST pixels)."""

    elastic_alpha: float = 34.0  # Simard et al.'s scale of the smoothed displacement field
    elastic_sigma: float = 4.0  # smoothing of the field, pixels (larger = smoother, gentler)
    max_rotation_deg: float = 12.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shear: float = 0.15  # horizontal shear factor
    max_shift_px: float = 2.0


def deform(image: np.ndarray, rng: np.random.Generator, params: Deformation = Deformation()) -> np.ndarray:
    """One random elastic + affine deformation of a uint8 H x W image (bilinear, zero fill)."""
    h, w = image.shape
    # Elastic: uniform noise in [-1, 1] smoothed by a Gaussian, times alpha (Simard et al., 2003).
    field = gaussian_filter(rng.uniform(-1, 1, size=(2, h, w)), sigma=(0, params.elastic_sigma, params.elastic_sigma)) * params.elastic_alpha
    angle = np.deg2rad(rng.uniform(-params.max_rotation_deg, params.max_rotation_deg))
    scale = rng.uniform(*params.scale_range)
    shear = rng.uniform(-params.max_shear, params.max_shear)
    shift = rng.uniform(-params.max_shift_px, params.max_shift_px, size=2)
    # Inverse map: for each output pixel, where in the source to sample.
    cos, sin = np.cos(angle), np.sin(angle)
    inverse = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, 0.0], [shear, 1.0]]) / scale
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    grid = np.mgrid[0:h, 0:w].reshape(2, -1) - centre[:, None]
    coords = inverse @ grid + centre[:, None] - shift[:, None] + field.reshape(2, -1)
    out = map_coordinates(image.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(h, w)


def deformed_sample(source: Split, seed: int, index: int, params: Deformation = Deformation()) -> tuple[np.ndarray, int]:
    """Train sample ``index``: (deformed image, label of its source digit)."""
    rng = np.random.default_rng([int(seed) % 2**63, int(index)])
    src = index % len(source)
    return deform(source.images[src], rng, params), int(source.labels[src])


# --- jobs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob(ShardTask):
    first: int  # sample index range [first, last) within the split
    last: int
    deformed: bool


def plan_jobs(samples: int, samples_per_shard: int, splits: dict[str, Split], eval_splits: bool = True) -> list[ShardJob]:
    jobs = [ShardJob("train", n, first, min(first + samples_per_shard, samples), True)
            for n, first in enumerate(range(0, samples, samples_per_shard))]
    for name in ("val", "test") if eval_splits else ():
        size = len(splits[name])
        jobs += [ShardJob(name, n, first, min(first + samples_per_shard, size), False)
                 for n, first in enumerate(range(0, size, samples_per_shard))]
    return jobs


def _job_samples(job: ShardJob, splits: dict[str, Split], seed: int, params: Deformation) -> Iterator[tuple[str, dict[str, bytes]]]:
    for index in range(job.first, job.last):
        if job.deformed:
            image, label = deformed_sample(splits["train"], seed, index, params)
        else:
            image, label = splits[job.split].images[index], int(splits[job.split].labels[index])
        yield f"{job.split}-{index:09d}", npy_members(image, label)


def _run_job(job: ShardJob, out_url: str, recipe: str, splits: dict[str, Split], seed: int, params: Deformation) -> Written:
    return Written(write_finished_shard(out_url, job.path, _job_samples(job, splits, seed, params), recipe))


_WORKER: dict = {}


def _init_worker(source: str, seed: int, params: Deformation) -> None:
    _WORKER.update(splits=load_mnist_splits(source), seed=seed, params=params)


def _run_job_in_worker(job: ShardJob, out_url: str, recipe: str) -> Written:
    return _run_job(job, out_url, recipe, _WORKER["splits"], _WORKER["seed"], _WORKER["params"])


# --- resume --------------------------------------------------------------------------------------


def recipe_digest(splits: dict[str, Split], seed: int, samples_per_shard: int, params: Deformation) -> str:
    """What a shard's bytes depend on (besides its index range): a finished shard is reusable iff this matches."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(name.encode())
        digest.update(splits[name].images.tobytes())
        digest.update(splits[name].labels.tobytes())
    recipe = {"version": RECIPE_VERSION, "seed": seed, "samples_per_shard": samples_per_shard,
              "params": asdict(params), "source": digest.hexdigest()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def generate_deformed_mnist(
    source: str,
    out_url: str,
    samples: int,
    *,
    seed: int = 0,
    samples_per_shard: int = 5000,
    workers: int = 1,
    params: Deformation = Deformation(),
    progress: bool = True,
    source_splits: dict[str, Split] | None = None,
    on_shard_done: Callable[[ShardInfo], None] | None = None,
    eval_splits: bool = True,
) -> tuple[dict[str, SplitInfo], int]:
    """Write deformed-MNIST (train: ``samples`` deformed digits; val/test: MNIST's) to ``out_url``.

    Returns (split infos, number of shards reused from an earlier run). ``source_splits``
    (in-process runs only) skips reading ``source``; ``on_shard_done`` is called in this
    process after each shard is recorded (tests use it to interrupt a run); ``eval_splits=False``
    writes the train split alone (benchmarks of the data path).
    """
    if samples < 1 or samples_per_shard < 1 or workers < 1:
        raise DataError(f"samples ({samples}), samples_per_shard ({samples_per_shard}) and workers ({workers}) must be >= 1")
    if source_splits is not None and workers > 1:
        raise DataError("source_splits are for in-process runs: worker processes read --source themselves")
    splits = source_splits or load_mnist_splits(source)
    recipe = recipe_digest(splits, seed, samples_per_shard, params)
    writer = ShardWriter(out_url, plan_jobs(samples, samples_per_shard, splits, eval_splits),
                         recipe=lambda job: recipe, samples=lambda job: job.last - job.first)
    if workers == 1 or len(writer.todo) <= 1:
        writer.run(in_process(lambda job: _run_job(job, out_url, recipe, splits, seed, params)), progress=progress,
                   on_shard_done=on_shard_done)
    else:
        with process_pool(workers, _init_worker, (source, seed, params)) as pool:
            writer.run(in_pool(pool, _run_job_in_worker, out_url, recipe, in_flight=2 * workers), progress=progress,
                       on_shard_done=on_shard_done)
    split_infos = writer.split_infos(("train", "val", "test") if eval_splits else ("train",))
    writer.finish(source=f"deformed-mnist:{source} seed={seed} n={samples}",
                  spec=SampleSpec(image="npy", channels=1, size=list(splits["train"].images.shape[1:]), label="cls"),
                  split_infos=split_infos)
    return split_infos, writer.reused
