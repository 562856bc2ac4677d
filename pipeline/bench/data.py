"""`pipeline bench data`: the same shards read five ways, side by side in one process.

An image dataset (encoded members: jpg, png, webp, ...) gets the image bench instead
(`pipeline.bench.images`: our loader vs WebDataset's pipeline, Ray Data and a raw Pillow loop);
``--make-images N`` writes a JPEG dataset to run it on. For .npy datasets (MNIST):

- raw:      a sequential read of every train shard's bytes (open_for_reading, 1 MiB reads): the
            physical limit of this storage here;
- loader:   our streaming loader as training uses it: `train_batches` (rank 0 of 1, block
            shuffle, dynamic binarization) behind the `prefetch` thread, consumed to exhaustion;
            also ``loader_inline`` (no prefetch thread) and ``loader_reference`` (the tarfile
            reference decode path, `ReadOptions(fast_path=False)`) for the record;
- memory:   a torch DataLoader over an in-memory TensorDataset of the same samples (shuffled),
            with the same per-batch work (uint8 -> float / 255 -> Bernoulli);
- raydata:  Ray Data `read_webdataset` -> `select_columns` -> `iter_torch_batches`, same batch
            and the same per-batch work (Ray started beforehand; its start is not counted);
- webdataset: WebDataset's own pipeline as its docs write it, ``wds.WebDataset(urls,
            shardshuffle=False).decode().to_tuple("npy", "cls")`` + ``DataLoader(num_workers=N,
            batch_size=B)`` (``--processes``; at most one worker per shard), same per-batch work.

Each is run ``--repeats`` times, interleaved, and the medians are reported (the machines are
shared: absolute numbers move with the load; the ratios are what to read). MB/s is the shard
bytes the samples occupy, divided by the time.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from pipeline.bench import bench_app
from pipeline.bench.common import JsonOption, ReadmeOption, SamplesOption, SourceOption, command_line, default_source, emit, machine, median, prepare_dataset, ratio


def _binarize(images: Any, seed: int) -> Any:
    import torch

    x = images.reshape(len(images), -1).float().div_(255)
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))


def read_raw(url: str) -> int:
    from pipeline.data import read_manifest, shard_url
    from pipeline.data.remote import open_for_reading

    total = 0
    for shard in read_manifest(url).splits["train"].shards:
        with open_for_reading(shard_url(url, shard)) as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    return total


def read_loader(url: str, batch: int, shuffle_buffer: int, prefetch_depth: int = 4, reference: bool = False,
                limit: int | None = None) -> int:
    from pipeline.data import read_manifest
    from pipeline.data.reader import ReadOptions
    from pipeline.data.stream import prefetch, train_batches

    manifest = read_manifest(url)
    samples = 0
    batches = prefetch(train_batches(manifest, url, epoch=0, seed=0, rank=0, world_size=1, batch_per_rank=batch,
                                     shuffle_buffer=shuffle_buffer, options=ReadOptions(fast_path=not reference)),
                       prefetch_depth)
    for step, item in enumerate(batches):
        samples += len(_binarize(item.x, step))  # the per-batch work the other readers do (the likelihood's, in training)
        if limit and samples >= limit:
            batches.close()
            break
    return samples


def load_in_memory(url: str) -> tuple[Any, Any]:
    """The train split as uint8 / int64 tensors (read once, not timed)."""
    import numpy as np
    import torch

    from pipeline.data import ShardReader, read_manifest

    manifest = read_manifest(url)
    shards = manifest.splits["train"].shards
    samples = list(ShardReader().read_pieces(manifest, url, shards, [(i, 0, s.samples) for i, s in enumerate(shards)]))
    images = torch.from_numpy(np.stack([s[1] for s in samples]))
    labels = torch.from_numpy(np.asarray([s[2] for s in samples], dtype=np.int64))
    return images, labels


def read_memory(images: Any, labels: Any, batch: int) -> int:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    samples = 0
    for step, (x, _) in enumerate(loader):
        samples += len(_binarize(x, step))
    return samples


def read_raydata(url: str, batch: int) -> int:
    import ray

    from pipeline.data import read_manifest, shard_url

    paths = [shard_url(url, s) for s in read_manifest(url).splits["train"].shards]
    dataset = ray.data.read_webdataset(paths).select_columns(["npy", "cls"])  # __key__/__url__ break torch batches
    samples = 0
    for step, item in enumerate(dataset.iter_torch_batches(batch_size=batch, drop_last=True)):
        samples += len(_binarize(item["npy"], step))
    return samples


def read_webdataset(url: str, batch: int, workers: int) -> int:
    """WebDataset's pipeline as its README writes one: decode, to_tuple, DataLoader workers."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    from pipeline.data import read_manifest, shard_url

    urls = [shard_url(url, s) for s in read_manifest(url).splits["train"].shards]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("npy", "cls")
    # split_by_worker (the default) hands each worker whole shards: more workers than shards get none
    loader = DataLoader(dataset, batch_size=batch, num_workers=min(workers, len(urls)))
    samples = 0
    for step, (x, _) in enumerate(loader):
        samples += len(_binarize(x, step))
    return samples


