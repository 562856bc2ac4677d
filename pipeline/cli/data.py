"""`pipeline data ...`: datasets into WebDataset shards + manifest.json (any fsspec URL), or
existing shards adopted as they are (`index`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pipeline.cli.common import OutUrl, console, fail, overrides_option

data_app = typer.Typer(help="Turn a dataset into WebDataset shards + manifest.json (any fsspec URL).", no_args_is_help=True)
ShardSize = Annotated[int, typer.Option("--samples-per-shard", min=1, help="Samples per .tar shard")]


def _write(splits, out: str, source: str, samples_per_shard: int) -> None:
    from pipeline.data import write_shards

    manifest = write_shards(splits, out, source=source, samples_per_shard=samples_per_shard, progress=True)
    counts = ", ".join(f"{name} {info.samples}" for name, info in manifest.splits.items())
    console.print(f"wrote {sum(len(i.shards) for i in manifest.splits.values())} shards ({counts}) + manifest.json to {out}")


@data_app.command("digits")
def data_digits(out: OutUrl = "data/digits", samples_per_shard: ShardSize = 500) -> None:
    """sklearn's bundled 8x8 digits (real data, offline): train/val/test 1297/250/250."""
    from pipeline.data import DataError, load_digits_splits

    try:
        _write(load_digits_splits(), out, "sklearn.datasets.load_digits", samples_per_shard)
    except DataError as err:
        fail(str(err))


@data_app.command("photos")
def data_photos(
    out: OutUrl = "data/photos",
    size: Annotated[int, typer.Option("--size", min=4, help="Side of the square RGB tiles")] = 32,
    scale: Annotated[int, typer.Option("--scale", min=4, help="Each picture's short side is scaled to this first")] = 512,
    samples_per_shard: ShardSize = 1000,
) -> None:
    """Real photographs bundled in scikit-learn and scikit-image (offline), cut into RGB tiles:
    train / val / test are whole different pictures (8 / 2 / 1), so val measures new photographs.
    At the defaults: 3,956 / 768 / 368 tiles of 32x32."""
    from pipeline.data import DataError
    from pipeline.data.photos import load_photo_splits

    try:
        _write(load_photo_splits(size, scale), out, f"bundled-photos:size={size},scale={scale}", samples_per_shard)
    except DataError as err:
        fail(str(err))


# --- the public datasets: from their files, or downloaded first -------------------------------------

def _mirror_option(key: str, env: str) -> object:
    return Annotated[Optional[str], typer.Option(
        "--mirror", envvar=env, show_envvar=True,
        help=f"With --download: a base URL serving the {key} files (an internal mirror, a proxy) instead of "
             f"their canonical locations")]


def _download_option(key: str) -> object:
    return Annotated[bool, typer.Option(
        "--download", help=f"Fetch the original files into --source first (default data/raw/{key}), resuming a "
                           f"partial download and checking each file's known digest; files already there are "
                           f"checked, not fetched again")]


Checksums = Annotated[Optional[str], typer.Option(
    "--checksums", help="With --download: a sha256sum-style list (SHA256  FILENAME per line) replacing the known "
                        "digests of the files it names, for a mirror serving re-packed copies")]


def _public_dataset(key: str, source: str | None, download: bool, mirror: str | None, checksums: str | None,
                    out: str, samples_per_shard: int) -> None:
    """The shared path of `data mnist`, `binarized-mnist` and `fashion-mnist`: download when asked (nothing is
    sharded unless every file matches its digest), then read the files and write the shards."""
    from pipeline.data import DataError, load_binarized_mnist_splits, load_mnist_splits
    from pipeline.data.remote import is_local
    from pipeline.data.sources import load_fashion_mnist_splits

    loaders = {"mnist": ("mnist", load_mnist_splits), "binarized-mnist": ("binarized_mnist", load_binarized_mnist_splits),
               "fashion-mnist": ("fashion_mnist", load_fashion_mnist_splits)}
    prefix, load = loaders[key]
    if not download:
        if source is None:
            fail(f"give --source (a folder or URL holding the {key} files) or --download (fetch them first)", code=2)
        if checksums:
            fail("--checksums applies to --download", code=2)
    else:
        from pipeline.data.download import DATASETS, download_dataset, read_checksums

        source = source or f"data/raw/{key}"
        if not is_local(source):
            fail(f"--download keeps the files in a local folder: --source {source} is not one "
                 f"(shard from a URL without --download)", code=2)
        source = source.removeprefix("file://")
        try:
            download_dataset(DATASETS[key], source, mirror=mirror, progress=console.is_terminal,
                             checksums=read_checksums(checksums) if checksums else None,
                             say=lambda line: console.print(line, highlight=False))
        except DataError as err:
            fail(str(err))
    try:
        _write(load(source), out, f"{prefix}:{source}", samples_per_shard)
    except DataError as err:
        fail(str(err))


