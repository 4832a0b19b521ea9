"""Pictures of a trained model, as uint8 arrays (PNG files and TensorBoard images).

`filter_grid` follows UFLDL's display_network: each hidden unit's incoming weights
W1[:, j] reshaped to the image shape, each tile scaled by its own max |value|,
tiles in a near-square grid with a 1-pixel border, grey centred on 0.
"""

from __future__ import annotations

import io
import math

import numpy as np


def _grid(tiles: np.ndarray, border: int) -> np.ndarray:
    """uint8 tiles [k, h, w, c] -> one uint8 image [rows*(h+1)+1, cols*(w+1)+1, c]."""
    k, h, w, c = tiles.shape
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    # Each tile with a border below and to its right, laid out by one reshape (no Python
    # loop, and in uint8: TensorBoard redraws this at every evaluation); then the top and
    # left border.
    cells = np.full((rows * cols, h + 1, w + 1, c), border, np.uint8)
    cells[:k, :h, :w] = tiles
    grid = cells.reshape(rows, cols, h + 1, w + 1, c).transpose(0, 2, 1, 3, 4)
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), border, np.uint8)
    out[1:, 1:] = grid.reshape(rows * (h + 1), cols * (w + 1), c)
    return out


def enlarge(img: np.ndarray, scale: int) -> np.ndarray:
    """[H, W, C] -> [scale*H, scale*W, C], each pixel a scale x scale block."""
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def filter_grid(w1: np.ndarray, image_shape: tuple[int, int, int], scale: int = 4) -> np.ndarray:
    """w1 [n, s] -> uint8 [H', W', 1 or 3]: one tile per hidden unit (display_network)."""
    h, w, c = image_shape
    tiles = np.asarray(w1, np.float64).T.reshape(-1, h, w, c)
    peak = np.abs(tiles).max(axis=(1, 2, 3), keepdims=True)
    tiles = 0.5 + 0.5 * tiles / np.where(peak > 0, peak, 1.0)  # grey = 0, per-tile contrast
    return enlarge(_grid(_to_uint8(tiles), border=0), scale)


def reconstruction_grid(x: np.ndarray, x_hat: np.ndarray, scale: int = 4) -> np.ndarray:
    """x, x_hat [k, H, W, C] (model input space) -> uint8 pairs: input left, reconstruction right.

    Both are min-max scaled together per example, so differences in contrast are visible.
    """
    lo = np.minimum(x.min(axis=(1, 2, 3)), x_hat.min(axis=(1, 2, 3)))[:, None, None, None]
    hi = np.maximum(x.max(axis=(1, 2, 3)), x_hat.max(axis=(1, 2, 3)))[:, None, None, None]
    span = np.where(hi > lo, hi - lo, 1.0)
    pairs = np.concatenate([(x - lo) / span, (x_hat - lo) / span], axis=2)  # side by side
    return enlarge(_grid(_to_uint8(pairs), border=255), scale)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()
