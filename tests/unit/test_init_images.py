import hashlib
import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from zimage_split.common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from zimage_split.dit_service.init_images import ImageStore, decode_upload, image_bytes

MAX_PIXELS = 1024 * 1024


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def gradient(width: int = 32, height: int = 24) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode_to_rgb(format: str) -> None:
    image = decode_upload(encoded(gradient(), format, quality=95), mask=False, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (32, 24)
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(gradient(), dtype=int))
    assert difference.mean() < 4
    assert image.info == {} and not hasattr(image, "fp")


def test_png_decodes_exactly() -> None:
    image = decode_upload(encoded(gradient(), "PNG"), mask=False, max_pixels=MAX_PIXELS)
    assert np.array_equal(np.asarray(image), np.asarray(gradient()))


@pytest.mark.parametrize("format", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(format: str) -> None:
    with pytest.raises(InvalidArgument, match=f"a {format} file, which is not accepted.*PNG, JPEG or WebP"):
        decode_upload(encoded(gradient(), format), mask=False, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40], ids=["empty", "text", "bad-png"]
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="PNG, JPEG or WebP"):
        decode_upload(data, mask=False, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(format: str) -> None:
    data = encoded(gradient(64, 64), format)
    with pytest.raises(InvalidArgument, match="truncated or corrupt|corrupt|not an image"):
        decode_upload(data[: len(data) // 2], mask=False, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_damaged_files_never_crash(format: str) -> None:
    """Every truncation point and random byte flips give an image or InvalidArgument, nothing else."""
    data = encoded(gradient(16, 16), format)
    rng = random.Random(0)
    damaged = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 60))]
    for _ in range(150):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        damaged.append(bytes(flipped))
    for sample in damaged:
        try:
            image = decode_upload(sample, mask=False, max_pixels=MAX_PIXELS)
        except InvalidArgument:
            continue
        assert image.mode == "RGB"


def test_too_many_pixels_are_refused_from_the_header() -> None:
    # A valid PNG signature and header claiming 100000 x 100000 pixels, with no pixel data at all: it must
    # be refused from the header alone (decoding would fail on the missing data instead).
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")
    with pytest.raises(InvalidArgument, match="limit of 1048576 pixels"):
        decode_upload(bomb, mask=False, max_pixels=MAX_PIXELS)
    small = struct.pack(">IIBBBBB", 2000, 1000, 8, 2, 0, 0, 0)
    with pytest.raises(InvalidArgument, match="2000x1000 = 2000000 pixels"):
        decode_upload(
            b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", small) + png_chunk(b"IEND", b""),
            mask=False,
            max_pixels=MAX_PIXELS,
        )


def test_the_limit_is_inclusive() -> None:
    data = encoded(gradient(32, 24), "PNG")
    assert decode_upload(data, mask=False, max_pixels=32 * 24).size == (32, 24)
    with pytest.raises(InvalidArgument, match="32x24"):
        decode_upload(data, mask=False, max_pixels=32 * 24 - 1)


def test_exif_orientation_is_applied() -> None:
    image = gradient(32, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    decoded = decode_upload(encoded(image, "PNG", exif=exif), mask=False, max_pixels=MAX_PIXELS)
    assert decoded.size == (24, 32)
    assert np.array_equal(np.asarray(decoded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))
    jpeg = decode_upload(encoded(image, "JPEG", exif=exif), mask=False, max_pixels=MAX_PIXELS)
    assert jpeg.size == (24, 32)


def test_animated_images_are_refused() -> None:
    frames = [gradient(), gradient().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    for format in ("PNG", "WEBP"):
        data = encoded(frames[0], format, save_all=True, append_images=frames[1:])
        with pytest.raises(InvalidArgument, match="animated.*still image"):
            decode_upload(data, mask=False, max_pixels=MAX_PIXELS)


def test_jpeg_with_extra_pictures_gives_the_first() -> None:
    first = Image.new("RGB", (16, 16), (250, 0, 0))
    data = encoded(first, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8), (0, 0, 250))])
    image = decode_upload(data, mask=False, max_pixels=MAX_PIXELS)
    assert image.size == (16, 16) and image.getpixel((8, 8))[0] > 200


