"""Convolutional encoding (trainer/conv.py): every map position equals `encode` of its window,
for every normalization, stride and image size; grid pooling against a plain NumPy loop; the
ZCA whitening; the SavedModel's `encode_map` signature."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.pooled import map_size
from trainer import artifacts, conv, export
from trainer.config import apply_overrides, preset
from trainer.model import SparseAutoencoder

K = 4


def _model(*sets: str, seed: int = 0) -> SparseAutoencoder:
    cfg = apply_overrides(
        preset("tiny"), [f"input_shape={K}x{K}x2", f"patch_size={K}", "hidden=6", *sets]
    )
    model = SparseAutoencoder(cfg)
    rng = np.random.default_rng(seed)
    model.b1.assign(rng.normal(0, 0.5, 6).astype(np.float32))
    if cfg.normalization == "ufldl_patches":  # a stored whole-set std of 0.1 (pixels / 255)
        model.pixel_count.assign(1000.0)
        model.pixel_sq_sum.assign(1000.0 * 0.1**2)
    if cfg.batch_norm == "before":
        bn = model.batch_norm
        bn.moving_mean.assign(rng.normal(0, 0.3, 6).astype(np.float32))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, 6).astype(np.float32))
        bn.gamma.assign(rng.uniform(0.5, 2.0, 6).astype(np.float32))
    return model


def _images(n: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    """Half smooth low-contrast images (the UFLDL clip rarely binds), half noise (it often does)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    smooth = 120 + 10 * np.sin(yy[None, ..., None] / 3.0 + rng.uniform(0, 6, (n, 1, 1, 2)))
    smooth = smooth + 3 * np.cos(xx[None, ..., None] / 2.0)
    noise = rng.integers(0, 256, (n, h, w, 2))
    out = np.where(np.arange(n)[:, None, None, None] % 2 == 0, smooth, noise)
    return np.rint(out).astype(np.uint8)


def _naive_maps(encode, images: np.ndarray, stride: int) -> np.ndarray:
    """Every window cut out with NumPy and passed to `encode`: [b, H', W', s]."""
    b, h, w, _ = images.shape
    hp, wp = map_size(h, w, K, stride)
    windows = np.stack(
        [
            images[:, r * stride : r * stride + K, c * stride : c * stride + K]
            for r in range(hp)
            for c in range(wp)
        ],
        axis=1,
    )  # [b, H' W', K, K, C]
    acts = np.asarray(encode(windows.reshape(-1, K, K, images.shape[3])))
    return acts.reshape(b, hp, wp, -1)


def _rel_error(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize(
    "sets",
    [
        [],
        ["normalization=ufldl_patches"],
        ["zca_epsilon=0.01", "decoder=linear"],
        ["batch_norm=before"],
        ["normalization=ufldl_patches", "batch_norm=before"],
    ],
)
@pytest.mark.parametrize(("stride", "h", "w"), [(1, 9, 12), (2, 11, 8), (3, 10, 13), (4, 4, 4)])
def test_every_position_equals_encode_of_its_window(sets, stride, h, w):
    model = _model(*sets)
    images = _images(4, h, w)
    if model.config.zca_epsilon:
        model.fit_zca(_images(200, K, K, seed=5))
    got = conv.encode_map(model, tf.constant(images), stride).numpy()
    want = _naive_maps(lambda x: model.encode(tf.constant(x)).numpy(), images, stride)
    assert got.shape == want.shape == (4, *map_size(h, w, K, stride), 6)
    assert _rel_error(got, want) <= 1e-5
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ufldl_clip_is_exercised_on_both_sides():
    """The test above covers windows where the clip binds and where it does not."""
    images = _images(4, 9, 12).astype(np.float64) / 255.0
    limit = 3 * 0.1
    windows = np.lib.stride_tricks.sliding_window_view(images, (K, K), axis=(1, 2))
    dev = windows - windows.mean(axis=(3, 4, 5), keepdims=True)
    binds = (np.abs(dev) > limit).any(axis=(3, 4, 5))
    assert 0.2 < binds.mean() < 0.8


def test_a_whole_image_model_maps_to_its_encode():
    model = _model()
    images = _images(3, K, K)
    got = conv.encode_map(model, tf.constant(images), 1).numpy()
    np.testing.assert_allclose(got[:, 0, 0], model.encode(images).numpy(), rtol=1e-5)


def _numpy_pool(maps: np.ndarray, grid: int, op: str) -> np.ndarray:
    b, h, w, s = maps.shape
    out = np.zeros((b, grid, grid, s))
    reduce = {"mean": np.mean, "max": np.max, "sum": np.sum}[op]
    for gi in range(grid):
        for gj in range(grid):
            rows = [r for r in range(h) if r * grid // h == gi]
            cols = [c for c in range(w) if c * grid // w == gj]
            out[:, gi, gj] = reduce(maps[:, rows][:, :, cols], axis=(1, 2))
    return out.reshape(b, -1)


@pytest.mark.parametrize("op", conv.POOL_OPS)
@pytest.mark.parametrize(("grid", "h", "w"), [(1, 5, 7), (2, 21, 21), (3, 7, 5), (2, 2, 3)])
def test_grid_pooling_matches_a_loop(op, grid, h, w):
    maps = np.random.default_rng(2).random((3, h, w, 4)).astype(np.float32)
    got = conv.pool_grid(tf.constant(maps), grid, op).numpy()
    np.testing.assert_allclose(got, _numpy_pool(maps, grid, op), rtol=1e-5)
    if op == "mean" and grid == 1:
        np.testing.assert_allclose(got, maps.mean(axis=(1, 2)), rtol=1e-5)


def test_regions_tile_the_map_evenly():
    for size in range(2, 30):
        for grid in range(1, min(size, 5) + 1):
            counts = np.bincount(np.arange(size) * grid // size, minlength=grid)
            assert counts.sum() == size and counts.max() - counts.min() <= 1


def test_zca_whitens_its_samples():
    model = _model("zca_epsilon=1e-6", "decoder=linear")
    images = _images(400, K, K, seed=7)
    model.fit_zca(images)
    x = tf.reshape(model.normalize(tf.constant(images)), [400, -1]).numpy().astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)
    cov = np.cov(x, rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=2e-3)
    z = model.zca_matrix.numpy()
    np.testing.assert_allclose(z, z.T, atol=1e-5)  # ZCA: the symmetric whitening


@pytest.mark.parametrize("sets", [["normalization=ufldl_patches"], ["zca_epsilon=0.1"]])
def test_saved_model_signature_equals_encode_and_checks_its_inputs(tmp_path, sets):
    model = _model(*sets)
    if model.config.zca_epsilon:
        model.fit_zca(_images(100, K, K, seed=3))
    info = artifacts.ExportInfo(model.config, model.config.input_shape, (), "", 0)
    export.save(model, str(tmp_path / "export"), info)
    sig = tf.saved_model.load(str(tmp_path / "export")).signatures
    images = _images(2, 10, 7)
    for stride in (1, 3):
        got = sig["encode_map"](images=tf.constant(images), stride=tf.constant(stride))["maps"]
        want = _naive_maps(
            lambda x: sig["encode"](images=tf.constant(x))["activations"].numpy(), images, stride
        )
        assert _rel_error(got.numpy(), want) <= 1e-5
    for bad, message in ((images[:, :3], "at least 4x4"), (images, "stride 1..4")):
        stride = 9 if bad is images else 1
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            sig["encode_map"](images=tf.constant(bad), stride=tf.constant(stride))
