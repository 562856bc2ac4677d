"""Decoding: member bytes or stored arrays -> uint8 [C, H, W] for one dataset and `ImageTarget`, in two
stages (`SampleDecoder.decode` before shuffling, `SampleDecoder.finish` at batch time; see the package doc)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from pipeline.data.contract.pixels import to_pixels, upright_size
from pipeline.data.contract.spec import ENCODED_FORMATS, NPY_MAGIC, SampleSpec, decode_label
from pipeline.data.errors import ShardError

Resize = Literal["center-crop", "random-crop", "border"]


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
