"""Pictures of a trained model, as uint8 arrays (PNG files and TensorBoard images).

`filter_grid` follows UFLDL's display_network: each hidden unit's incoming weights
W1[:, j] reshaped to the image shape, each tile scaled by its own max |value|,
tiles in a near-square grid with a 1-pixel border, grey centred on 0.
"""

from __future__ import annotations

import io
import math

import numpy as np


def _grid(tiles: np.ndarray, border_value: float) -> np.ndarray:
    """tiles [k, h, w, c] in [0, 1] -> one image [rows*(h+1)+1, cols*(w+1)+1, c]."""
    k, h, w, c = tiles.shape
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), border_value, np.float64)
    for i in range(k):
        r, q = divmod(i, cols)
        out[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = tiles[i]
    return out


def filter_grid(w1: np.ndarray, image_shape: tuple[int, int, int], scale: int = 4) -> np.ndarray:
    """w1 [n, s] -> uint8 [H', W', 1 or 3]: one tile per hidden unit (display_network)."""
    h, w, c = image_shape
    tiles = np.asarray(w1, np.float64).T.reshape(-1, h, w, c)
    peak = np.abs(tiles).max(axis=(1, 2, 3), keepdims=True)
    tiles = 0.5 + 0.5 * tiles / np.where(peak > 0, peak, 1.0)  # grey = 0, per-tile contrast
    grid = _grid(tiles, border_value=0.0)
    return _to_uint8(np.kron(grid, np.ones((scale, scale, 1))))


def reconstruction_grid(x: np.ndarray, x_hat: np.ndarray, scale: int = 4) -> np.ndarray:
    """x, x_hat [k, H, W, C] (model input space) -> uint8 pairs: input left, reconstruction right.

    Both are min-max scaled together per example, so differences in contrast are visible.
    """
    lo = np.minimum(x.min(axis=(1, 2, 3)), x_hat.min(axis=(1, 2, 3)))[:, None, None, None]
    hi = np.maximum(x.max(axis=(1, 2, 3)), x_hat.max(axis=(1, 2, 3)))[:, None, None, None]
    span = np.where(hi > lo, hi - lo, 1.0)
    pairs = np.concatenate([(x - lo) / span, (x_hat - lo) / span], axis=2)  # side by side
    return _to_uint8(np.kron(_grid(pairs, border_value=1.0), np.ones((scale, scale, 1))))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()