Source = Annotated[Optional[str], typer.Option(
    "--source", help="Folder or URL holding the files (with --download: the local folder they are fetched into)")]


@data_app.command("mnist")
def data_mnist(
    source: Source = None,
    download: _download_option("mnist") = False,
    mirror: _mirror_option("MNIST", "PIPELINE_MNIST_MIRROR") = None,
    checksums: Checksums = None,
    out: OutUrl = "data/mnist",
    samples_per_shard: ShardSize = 5000,
) -> None:
    """MNIST from the four idx .gz files: train/val/test 50000/10000/10000 (val = last 10k of the train file).
    --download fetches them from yann.lecun.com (PyTorch's mirror when it is down) and checks their sha256."""
    _public_dataset("mnist", source, download, mirror, checksums, out, samples_per_shard)


@data_app.command("binarized-mnist")
def data_binarized_mnist(
    source: Source = None,
    download: _download_option("binarized-mnist") = False,
    mirror: _mirror_option("binarized MNIST", "PIPELINE_BINARIZED_MNIST_MIRROR") = None,
    checksums: Checksums = None,
    out: OutUrl = "data/binarized_mnist",
    samples_per_shard: ShardSize = 5000,
) -> None:
    """Larochelle's fixed binarization of MNIST (binarized_mnist_{train,valid,test}.amat, gzipped or not):
    train/val/test 50000/10000/10000, pixels 0/255, no labels (-1). Train on it with model.binarize: threshold
    (the images are already binary). --download fetches the .amat files from www.cs.toronto.edu and checks their
    sha256."""
    _public_dataset("binarized-mnist", source, download, mirror, checksums, out, samples_per_shard)


@data_app.command("fashion-mnist")
def data_fashion_mnist(
    source: Source = None,
    download: _download_option("fashion-mnist") = False,
    mirror: _mirror_option("Fashion-MNIST", "PIPELINE_FASHION_MNIST_MIRROR") = None,
    checksums: Checksums = None,
    out: OutUrl = "data/fashion-mnist",
    samples_per_shard: ShardSize = 5000,
) -> None:
    """Fashion-MNIST (Zalando's 28x28 grey article images, labels 0-9) from its four idx .gz files, as MNIST:
    train/val/test 50000/10000/10000 (val = last 10k of the train file). --download fetches them from the
    publisher's S3 site (its GitHub repository when that is down) and checks the md5 sums the publisher gives."""
    _public_dataset("fashion-mnist", source, download, mirror, checksums, out, samples_per_shard)


