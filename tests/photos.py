"""Real photographs, cut into small test datasets of every layout a user brings (no internet needed).

The pixels come from scikit-learn's two bundled photographs (``load_sample_images()``: china.jpg,
flower.jpg, 427 x 640 RGB) and from MNIST's idx files; every function is deterministic in its
``seed``. Imported by the data tests (tests/ is on sys.path under pytest's default import mode):

    crops(n, ...)                   -> list of uint8 [H, W, 3] (or [H, W] grey) crops of the photos
    write_image_folder(root, ...)   -> ImageFolder tree: root/<class>/<name>.<jpg|png|webp>
    write_img2dataset(root, ...)    -> img2dataset's layout: 00000.tar ({key}.jpg/.txt/.json) + .parquet + _stats.json
    write_png_shards(root, ...)     -> WebDataset shards of {key}.png + {key}.cls, gzip-compressed by default
    write_mnist_png_shards(root, mnist_dir, ...) -> MNIST digits as grey {key}.png + {key}.cls shards
    write_tar(path, members)        -> a raw tar of (name, bytes) members (hostile or odd shards)
    png_bytes(array, ...)           -> a PNG written byte by byte (any bit depth and colour type, e.g. 48-bit RGB)
    jpeg_bytes(image, ...)          -> a JPEG of a Pillow image (CMYK, grey, with an EXIF orientation tag)
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The two bundled photographs, uint8 [427, 640, 3]."""
    from sklearn.datasets import load_sample_images

    return tuple(np.ascontiguousarray(image) for image in load_sample_images().images)


def crops(n: int, *, size: tuple[int, int] | None = None, min_side: int = 24, max_side: int = 96, grey: int = 0,
          seed: int = 0) -> list[np.ndarray]:
    """``n`` crops of the photos: all ``size`` (H, W) when given, else sides drawn from [min_side, max_side];
    the last ``grey`` of them converted to grey ([H, W])."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos()[int(rng.integers(len(photos())))]
        height, width = size or (int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1)))
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        crop = photo[top: top + height, left: left + width]
        if i >= n - grey:
            crop = np.asarray(Image.fromarray(crop).convert("L"))
        out.append(np.ascontiguousarray(crop))
    return out


def encode(image: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """uint8 [H, W(, 3)] -> the bytes of a ``fmt`` file (jpg, png, webp)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=PIL_FORMATS[fmt], **({"quality": quality} if fmt != "png" else {}))
    return buffer.getvalue()


def write_image_folder(root: str | Path, *, classes: Sequence[str] = ("bird", "boat", "flower"), per_class: int = 8,
                       formats: Sequence[str] = ("jpg", "png", "webp"), size: tuple[int, int] | None = None,
                       grey: int = 2, seed: int = 0) -> dict[str, list[str]]:
    """An ImageFolder tree (root/<class>/img-<i>.<fmt>, formats cycling); ``classes=()`` puts the images
    straight into root (no labels). ``grey`` images per class are grey. Returns {class: relative paths}."""
    root = Path(root)
    tree: dict[str, list[str]] = {}
    for c, name in enumerate(classes or [""]):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        images = crops(per_class, size=size, grey=grey, seed=seed * 1000 + c)
        paths = []
        for i, image in enumerate(images):
            fmt = formats[i % len(formats)]
            path = folder / f"img-{i:04d}.{fmt}"
            path.write_bytes(encode(image, fmt))
            paths.append(str(path.relative_to(root)))
        tree[name] = paths
    return tree


def write_tar(path: str | Path, members: Sequence[tuple[str, bytes]], *, gzipped: bool = False) -> Path:
    """A tar of (name, bytes) members in the given order (``.tar.gz`` content when ``gzipped``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gzipped else "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def write_img2dataset(root: str | Path, *, shards: int = 3, per_shard: int = 10, size: tuple[int, int] | None = None,
                      seed: int = 0) -> list[Path]:
    """Shards as img2dataset writes them: NNNNN.tar with {key}.jpg, {key}.txt (caption), {key}.json
    (url, key, status, width, height, ... plus an integer ``label`` for the --label json: tests), and
    NNNNN.parquet and NNNNN_stats.json beside each tar."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        members, rows = [], []
        for i, image in enumerate(crops(per_shard, size=size, min_side=32, max_side=80, seed=seed * 1000 + shard)):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
                    "caption": f"a photo crop {key}", "width": image.shape[1], "height": image.shape[0],
                    "original_width": 640, "original_height": 427, "label": (shard + i) % 4}
            members += [(f"{key}.jpg", encode(image, "jpg", 95)), (f"{key}.txt", meta["caption"].encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
            rows.append(meta)
        paths.append(write_tar(root / f"{shard:05d}.tar", members))
        pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("url", "key", "status", "caption")} for r in rows]),
                       root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return paths


def write_png_shards(root: str | Path, *, shards: int = 2, per_shard: int = 12, size: tuple[int, int] = (40, 48),
                     gzipped: bool = True, prefix: str = "photos", seed: int = 0) -> list[Path]:
    """WebDataset shards of RGB {key}.png + {key}.cls (label = index mod 3); ``.tar.gz`` when gzipped."""
    paths = []
    for shard in range(shards):
        members = []
        for i, image in enumerate(crops(per_shard, size=size, seed=seed * 1000 + shard)):
            key = f"{prefix}-{shard:03d}-{i:05d}"
            members += [(f"{key}.png", encode(image, "png")), (f"{key}.cls", str(i % 3).encode())]
        name = f"{prefix}-{shard:05d}.tar" + (".gz" if gzipped else "")
        paths.append(write_tar(Path(root) / name, members, gzipped=gzipped))
    return paths


def write_mnist_png_shards(root: str | Path, mnist_dir: str | Path, *, samples: int = 300, per_shard: int = 100,
                           split: str = "train") -> list[Path]:
    """The first ``samples`` MNIST digits of ``split`` as grey 28 x 28 {key}.png + {key}.cls shards."""
    from pipeline.data.sources import load_mnist_splits

    data = load_mnist_splits(str(mnist_dir))[split]
    paths = []
    for shard, first in enumerate(range(0, samples, per_shard)):
        members = []
        for i in range(first, min(first + per_shard, samples)):
            members += [(f"mnist-{i:06d}.png", encode(data.images[i], "png")),
                        (f"mnist-{i:06d}.cls", str(int(data.labels[i])).encode())]
        paths.append(write_tar(Path(root) / f"mnist-{shard:05d}.tar", members))
    return paths


PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def png_bytes(array: np.ndarray, *, trns: bytes | None = None) -> bytes:
    """A PNG of uint8 or uint16 [H, W] / [H, W, C] (C = 2: grey + alpha, 3: RGB, 4: RGBA), written by hand:
    Pillow cannot write 16-bit colour PNGs. ``trns``: the raw payload of a tRNS chunk (a transparent colour)."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    depth = 16 if array.dtype == np.uint16 else 8
    big_endian = array.astype(">u2" if depth == 16 else "u1").reshape(height, -1)
    rows = b"".join(b"\0" + row.tobytes() for row in big_endian)  # filter type 0 (None) on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + (chunk(b"tRNS", trns) if trns else b"")
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def jpeg_bytes(image: Image.Image, *, quality: int = 95, orientation: int | None = None) -> bytes:
    """The JPEG Pillow writes for ``image`` (mode L, RGB or CMYK), with an EXIF orientation tag when given."""
    options: dict = {"quality": quality}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()
