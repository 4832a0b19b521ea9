"""Whole images through a patch model: activation maps by convolution, then grid pooling.

A model trained on KxK windows (config.patch_size = K) encodes an image [H, W, C] at stride S
into a map a[r, c, j] = encode(the window whose top-left pixel is (r*S, c*S))_j for
r < H' = (H - K) // S + 1 and c < W' = (W - K) // S + 1 (UFLDL's "Convolution and Pooling";
Coates, Lee & Ng 2011). When S does not divide H - K, the last (H - K) % S rows are in no
window (likewise columns). Each normalization is done so that every position equals `encode`
of its window, not an approximation of it:

  unit (+ ZCA)   x = pixels / 255 and the whitening are linear:
                 (x - mu) Z W1 + b1 = x (Z W1) + (b1 - mu Z W1), one VALID conv2d whose kernel
                 is Z W1 reshaped to [K, K, C, s].
  ufldl_patches  per window: v = clip(x - m, -L, L) * 0.4 / L + 0.5, m = the window's mean over
                 its K*K*C values, L = 3 x the stored std. The mean is a box filter (avg_pool of
                 the channel mean), so where the clip does not bind
                     W1 . v = (0.4 / L) (conv(x, W1) - m sum(W1)) + 0.5 sum(W1),
                 convolutions only. The clip is element-wise per window, so it cannot be a
                 convolution: it binds exactly where max(window) - m > L or m - min(window) > L
                 (max pools), and only those windows are gathered and encoded as they are by
                 `encode`, then scattered into the map.
  batch_norm     "before": the layer (in inference mode, an affine map per unit) applies to the
                 map's pre-activations as it does to `encode`'s; "after" does not touch `encode`.

Cost: about H' W' K^2 C s multiply-adds per image, and the map holds H' W' s floats, so callers
bound a batch by its map size (pipeline/extract.py) and pool it before it leaves the batch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import tensorflow as tf

from trainer import losses

PoolOp = Literal["mean", "max", "sum"]
POOL_OPS = ("mean", "max", "sum")


def effective_encoder(model) -> tuple[tf.Tensor, tf.Tensor]:
    """(kernel [K, K, C, s], bias [s]) of the linear part of `encode` on x = pixels / 255,
    with the ZCA whitening (if any) folded in: x (Z W1) + (b1 - mu Z W1)."""
    w1, b1 = model.w1, model.b1
    if model.config.zca_epsilon > 0:
        w1 = tf.matmul(model.zca_matrix, w1)
        b1 = b1 - tf.linalg.matvec(w1, model.zca_mean, transpose_a=True)
    return tf.reshape(w1, [*model.config.input_shape, model.num_hidden]), b1


def _windows(images: tf.Tensor, corners: tf.Tensor, k: int, stride: int) -> tf.Tensor:
    """images [b, H, W, C], corners int64 [m, 3] of (image, r, c) map positions -> the
    windows [m, K, K, C] at those positions."""
    offsets = tf.range(k, dtype=tf.int64)
    rows = corners[:, 1:2] * stride + offsets  # [m, K]
    cols = corners[:, 2:3] * stride + offsets
    m = tf.shape(corners, out_type=tf.int64)[0]
    index = tf.stack(
        [
            tf.broadcast_to(corners[:, 0, None, None], [m, k, k]),
            tf.broadcast_to(rows[:, :, None], [m, k, k]),
            tf.broadcast_to(cols[:, None, :], [m, k, k]),
        ],
        axis=-1,
    )
    return tf.gather_nd(images, index)


def encode_map(model, images: tf.Tensor, stride: int) -> tf.Tensor:
    """uint8 images [b, H, W, C] with H, W >= K -> activation maps [b, H', W', s].

    stride: a Python int >= 1 (convolution strides are static). Every position equals
    model.encode of its window (see the module docstring for how).
    """
    cfg = model.config
    k = cfg.input_shape[0]
    dtype = model.compute_dtype
    kernel, bias = effective_encoder(model)
    kernel, bias = tf.cast(kernel, dtype), tf.cast(bias, dtype)
    x = losses.unit_normalize(images, dtype)
    conv = tf.nn.conv2d(x, kernel, strides=stride, padding="VALID")  # [b, H', W', s]
    pool = dict(ksize=k, strides=stride, padding="VALID")
    if cfg.normalization == "ufldl_patches":
        limit = 3.0 * tf.cast(tf.sqrt(model.pixel_sq_sum / model.pixel_count), dtype)
        channel_mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        mean = tf.nn.avg_pool2d(channel_mean, **pool)  # [b, H', W', 1], the window means
        w_sum = tf.reduce_sum(kernel, axis=[0, 1, 2])  # [s]
        scale = tf.math.divide_no_nan(tf.constant(0.4, dtype), limit)
        z = scale * (conv - mean * w_sum) + 0.5 * w_sum + bias
        top = tf.nn.max_pool2d(tf.reduce_max(x, axis=-1, keepdims=True), **pool)
        bottom = -tf.nn.max_pool2d(-tf.reduce_min(x, axis=-1, keepdims=True), **pool)
        clipped = tf.logical_or(top - mean > limit, mean - bottom > limit)[..., 0]
    else:
        z = conv + bias
    if cfg.batch_norm == "before":
        z = tf.reshape(model.batch_norm(tf.reshape(z, [-1, model.num_hidden])), tf.shape(z))
    maps = tf.sigmoid(z)
    if cfg.normalization == "ufldl_patches":
        corners = tf.where(clipped)  # [m, 3]: the windows the clip changes
        exact = model.encode(_windows(images, corners, k, stride))
        maps = tf.tensor_scatter_nd_update(maps, corners, tf.cast(exact, maps.dtype))
    return maps


def pool_grid(
    maps: tf.Tensor,
    grid: int,
    op: PoolOp,
    first_row: int | tf.Tensor = 0,
    map_rows: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """Activation maps [b, H', W', s] -> pooled features [b, G*G*s], G = grid <= H', W'.

    Map row r belongs to grid row floor(r G / H') (column c likewise), which splits the map
    into G x G regions of sizes that differ by at most one (Coates' quadrants for G = 2).
    Each region is reduced by `op` over its positions, per unit; the output is ordered
    (grid row, grid column, unit).

    A band of a taller map: `maps` holds rows first_row.. of a map of `map_rows` rows (H' when
    None), and the regions are those of the whole map; a region the band misses is 0 (sum,
    mean) or the lowest float32 (max). Only whole maps give region means: for bands, take
    "sum" and divide by region_sizes (pipeline/pooled.py).
    """
    shape = tf.shape(maps)
    b, h, w, s = shape[0], shape[1], shape[2], shape[3]
    rows = (tf.range(h) + first_row) * grid // (h if map_rows is None else map_rows)
    cols = tf.range(w) * grid // w
    region = tf.reshape(rows[:, None] * grid + cols[None, :], [-1])  # [H' W']
    per_position = tf.reshape(tf.transpose(maps, [1, 2, 0, 3]), [h * w, b, s])
    reduce = {
        "mean": tf.math.unsorted_segment_mean,
        "max": tf.math.unsorted_segment_max,
        "sum": tf.math.unsorted_segment_sum,
    }[op]
    pooled = reduce(per_position, region, grid * grid)  # [G*G, b, s]
    return tf.reshape(tf.transpose(pooled, [1, 0, 2]), [b, grid * grid * s])


def region_sizes(map_rows: int, map_cols: int, grid: int) -> np.ndarray:
    """Positions in each of pool_grid's G x G regions of a map_rows x map_cols map: [G*G]."""
    rows = np.bincount(np.arange(map_rows) * grid // map_rows, minlength=grid)
    cols = np.bincount(np.arange(map_cols) * grid // map_cols, minlength=grid)
    return np.outer(rows, cols).reshape(-1)
