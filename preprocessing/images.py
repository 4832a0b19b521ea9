"""Pure image operations: bytes -> Pillow image -> uint8 array -> resized image or patches.

No TensorFlow and no Beam here, so every step is testable on in-memory bytes. The contract
with `records.py`: `to_array`, `resize` and `sample_patches` return uint8 [H, W, C] (or
[N, size, size, C]) with C in {1, 3}.

Rejected inputs raise `ImageError`, whose one-line message goes into the error report; any
other exception is a bug and should crash loudly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Pillow's own default, restated so our limit does not move if someone edits the global.
MAX_PIXELS: int = 89_478_485

RESIZE_MODES = ("squash", "crop", "pad")

_GREY_MODES = {"1", "L", "LA", "La", "I", "F"}  # plus every "I;16*" variant

# What Pillow raises on truncated or corrupt data (UnidentifiedImageError is an OSError, but
# it is caught first for a clearer message).
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class ImageError(ValueError):
    """A rejected input; str(err) is one line saying what is wrong and what to do."""

    def __init__(self, message: str):
        # The message lands in a one-line-per-file error report, so Pillow text that we embed
        # must not break it.
        super().__init__(" ".join(message.split()))


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decodes an encoded image (JPEG, PNG, GIF first frame, BMP, TIFF, WebP, ...).

    Returns a fully loaded image (so truncation is detected here, not later) with its EXIF
    orientation applied, in Pillow's mode for the file ('L', 'RGB', 'P', 'I;16', ...).
    Raises ImageError for empty, non-image, truncated or corrupt data, and for images with
    more than `max_pixels` pixels, checked from the header before any pixel is decoded.
    """
    with _decoding():
        img = _open(data, max_pixels)
        return _load(img)


