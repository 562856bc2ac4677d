"""`pipeline data images`: shard a folder of images (ImageFolder convention) into WebDataset shards.

- Classes: a sub-folder per class (``root/<class>/.../*.jpg``) gives integer labels in sorted
  class-name order, written to ``classes.json`` beside the manifest; images straight in the
  root (no sub-folders) give an unlabelled dataset; in nested folders (``root/<class>/sub/x.jpg``)
  the top-level folder is the class. Hidden files and folders (any path part starting with
  ``.``: ``.DS_Store``, macOS's ``._x.jpg``, ``.thumbnails/``) and non-images are passed over;
  an empty (0-byte) image file is refused by name before anything is written.
- Split: a seeded hash of each file's relative path picks its split, and a second hash its
  place in the split, so the split of a file never depends on which other files exist, and
  shards are not sorted by class.
- Each image: decoded by Pillow (a whitelist of formats; the decompression-bomb limit on, and
  its 1x-2x warning band refused too), made upright and 8-bit RGB (grey when every image is
  grey) by `contract.to_pixels` (EXIF orientation applied, 16-bit grey scaled by 1/257, alpha
  composited on white), resized (``center-crop``: shorter side to S then the center S x S;
  ``border``: fit inside S x S and pad with black; no --size: stored as it is), encoded by
  `contract.encode_image`.
- Writing (pipeline/data/writer.py): shards are independent tasks over ``workers`` spawned
  processes, each streaming one image at a time (bounded memory); a shard's recipe is the
  settings plus its files' names, sizes and modification stamps, and a re-run reuses every
  shard whose recipe still matches and whose file is intact. ``manifest.json`` is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal, Sequence

import fsspec
import numpy as np

from pipeline.data.contract import GREY_MODES, SampleSpec, encode_image, to_pixels
from pipeline.data.errors import DataError
from pipeline.data.shards import ShardInfo, SplitInfo
from pipeline.data.executors import in_pool, in_process, process_pool
from pipeline.data.writer import ShardTask, ShardWriter, Written, write_finished_shard

RECIPE_VERSION = "images/1"
CLASSES_NAME = "classes.json"
# Source files we open, by extension, and the only Pillow decoders they may reach.
SOURCE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "gif", "tif", "tiff"})
SOURCE_FORMATS = ("JPEG", "PNG", "WEBP", "PPM", "BMP", "GIF", "TIFF")
MAX_SOURCE_BYTES = 256 << 20  # a source file larger than this is refused before it is read
ResizeMode = Literal["center-crop", "border", "none"]


@dataclass(frozen=True)
class Settings:
    """How every image is turned into a stored sample (part of each shard's recipe)."""

    size: int | None = None
    resize: ResizeMode = "center-crop"
    format: str = "jpg"
    quality: int = 95
    channels: int = 3


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the source root, '/'-separated
    bytes: int
    stamp: str  # modification time or ETag: a changed file changes its shard's recipe
    label: int


@dataclass(frozen=True)
class ShardJob(ShardTask):
    first: int  # index of the shard's first sample within its split (sample keys)
    files: tuple[SourceFile, ...]

    def recipe(self, settings: Settings) -> str:
        recipe = {"version": RECIPE_VERSION, "settings": asdict(settings), "first": self.first,
                  "files": [asdict(f) for f in self.files]}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# --- the source folder ---------------------------------------------------------------------------------


def list_source(source: str, not_images: Counter | None = None) -> tuple[list[SourceFile], list[str]]:
    """(image files, class names) of an image folder at any fsspec URL; labels are class indices or -1.
    Hidden files and folders (.DS_Store, ._x.jpg, .git/) are passed over; the other files that are not
    images are counted by extension into ``not_images`` (``".txt"``, or ``"(none)"``)."""
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise DataError(f"--source {source} is not a folder")
    found, empty = [], []
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root) + 1:]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        name = rel.rsplit("/", 1)[-1]
        extension = name.rsplit(".", 1)[-1].lower() if "." in name else None
        if extension not in SOURCE_EXTENSIONS:
            if not_images is not None:
                not_images[f".{extension}" if extension else "(none)"] += 1
            continue
        if info.get("size") == 0:
            empty.append(rel)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
        found.append((rel, int(info.get("size") or 0), str(stamp)))
    if empty:
        more = f" (and {len(empty) - 1} more empty files)" if len(empty) > 1 else ""
        raise DataError(f"{source.rstrip('/')}/{empty[0]}: empty file (0 bytes), not an image{more}: "
                        "remove it or replace it with the image")
    if not found:
        raise DataError(f"no images ({', '.join(sorted(SOURCE_EXTENSIONS))}) under {source}")
    classes = sorted({rel.split("/", 1)[0] for rel, _, _ in found if "/" in rel})
    loose = [rel for rel, _, _ in found if "/" not in rel]
    if classes and loose:
        raise DataError(f"{source}/{loose[0]} lies outside every class folder ({', '.join(classes[:5])}...): "
                        "put every image in a class sub-folder, or none")
    label = {name: i for i, name in enumerate(classes)}
    files = [SourceFile(rel, size, stamp, label[rel.split("/", 1)[0]] if classes else -1) for rel, size, stamp in found]
    return files, classes


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) that is a pure function of ``parts``."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def plan_jobs(files: Sequence[SourceFile], *, seed: int, val_fraction: float, test_fraction: float,
              samples_per_shard: int) -> list[ShardJob]:
    """Shard jobs per split; a file's split and place depend only on (seed, its relative path)."""
    splits: dict[str, list[SourceFile]] = {"train": [], "val": [], "test": []}
    for f in files:
        u = _unit("split", seed, f.path)
        splits["test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"].append(f)
    if not splits["train"]:
        raise DataError(f"no train images left: {len(files)} images, --val-fraction {val_fraction}, "
                        f"--test-fraction {test_fraction}")
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not splits[name]:
            raise DataError(f"the {name} split is empty: {len(files)} images and --{name}-fraction {fraction} "
                            f"give none; raise it (or 0 for no {name} split)")
    jobs = []
    for name, members in splits.items():
        members.sort(key=lambda f: _unit("order", seed, f.path))
        for number, first in enumerate(range(0, len(members), samples_per_shard)):
            jobs.append(ShardJob(name, number, first, tuple(members[first: first + samples_per_shard])))
    return jobs


