"""`pipeline bench data` on an image dataset: encoded images (JPEG, ...) read five ways, same output.

Every row reads the same train shards of a format-2 dataset (`--source`), turns every image
into the same uint8 [C, S, S] (`--image-size S`: scaled to cover, center crop) and uses the same
number of processes/cores N (`--processes`, default 2):

- loader:        our loader as a training rank runs it: `train_batches` (block shuffle) with a
                 `SampleDecoder(workers=N)` (N decoding threads: Pillow releases the GIL while it
                 decodes) behind the `prefetch` thread, in ONE process; this is the headline row;
- loader_procs:  the same loader in N processes, rank r of a world of N (one decoding thread
                 each), as N Ray workers would read;
- webdataset:    WebDataset's own pipeline as its docs write it:
                 ``wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "cls")``
                 + ``.map_tuple(resize)`` + ``torch.utils.data.DataLoader(num_workers=N, batch_size=B)``;
- raydata:       Ray Data ``read_webdataset`` (default decoder) -> ``map_batches(resize)`` ->
                 ``iter_torch_batches``, on a local Ray started with ``num_cpus=N`` (start not timed);
- raw:           a plain loop per process over its shards (shard i goes to process i % N): tarfile,
                 then per image member Pillow open + draft + convert + resize + crop. No labels, no
                 batches, no shuffle: the per-core limit of decoding these images with Pillow.

Two per-core figures per row, because the machines are shared: samples/s / N (wall clock), and
samples per CPU-second (user + system time of this process and the processes it started, read
from /proc: independent of how many cores other jobs leave us). Rows are run ``--repeats``
times, interleaved; medians are reported.

`make_image_dataset` (bench/image_dataset.py) writes a JPEG dataset from crops of scikit-learn's two bundled photographs
(`pipeline bench data --make-images N`), so the bench runs anywhere; any user dataset works too.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.bench.common import machine, median, ratio

ROWS = ("loader", "loader_procs", "webdataset", "raydata", "raw")
NAMES = {
    "loader": "(a) our loader: train_batches + SampleDecoder(workers=N) + prefetch, 1 process",
    "loader_procs": "(a') our loader, N processes (rank r of N, 1 decode thread each)",
    "webdataset": "(b) WebDataset .decode(\"rgb8\").to_tuple + resize, DataLoader(num_workers=N)",
    "raydata": "(c) Ray Data read_webdataset + map_batches(resize), num_cpus=N",
    "raw": "(d) raw loop: tarfile + Pillow open/draft/convert/resize, N processes",
}


# --- CPU time of this process tree -----------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and its reaped children), for every live process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (stat field 3): utime, stime, cutime, cstime are stat fields 14-17
        table[int(stat.parent.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICK)
    return table


def tree_cpu_seconds(exclude: frozenset[int] = frozenset()) -> float:
    """CPU seconds (user + system) used so far by this process, its live descendants and the children
    they reaped, leaving out the subtrees rooted at ``exclude`` (e.g. Ray's daemons for non-Ray rows)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo += [c for c in children.get(pid, []) if c not in exclude]
    return total


# --- the five readers ------------------------------------------------------------------------------------


def _cover(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(W', H') of a (W, H) image scaled so that it covers side x side."""
    width, height = size
    scale = max(side / width, side / height)
    return max(side, round(width * scale)), max(side, round(height * scale))


def resize_center(image: Any, side: int) -> np.ndarray:
    """A PIL image or HWC uint8 array -> uint8 [C, side, side]: bilinear scale to cover, center crop."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    width, height = _cover(image.size, side)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image)
    array = array[:, :, None] if array.ndim == 2 else array
    top, left = (height - side) // 2, (width - side) // 2
    return np.ascontiguousarray(array[top: top + side, left: left + side].transpose(2, 0, 1))


def _loader_rank(url: str, side: int, rank: int, world: int, batch: int, shuffle_buffer: int, workers: int) -> int:
    import torch

    from pipeline.data import read_manifest
    from pipeline.data.contract import ImageTarget, SampleDecoder
    from pipeline.data.stream import prefetch, train_batches

    torch.set_num_threads(1)
    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=3, size=(side, side)), workers=workers)
    samples = 0
    for item in prefetch(train_batches(manifest, url, epoch=0, seed=0, rank=rank, world_size=world,
                                       batch_per_rank=batch // world, shuffle_buffer=shuffle_buffer,
                                       decoder=decoder), 4):
        samples += len(item.x)
    return samples


def read_loader(url: str, side: int, processes: int, batch: int, shuffle_buffer: int) -> int:
    """Our loader in this process, ``processes`` decoding threads."""
    return _loader_rank(url, side, 0, 1, batch, shuffle_buffer, processes)


def _fork_pool(processes: int) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))


