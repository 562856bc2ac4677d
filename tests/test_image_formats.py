"""Images as people have them, through `pipeline data images` and `pipeline data index`, read back by the
training reader and compared pixel by pixel with Pillow's own decoding of the source bytes.

The rule every case is held to (the sample contract's): 16-bit grey becomes 8-bit by value / 257, rounded;
alpha (RGBA, grey + alpha, a palette or colour with a transparent entry) is composited on white; an EXIF
orientation tag is applied (the stored image is upright); everything else is Pillow's conversion to 8-bit
RGB (or L when every image is grey). All sources are 16 x 24 (H x W) once upright, stored as PNG and read
back at 16 x 24, so no resizing is involved and every comparison is exact.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from photos import crops, jpeg_bytes, png_bytes, write_tar
from pipeline.data import DataError, ImageTarget, ReadOptions, SampleDecoder, ShardError, eval_batches, read_manifest
from pipeline.data.images import list_source, plan_jobs, shard_images
from pipeline.data.index import index_shards

H, W = 16, 24
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def reference(raw: bytes, channels: int) -> np.ndarray:
    """uint8 [C, H, W]: Pillow's decoding of ``raw``, made 8-bit L or RGB as the contract promises."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        grey = ((values + 128) // 257).astype(np.uint8)  # round(value / 257): 257 is odd, so no ties
        key = image.info.get("transparency")
        image = (Image.fromarray(grey, "L") if key is None else
                 Image.fromarray(np.dstack([grey, np.where(values == key, 0, 255).astype(np.uint8)]), "LA"))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.int64)
        colour, alpha = rgba[..., :3], rgba[..., 3:]
        image = Image.fromarray(((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8), "RGB")
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_split(url: str, split: str = "train", channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, C, H, W], labels) of a split through the training reader, at the stored 16 x 24."""
    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=channels, size=(H, W)))
    batches = list(eval_batches(manifest, url, split=split, rank=0, world_size=1, batch_size=64,
                                options=ReadOptions(verify=True), decoder=decoder))
    return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])


def photo(seed: int = 0, size: tuple[int, int] = (H, W)) -> np.ndarray:
    return crops(1, size=size, seed=seed)[0]


# --- the sources ------------------------------------------------------------------------------------------


def grey16_ramp() -> bytes:
    """A full 0..65535 ramp in a 16-bit grey PNG (Pillow mode I;16)."""
    return png_bytes(np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W))


def rgb48_values() -> np.ndarray:
    """uint16 [H, W, 3]: a photo scaled up to 16 bits, plus noise in the low byte."""
    noise = np.random.default_rng(1).integers(0, 256, (H, W, 3))
    return (photo(1).astype(np.int64) * 257 + noise).clip(0, 65535).astype(np.uint16)


def rgb48() -> bytes:
    """A 16-bit-per-channel RGB PNG."""
    return png_bytes(rgb48_values())


def palette_with_transparency() -> bytes:
    """A palette PNG whose entries run from fully transparent to opaque (a tRNS chunk)."""
    image = Image.fromarray((np.arange(H * W).reshape(H, W) % 8).astype(np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30, 200, 100, 0, 0, 0, 0, 90, 90, 90, 250, 250, 5])
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=bytes([0, 60, 128, 255, 255, 1, 200, 10]))
    return buffer.getvalue()


def rgba() -> bytes:
    alpha = np.random.default_rng(2).integers(0, 256, (H, W, 1))
    alpha[0, :4] = [[0], [0], [255], [255]]  # fully transparent and fully opaque pixels, for certain
    return png_bytes(np.concatenate([photo(2), alpha], axis=2).astype(np.uint8))


def grey_alpha() -> bytes:
    return png_bytes(np.dstack([np.asarray(Image.fromarray(photo(3)).convert("L")),
                                np.tile(np.arange(0, 256, 256 // W, dtype=np.uint8)[:W], (H, 1))]))


def cmyk_jpeg() -> bytes:
    return jpeg_bytes(Image.fromarray(photo(4)).convert("CMYK"))


def rotated_jpeg() -> bytes:
    """An upright 16 x 24 photo stored as 24 x 16 with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    stored = Image.fromarray(photo(5)).transpose(Image.Transpose.ROTATE_90)  # what a camera held upright writes
    return jpeg_bytes(stored, orientation=6)