def decode_resized(
    data: bytes,
    channels: int,
    height: int,
    width: int,
    mode: str,
    max_pixels: int = MAX_PIXELS,
    exact: bool = False,
) -> np.ndarray:
    """Encoded image -> uint8 [height, width, channels]: `resize(to_array(decode(data)))`.

    A JPEG much larger than the target is decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain (Pillow's `draft`), never below what the resize needs, then resampled the same
    way (tests/test_images.py holds it to >= 30 dB PSNR against the exact decode).
    `exact=True`, or any other format, decodes at full size: then the result equals
    `resize(to_array(decode(data), channels), height, width, mode)` bit for bit. The work
    stays in Pillow (no array copies of the full-size image), which is most of the speed.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    with _decoding():
        img = _open(data, max_pixels)
        if exact or img.format != "JPEG":
            return _pixels(_resize_pil(_convert(_load(img), channels), height, width, mode))
        # Resized in the file's orientation, then turned: the draft's partial last block
        # stays at the right and bottom edges, where the resize box expects it.
        turn = _EXIF_TRANSPOSE.get(img.getexif().get(ExifTags.Base.Orientation, 1))
        stored = (width, height) if turn in _TRANSPOSING else (height, width)
        extent = _draft(img, channels, *stored, mode)
        img.load()
    return _pixels(_resize_pil(_convert(img, channels), height, width, mode, extent, turn))


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes); remove it or re-download it")
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the "
            f"{max_pixels}-pixel limit (possible decompression bomb); downscale it"
        )
    return img


def _load(img: Image.Image) -> Image.Image:
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when upright
    return img


def _draft(
    img: Image.Image, channels: int, height: int, width: int, mode: str
) -> tuple[float, float] | None:
    """Asks the JPEG decoder for the smallest DCT scale (1, 1/2, 1/4 or 1/8) whose output
    still covers what the resize samples, so no detail the target can show is lost.

    Returns the picture's extent (width, height) in decoded pixels, as floats: at 1/s
    scale the last column and row of pixels can be partly outside the picture, so the
    resize box must use this, not the pixel size.
    """
    w, h = img.size
    # squash and crop: the (centre-cropped) picture must cover the whole target.
    need = _fit(w, h, height, width) if mode == "pad" else (width, height)
    # Grey output decodes only the luma plane: the ITU-R 601 weights of convert('L').
    res = img.draft("L" if channels == 1 else "RGB", need)
    return None if res is None else (res[1][2], res[1][3])


# How each EXIF orientation is undone (as ImageOps.exif_transpose does); 5-8 swap the sides.
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TRANSPOSING = {_EXIF_TRANSPOSE[k] for k in (5, 6, 7, 8)}


@contextlib.contextmanager
def _decoding():
    """Maps what Pillow raises on bad data to one-line ImageErrors."""
    try:
        # Pillow reports oversized images and odd EXIF through the warnings machinery; our
        # size check is the one that decides, and rejects are reported by the pipeline.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(
            "not an image (Pillow cannot identify the format); remove it or convert it to PNG/JPEG"
        ) from None
    except Image.DecompressionBombError as err:
        # Pillow's global limit (2x Image.MAX_IMAGE_PIXELS) fired before our header check.
        raise ImageError(f"{err}; downscale it") from None
    except _CORRUPT as err:
        raise ImageError(
            f"truncated or corrupt image ({type(err).__name__}: {err}); re-download or re-export it"
        ) from None


def default_channels(img: Image.Image) -> int:
    """1 for grey images (grey modes, or a palette whose used colours are all grey), else 3."""
    if img.mode in _GREY_MODES or img.mode.startswith("I;16"):
        return 1
    if img.mode == "P":
        # Only the colours in use count: GIF/PNG palettes often carry unused colour entries.
        palette = np.zeros((256, 3), np.uint8)
        entries = np.asarray(img.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
        palette[: len(entries)] = entries
        used = palette[np.unique(np.asarray(img))]
        return 1 if (used == used[:, :1]).all() else 3
    return 3


def to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Converts a decoded image to uint8 [H, W, channels], channels in {1, 3}.

    - 16-bit data ('I;16*', and 'I', which Pillow uses for 16-bit files) is scaled by 255/65535
      with rounding, so the full range survives (Pillow's convert('L') clips at 255 instead).
    - 'F' is read on the 0..255 scale, as Pillow's 'L' -> 'F' conversion produces.
    - Alpha (LA, RGBA, P or L/RGB with a transparency key) is composited over black: the
      result is deterministic whatever the viewer's background, and transparent regions
      look like the zero padding of `resize(..., 'pad')`.
    - Grey -> 3 channels repeats the grey; colour -> 1 channel is ITU-R 601-2 luma (Pillow 'L').
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        pixels = ((wide + 128) // 257).astype(np.uint8)[..., None]
    elif img.mode == "F":
        floats = np.nan_to_num(np.asarray(img, np.float32))
        pixels = np.clip(floats, 0, 255).round().astype(np.uint8)[..., None]
    else:
        grey = img.mode in _GREY_MODES
        alpha = img.has_transparency_data
        target = ("LA" if alpha else "L") if grey else ("RGBA" if alpha else "RGB")
        pixels = np.asarray(img.convert(target))
        if grey and not alpha:
            pixels = pixels[..., None]
        if alpha:
            colour, a = pixels[..., :-1].astype(np.uint16), pixels[..., -1:].astype(np.uint16)
            pixels = ((colour * a + 127) // 255).astype(np.uint8)
    if pixels.shape[2] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    return np.asarray(Image.fromarray(pixels).convert("L"))[..., None]


def resize(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resizes uint8 [H, W, C] (C in {1, 3}) to uint8 [height, width, C].

    mode: 'squash' stretches to the target, ignoring aspect ratio; 'crop' resamples the
    largest centred region with the target's aspect ratio (scale to cover, centre crop);
    'pad' scales to fit inside and centres the result on zeros. Resampling is Pillow's
    BILINEAR, which widens its kernel when downscaling, so it is antialiased. An image that
    is already the target size is returned as is.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
    if image.shape[:2] == (height, width):
        return image
    return _pixels(_resize_pil(Image.fromarray(_squeeze(image)), height, width, mode))


def _pixels(img: Image.Image) -> np.ndarray:
    """A Pillow image in mode 'L' or 'RGB' -> uint8 [H, W, 1 or 3]."""
    return np.asarray(img).reshape(img.height, img.width, 1 if img.mode == "L" else 3)


def _squeeze(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., 0] if pixels.shape[2] == 1 else pixels


def _convert(img: Image.Image, channels: int) -> Image.Image:
    """`to_array(img, channels)` as a Pillow image ('L' or 'RGB'), without the array copy
    for the modes photos come in; the other modes go through `to_array`'s rules."""
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img
    if img.mode in ("L", "RGB", "CMYK", "YCbCr") and not img.has_transparency_data:
        return img.convert(target)
    return Image.fromarray(_squeeze(to_array(img, channels)))