def start_ray() -> float:
    import ray

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return time.perf_counter() - started


def run_data_bench(url: str, *, batch: int = 100, shuffle_buffer: int = 1000, repeats: int = 3,
                   raydata: bool = True, reference_limit: int = 10_000, workers: int = 2) -> dict[str, Any]:
    import torch

    from pipeline.data import read_manifest

    torch.set_num_threads(1)  # as in a Ray worker (OMP_NUM_THREADS=1)
    manifest = read_manifest(url)
    train = manifest.splits["train"]
    total_bytes = sum(s.bytes for s in train.shards)
    bytes_per_sample = total_bytes / max(train.samples, 1)
    images, labels = load_in_memory(url)
    ray_init_s = start_ray() if raydata else None

    ways: dict[str, Callable[[], int]] = {
        "raw": lambda: (read_raw(url), train.samples)[1],
        "loader": lambda: read_loader(url, batch, shuffle_buffer),
        "loader_inline": lambda: read_loader(url, batch, shuffle_buffer, prefetch_depth=0),
        "memory": lambda: read_memory(images, labels, batch),
        "webdataset": lambda: read_webdataset(url, batch, workers),
    }
    if raydata:
        ways["raydata"] = lambda: read_raydata(url, batch)
    if reference_limit:
        ways["loader_reference"] = lambda: read_loader(url, batch, shuffle_buffer, reference=True,
                                                       limit=reference_limit)
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):  # interleaved, so slow spells of a shared machine hit every way alike
        for name, way in ways.items():
            started = time.perf_counter()
            samples = way()
            rates[name].append(samples / max(time.perf_counter() - started, 1e-9))
    sps = {name: round(median(values)) for name, values in rates.items()}
    loader = sps["loader"]
    return {
        "bench": "data",
        "dataset": {"url": url, "train_samples": train.samples, "shards": len(train.shards), "bytes": total_bytes,
                    "image_shape": manifest.image_shape},
        "batch": batch, "shuffle_buffer": shuffle_buffer, "repeats": repeats,
        "samples_per_s": sps,
        "samples_per_s_all": {name: [round(v) for v in values] for name, values in rates.items()},
        "mb_per_s": {name: round(rate * bytes_per_sample / 1e6, 1) for name, rate in sps.items()},
        "loader_vs_raw": ratio(loader, sps["raw"]),
        "loader_vs_memory": ratio(loader, sps["memory"]),
        "loader_vs_raydata": ratio(loader, sps["raydata"]) if raydata else None,
        "loader_vs_reference": ratio(loader, sps.get("loader_reference", 0)),
        "loader_vs_webdataset": ratio(loader, sps["webdataset"]),
        "webdataset_workers": min(workers, len(train.shards)),
        "targets": {"loader_vs_memory>=0.9": (ratio(loader, sps["memory"]) or 0) >= 0.9,
                    "loader_vs_raydata>=2": (ratio(loader, sps["raydata"]) or 0) >= 2 if raydata else None},
        "ray_init_s": round(ray_init_s, 2) if ray_init_s is not None else None,
        "machine": machine(),
    }


