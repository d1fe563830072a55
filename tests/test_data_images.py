"""The pixel convention: uint8 <-> [-1, 1], exact at both ends and invertible on the 8-bit grid."""

import numpy as np
import pytest
import torch

from difflab.data.images import quantize, to_signed, to_uint8


def test_to_signed_maps_the_8_bit_range_onto_minus_one_to_one():
    pixels = np.array([[[0, 128, 255]]], dtype=np.uint8)  # (H=1, W=1, C=3)
    x = to_signed(pixels)
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 128 / 127.5 - 1.0, 1.0], abs=1e-7)
    assert x[0].item() == -1.0 and x[2].item() == 1.0  # the ends exactly


def test_round_trip_is_exact_for_every_byte_and_keeps_the_layout():
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)[..., None].repeat(3, axis=-1)  # (4, 8, 8, 3)
    pixels[..., 1] = 255 - pixels[..., 1]  # distinct channels, so a transposed layout would show
    assert np.array_equal(to_uint8(to_signed(pixels)), pixels)


def test_quantize_rounds_to_nearest_and_clips():
    x = np.array([-0.2, 0.0, 0.49 / 255, 0.51 / 255, 1.0, 1.3])
    assert quantize(x).tolist() == [0, 0, 0, 1, 255, 255]