def read_loader_procs(url: str, side: int, processes: int, batch: int, shuffle_buffer: int) -> int:
    """Our loader in ``processes`` forked processes, one rank each."""
    with _fork_pool(processes) as pool:
        futures = [pool.submit(_loader_rank, url, side, r, processes, batch, shuffle_buffer, 1)
                   for r in range(processes)]
        return sum(f.result() for f in futures)


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    import fsspec

    return fsspec.open(url, mode).open()


def _wds_openers(urls: list[str]) -> None:
    """WebDataset opens local paths itself and has no s3:// opener: other fsspec URLs go through fsspec
    (`webdataset.gopen.gopen_schemes`, inherited by the DataLoader's forked workers)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")
    for scheme in {u.split("://", 1)[0] for u in urls if "://" in u} - {"file"}:
        gopen.gopen_schemes[scheme] = _fsspec_gopen


def read_webdataset(urls: list[str], side: int, processes: int, batch: int) -> int:
    """WebDataset's pipeline, as its README writes one (decode, to_tuple, map, DataLoader workers)."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    _wds_openers(urls)

    dataset = (wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "cls")
               .map_tuple(lambda image: resize_center(image, side)))
    # split_by_worker (the default) hands each worker whole shards: more workers than shards get none
    loader = DataLoader(dataset, batch_size=batch, num_workers=min(processes, len(urls)))
    samples = 0
    for images, _ in loader:
        samples += len(images)
    return samples


def read_raydata(urls: list[str], side: int, batch: int) -> int:
    import ray

    def resize(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": np.stack([resize_center(image, side) for image in rows["jpg"]]), "cls": rows["cls"]}

    filesystem = None
    if any("://" in u and not u.startswith("file://") for u in urls):  # s3://, gs://: pyarrow over fsspec
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, _ = fsspec.core.url_to_fs(urls[0])
        filesystem, urls = PyFileSystem(FSSpecHandler(fs)), [fsspec.core.url_to_fs(u)[1] for u in urls]
    # __key__/__url__ (strings) break torch batches: keep only what is trained on
    dataset = (ray.data.read_webdataset(urls, filesystem=filesystem).select_columns(["jpg", "cls"])
               .map_batches(resize, batch_format="numpy"))
    samples = 0
    for item in dataset.iter_torch_batches(batch_size=batch):
        samples += len(item["image"])
    return samples


def _raw_shards(urls: list[str], side: int, suffix: str) -> int:
    from PIL import Image

    from pipeline.data.remote import open_for_reading

    samples = 0
    for url in urls:
        with open_for_reading(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.name.endswith(suffix):
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(info).read()))  # type: ignore[union-attr]
                image.draft("RGB", _cover(image.size, side))
                image = image.convert("RGB")
                resize_center(image, side)
                samples += 1
    return samples


def read_raw(urls: list[str], side: int, processes: int, suffix: str) -> int:
    if processes == 1:
        return _raw_shards(urls, side, suffix)
    with _fork_pool(processes) as pool:
        futures = [pool.submit(_raw_shards, urls[r::processes], side, suffix) for r in range(processes)]
        return sum(f.result() for f in futures)


def start_ray(processes: int) -> tuple[float, frozenset[int]]:
    """(seconds to start a local Ray with ``processes`` CPUs, the pids of the processes it started)."""
    import ray

    before = set(_proc_table())
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=processes, include_dashboard=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    seconds = time.perf_counter() - started
    table = _proc_table()
    return seconds, frozenset(pid for pid, (parent, _) in table.items()
                              if parent == os.getpid() and pid not in before)


