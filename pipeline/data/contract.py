"""The sample contract: what a shard's sample holds, and how its bytes become a uint8 [C, H, W] image.

Every writer (`pipeline data ...`), indexer (`pipeline data index`), reader, bench and evaluator
asks this module; nothing else knows member names or image formats.

A `SampleSpec` (the manifest's ``sample`` field, format v2) says:
- ``image``: the member holding the image: ``npy`` (``np.save`` of uint8 [H, W] or [C, H, W]) or an
  encoded image ``png``, ``jpg``/``jpeg``, ``webp``, ``ppm``/``pgm``;
- ``channels``: channels stored (1 = grey, 3 = RGB);
- ``size``: the stored [H, W] when every sample has it, or None ("varies");
- ``label``: ``cls`` (ASCII integer), ``json:<field>`` (an integer field of the ``.json`` member) or None;
- ``ignore``: members that may be present and are never read (img2dataset's ``txt``, ``json``);
- ``compression``: ``none`` or ``gzip`` (``.tar.gz`` shards; tarfile detects it when reading).

Decoding is in two stages, so that the random choices can depend on a sample's *position* in
the epoch (seeded by (seed, epoch, partition, position): exact resume, W-independent batches)
while the expensive work happens once, early, in parallel:
1. `SampleDecoder.decode` (in the reader, before shuffling): bytes -> uint8 [C, H', W'] in the
   requested channels, scaled so it covers the target (crop modes) or fits inside it with a
   border; center crops are cut here. JPEGs are decoded with Pillow's draft mode when the target
   is far smaller (DCT scaling: 2-8x less work). Only whitelisted formats are opened, with
   Pillow's decompression-bomb limit enforced.
2. `SampleDecoder.finish` (at batch time): the position-seeded random crop and flip, then
   stacking to uint8 [n, C, H, W]. Images stay uint8 until the model's likelihood converts them.

What a decoded image becomes (`to_pixels`: the one conversion `pipeline data images` applies to
source files and the reader applies to shard members, so both see the same pixels):
- upright: an EXIF orientation tag is applied (a camera's rotated JPEG comes out as it is shown);
- 16-bit grey (Pillow's ``I;16`` modes) is scaled to 8 bits, value / 257 rounded (Pillow alone
  would clip: everything above 255 would become white). 16-bit colour reaches us from Pillow
  already at 8 bits, each sample's high byte (within 1 of value / 257);
- alpha is composited on white: RGBA, grey + alpha, and palette, grey or RGB images with a
  transparent colour become ``round((c * a + 255 * (255 - a)) / 255)`` per channel, so a fully
  transparent pixel is white and an opaque one keeps its colour. A grey image stays grey;
- then Pillow's own conversion to 8-bit RGB or L (CMYK, palette, YCbCr, bilevel; grey to RGB
  gives three equal channels).
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from pipeline.data.errors import ShardError

ImageFormat = Literal["npy", "png", "jpg", "jpeg", "webp", "ppm", "pgm"]
ENCODED_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "ppm": "PPM", "pgm": "PPM"}
IMAGE_FORMATS = frozenset(ENCODED_FORMATS) | {"npy"}
# Members a sample may carry without being read (captions, metadata); pickles never qualify.
IGNORABLE = frozenset({"txt", "json", "cls", "caption", "url", "id", "key"}) | IMAGE_FORMATS
UNSAFE = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "npz", "mp", "msgpack"})
Resize = Literal["center-crop", "random-crop", "border"]
NPY_MAGIC = b"\x93NUMPY"  # every .npy member starts so (np.load would also take zip archives)
NPY_HEADER_MAX = 4096  # np.save headers are 128 bytes; anything much larger is not ours
# Pillow modes of grey images (a source or member in any other mode has colour).
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_GREY_WITH_ALPHA = frozenset({"1", "L", "LA", "La"})  # composited as grey + alpha, kept grey
_ORIENTATION = 0x0112  # EXIF tag
_SIDES_SWAPPED = frozenset({5, 6, 7, 8})  # orientations that turn the image by 90 degrees


class SampleSpec(BaseModel):
    """What every sample of a dataset holds (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    image: ImageFormat = "npy"
    channels: Literal[1, 3] = 1
    size: list[int] | None = None  # [H, W]; None: varies from sample to sample
    label: str | None = "cls"
    ignore: list[str] = []
    compression: Literal["none", "gzip"] = "none"

    @field_validator("size")
    @classmethod
    def _two_positive(cls, size: list[int] | None) -> list[int] | None:
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size must be [H, W] with positive sides, got {size}")
        return size

    @field_validator("label")
    @classmethod
    def _label_form(cls, label: str | None) -> str | None:
        if label not in (None, "cls") and not (label.startswith("json:") and len(label) > 5):
            raise ValueError(f"label must be 'cls', 'json:<field>' or null, got {label!r}")
        return label

    @model_validator(mode="after")
    def _safe_members(self) -> "SampleSpec":
        unsafe = sorted(set(self.ignore) & UNSAFE | set(self.ignore) - IGNORABLE)
        if unsafe:
            raise ValueError(f"members {unsafe} cannot be declared (ignorable: {sorted(IGNORABLE)}; pickles never)")
        if self.image in self.ignore or (self.label_member in self.ignore and self.label_member):
            raise ValueError("a member that is read cannot also be ignored")
        return self

    @property
    def label_member(self) -> str | None:
        return None if self.label is None else self.label.split(":", 1)[0]

    @property
    def read_members(self) -> set[str]:
        """Suffixes whose bytes the reader hands to `decode`."""
        return {self.image} | ({self.label_member} if self.label_member else set())

    @property
    def declared(self) -> set[str]:
        """Every suffix a sample may carry; anything else is refused unread."""
        return self.read_members | set(self.ignore)

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """Stored [C, H, W], or None when the size varies."""
        return None if self.size is None else (self.channels, *self.size)

    @property
    def fixed_npy(self) -> bool:
        """Samples the reader's numpy fast path can slice straight out of a plain tar."""
        return self.image == "npy" and self.size is not None and self.label == "cls" and self.compression == "none"


def v1_spec(image_shape: Sequence[int]) -> SampleSpec:
    """The contract every format-1 manifest implies: grey uint8 [H, W] ``.npy`` + ``.cls``, plain tar."""
    shape = list(image_shape)
    channels = 1 if len(shape) == 2 else shape[0]
    return SampleSpec(image="npy", channels=channels, size=shape[-2:], label="cls")


# --- labels -------------------------------------------------------------------------------------------


def decode_label(members: dict[str, bytes], spec: SampleSpec, url: str, key: str) -> int:
    """The integer label (-1 when the dataset has none)."""
    if spec.label is None:
        return -1
    member = spec.label_member
    if member not in members:
        raise ShardError(url, f"sample has no .{member} member", key=key)
    raw = members[member]
    if spec.label == "cls":
        text = raw.strip()
        if not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())):
            raise ShardError(url, f"label {raw[:20]!r} is not an ASCII integer", member=f"{key}.cls")
        return int(text)
    field = spec.label.split(":", 1)[1]
    try:
        value = json.loads(raw).get(field)
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ShardError(url, "not a JSON object", member=f"{key}.json") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShardError(url, f"label field {field!r} is {value!r}, not an integer", member=f"{key}.json")
    return value