@data_app.command("deformed-mnist")
def data_deformed_mnist(
    source: Annotated[str, typer.Option("--source", help="Directory or URL with the four MNIST idx .gz files")],
    samples: Annotated[int, typer.Option("--samples", min=1, help="Train samples to generate (any number)")],
    out: OutUrl = "data/deformed-mnist",
    workers: Annotated[int, typer.Option("--processes", min=1, help="Parallel generator processes")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Deformations are a function of (seed, index)")] = 0,
    samples_per_shard: ShardSize = 5000,
) -> None:
    """MNIST digits under random elastic + affine deformations (InfiMNIST-style), N train samples; val/test
    are MNIST's own, untouched. Streams (flat memory), runs in parallel, resumes: a re-run skips finished shards."""
    from pipeline.data import DataError
    from pipeline.data.deformed import generate_deformed_mnist

    try:
        splits, reused = generate_deformed_mnist(source, out, samples, seed=seed, samples_per_shard=samples_per_shard,
                                                 workers=workers, progress=True)
    except DataError as err:
        fail(str(err))
    shards = sum(len(info.shards) for info in splits.values())
    counts = ", ".join(f"{name} {info.samples}" for name, info in splits.items())
    console.print(f"wrote {shards - reused} shards, reused {reused} finished ({counts}) + manifest.json to {out}")


@data_app.command("index")
def data_index(
    shards: Annotated[list[str], typer.Argument(help="Shards: brace patterns ('s3://b/cc12m/{00000..01241}.tar'), globs, "
                                                     "folders or paths over any fsspec URL (.tar, .tar.gz, .tgz)")],
    out: OutUrl,
    val: Annotated[Optional[list[str]], typer.Option("--val", help="Val shards: a file-name pattern ('val-*.tar') or "
                                                     "a pattern like SHARDS; repeatable")] = None,
    test: Annotated[Optional[list[str]], typer.Option("--test", help="Test shards, as --val")] = None,
    val_shards: Annotated[Optional[int], typer.Option("--val-shards", min=0, help="Hold out N whole shards (seeded) "
                                                      "as val [default without --val: ~1% of the shards, at least 1]")] = None,
    test_shards: Annotated[int, typer.Option("--test-shards", min=0, help="Hold out N whole shards as test")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the hold-out")] = 0,
    no_val: Annotated[bool, typer.Option("--no-val", help="Allow a manifest without val (not trainable; encode only)")] = False,
    label: Annotated[str, typer.Option("--label", help="auto (cls when every sample has one), cls, json:FIELD or none")] = "auto",
    image: Annotated[Optional[str], typer.Option("--image", help="Image member when several are present (jpg, png, ...)")] = None,
    workers: Annotated[int, typer.Option("--threads", min=1, help="Shards scanned at once (threads)")] = 8,
) -> None:
    """Adopt existing WebDataset shards (img2dataset, webdataset) without rewriting them: one streaming pass per
    shard for its sha256, bytes, samples and members; the sample contract inferred; a manifest written at --out."""
    import time

    from pipeline.data import DataError
    from pipeline.data.index import index_shards

    start = time.perf_counter()
    try:
        manifest = index_shards(shards, out, val=val or [], test=test or [], val_shards=val_shards,
                                test_shards=test_shards, seed=seed, require_val=not no_val,
                                label=None if label == "none" else label, image=image, workers=workers)
    except (DataError, ValueError) as err:
        fail(str(err))
    seconds = time.perf_counter() - start
    every = [info for split in manifest.splits.values() for info in split.shards]
    counts = sorted(info.samples for info in every)
    spec = manifest.spec
    console.print(f"indexed {len(every)} shards, {sum(counts):,} samples, {sum(i.bytes for i in every) / 1e6:,.1f} MB "
                  f"in {seconds:.1f} s ({sum(counts) / max(seconds, 1e-9):,.0f} samples/s)")
    console.print(f"samples per shard: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}")
    console.print(f"sample: image .{spec.image}, {spec.channels} channel(s), size {spec.size or 'varies'}, "
                  f"label {spec.label or 'none'}, ignored {spec.ignore or 'nothing'}, compression {spec.compression}")
    splits = ", ".join(f"{name} {info.samples:,} ({len(info.shards)} shards)" for name, info in manifest.splits.items())
    console.print(f"splits: {splits}; manifest.json written to {out}")


@data_app.command("images")
def data_images(
    source: Annotated[str, typer.Option("--source", help="Image folder (any fsspec URL): a sub-folder per class "
                                                         "(ImageNet/CelebA style), or images alone (no labels)")],
    out: OutUrl,
    size: Annotated[Optional[int], typer.Option("--size", min=1, help="Store S x S images (default: as they are)")] = None,
    resize: Annotated[str, typer.Option("--resize", help="center-crop (shorter side to S, center S x S), border "
                                                         "(fit and pad) or none")] = "center-crop",
    fmt: Annotated[str, typer.Option("--format", help="Stored format: png (lossless), jpg or webp")] = "jpg",
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="jpg/webp quality")] = 95,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of images for val (0: none)")] = 0.05,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of images for test (0: none)")] = 0.05,
    samples_per_shard: ShardSize = 1000,
    workers: Annotated[int, typer.Option("--processes", min=1, help="Parallel encoder processes")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the split and the order (a hash of each path)")] = 0,
) -> None:
    """Shard an image folder: decoded with Pillow, RGB (grey when every image is), resized, encoded; split by a
    seeded hash of each path. Parallel, flat memory, resumable: a re-run reuses finished shards."""
    from pipeline.data import DataError
    from pipeline.data.images import shard_images

    if resize not in ("center-crop", "border", "none") or fmt not in ("png", "jpg", "webp"):
        fail(f"--resize must be center-crop, border or none and --format png, jpg or webp (got {resize}, {fmt})", code=2)
    try:
        splits, reused, classes = shard_images(source, out, size=size, resize=resize, fmt=fmt, quality=quality,
                                               val_fraction=val_fraction, test_fraction=test_fraction,
                                               samples_per_shard=samples_per_shard, workers=workers, seed=seed,
                                               say=console.print)
    except DataError as err:
        fail(str(err))
    shards = sum(len(info.shards) for info in splits.values())
    counts = ", ".join(f"{name} {info.samples}" for name, info in splits.items())
    labels = f"{len(classes)} classes (classes.json)" if classes else "no labels"
    console.print(f"wrote {shards - reused} shards, reused {reused} finished ({counts}; {labels}) + manifest.json to {out}")