def all_grey(source: str, files: Sequence[SourceFile], pool: ProcessPoolExecutor | None = None) -> bool:
    """True when every image is grey (header reads only; stops at the first colour image)."""
    chunks = [[f.path for f in files[i: i + 256]] for i in range(0, len(files), 256)]
    if pool is None or len(chunks) == 1:
        return not any(_any_colour(source, chunk) for chunk in chunks)
    futures = [pool.submit(_any_colour, source, chunk) for chunk in chunks]
    for future in futures:
        if future.result():
            for pending in futures:
                pending.cancel()
            return False
    return True


def _any_colour(source: str, paths: Sequence[str]) -> bool:
    from PIL import Image

    fs, root = fsspec.core.url_to_fs(source)
    for rel in paths:
        try:
            with fs.open(f"{root.rstrip('/')}/{rel}", "rb") as handle:
                if Image.open(handle, formats=SOURCE_FORMATS).mode not in GREY_MODES:
                    return True
        except Exception as err:  # noqa: BLE001 - any decoder failure is the file's fault
            raise _unreadable(f"{source.rstrip('/')}/{rel}", err) from None
    return False


def _unreadable(name: str, err: BaseException) -> DataError:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):  # its message is the repr of a file object: say it plainly
        return DataError(f"{name}: unreadable image (not a {', '.join(SOURCE_FORMATS)} file Pillow can open)")
    return DataError(f"{name}: unreadable image ({type(err).__name__}: {err})")


# --- one image, one shard --------------------------------------------------------------------------------


def load_image(raw: bytes, name: str, settings: Settings) -> np.ndarray:
    """Bytes of a source image -> the uint8 [C, H, W] sample to store; DataError names the file."""
    from PIL import Image, ImageOps

    mode = "L" if settings.channels == 1 else "RGB"
    if not raw:
        raise DataError(f"{name}: empty file (0 bytes), not an image")
    try:
        image = Image.open(io.BytesIO(raw), formats=SOURCE_FORMATS)
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise DataError(f"{name}: {width}x{height} pixels exceeds the decompression-bomb limit "
                            f"({Image.MAX_IMAGE_PIXELS} pixels)")
        if image.format == "JPEG" and settings.size:  # DCT-domain downscale, never below what the resize needs
            scale = settings.size / (max if settings.resize == "border" else min)(width, height)
            image.draft(mode, (int(width * scale) + 1, int(height * scale) + 1))
        image = to_pixels(image, mode)  # upright, 8-bit, alpha on white: the contract's one conversion
        if settings.size and settings.resize == "center-crop":
            image = ImageOps.fit(image, (settings.size, settings.size), Image.Resampling.BICUBIC)
        elif settings.size and settings.resize == "border":
            image = ImageOps.pad(image, (settings.size, settings.size), Image.Resampling.BICUBIC, color=0)
        array = np.asarray(image)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated/garbage files raise many types inside Pillow
        raise _unreadable(name, err) from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _run_job(job: ShardJob, source: str, out_url: str, settings: Settings) -> Written:
    """Write one shard, then its record; its ``sizes``: up to two distinct stored [H, W]."""
    src_fs, src_root = fsspec.core.url_to_fs(source)
    sizes: list[list[int]] = []

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for i, f in enumerate(job.files):
            name = f"{source.rstrip('/')}/{f.path}"
            if f.bytes > MAX_SOURCE_BYTES:
                raise DataError(f"{name}: {f.bytes} bytes, larger than any image we accept ({MAX_SOURCE_BYTES})")
            image = load_image(src_fs.cat_file(f"{src_root.rstrip('/')}/{f.path}"), name, settings)
            if len(sizes) < 2 and list(image.shape[1:]) not in sizes:
                sizes.append(list(image.shape[1:]))
            members = {settings.format: encode_image(image, settings.format, settings.quality)}
            if f.label >= 0:
                members["cls"] = str(f.label).encode()
            yield f"{job.split}-{job.first + i:09d}", members

    # `sizes` is filled while the shard is written, so the record (written after it) holds them all
    info = write_finished_shard(out_url, job.path, samples(), job.recipe(settings), sizes=sizes)
    return Written(info, {"sizes": sizes})