def data_markdown(report: dict[str, Any], command: str) -> str:
    m, s, mb = report["machine"], report["samples_per_s"], report["mb_per_s"]
    d = report["dataset"]
    names = {"raw": "(a) raw sequential read of the tar files", "loader": "(b) streaming loader (train_batches + prefetch)",
             "loader_inline": "(b') streaming loader, no prefetch thread",
             "loader_reference": "(b'') streaming loader, tarfile reference decode",
             "memory": "(c) in-memory TensorDataset + DataLoader", "raydata": "(d) Ray Data read_webdataset",
             "webdataset": f"(e) WebDataset .decode().to_tuple(\"npy\", \"cls\") + DataLoader("
                           f"num_workers={report.get('webdataset_workers')})"}
    lines = [
        f"`{command}` — {m['cpus']} cores ({m['cpu']}), load average {m['loadavg_1m']} at the end; "
        f"{d['train_samples']} samples {d['image_shape']} in {d['shards']} shards, batch {report['batch']}, "
        f"median of {report['repeats']} interleaved runs, 1 torch thread.",
        "",
        "| reader | samples/s | MB/s |",
        "|---|---:|---:|",
    ]
    for key in ("raw", "loader", "loader_inline", "loader_reference", "memory", "raydata", "webdataset"):
        if key in s:
            lines.append(f"| {names[key]} | {s[key]:,} | {mb[key]:,} |")
    lines += ["", f"loader/raw **{report['loader_vs_raw']}**, loader/in-memory **{report['loader_vs_memory']}** "
              f"(target >= 0.9), loader/Ray Data **{report['loader_vs_raydata']}** (target >= 2), "
              f"loader/WebDataset pipeline **{report['loader_vs_webdataset']}** (our loader: 1 process, 1 thread), "
              f"fast/reference decode {report['loader_vs_reference']}."]
    return "\n".join(lines)


@bench_app.command("data")
def bench_data(
    source: SourceOption = "",
    samples: SamplesOption = 50_000,
    batch: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per batch, for every reader")] = 100,
    shuffle_buffer: Annotated[int, typer.Option("--shuffle-buffer", min=0, help="The loader's shuffle buffer (samples; 0: none)")] = 1000,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Interleaved runs per reader; medians reported")] = 3,
    raydata: Annotated[bool, typer.Option("--raydata/--no-raydata", help="Include Ray Data read_webdataset")] = True,
    processes: Annotated[int, typer.Option("--processes", min=1, help="Processes (cores) every image reader uses; "
                                           "the WebDataset row's DataLoader workers")] = 2,
    image_size: Annotated[int, typer.Option("--image-size", min=1, help="Image datasets: every reader outputs "
                                            "uint8 [3, S, S] (scaled to cover, center crop)")] = 64,
    make_images: Annotated[int, typer.Option("--make-images", min=0, help="First write a JPEG dataset of N crops "
                                             "(256-512 px) of scikit-learn's two sample photos into --source "
                                             "(a new folder; default: a temporary one), then bench it")] = 0,
    as_json: JsonOption = False,
    readme: ReadmeOption = None,
) -> None:
    """Samples/s of raw tar reads, our streaming loader, an in-memory DataLoader, Ray Data and WebDataset.

    On an image dataset (jpg/png/webp members; or --make-images N): our loader vs WebDataset's
    pipeline, Ray Data and a raw Pillow decode loop, same shards, output size and processes.
    """
    from pipeline.bench.image_dataset import make_image_dataset
    from pipeline.bench.images import images_markdown, run_image_bench
    from pipeline.data import read_manifest

    command = command_line()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        if make_images:
            url = source or str(Path(tmp) / "images")
            if "://" not in url and (Path(url) / "manifest.json").exists():
                raise typer.BadParameter(f"{url} already holds a dataset: --make-images writes a new one")
            make_image_dataset(url, make_images)
        else:
            url, _ = prepare_dataset(source or default_source(), Path(tmp), samples)
        if read_manifest(url).spec.image != "npy":
            if batch % processes:
                raise typer.BadParameter(f"--batch-size {batch} must be a multiple of --processes {processes}")
            report = run_image_bench(url, side=image_size, processes=processes, batch=batch,
                                     shuffle_buffer=shuffle_buffer, repeats=repeats, raydata=raydata)
            markdown, section = images_markdown(report, command), "data-images"
        else:
            report = run_data_bench(url, batch=batch, shuffle_buffer=shuffle_buffer, repeats=repeats,
                                    raydata=raydata, workers=processes)
            markdown, section = data_markdown(report, command), "data"
    report["command"] = command
    emit(report, as_json, markdown, readme, section)
