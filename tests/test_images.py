"""Tests for preprocessing/images.py on tiny images generated in memory.

Every test turns warnings into errors: decoding must stay silent even on inputs that make
Pillow warn (a header just over the pixel limit), and conversions must not warn either.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from preprocessing import images

pytestmark = pytest.mark.filterwarnings("error")

H, W = 6, 8
RAMP = (np.arange(H * W, dtype=np.uint8) * 5).reshape(H, W)  # distinct values 0..235
RGB = np.stack([RAMP, RAMP // 2 + 60, np.full_like(RAMP, 100)], axis=-1)  # smooth chroma
ALPHA = np.resize(np.array([0, 64, 128, 255], np.uint8), (H, W))
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
INDEX = RAMP % 4
WORDS16 = np.linspace(0, 65535, H * W).astype(np.uint16).reshape(H, W)
WORDS16[0, :3] = [0, 32768, 65535]


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def over_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing, in floats: colour [H, W, C], alpha [H, W]."""
    return np.rint(colour * (alpha[..., None] / 255.0)).astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, in floats: [H, W, 3] -> [H, W, 1]."""
    return np.rint(rgb @ np.array([0.299, 0.587, 0.114]))[..., None]


# Each source returns (image to save, expected uint8 [H, W, C] after decoding).
def grey():
    return Image.fromarray(RAMP), RAMP[..., None]


def bilevel():
    bits = (RAMP % 2).astype(bool)
    return Image.fromarray(bits), np.where(bits, 255, 0).astype(np.uint8)[..., None]


def grey_alpha():
    img = Image.merge("LA", [Image.fromarray(RAMP), Image.fromarray(ALPHA)])
    return img, over_black(RAMP[..., None], ALPHA)


def rgb():
    return Image.fromarray(RGB), RGB


def rgba():
    return Image.fromarray(np.dstack([RGB, ALPHA])), over_black(RGB, ALPHA)


def palette():
    img = Image.frombytes("P", (W, H), INDEX.tobytes())
    img.putpalette(PALETTE.ravel().tolist())
    return img, PALETTE[INDEX]


def palette_transparent():
    img, expected = palette()
    img.info["transparency"] = 2  # blue is see-through
    return img, np.where((INDEX == 2)[..., None], 0, expected).astype(np.uint8)


def cmyk():
    planes = np.dstack([RAMP, RAMP // 2 + 60, np.full_like(RAMP, 100), np.zeros_like(RAMP)])
    return Image.frombytes("CMYK", (W, H), planes.tobytes()), 255 - planes[..., :3]


def words16():
    expected = np.rint(WORDS16 * (255 / 65535)).astype(np.uint8)[..., None]
    return Image.fromarray(WORDS16), expected


def int32():
    return Image.fromarray(WORDS16.astype(np.int32)), words16()[1]


def floats():
    values = RAMP.astype(np.float32) + 0.25
    return Image.fromarray(values), RAMP[..., None]


CASES = {  # id: (format, save options, source, lossy)
    "png-1": ("PNG", {}, bilevel, False),
    "png-L": ("PNG", {}, grey, False),
    "png-LA": ("PNG", {}, grey_alpha, False),
    "png-P": ("PNG", {}, palette, False),
    "png-P-transparent": ("PNG", {}, palette_transparent, False),
    "png-RGB": ("PNG", {}, rgb, False),
    "png-RGBA": ("PNG", {}, rgba, False),
    "png-16bit": ("PNG", {}, words16, False),
    "gif-P-transparent": ("GIF", {}, palette_transparent, False),
    "bmp-L": ("BMP", {}, grey, False),
    "bmp-P": ("BMP", {}, palette, False),
    "bmp-RGB": ("BMP", {}, rgb, False),
    "tiff-L": ("TIFF", {}, grey, False),
    "tiff-LA": ("TIFF", {}, grey_alpha, False),
    "tiff-RGB": ("TIFF", {}, rgb, False),
    "tiff-RGBA": ("TIFF", {}, rgba, False),
    "tiff-CMYK": ("TIFF", {}, cmyk, False),
    "tiff-16bit": ("TIFF", {}, words16, False),
    "tiff-I32": ("TIFF", {}, int32, False),
    "tiff-F": ("TIFF", {}, floats, False),
    "webp-lossless-RGB": ("WEBP", {"lossless": True}, rgb, False),
    "webp-lossless-RGBA": ("WEBP", {"lossless": True}, rgba, False),
    "webp-lossy-RGB": ("WEBP", {"quality": 95}, rgb, True),
    "jpeg-L": ("JPEG", {"quality": 95}, grey, True),
    "jpeg-RGB": ("JPEG", {"quality": 95}, rgb, True),
    "jpeg-CMYK": ("JPEG", {"quality": 95}, cmyk, True),
}


def assert_pixels(actual: np.ndarray, expected: np.ndarray, lossy: bool) -> None:
    assert actual.dtype == np.uint8
    assert actual.shape == expected.shape
    if lossy:
        error = np.abs(actual.astype(int) - expected.astype(int))
        assert error.mean() <= 6 and error.max() <= 32, (error.mean(), error.max())
    else:
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_and_mode_decodes_to_its_pixels(case):
    fmt, options, source, lossy = CASES[case]
    img, expected = source()
    decoded = images.decode(encode(img, fmt, **options))
    channels = expected.shape[2]

    assert decoded.size == (W, H)
    assert images.default_channels(decoded) == channels
    assert_pixels(images.to_array(decoded, channels), expected, lossy)
    # The other channel count: grey repeats, colour becomes luma.
    if channels == 1:
        assert_pixels(images.to_array(decoded, 3), np.repeat(expected, 3, axis=2), lossy)
    else:
        grey_out = images.to_array(decoded, 1).astype(int)
        assert grey_out.shape == (H, W, 1)
        assert np.abs(grey_out - luma(expected.astype(float))).max() <= (32 if lossy else 1)


def test_animated_gif_gives_its_first_frame():
    first, expected = palette()
    second = Image.fromarray(np.full((H, W, 3), 77, np.uint8)).convert("P")
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2

    decoded = images.decode(data)
    np.testing.assert_array_equal(images.to_array(decoded, 3), expected)


def test_16bit_values_are_scaled_not_clipped():
    words = np.array([[0, 257, 32768, 65535]], np.uint16)
    decoded = images.decode(encode(Image.fromarray(words), "PNG"))
    assert decoded.mode.startswith("I;16")
    np.testing.assert_array_equal(images.to_array(decoded, 1)[0, :, 0], [0, 1, 128, 255])


def test_grey_palette_counts_as_grey_even_with_unused_colours():
    img = Image.frombytes("P", (W, H), INDEX.tobytes())
    greys = [[0, 0, 0], [80, 80, 80], [160, 160, 160], [255, 255, 255], [255, 0, 0]]
    img.putpalette(sum(greys, []))  # index 4 (red) is never used
    assert images.default_channels(img) == 1
    img.putpixel((0, 0), 4)
    assert images.default_channels(img) == 3


def test_to_array_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="channels"):
        images.to_array(Image.fromarray(RGB), 4)


@pytest.mark.parametrize(
    "orientation, bright_corner",
    [(1, "top-left"), (6, "top-right"), (8, "bottom-left"), (3, "bottom-right")],
)
def test_exif_orientation_is_applied(orientation, bright_corner):
    stored = np.zeros((16, 32), np.uint8)  # landscape, marked in its top-left corner
    stored[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)

    shown = images.to_array(images.decode(data), 1)[..., 0]
    rotated = orientation in (6, 8)
    assert shown.shape == ((32, 16) if rotated else (16, 32))
    corners = {
        "top-left": shown[:8, :8],
        "top-right": shown[:8, -8:],
        "bottom-left": shown[-8:, :8],
        "bottom-right": shown[-8:, -8:],
    }
    assert max(corners, key=lambda name: corners[name].mean()) == bright_corner


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height; its data is tiny."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def truncated(fmt: str) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, max_pixels, says",
    [
        (b"", images.MAX_PIXELS, "empty"),
        (np.random.default_rng(0).bytes(256), images.MAX_PIXELS, "not an image"),
        (b"name,label\ncat.png,cat\n" * 4, images.MAX_PIXELS, "not an image"),
        (truncated("PNG"), images.MAX_PIXELS, "truncated"),
        (truncated("JPEG"), images.MAX_PIXELS, "truncated"),
        # Over our limit but under Pillow's error threshold, where Pillow only warns.
        (png_header_only(10_000, 10_000), images.MAX_PIXELS, "decompression bomb"),
        # Over Pillow's error threshold too.
        (png_header_only(100_000, 100_000), images.MAX_PIXELS, "decompression bomb"),
        (encode(Image.fromarray(RGB), "PNG"), H * W - 1, "decompression bomb"),
    ],
    ids=["empty", "random", "text", "png-cut", "jpeg-cut", "bomb", "huge-bomb", "max-pixels"],
)
def test_bad_inputs_raise_one_line_image_errors(data, max_pixels, says):
    with pytest.raises(images.ImageError) as caught:
        images.decode(data, max_pixels=max_pixels)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message and ";" in message  # what is wrong; what to do


def test_bomb_check_does_not_rely_on_pillows_global_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.decode(png_header_only(10_000, 10_000))
    assert images.decode(encode(Image.fromarray(RGB), "PNG"), max_pixels=H * W).size == (W, H)


def test_image_error_messages_are_flattened_to_one_line():
    assert str(images.ImageError("bad\nthing;\r\n  fix it")) == "bad thing; fix it"


# --- resize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("source_shape", [(6, 8), (40, 10), (3, 50)])
def test_resize_gives_target_shape(mode, channels, source_shape):
    image = np.random.default_rng(1).integers(0, 256, (*source_shape, channels), dtype=np.uint8)
    out = images.resize(image, 12, 16, mode)
    assert out.shape == (12, 16, channels) and out.dtype == np.uint8


def test_pad_centres_the_content_on_zero_borders():
    out = images.resize(np.full((10, 20, 3), 200, np.uint8), 20, 20, "pad")
    rows = np.flatnonzero(out.any(axis=(1, 2)))
    assert (rows[0], rows[-1]) == (5, 14)  # 10 content rows, 5 zero rows either side
    assert (out[rows[0] : rows[-1] + 1] == 200).all()
    assert (out[: rows[0]] == 0).all() and (out[rows[-1] + 1 :] == 0).all()


def test_crop_at_the_same_scale_is_the_centre_window():
    image = np.random.default_rng(5).integers(0, 256, (10, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.resize(image, 10, 10, "crop"), image[:, 10:20])
    np.testing.assert_array_equal(images.resize(image, 4, 30, "crop"), image[3:7])


def test_crop_equals_squash_when_the_aspect_ratio_already_matches():
    image = np.random.default_rng(2).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        images.resize(image, 20, 30, "crop"), images.resize(image, 20, 30, "squash")
    )


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_resize_to_the_same_size_is_identity(mode):
    image = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    assert images.resize(image, H, W, mode) is image


def test_resize_rejects_unknown_modes():
    with pytest.raises(ValueError, match="stretch"):
        images.resize(np.zeros((H, W, 3), np.uint8), 4, 4, "stretch")


# --- decode_resized: the job's decode + resize path ------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_exact_decode_resized_equals_decode_then_resize(case, mode):
    fmt, options, source, _ = CASES[case]
    data = encode(source()[0], fmt, **options)
    for channels in (1, 3):
        for height, width in ((H, W), (4, 5), (9, 3)):
            decoded = images.to_array(images.decode(data), channels)
            want = images.resize(decoded, height, width, mode)
            got = images.decode_resized(data, channels, height, width, mode, exact=True)
            np.testing.assert_array_equal(got, want)


def photo(height: int, width: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut, 512x512 RGB), resampled to height x width."""
    import skimage.data

    return np.asarray(
        Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.Resampling.LANCZOS)
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", images.RESIZE_MODES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("progressive", [False, True])
def test_dct_downscaled_jpeg_is_close_to_the_exact_decode(orientation, mode, channels, progressive):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(
        Image.fromarray(photo(600, 420)), "JPEG", quality=90, exif=exif, progressive=progressive
    )
    exact = images.decode_resized(data, channels, 40, 56, mode, exact=True)
    fast = images.decode_resized(data, channels, 40, 56, mode)
    assert fast.shape == exact.shape == (40, 56, channels)
    assert not np.array_equal(fast, exact)  # the decoder did scale down
    # A wrong crop box or a missed EXIF transpose moves the picture: far below 30 dB.
    assert psnr(fast, exact) >= 30