# --- the command ------------------------------------------------------------------------------------------


def shard_images(source: str, out_url: str, *, size: int | None = None, resize: ResizeMode = "center-crop",
                 fmt: str = "jpg", quality: int = 95, channels: int | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, samples_per_shard: int = 1000, workers: int = 1, seed: int = 0,
                 progress: bool = True, on_shard_done: Callable[[ShardInfo], None] | None = None,
                 say: Callable[[str], None] = lambda line: None) -> tuple[dict[str, SplitInfo], int, list[str]]:
    """Shard the image folder ``source`` into ``out_url``: (split infos, shards reused, class names).

    ``channels`` None: grey when every image is grey, else RGB. ``on_shard_done`` is called in
    this process after each new shard is recorded (tests interrupt a run with it). ``say`` gets the
    one line that names the files passed over because they are not images, with counts per extension.
    """
    if resize == "none":
        size = None
    if size is not None and size < 1 or samples_per_shard < 1 or workers < 1 or not 1 <= quality <= 100:
        raise DataError("--size, --samples-per-shard and --processes must be >= 1, --quality in 1..100")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise DataError("--val-fraction and --test-fraction must lie in [0, 1)")
    if workers > 1 and any(url.startswith("memory://") for url in (source, out_url)):
        workers = 1  # a spawned process has its own, empty memory:// filesystem
    not_images: Counter = Counter()
    files, classes = list_source(source, not_images)
    if not_images:
        counts = ", ".join(f"{n} {ext}" for ext, n in sorted(not_images.items()))
        total = sum(not_images.values())
        say(f"skipped {total} file{'s' * (total > 1)} that {'are' if total > 1 else 'is'} not an image: {counts} "
            f"(images are {', '.join(sorted(SOURCE_EXTENSIONS))})")
    jobs = plan_jobs(files, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                     samples_per_shard=samples_per_shard)
    with process_pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        return _shard(source, out_url, files, classes, jobs, pool, size=size, resize=resize, fmt=fmt, quality=quality,
                      channels=channels, seed=seed, workers=workers, progress=progress, on_shard_done=on_shard_done)


def _shard(source: str, out_url: str, files: list[SourceFile], classes: list[str], jobs: list[ShardJob],
           pool: ProcessPoolExecutor | None, *, size: int | None, resize: ResizeMode, fmt: str, quality: int,
           channels: int | None, seed: int, workers: int, progress: bool, on_shard_done: Callable[[ShardInfo], None] | None,
           ) -> tuple[dict[str, SplitInfo], int, list[str]]:
    if channels is None:
        channels = 1 if all_grey(source, files, pool) else 3
    settings = Settings(size=size, resize=resize if size else "none", format=fmt, quality=quality, channels=channels)
    writer = ShardWriter(out_url, jobs, recipe=lambda job: job.recipe(settings), samples=lambda job: len(job.files))
    if pool is None or len(writer.todo) <= 1:
        execute = in_process(lambda job: _run_job(job, source, out_url, settings))
    else:
        execute = in_pool(pool, _run_job, source, out_url, settings, in_flight=2 * workers)
    writer.run(execute, progress=progress, on_shard_done=on_shard_done)

    split_infos = writer.split_infos(name for name in ("train", "val", "test") if any(j.split == name for j in jobs))
    seen = {tuple(s) for job in jobs for s in writer.done[job.path].extra.get("sizes") or []}  # with --size: just S x S
    stored = [size, size] if size else list(seen.pop()) if len(seen) == 1 else None
    spec = SampleSpec(image=fmt, channels=channels, size=stored, label="cls" if classes else None)  # type: ignore[arg-type]
    if classes:  # beside the manifest, written before it (the manifest is always last)
        writer.fs.pipe_file(f"{writer.root}/{CLASSES_NAME}", json.dumps(classes, indent=1).encode())
    elif writer.fs.exists(f"{writer.root}/{CLASSES_NAME}"):
        writer.fs.rm(f"{writer.root}/{CLASSES_NAME}")
    recipe = f"size={size} resize={settings.resize} format={fmt} quality={quality} seed={seed}"
    writer.finish(source=f"images {source} ({len(classes)} classes) {recipe}", spec=spec, split_infos=split_infos)
    return split_infos, writer.reused, classes
