"""Uploaded img2img start images and inpainting masks: checked and decoded once, kept by content key."""

from __future__ import annotations

import builtins
import hashlib
import io
import string
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zimage_split.common.errors import IMAGE_UNKNOWN, DataLoss, InvalidArgument, NotFound, ResourceExhausted
from zimage_split.common.lru import ByteBoundedLRU

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_PREFIX = "img-"
MASK_PREFIX = "mask-"
# Pillow opens a JPEG that carries extra pictures (phone photos with a depth map or preview) as MPO; its
# first frame is the photo itself.
_JPEG_WITH_EXTRAS = "MPO"
# What Pillow raises on corrupt, truncated or hostile files (found by truncating and flipping bytes of
# valid files in the tests); anything else is a bug and stays one.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_FORMATS_HINT = "send a PNG, JPEG or WebP file"


def decode_upload(data: bytes, *, mask: bool, max_pixels: int) -> Image.Image:
    """Checks and decodes an uploaded PNG, JPEG or WebP file; raises InvalidArgument saying the fix.

    The size is checked against `max_pixels` from the header, before any pixel is decoded. The EXIF
    orientation is applied (phone photos come out upright). Animated PNG/WebP files are refused; a JPEG
    with extra pictures (MPO) gives its first, main picture. Images come back "RGB", with transparent
    parts composited on white (what a viewer shows); masks come back "L" (white = repaint), with
    transparent parts composited on black (keep), so that a mask painted on a transparent layer works.
    16-bit greyscale is scaled to 8 bits. The result is fully loaded and independent of `data`.
    """
    what = "mask" if mask else "image"
    if not data:
        raise InvalidArgument(f"The uploaded {what} is empty (0 bytes); {_FORMATS_HINT}.")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"The uploaded {what} is {_describe_unreadable(data)}; {_FORMATS_HINT}."
        ) from None
    except Image.DecompressionBombError:
        raise _too_large(what, None, max_pixels) from None
    except _DECODE_ERRORS as error:
        raise InvalidArgument(f"The uploaded {what} is corrupt ({error}); {_FORMATS_HINT}.") from None
    with image:
        width, height = image.size
        if width == 0 or height == 0:
            raise InvalidArgument(
                f"The uploaded {what} is {width}x{height} pixels; send a non-empty picture."
            )
        if width * height > max_pixels:
            raise _too_large(what, (width, height), max_pixels)
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format != _JPEG_WITH_EXTRAS:
            raise InvalidArgument(
                f"The uploaded {what} is animated ({frames} frames); send a still image, e.g. the "
                "frame you want saved as PNG."
            )
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError:
            raise _too_large(what, (width, height), max_pixels) from None
        except _DECODE_ERRORS as error:
            raise InvalidArgument(
                f"The uploaded {what} is truncated or corrupt ({error}); {_FORMATS_HINT}."
            ) from None
    result = _flatten(upright, mask)
    result.info = {}
    return result