def cut_in_the_scan(raw: bytes, keep: float) -> bytes:
    """A JPEG cut short inside its compressed image data (its headers whole: it opens, then fails to load)."""
    scan = raw.index(b"\xff\xda")  # start of scan
    return raw[: scan + int((len(raw) - scan) * keep)]


def grey_jpeg() -> bytes:
    return jpeg_bytes(Image.fromarray(photo(6)).convert("L"))


def rgb_jpeg(seed: int = 7) -> bytes:
    return jpeg_bytes(Image.fromarray(photo(seed)))


COLOUR_FOLDER = {  # relative path -> bytes; classes: the top-level folders (café, colour, deep)
    "deep/16-bit/grey-ramp.png": grey16_ramp,
    "deep/16-bit/rgb48.png": rgb48,
    "colour/palette-transparent.png": palette_with_transparency,
    "colour/rgba.png": rgba,
    "colour/grey-alpha.png": grey_alpha,
    "colour/cmyk.jpg": cmyk_jpeg,
    "colour/rotated.jpg": rotated_jpeg,
    "colour/grey.jpg": grey_jpeg,
    "café/naïve-ü.jpg": rgb_jpeg,
    "café/日本/写真.png": lambda: png_bytes(photo(8)),
}
HIDDEN = {  # a hidden-file rule passes these over: were they read, they would fail (garbage) or add a class
    "colour/._rgba.png": b"\x00\x05\x16\x07AppleDouble resource fork",
    "café/._naïve-ü.jpg": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ",  # AppleDouble beside a JPEG
    ".hidden/x.jpg": b"not a jpeg",
    "colour/.thumbnails/y.png": b"not a png",
}


def write_folder(root: Path, files: dict) -> dict[str, bytes]:
    written = {}
    for rel, make in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        written[rel] = make() if callable(make) else make
        path.write_bytes(written[rel])
    return written


# --- pipeline data images ----------------------------------------------------------------------------------


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path) -> None:
    raw = grey16_ramp()
    assert Image.open(io.BytesIO(raw)).mode == "I;16"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ramp.png").write_bytes(raw)
    shard_images(str(tmp_path / "src"), str(tmp_path / "out"), resize="none", fmt="png", val_fraction=0,
                 test_fraction=0, progress=False)
    manifest = read_manifest(str(tmp_path / "out"))
    assert (manifest.spec.channels, manifest.spec.size) == (1, [H, W])
    images, _ = read_split(str(tmp_path / "out"), channels=1)
    ramp = np.linspace(0, 65535, H * W).round().reshape(H, W)
    np.testing.assert_array_equal(images[0, 0], np.round(ramp / 257).astype(np.uint8))
    assert (images == 255).mean() < 0.01 and images.min() == 0 and images.max() == 255