def run_image_bench(url: str, *, side: int = 64, processes: int = 2, batch: int = 100, shuffle_buffer: int = 1000,
                    repeats: int = 3, raydata: bool = True, rows: tuple[str, ...] = ROWS) -> dict[str, Any]:
    """Every row ``repeats`` times, interleaved: wall and CPU time, samples; medians and ratios."""
    import torch

    from pipeline.data import read_manifest, shard_url

    if batch % processes:
        raise ValueError(f"batch {batch} must be a multiple of the {processes} processes (our loader's ranks)")
    torch.set_num_threads(1)  # as in a Ray worker (OMP_NUM_THREADS=1)
    manifest = read_manifest(url)
    spec = manifest.spec
    if spec.image == "npy":
        raise ValueError(f"{url} holds .npy arrays, not encoded images: the MNIST bench applies")
    train = manifest.splits["train"]
    urls = [shard_url(url, s) for s in train.shards]
    rows = tuple(r for r in rows if raydata or r != "raydata")
    ray_init_s, ray_pids = start_ray(processes) if "raydata" in rows else (None, frozenset())
    ways: dict[str, Callable[[], int]] = {
        "loader": lambda: read_loader(url, side, processes, batch, shuffle_buffer),
        "loader_procs": lambda: read_loader_procs(url, side, processes, batch, shuffle_buffer),
        "webdataset": lambda: read_webdataset(urls, side, processes, batch),
        "raydata": lambda: read_raydata(urls, side, batch),
        "raw": lambda: read_raw(urls, side, processes, f".{spec.image}"),
    }
    ways = {name: ways[name] for name in rows}
    if spec.image != "jpg":
        ways.pop("webdataset", None)  # the docs' to_tuple("jpg", ...) names the member
    wall: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    counted: dict[str, int] = {}
    loads = []
    for _ in range(repeats):  # interleaved, so slow spells of a shared machine hit every row alike
        for name, way in ways.items():
            exclude = frozenset() if name == "raydata" else ray_pids
            cpu0, started = tree_cpu_seconds(exclude), time.perf_counter()
            samples = way()
            seconds, cpu_s = time.perf_counter() - started, tree_cpu_seconds(exclude) - cpu0
            counted[name] = samples
            wall[name].append(samples / max(seconds, 1e-9))
            cpu[name].append(samples / max(cpu_s, 1e-3))
            loads.append(os.getloadavg()[0])
    sps = {name: round(median(v)) for name, v in wall.items()}
    per_core = {name: round(v / processes) for name, v in sps.items()}
    per_cpu_s = {name: round(median(v)) for name, v in cpu.items()}

    def ratios(table: dict[str, int], of: str) -> dict[str, float | None]:
        return {f"{of}_vs_{other}": ratio(table.get(of, 0), table.get(other, 0)) for other in ("webdataset", "raw")}

    headline = ratios(per_core, "loader")
    return {
        "bench": "data-images",
        "dataset": {"url": url, "train_samples": train.samples, "shards": len(train.shards),
                    "bytes": sum(s.bytes for s in train.shards), "image": spec.image, "size": spec.size,
                    "source": manifest.source},
        "image_size": [3, side, side], "processes": processes, "batch": batch,
        "shuffle_buffer": shuffle_buffer, "repeats": repeats,
        "samples": counted,
        "samples_per_s": sps,
        "samples_per_s_per_core": per_core,
        "samples_per_cpu_s": per_cpu_s,
        "samples_per_s_all": {name: [round(v) for v in values] for name, values in wall.items()},
        "samples_per_cpu_s_all": {name: [round(v) for v in values] for name, values in cpu.items()},
        **headline,
        "cpu_ratios": {**ratios(per_cpu_s, "loader"), **ratios(per_cpu_s, "loader_procs")},
        "wall_ratios": {**ratios(per_core, "loader"), **ratios(per_core, "loader_procs")},
        "targets": {"loader_vs_webdataset>=1.5": (headline["loader_vs_webdataset"] or 0) >= 1.5,
                    "loader_vs_raw>=0.9": (headline["loader_vs_raw"] or 0) >= 0.9},
        "loadavg_1m_during": [round(min(loads), 2), round(max(loads), 2)] if loads else None,
        "ray_init_s": round(ray_init_s, 2) if ray_init_s is not None else None,
        "machine": machine(),
    }


def images_markdown(report: dict[str, Any], command: str) -> str:
    m, d = report["machine"], report["dataset"]
    wall, core, cpu = report["samples_per_s"], report["samples_per_s_per_core"], report["samples_per_cpu_s"]
    n, (c, h, w) = report["processes"], report["image_size"]
    low, high = report["loadavg_1m_during"] or ("?", "?")
    stored = "x".join(map(str, d["size"])) if d["size"] else "sizes varying"
    lines = [
        f"`{command}` — {m['cpus']} cores ({m['cpu']}), load average {low}–{high} during the run; "
        f"{d['train_samples']:,} {d['image']} images ({stored}; {d['source']}) in {d['shards']} shards, "
        f"out uint8 [{c}, {h}, {w}] (cover + center crop), N = {n} processes/cores per row, batch "
        f"{report['batch']}, median of {report['repeats']} interleaved runs.",
        "",
        "| reader | samples | samples/s | per core (/N) | per CPU-second |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ROWS:
        if key in wall:
            lines.append(f"| {NAMES[key]} | {report['samples'][key]:,} | {wall[key]:,} | {core[key]:,} | {cpu[key]:,} |")
    wr, cr = report["wall_ratios"], report["cpu_ratios"]
    lines += ["", f"ours/WebDataset **{wr['loader_vs_webdataset']}** per core (target >= 1.5; per CPU-second "
              f"{cr['loader_vs_webdataset']}), ours/raw Pillow loop **{wr['loader_vs_raw']}** (target >= 0.9; per "
              f"CPU-second {cr['loader_vs_raw']}); our loader in N processes: {wr['loader_procs_vs_webdataset']} and "
              f"{wr['loader_procs_vs_raw']} per core ({cr['loader_procs_vs_webdataset']} and "
              f"{cr['loader_procs_vs_raw']} per CPU-second)."]
    return "\n".join(lines)