class ImageStore:
    """Decoded uploads by key: "img-" or "mask-" and the hex sha256 of the file bytes.

    A byte-bounded LRU (width * height * channels bytes per entry) that UploadImage fills and Generate
    reads. Returned images are shared: treat them as read-only. Thread-safe.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self._images: ByteBoundedLRU[Image.Image] = ByteBoundedLRU(max_bytes, image_bytes)

    @property
    def max_bytes(self) -> int:
        return self._images.max_bytes

    @property
    def bytes(self) -> int:
        """Bytes of decoded images held now."""
        return self._images.bytes

    @property
    def hits(self) -> int:
        """`get` calls that found their image."""
        return self._images.hits

    @property
    def misses(self) -> int:
        """`get` calls whose key was unknown or evicted."""
        return self._images.misses

    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, key: str) -> bool:
        return key in self._images

    # builtins.bytes: the `bytes` property above shadows the type inside this class.
    def add(
        self, data: builtins.bytes, *, mask: bool, max_pixels: int, sha256: str = ""
    ) -> tuple[str, Image.Image]:
        """Checks, decodes and keeps an uploaded file; returns its key and the decoded image.

        The same bytes always give the same key. A `sha256` that does not match the bytes is DataLoss
        (the bytes changed on the way, as for tensor uploads); one that is not 64 hex digits is
        InvalidArgument. An image too large for the whole store is ResourceExhausted.
        """
        digest = hashlib.sha256(data).hexdigest()
        if sha256:
            expected = sha256.lower()
            if len(expected) != 64 or not set(expected) <= set(string.hexdigits.lower()):
                raise InvalidArgument(
                    f"The upload's sha256 must be 64 hex digits (got {sha256!r}); send the file's hex "
                    "sha256, or leave it empty."
                )
            if expected != digest:
                raise DataLoss(
                    f"The uploaded bytes do not match their sha256 (expected {expected}, got {digest}): they "
                    "were corrupted on the way, or the sha256 is of another file. Upload the file again."
                )
        image = decode_upload(data, mask=mask, max_pixels=max_pixels)
        size = image_bytes(image)
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"The decoded {image.width}x{image.height} image needs {size} bytes, more than this "
                f"generator's whole image store ({self.max_bytes} bytes); send a smaller image."
            )
        key = (MASK_PREFIX if mask else IMAGE_PREFIX) + digest
        self._images.put(key, image)
        return key, image

    def get(self, key: str, *, mask: bool) -> Image.Image:
        """The image uploaded under `key`: NotFound once evicted, InvalidArgument for a key of the other
        kind (a mask key given as the image, or the reverse) or not from UploadImage at all."""
        wanted, other = (MASK_PREFIX, IMAGE_PREFIX) if mask else (IMAGE_PREFIX, MASK_PREFIX)
        role, other_role = ("mask_key", "image_key") if mask else ("image_key", "mask_key")
        if key.startswith(other):
            raise InvalidArgument(
                f"{key!r} was uploaded as {'an image' if mask else 'a mask'}, so it is an {other_role}, not "
                f"a {role}; upload the file again with mask={mask} to use it this way."
            )
        if not key.startswith(wanted):
            raise InvalidArgument(
                f"{key!r} is not a key UploadImage returned (those start with {IMAGE_PREFIX!r} or "
                f"{MASK_PREFIX!r}); pass the key from UploadImage."
            )
        image = self._images.get(key)
        if image is None:
            raise NotFound(
                f"This generator no longer holds the upload {key!r} (or never did); upload it again with "
                "UploadImage.",
                reason=IMAGE_UNKNOWN,
            )
        return image


def image_bytes(image: Image.Image) -> int:
    """Memory an 8-bit decoded image takes: width * height * channels."""
    return image.width * image.height * len(image.getbands())


def _too_large(what: str, size: tuple[int, int] | None, max_pixels: int) -> InvalidArgument:
    described = "too large to decode" if size is None else f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels"
    return InvalidArgument(
        f"The uploaded {what} is {described}, more than this generator's limit of {max_pixels} pixels; "
        "resize it and upload it again."
    )


def _describe_unreadable(data: bytes) -> str:
    """Names a file's format when Pillow knows it but uploads do not accept it ("a GIF file")."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return f"a {image.format} file, which is not accepted"
    except Exception:
        # Only the name is wanted; a file no plugin reads gets the generic answer.
        return "not an image, or a corrupt one"


def _flatten(image: Image.Image, mask: bool) -> Image.Image:
    if image.mode == "I" or image.mode.startswith("I;16"):
        # Pillow's convert clips 16-bit values at 255 instead of scaling them.
        levels = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(levels.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        layer = image.convert("RGBA")
        background = Image.new("RGBA", layer.size, (0, 0, 0, 255) if mask else (255, 255, 255, 255))
        background.alpha_composite(layer)
        image = background
    return image.convert("L" if mask else "RGB")
