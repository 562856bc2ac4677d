"""Fast path for reading a shard: the whole tar parsed with numpy.

The shards `pipeline data` writes are plain ustar archives with a fixed layout: per sample a
512-byte header + the .npy payload (padded to 512) + a header + the .cls payload (<= 512).
`_fast_samples` checks that layout for every member at once (header checksums, numeric
fields, regular-file type, names key.npy/key.cls, sizes, the .npy header byte-identical to
one parsed safely with numpy's own header reader and matching the manifest's shape and
dtype, ASCII-integer labels) and slices images and labels out of the buffer without a
Python call per member. It accepts only a subset of what the tarfile path accepts, with the
same result; anything else (another layout, any damage, extra members) returns None and the
shard goes through the reference path (tarfile + `_decode`) over the same bytes, so errors,
skips and their counts are exactly the reference's.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"
_OCTAL_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))


def _octal(field: np.ndarray) -> np.ndarray:
    """[n, k] ASCII octal digits -> int64 [n]."""
    value = np.zeros(len(field), np.int64)
    for column in range(field.shape[1]):
        value = value * 8 + (field[:, column].astype(np.int64) - 48)
    return value


def _numeric_fields_ok(headers: np.ndarray) -> bool:
    """Every numeric field is 'ddd...d\\0' (octal digits) or all NULs: a form tarfile reads the same way."""
    for low, high in _OCTAL_FIELDS:
        field = headers[:, low:high]
        digits = field[:, :-1]
        ok = ((digits >= 48) & (digits <= 55)).all(axis=1) & (field[:, -1] == 0)
        if not (ok | (field == 0).all(axis=1)).all():
            return False
    return True


def _npy_header(payload: bytes, shape: tuple[int, ...], dtype: np.dtype) -> int | None:
    """Length of the .npy header of ``payload`` if numpy's safe header reader says it is a C-order
    ``dtype`` array of ``shape`` (no pickle involved: np.load's own header parser), else None."""
    if not payload.startswith(_NPY_MAGIC):
        return None
    try:
        stream = io.BytesIO(payload)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            found_shape, fortran, found_dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return None
    except (ValueError, OSError, EOFError, SyntaxError):
        return None
    if tuple(found_shape) != shape or fortran or found_dtype != dtype or found_dtype.hasobject:
        return None
    return stream.tell()


def _fast_samples(data: bytes, start: int, stop: int, shape: tuple[int, ...], dtype: np.dtype,
                  declared: set[str], max_member: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(keys, images [n, *shape], labels [n]) of samples [start, stop), or None: use the reference path."""
    if not {"npy", "cls"} <= declared or stop <= start or len(data) < 512:
        return None
    buf = np.frombuffer(data, np.uint8)
    first = buf[:512][None]
    if not _numeric_fields_ok(first):
        return None
    npy_size = int(_octal(first[:, 124:135])[0])
    if not 0 < npy_size <= max_member:
        return None
    padded = -(-npy_size // 512) * 512
    stride = 512 + padded + 1024
    if len(buf) < stop * stride:
        return None
    rows = buf[: stop * stride].reshape(stop, stride)
    headers = np.concatenate([rows[:, :512], rows[:, 512 + padded: 1024 + padded]])  # npy headers, then cls headers
    checksum = headers[:, 148:156]
    if not (((checksum[:, :6] >= 48) & (checksum[:, :6] <= 55)).all() and (checksum[:, 6] == 0).all()
            and (checksum[:, 7] == 32).all()):
        return None
    computed = headers.sum(axis=1, dtype=np.int64) - checksum.sum(axis=1, dtype=np.int64) + 8 * 32
    if not ((_octal(checksum[:, :6]) == computed).all() and (headers[:, 156] == ord("0")).all()
            and (headers[:, 345] == 0).all() and _numeric_fields_ok(headers)):
        return None  # damage, or a type/prefix/number form this path does not handle
    sizes = _octal(headers[:, 124:135])
    label_sizes = sizes[stop:]
    if not ((sizes[:stop] == npy_size).all() and (label_sizes >= 1).all() and (label_sizes <= 512).all()):
        return None
    names = np.ascontiguousarray(headers[:, :100]).view("S100").ravel().tolist()  # trailing NULs dropped
    keys = []
    for image_name, label_name in zip(names[:stop], names[stop:]):
        key = image_name[:-4]
        if (not image_name.endswith(b".npy") or label_name != key + b".cls" or b"\0" in key
                or not key.rsplit(b"/", 1)[-1] or b"." in key.rsplit(b"/", 1)[-1]):
            return None  # not key.npy then key.cls, as base_plus_ext would split them
        keys.append(key)
    payloads = rows[:, 512: 512 + npy_size]
    header_len = _npy_header(payloads[0].tobytes(), shape, dtype)
    if header_len is None or header_len + int(np.prod(shape)) * dtype.itemsize != npy_size:
        return None
    if not (payloads[:, :header_len] == payloads[0, :header_len]).all():
        return None  # every .npy header byte-identical to the one numpy parsed
    try:
        out_keys = [key.decode(tarfile.ENCODING) for key in keys[start:stop]]
    except UnicodeDecodeError:
        return None
    labels_at = 1024 + padded
    label_rows = rows[start:stop, labels_at: labels_at + 512]
    if (label_sizes == 1).all() and ((label_rows[:, 0] >= 48) & (label_rows[:, 0] <= 57)).all():
        labels = label_rows[:, 0].astype(np.int64) - 48
    else:
        labels = np.empty(stop - start, np.int64)
        for i, (row, size) in enumerate(zip(label_rows, label_sizes[start:stop])):
            text = row[:size].tobytes().strip()
            if not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())):
                return None
            labels[i] = int(text)
    images = np.ascontiguousarray(payloads[start:stop, header_len:]).reshape(stop - start, *shape)
    return out_keys, images, labels
