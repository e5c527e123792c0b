"""Pictures the tests send as start, control and mask images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noise_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """Random RGB pixels: every part of the image differs, so any change to its use shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def mask_image(width: int = 64, height: int = 64) -> Image.Image:
    """White (repaint) in the middle half of each side, black elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask, "L")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