def test_cmyk_jpeg_is_downscaled_too():
    cmyk_photo = Image.fromarray(photo(480, 640)).convert("CMYK")
    data = encode(cmyk_photo, "JPEG", quality=90)
    exact = images.decode_resized(data, 3, 32, 32, "crop", exact=True)
    fast = images.decode_resized(data, 3, 32, 32, "crop")
    assert not np.array_equal(fast, exact) and psnr(fast, exact) >= 30


def test_a_jpeg_less_than_twice_the_target_is_decoded_at_full_size():
    # Never below the target: 1/2 scale would give 60x45 < 64x48, so nothing changes.
    data = encode(Image.fromarray(photo(90, 120)), "JPEG", quality=90)
    for mode in images.RESIZE_MODES:
        np.testing.assert_array_equal(
            images.decode_resized(data, 3, 48, 64, mode),
            images.decode_resized(data, 3, 48, 64, mode, exact=True),
        )


def test_decode_resized_rejects_bad_data_in_one_line():
    with pytest.raises(images.ImageError, match="truncated or corrupt"):
        images.decode_resized(encode(Image.fromarray(RGB), "JPEG")[:-60], 3, 4, 4, "crop")
    with pytest.raises(images.ImageError, match="pixel limit"):
        images.decode_resized(encode(Image.fromarray(RGB), "JPEG"), 3, 4, 4, "crop", max_pixels=10)