def _resize_pil(
    img: Image.Image,
    height: int,
    width: int,
    mode: str,
    extent: tuple[float, float] | None = None,
    turn: Image.Transpose | None = None,
) -> Image.Image:
    """`resize` on a Pillow image in mode 'L' or 'RGB', returning one.

    `extent`: the picture's size in its pixels when it is not the pixel size (a
    DCT-downscaled JPEG, see `_draft`). `turn`: a transpose undoing the EXIF orientation,
    applied after resampling and before padding; the picture is resampled in its file's
    orientation (where a draft's partial last pixels sit at the right and bottom edges)
    and placed as displayed, so 'pad' centres it exactly as for an upright file.
    """
    w, h = extent or img.size
    if extent is None and turn is None and (h, w) == (height, width):
        return img
    tw, th = (height, width) if turn in _TRANSPOSING else (width, height)  # as stored
    bilinear = Image.Resampling.BILINEAR
    if mode == "squash":
        out = img.resize((tw, th), bilinear, box=(0, 0, w, h))
    elif mode == "crop":
        # Crop box in source pixels (sub-pixel), resampled in one step; exact comparison
        # so an image that already has the target aspect ratio gives exactly 'squash'.
        box_w = h * tw / th if w * th > h * tw else w
        box_h = w * th / tw if w * th < h * tw else h
        left, top = (w - box_w) / 2, (h - box_h) / 2
        out = img.resize((tw, th), bilinear, box=(left, top, left + box_w, top + box_h))
    else:
        fitted = img.resize(_fit(w, h, th, tw), bilinear, box=(0, 0, w, h))
        fitted = fitted if turn is None else fitted.transpose(turn)
        out = Image.new(img.mode, (width, height))  # zeros
        out.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
        return out
    return out if turn is None else out.transpose(turn)


def _fit(w: float, h: float, height: int, width: int) -> tuple[int, int]:
    """(width, height) of a w x h picture scaled to fit inside height x width ('pad')."""
    scale = min(height / h, width / w)
    return min(width, max(1, round(w * scale))), min(height, max(1, round(h * scale)))


def sample_patches(
    image: np.ndarray, count: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """UFLDL's sampleIMAGES: `count` size x size windows at uniform random positions.

    image uint8 [H, W, C] -> uint8 [count, size, size, C], raw pixels (normalisation is the
    trainer's job). Raises ImageError if the image is smaller than a patch.
    """
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ImageError(
            f"image is {w}x{h}, smaller than the {size}x{size} patch size; "
            "use a smaller patch size or remove the image"
        )
    tops = rng.integers(0, h - size + 1, count)
    lefts = rng.integers(0, w - size + 1, count)
    offsets = np.arange(size)
    rows = tops[:, None, None] + offsets[None, :, None]  # [count, size, 1]
    cols = lefts[:, None, None] + offsets[None, None, :]  # [count, 1, size]
    return image[rows, cols]


def patch_rng(key: str, seed: int) -> np.random.Generator:
    """A generator seeded from sha256(seed, key), not from Python's per-process hash().

    So the patches of an image depend only on its key and the seed, not on processing
    order, worker or run (for a given NumPy version, whose Generator methods may change).
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))
