"""The sample contract: what a shard's sample holds, and how its bytes become a uint8 [C, H, W] image.

Every writer (`pipeline data ...`), indexer (`pipeline data index`), reader, bench and evaluator
asks this package; nothing else knows member names or image formats. Its rooms: `spec` (the
`SampleSpec`, member names and formats, labels), `pixels` (`to_pixels`, `encode_image`) and
`decoder` (`ImageTarget`, `SampleDecoder`); every name is imported from here.

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

from pipeline.data.contract.decoder import ImageTarget, Resize, SampleDecoder
from pipeline.data.contract.pixels import (ALPHA_MODES, GREY_MODES, SIXTEEN_BIT_MODES, encode_image, exif_orientation,
                                           to_pixels, upright_size)
from pipeline.data.contract.spec import (ENCODED_FORMATS, IGNORABLE, IMAGE_FORMATS, NPY_HEADER_MAX, NPY_MAGIC, UNSAFE,
                                         ImageFormat, SampleSpec, decode_label, v1_spec)

__all__ = [
    "ALPHA_MODES", "ENCODED_FORMATS", "GREY_MODES", "IGNORABLE", "IMAGE_FORMATS", "NPY_HEADER_MAX", "NPY_MAGIC",
    "SIXTEEN_BIT_MODES", "UNSAFE", "ImageFormat", "ImageTarget", "Resize", "SampleDecoder", "SampleSpec",
    "decode_label", "encode_image", "exif_orientation", "to_pixels", "upright_size", "v1_spec",
]