# --- patches --------------------------------------------------------------------------------


def test_patches_are_uniformly_placed_sub_windows():
    image = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16, 1)  # value -> position
    patches = images.sample_patches(image, 2000, 4, images.patch_rng("a.png", 0))
    assert patches.shape == (2000, 4, 4, 1) and patches.dtype == np.uint8

    corners = {divmod(int(value), 16) for value in patches[:, 0, 0, 0]}
    for top, left in corners:
        window = image[top : top + 4, left : left + 4]
        assert (patches[patches[:, 0, 0, 0] == image[top, left, 0]] == window).all()
    assert corners == {(r, c) for r in range(12 - 4 + 1) for c in range(16 - 4 + 1)}


def test_patches_depend_only_on_key_and_seed():
    image = np.random.default_rng(4).integers(0, 256, (20, 20, 3), dtype=np.uint8)

    def sample(key, seed):
        return images.sample_patches(image, 8, 5, images.patch_rng(key, seed))

    np.testing.assert_array_equal(sample("a.png", 0), sample("a.png", 0))
    assert not np.array_equal(sample("a.png", 0), sample("b.png", 0))
    assert not np.array_equal(sample("a.png", 0), sample("a.png", 1))


def test_patch_rng_does_not_depend_on_python_hash_seed():
    code = "from preprocessing import images; print(images.patch_rng('a.png', 7).integers(1 << 62))"
    here = images.patch_rng("a.png", 7).integers(1 << 62)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": root}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert int(result.stdout) == here


def test_undersized_image_for_patches_raises_one_line_image_error():
    with pytest.raises(images.ImageError, match="image is 8x6, smaller than the 7x7") as caught:
        images.sample_patches(np.zeros((H, W, 1), np.uint8), 3, 7, images.patch_rng("a", 0))
    assert "\n" not in str(caught.value)
