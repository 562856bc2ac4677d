"""What a sample holds: the manifest's `SampleSpec` (members, image format, channels, size, label), the
member names and formats every shard may carry, and the label of a sample's members (see the package doc)."""

from __future__ import annotations

import json
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from pipeline.data.errors import ShardError

ImageFormat = Literal["npy", "png", "jpg", "jpeg", "webp", "ppm", "pgm"]
ENCODED_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "ppm": "PPM", "pgm": "PPM"}
IMAGE_FORMATS = frozenset(ENCODED_FORMATS) | {"npy"}
# Members a sample may carry without being read (captions, metadata); pickles never qualify.
IGNORABLE = frozenset({"txt", "json", "cls", "caption", "url", "id", "key"}) | IMAGE_FORMATS
UNSAFE = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "npz", "mp", "msgpack"})
NPY_MAGIC = b"\x93NUMPY"  # every .npy member starts so (np.load would also take zip archives)
NPY_HEADER_MAX = 4096  # np.save headers are 128 bytes; anything much larger is not ours


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