@data_app.command("show")
def data_show(
    dataset: Annotated[str, typer.Argument(help="Dataset: a folder or fsspec URL with manifest.json")],
    split: Annotated[str, typer.Option("--split", help="Split the samples of the grid come from")] = "val",
    out: Annotated[Optional[str], typer.Option("--out", help="Write a PNG grid of the split's first samples, "
                                                             "decoded as training decodes them for validation")] = None,
    count: Annotated[int, typer.Option("--count", min=1, max=1024, help="Samples in the grid")] = 64,
    config: Annotated[Optional[str], typer.Option("--config", help="A training config whose data section (image_size, "
                                                                   "channels, resize) says how samples are decoded "
                                                                   "(default: as stored)")] = None,
    override: overrides_option("Config override, as for train (e.g. -o data.image_size=[32,32])") = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Look at a dataset: its splits (samples, shards, bytes), its sample contract and source, and with --out a grid of
    its samples exactly as the model would be fed them (validation's center crops, the config's size and channels)."""
    import json

    from pipeline.data import DataError, read_manifest

    try:
        manifest = read_manifest(dataset)
    except DataError as err:
        fail(str(err))
    summary = _dataset_summary(manifest)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for line in _summary_lines(dataset, summary):
            console.print(line, highlight=False)
    if out:
        if manifest.tokens is not None:
            fail(f"{dataset} holds tokens, not images: `pipeline decode RUN --data {dataset}` renders them", code=2)
        if split not in manifest.splits:
            fail(f"{dataset} has no split {split!r} (it has {', '.join(manifest.splits)})", code=2)
        from pipeline.config import ConfigError

        try:
            grid = _sample_grid(manifest, dataset, split, count, config, override or [])
        except ConfigError as err:
            fail(str(err), code=2)
        except (DataError, ValueError) as err:
            fail(str(err))
        grid.save(out)
        console.print(f"wrote {out}: the first {min(count, manifest.splits[split].samples)} {split} samples")


def _dataset_summary(manifest) -> dict:
    splits = {name: {"samples": info.samples, "shards": len(info.shards), "bytes": sum(s.bytes for s in info.shards)}
              for name, info in manifest.splits.items()}
    summary = {"format_version": manifest.format_version, "source": manifest.source, "created": manifest.created,
               "digest": manifest.digest(), "splits": splits}
    if manifest.tokens is not None:
        summary["tokens"] = manifest.tokens.model_dump()
    else:
        summary["sample"] = manifest.spec.model_dump()
    return summary


def _summary_lines(dataset: str, summary: dict) -> list[str]:
    lines = [f"{dataset}: format {summary['format_version']}, from {summary['source']}, created {summary['created']}",
             f"digest (dataset.manifest_sha256 of runs trained on it): {summary['digest']}"]
    for name, info in summary["splits"].items():
        lines.append(f"  {name:<6} {info['samples']:>12,} samples  {info['shards']:>6,} shards  "
                     f"{info['bytes'] / 1e6:>12,.1f} MB")
    if "sample" in summary:
        spec = summary["sample"]
        size = "x".join(map(str, spec["size"])) if spec["size"] else "varies"
        lines.append(f"sample: image .{spec['image']}, {spec['channels']} channel(s), size {size}, "
                     f"label {spec['label'] or 'none'}, compression {spec['compression']}")
    else:
        lines.append(f"tokens: {summary['tokens']}")
    return lines


def _sample_grid(manifest, url: str, split: str, count: int, config: str | None, overrides: list[str]):
    """The first ``count`` samples of ``split`` as `eval_batches` feeds validation, tiled into one image."""
    from pipeline.config import DataConfig, load_config
    from pipeline.data import eval_batches
    from pipeline.data.contract import ImageTarget, SampleDecoder
    from pipeline.data.reader import ReadOptions
    from pipeline.train.artifacts import image_grid

    data = load_config(config, overrides).data if config else DataConfig(url=url, **_data_overrides(overrides))
    target = ImageTarget.from_config(manifest.spec, data)
    decoder = SampleDecoder(manifest.spec, target, data.decode_workers)
    batches = eval_batches(manifest, url, split=split, rank=0, world_size=1, batch_size=min(count, 256),
                           options=ReadOptions.from_config(data), decoder=decoder)
    images = []
    for x, _ in batches:
        images.append(x.numpy())
        if sum(len(i) for i in images) >= count:
            break
    import numpy as np

    pixels = np.concatenate(images)[:count].astype(np.float32) / 255.0
    return image_grid(pixels, columns=min(16, len(pixels)), scale=max(1, 128 // max(target.size)))


def _data_overrides(overrides: list[str]) -> dict:
    """``data.*`` overrides without a config file (e.g. -o data.image_size=[32,32])."""
    from pipeline.config import ConfigError, apply_override

    tree: dict = {}
    for assignment in overrides:
        if not assignment.startswith("data."):
            raise ConfigError(f"without --config only data.* overrides apply, got {assignment!r}")
        apply_override(tree, assignment)
    return tree.get("data", {})
