"""`pipeline bench codecs`: classical coders' bits per dimension on constructed images (exact values)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.bench.codecs import codec_bits_per_dim


def test_constant_and_two_level_images_have_their_entropies() -> None:
    flat = np.full((4, 3, 8, 8), 77, np.uint8)
    figures = codec_bits_per_dim(flat)
    assert figures["histogram"] == 0.0
    # differences: the first column keeps 77 (1/8 of the values), the rest are 0
    assert figures["left_neighbour"] == pytest.approx(-(1 / 8) * math.log2(1 / 8) - (7 / 8) * math.log2(7 / 8))
    halves = np.zeros((2, 1, 4, 4), np.uint8)
    halves[1] = 255
    assert codec_bits_per_dim(halves)["histogram"] == pytest.approx(1.0)
    assert 0 < figures["png"] < 8


def test_refuses_what_is_not_8_bit_images() -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        codec_bits_per_dim(np.zeros((2, 8, 8), np.uint8))