def test_colour_folder_pixel_for_pixel(tmp_path) -> None:
    """Every kind of source through the command line, then the reader; exact against the rule."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    sources = write_folder(tmp_path / "src", COLOUR_FOLDER)
    write_folder(tmp_path / "src", HIDDEN)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "images", "--source", str(tmp_path / "src"), "--out", str(out),
                                      "--resize", "none", "--format", "png", "--val-fraction", "0",
                                      "--test-fraction", "0", "--processes", "1"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(out))
    assert manifest.spec.model_dump() == {"image": "png", "channels": 3, "size": [H, W], "label": "cls",
                                          "ignore": [], "compression": "none"}  # the rotated JPEG is upright
    files, classes = list_source(str(tmp_path / "src"))
    assert classes == ["café", "colour", "deep"]  # the top-level folder is the class; hidden ones are none
    assert sorted(f.path for f in files) == sorted(COLOUR_FOLDER)
    images, labels = read_split(str(out))
    order = [f for job in plan_jobs(files, seed=0, val_fraction=0, test_fraction=0, samples_per_shard=1000)
             for f in job.files]
    assert len(images) == len(order) == len(COLOUR_FOLDER)
    assert labels.tolist() == [classes.index(f.path.split("/")[0]) for f in order]
    differ = {f.path: int(np.abs(image.astype(int) - reference(sources[f.path], 3)).max())
              for image, f in zip(images, order) if not np.array_equal(image, reference(sources[f.path], 3))}
    assert differ == {}  # path -> largest difference of any pixel
    by_path = {f.path: image for image, f in zip(images, order)}
    grey = by_path["colour/grey.jpg"]
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()  # grey among colour: three equal channels
    assert (by_path["colour/rgba.png"][:, 0, :2] == 255).all()  # fully transparent: white
    assert (by_path["deep/16-bit/grey-ramp.png"] == 255).mean() < 0.01
    # 16-bit colour: Pillow keeps each sample's high byte, within 1 of value / 257
    deep = rgb48_values().transpose(2, 0, 1).astype(int)
    np.testing.assert_array_equal(by_path["deep/16-bit/rgb48.png"], deep >> 8)
    assert np.abs(by_path["deep/16-bit/rgb48.png"] - np.round(deep / 257)).max() == 1
    upright = photo(5).transpose(2, 0, 1).astype(int)  # the rotated JPEG shows the photo the right way up
    assert np.abs(by_path["colour/rotated.jpg"].astype(int) - upright).mean() < 4


def test_grey_folder_pixel_for_pixel(tmp_path) -> None:
    """Only grey sources (16-bit, grey + alpha, grey JPEG): stored as one channel, exact against the rule."""
    sources = write_folder(tmp_path / "src", {"a/ramp.png": grey16_ramp, "a/alpha.png": grey_alpha,
                                              "b/grey.jpg": grey_jpeg,
                                              "b/trns16.png": lambda: png_bytes(
                                                  (photo(9)[..., 0].astype(np.uint16) * 257),
                                                  trns=(100 * 257).to_bytes(2, "big"))})
    shard_images(str(tmp_path / "src"), str(tmp_path / "out"), resize="none", fmt="png", val_fraction=0,
                 test_fraction=0, workers=1, progress=False)
    assert read_manifest(str(tmp_path / "out")).spec.channels == 1
    images, _ = read_split(str(tmp_path / "out"), channels=1)
    files, _ = list_source(str(tmp_path / "src"))
    order = [f for job in plan_jobs(files, seed=0, val_fraction=0, test_fraction=0, samples_per_shard=1000)
             for f in job.files]
    differ = {f.path: int(np.abs(image.astype(int) - reference(sources[f.path], 1)).max())
              for image, f in zip(images, order) if not np.array_equal(image, reference(sources[f.path], 1))}
    assert differ == {}  # path -> largest difference of any pixel


def test_hidden_files_by_rule_not_by_extension(tmp_path) -> None:
    write_folder(tmp_path, {"a/x.jpg": rgb_jpeg, "a/sub/y.jpg": rgb_jpeg, **HIDDEN,
                            "a/.z.png": b"hidden, with an image extension"})
    files, classes = list_source(str(tmp_path))
    assert [f.path for f in files] == ["a/sub/y.jpg", "a/x.jpg"] and classes == ["a"]
    assert {f.label for f in files} == {0}  # root/class/sub/x.jpg: the class is the top-level folder


def test_empty_file_named_nothing_written(tmp_path) -> None:
    write_folder(tmp_path / "src", {"café/ok.jpg": rgb_jpeg, "café/vide-é.jpg": b""})
    with pytest.raises(DataError, match=r"café/vide-é\.jpg.*empty"):
        shard_images(str(tmp_path / "src"), str(tmp_path / "out"), size=8, val_fraction=0, test_fraction=0,
                     progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_named_nothing_written(tmp_path, keep) -> None:
    write_folder(tmp_path / "src", {"x/ok.jpg": rgb_jpeg, "x/cut.jpg": cut_in_the_scan(rgb_jpeg(10), keep)})
    with pytest.raises(DataError, match=r"src/x/cut\.jpg: unreadable image \(OSError: image file is truncated"):
        shard_images(str(tmp_path / "src"), str(tmp_path / "out"), resize="none", val_fraction=0, test_fraction=0,
                     progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- pipeline data index -------------------------------------------------------------------------------------


PNG_SHARD = {"grey16": grey16_ramp, "rgb48": rgb48, "palette": palette_with_transparency, "rgba": rgba,
             "greyalpha": grey_alpha, "plain": lambda: png_bytes(photo(11))}
JPG_SHARD = {"cmyk": cmyk_jpeg, "rotated": rotated_jpeg, "grey": grey_jpeg, "plain": rgb_jpeg}


@pytest.mark.parametrize("suffix, makers", [("png", PNG_SHARD), ("jpg", JPG_SHARD)])
def test_indexed_shards_pixel_for_pixel(tmp_path, suffix, makers) -> None:
    members = {key: make() for key, make in makers.items()}
    write_tar(tmp_path / "s-00000.tar", [(name, data) for key, raw in members.items()
                                         for name, data in ((f"{key}.{suffix}", raw), (f"{key}.cls", b"1"))])
    manifest = index_shards([str(tmp_path / "s-00000.tar")], str(tmp_path), require_val=False, workers=1,
                            progress=False)
    assert (manifest.spec.image, manifest.spec.channels, manifest.spec.size) == (suffix, 3, [H, W])
    images, labels = read_split(str(tmp_path))
    assert images.shape == (len(members), 3, H, W) and (labels == 1).all()
    differ = {key: int(np.abs(image.astype(int) - reference(raw, 3)).max())  # one shard: read in tar order
              for image, (key, raw) in zip(images, members.items()) if not np.array_equal(image, reference(raw, 3))}
    assert differ == {}  # member -> largest difference of any pixel


def test_indexed_empty_member_named(tmp_path) -> None:
    write_tar(tmp_path / "s-00000.tar", [("a.jpg", rgb_jpeg()), ("a.cls", b"0"), ("b.jpg", b""), ("b.cls", b"0")])
    with pytest.raises(ShardError, match=r"s-00000\.tar.*b\.jpg"):
        index_shards([str(tmp_path / "s-00000.tar")], str(tmp_path), require_val=False, workers=1, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_indexed_truncated_jpeg_named_when_read_or_skipped_and_counted(tmp_path) -> None:
    """The index reads headers only: a JPEG cut short in its image data is found when it is decoded."""
    from pipeline.data.reader import ShardReader

    write_tar(tmp_path / "s-00000.tar", [("a.jpg", rgb_jpeg()), ("a.cls", b"0"),
                                         ("b.jpg", cut_in_the_scan(rgb_jpeg(12), 0.5)), ("b.cls", b"0"),
                                         ("c.jpg", rgb_jpeg(13)), ("c.cls", b"0")])
    manifest = index_shards([str(tmp_path / "s-00000.tar")], str(tmp_path), require_val=False, workers=1,
                            progress=False)
    with pytest.raises(ShardError, match=r"s-00000\.tar.*b\.jpg.*truncated"):
        read_split(str(tmp_path))
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=3, size=(H, W)))
    reader = ShardReader(ReadOptions(on_corrupt="skip"), decoder)
    batches = list(eval_batches(manifest, str(tmp_path), split="train", rank=0, world_size=1, batch_size=8,
                                reader=reader))
    assert sum(len(x) for x, _ in batches) == 2
    health = reader.stats
    assert health.skipped_samples == 1 and "b.jpg" in str(health.skipped_shards)
