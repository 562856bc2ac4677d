"""Pixels: a decoded image as the upright 8-bit L or RGB image the contract promises (`to_pixels`), and an
array as the bytes of one member (`encode_image`): the one conversion writers and readers share."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pipeline.data.contract.spec import ENCODED_FORMATS

# Pillow modes of grey images (a source or member in any other mode has colour).
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_GREY_WITH_ALPHA = frozenset({"1", "L", "LA", "La"})  # composited as grey + alpha, kept grey
_ORIENTATION = 0x0112  # EXIF tag
_SIDES_SWAPPED = frozenset({5, 6, 7, 8})  # orientations that turn the image by 90 degrees


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