# --- images -------------------------------------------------------------------------------------------


def exif_orientation(image: Any) -> int:
    """The EXIF orientation (1-8; 1 = upright) of an opened Pillow image. Reads only what the headers
    already hold (JPEG and WebP: always; PNG: an eXIf chunk before the image data, any once loaded)."""
    if "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block says nothing about orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(image: Any) -> tuple[int, int]:
    """(W, H) of an opened image once its EXIF orientation is applied (headers only)."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _SIDES_SWAPPED else (width, height)


def to_pixels(image: Any, mode: str) -> Any:
    """A Pillow image as the upright 8-bit ``mode`` ("L" or "RGB") image the contract promises (module doc)."""
    from PIL import Image, ImageOps

    image.load()
    # 16-bit grey; older Pillow releases open such PNGs as 32-bit "I" (a PNG has no other source of "I")
    sixteen_bit = image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG")
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if sixteen_bit:
        values = np.asarray(image, dtype=np.uint32)
        grey = ((values + 128) // 257).astype(np.uint8)  # round(value / 257): 257 is odd, so never a tie
        key = image.info.get("transparency")
        if isinstance(key, int):  # a transparent grey level (tRNS), compared at 16 bits
            image = Image.fromarray(np.dstack([grey, np.where(values == key, 0, 255).astype(np.uint8)]), "LA")
        else:
            image = Image.fromarray(grey, "L")
    palette = getattr(image, "palette", None)
    if (image.mode in ALPHA_MODES or "transparency" in image.info
            or (image.mode == "P" and palette is not None and palette.mode == "RGBA")):
        grey = image.mode in _GREY_WITH_ALPHA
        with_alpha = np.asarray(image.convert("LA" if grey else "RGBA"), dtype=np.uint32)
        colour, alpha = with_alpha[..., :-1], with_alpha[..., -1:]
        on_white = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # rounded
        image = Image.fromarray(on_white[..., 0], "L") if grey else Image.fromarray(on_white, "RGB")
    return image if image.mode == mode else image.convert(mode)


@dataclass(frozen=True)
class ImageTarget:
    """What the model is fed: [channels, *size], and how stored images get there."""

    channels: int
    size: tuple[int, int]  # H, W
    resize: Resize = "center-crop"
    hflip: bool = False

    @classmethod
    def from_config(cls, spec: SampleSpec, data: Any) -> "ImageTarget":
        """From a `pipeline.config.DataConfig` (image_size, channels, resize, hflip) and the stored spec."""
        size = data.image_size or spec.size
        if size is None:
            raise ValueError("the dataset's image size varies: set data.image_size: [H, W] (e.g. [64, 64])")
        return cls(channels=data.channels or spec.channels, size=(int(size[0]), int(size[1])), resize=data.resize,
                   hflip=data.hflip)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)


class SampleDecoder:
    """Bytes or stored arrays -> uint8 [C, H, W] for one dataset and target, with a decoding pool.

    ``workers`` > 1 decodes a chunk's images in that many threads (Pillow releases the GIL
    while it decodes and resizes). The pool is this object's own: settings travel with it.
    """

    def __init__(self, spec: SampleSpec, target: ImageTarget | None = None, workers: int = 1,
                 dtype: str = "uint8") -> None:
        self.spec = spec
        # uint8 images; "uint16" only for token datasets (`pipeline encode`), stored as they are
        self.dtype = np.dtype(dtype)
        if target is None:
            if spec.size is None:
                raise ValueError("the dataset's image size varies: an ImageTarget (data.image_size) is needed")
            target = ImageTarget(channels=spec.channels, size=(spec.size[0], spec.size[1]))
        self.target = target
        self.workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        # Stored arrays that already are the target need no per-sample work at all (MNIST).
        self.identity = (spec.size is not None and tuple(spec.size) == target.size
                         and spec.channels == target.channels)
        if self.dtype != np.uint8 and not self.identity:
            raise ValueError(f"{self.dtype} arrays (tokens) are read as stored: no resizing or channel conversion")

    def __getstate__(self) -> dict:  # crosses process boundaries without its threads
        return {**self.__dict__, "_pool": None}

    # stage 1 ---------------------------------------------------------------------------------------

    def decode(self, members: dict[str, bytes], url: str, key: str) -> tuple[np.ndarray, int]:
        """(uint8 [C, H', W'], label) of one sample's member bytes; ShardError names shard and member."""
        label = decode_label(members, self.spec, url, key)
        ext = self.spec.image
        if ext not in members:
            raise ShardError(url, f"sample has no .{ext} member", key=key)
        member = f"{key}.{ext}"
        if ext == "npy":
            array = self._load_npy(members[ext], url, member)
            return self.prepare_array(array), label
        return self._decode_encoded(members[ext], url, member), label

    def start_decoding(self, groups: list[tuple[str, dict[str, bytes]]],
                       url: str) -> Callable[[], list[tuple[np.ndarray, int] | ShardError]]:
        """`decode` over many samples handed to the pool now; the returned function waits for their results,
        in order, a failure (ShardError) in its sample's place. Meanwhile the caller reads the next samples
        (with one thread, the decoding happens here, before returning)."""
        def one(group: tuple[str, dict[str, bytes]]) -> tuple[np.ndarray, int] | ShardError:
            try:
                return self.decode(group[1], url, group[0])
            except ShardError as err:
                return err
        if self.workers == 1 or len(groups) < 2:
            results = [one(g) for g in groups]
            return lambda: results
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pipeline-decode")
        futures = [self._pool.submit(one, g) for g in groups]
        return lambda: [future.result() for future in futures]

    def _load_npy(self, raw: bytes, url: str, member: str) -> np.ndarray:
        if not raw.startswith(NPY_MAGIC):  # np.load would otherwise also accept zip (npz) archives
            raise ShardError(url, "not an .npy array", member=member)
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ShardError(url, f"undecodable .npy ({err})", member=member) from None
        stored = self.spec.shape
        ok_shape = array.ndim in (2, 3) and (stored is None or array.shape in (stored, stored[1:]))
        if array.dtype != self.dtype or not ok_shape or (array.ndim == 3 and array.shape[0] not in (1, 3)):
            want = f"{self.dtype} " + (str(list(stored)) if stored else "[C, H, W]")
            raise ShardError(url, f"image is {array.dtype} {list(array.shape)}, the manifest declares {want}",
                             member=member)
        return array if array.ndim == 3 else array[None]

    def prepare_array(self, array: np.ndarray) -> np.ndarray:
        """Stage 1 for an already decoded uint8 [C, H, W] array."""
        if self.identity:
            return array
        from PIL import Image

        mode = "L" if array.shape[0] == 1 else "RGB"
        image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0), mode)
        return self._fit(image)

    def _decode_encoded(self, raw: bytes, url: str, member: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        fmt = ENCODED_FORMATS[self.spec.image]
        if not raw:
            raise ShardError(url, "empty member (0 bytes), not an image", member=member)
        try:
            image = Image.open(io.BytesIO(raw), formats=[fmt])  # header only; the whitelist of one format
            width, height = image.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                # Pillow only warns between 1x and 2x its limit; a shard is untrusted: refuse.
                raise ShardError(url, f"image of {width}x{height} pixels exceeds the decompression-bomb limit "
                                      f"({Image.MAX_IMAGE_PIXELS} pixels)", member=member)
            mode = "L" if self.target.channels == 1 else "RGB"
            if fmt == "JPEG":
                upright = upright_size(image)
                cover = _scaled(upright, self.target.size, self.target.resize)
                if upright != image.size:  # the stored image lies on its side: so does the size it must cover
                    cover = cover[::-1]
                image.draft(mode, cover)  # DCT-domain downscale to >= the size we need (no-op when not smaller)
            image = to_pixels(image, mode)
        except ShardError:
            raise
        except UnidentifiedImageError:  # its message is the repr of a file object: say it plainly
            raise ShardError(url, f"undecodable {fmt} image (not a {fmt} file Pillow can open)",
                             member=member) from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise ShardError(url, f"undecodable {fmt} image ({type(err).__name__}: {err})", member=member) from None
        return self._fit(image)

    def _fit(self, image: Any) -> np.ndarray:
        """Convert channels, scale to cover (crops) or fit (border) the target, center-crop: [C, H', W']."""
        from PIL import Image

        mode = "L" if self.target.channels == 1 else "RGB"
        if image.mode != mode:  # stored arrays (L or RGB); decoded images have been through `to_pixels`
            image = image.convert(mode)
        height, width = self.target.size
        new_w, new_h = _scaled(image.size, self.target.size, self.target.resize)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        array = np.asarray(image)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if self.target.resize == "border":
            out = np.zeros((self.target.channels, height, width), np.uint8)
            top, left = (height - new_h) // 2, (width - new_w) // 2
            out[:, top: top + new_h, left: left + new_w] = array
            return out
        if self.target.resize == "center-crop":
            return _center(array, height, width)
        return np.ascontiguousarray(array)  # random-crop: cut at batch time, where the position is known

    # stage 2 ---------------------------------------------------------------------------------------

    def finish(self, images: np.ndarray, seeds: Sequence[Sequence[int]] | None) -> np.ndarray:
        """uint8 [n, C, H, W] from stage-1 images (a uint8 array or an object array of arrays).

        ``seeds`` (one entropy tuple per row, from its position) drive the random crop and flip;
        None (evaluation): center crop, no flip.
        """
        height, width = self.target.size
        random = seeds is not None
        flips = random and self.target.hflip
        if images.dtype != object and images.shape[1:] == self.target.shape and not flips:
            return images
        out = np.empty((len(images), *self.target.shape), np.uint8)
        for i, image in enumerate(images):
            rng = np.random.default_rng(list(seeds[i])) if random else None
            if image.shape[1:] != (height, width):
                if rng is not None and self.target.resize == "random-crop":
                    top = int(rng.integers(0, image.shape[1] - height + 1))
                    left = int(rng.integers(0, image.shape[2] - width + 1))
                    image = image[:, top: top + height, left: left + width]
                else:
                    image = _center(image, height, width)
            if flips and rng.random() < 0.5:
                image = image[:, :, ::-1]
            out[i] = image
        return out


def _scaled(size: tuple[int, int], target: tuple[int, int], resize: str) -> tuple[int, int]:
    """(W', H') of a stored (W, H) image scaled to cover (crops) or fit inside (border) target (H, W)."""
    width, height = size
    t_h, t_w = target
    scale = (min if resize == "border" else max)(t_w / width, t_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _center(array: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (array.shape[1] - height) // 2, (array.shape[2] - width) // 2
    return array[:, top: top + height, left: left + width]


def encode_image(image: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """uint8 [C, H, W] -> the bytes of one member in ``fmt`` (the writers' side of the contract)."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, image[0] if image.shape[0] == 1 else image, allow_pickle=False)
        return buffer.getvalue()
    from PIL import Image

    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpg", "jpeg", "webp") else {}
    pil.save(buffer, format=ENCODED_FORMATS[fmt], **options)
    return buffer.getvalue()