def test_transparency_is_composited_on_white_for_images_and_black_for_masks() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 255, 255, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    data = encoded(rgba, "PNG")
    image = decode_upload(data, mask=False, max_pixels=MAX_PIXELS)
    assert image.getpixel((1, 0)) == (255, 0, 0) and image.getpixel((3, 3)) == (255, 255, 255)
    mask = decode_upload(data, mask=True, max_pixels=MAX_PIXELS)
    assert mask.mode == "L"
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((3, 3)) == 0


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "LA"])
def test_masks_are_greyscale(mode: str) -> None:
    source = Image.new("L", (8, 8), 0)
    source.paste(255, (0, 0, 4, 8))
    mask = decode_upload(encoded(source.convert(mode), "PNG"), mask=True, max_pixels=MAX_PIXELS)
    assert mask.mode == "L"
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((7, 0)) == 0


def test_sixteen_bit_greyscale_is_scaled() -> None:
    levels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    data = encoded(Image.fromarray(levels), "PNG")
    mask = decode_upload(data, mask=True, max_pixels=MAX_PIXELS)
    assert list(mask.getdata()) == [0, 128, 255]
    assert decode_upload(data, mask=False, max_pixels=MAX_PIXELS).getpixel((1, 0)) == (128, 128, 128)


def test_store_keys_by_content_and_kind() -> None:
    store = ImageStore()
    data = encoded(gradient(), "PNG")
    key, image = store.add(data, mask=False, max_pixels=MAX_PIXELS)
    assert key == "img-" + hashlib.sha256(data).hexdigest()
    assert store.add(data, mask=False, max_pixels=MAX_PIXELS)[0] == key
    mask_key, _ = store.add(
        data, mask=True, max_pixels=MAX_PIXELS, sha256=hashlib.sha256(data).hexdigest().upper()
    )
    assert mask_key == "mask-" + hashlib.sha256(data).hexdigest()
    assert store.get(key, mask=False) is not None and store.get(mask_key, mask=True).mode == "L"
    assert len(store) == 2 and store.bytes == 32 * 24 * 3 + 32 * 24
    assert np.array_equal(np.asarray(store.get(key, mask=False)), np.asarray(image))
    with pytest.raises(InvalidArgument, match="mask_key"):
        store.get(mask_key, mask=False)
    with pytest.raises(InvalidArgument, match="image_key"):
        store.get(key, mask=True)
    with pytest.raises(InvalidArgument, match="not a key UploadImage returned"):
        store.get("deadbeef", mask=False)


def test_store_evicts_by_bytes() -> None:
    one_image = 32 * 24 * 3
    store = ImageStore(max_bytes=2 * one_image)
    keys = []
    for shade in range(3):
        data = encoded(Image.new("RGB", (32, 24), (shade, 0, 0)), "PNG")
        keys.append(store.add(data, mask=False, max_pixels=MAX_PIXELS)[0])
        if shade == 1:
            store.get(keys[0], mask=False)  # keys[0] is now more recent than keys[1]
    assert store.bytes == 2 * one_image == image_bytes(store.get(keys[2], mask=False)) * 2
    store.get(keys[0], mask=False)
    with pytest.raises(NotFound, match="upload it again with UploadImage"):
        store.get(keys[1], mask=False)
    assert (store.hits, store.misses) == (3, 1)


def test_store_refuses_a_bad_checksum_and_oversized_images() -> None:
    store = ImageStore(max_bytes=100)
    data = encoded(gradient(), "PNG")
    with pytest.raises(DataLoss, match="Upload the file again"):
        store.add(data, mask=False, max_pixels=MAX_PIXELS, sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(InvalidArgument, match="64 hex digits"):
        store.add(data, mask=False, max_pixels=MAX_PIXELS, sha256="xyz")
    with pytest.raises(ResourceExhausted, match="smaller image"):
        store.add(data, mask=False, max_pixels=MAX_PIXELS)
    assert len(store) == 0
