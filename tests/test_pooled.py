"""`sae extract --pool` end to end on the real Beam runner: every key exactly once, each
pooled vector equal to a NumPy reference (windows cut out, `encode`, pooled over the grid),
the manifest's pooling record, and one-line errors for sizes that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline import extract, features, pooled
from preprocessing import manifest, records
from tests.helpers import FAST, LABELLED_H, LABELLED_W
from tests.helpers import sae as _cli
from tests.test_conv import K, _naive_maps, _numpy_pool
from trainer import export
from trainer.config import apply_overrides, preset
from trainer.conv import POOL_OPS
from trainer.model import SparseAutoencoder

H, W = LABELLED_H, LABELLED_W
HIDDEN = 5


@pytest.fixture(scope="module")
def images(labelled) -> str:
    return labelled


def _patch_model(path, k: int) -> str:
    """An untrained KxK patch model with random weights, exported to `path`."""
    cfg = apply_overrides(
        preset("tiny"), [f"input_shape={k},{k},1", f"patch_size={k}", f"hidden={HIDDEN}"]
    )
    model = SparseAutoencoder(cfg)
    rng = np.random.default_rng(1)
    model.w1.assign(rng.normal(0, 1.0, model.w1.shape).astype(np.float32))
    model.b1.assign(rng.normal(0, 1.0, HIDDEN).astype(np.float32))
    export.save(model, str(path), {"config": cfg.to_dict(), "image_shape": [k, k, 1]})
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return _patch_model(tmp_path_factory.mktemp("model") / "export", K)


def _serialized(paths: list[str]):
    return (r.numpy() for r in tf.data.TFRecordDataset(paths))


def _records(data: str) -> dict[str, tuple[records.Record, str]]:
    m = manifest.load(data)
    return {
        rec.key: (rec, split)
        for split in ("train", "eval")
        for rec in map(records.decode, _serialized(m.shard_paths(split)))
    }


@pytest.mark.parametrize(
    ("grid", "op", "stride", "sparsify"),
    [(2, "mean", 1, []), (3, "max", 2, ["--sparsify", "none"])],
)
def test_every_image_once_and_equal_to_a_numpy_reference(
    images, model, tmp_path, grid, op, stride, sparsify
):
    out = str(tmp_path / "feats")
    m = extract.run(
        [
            "--data", images, "--model", model, "--output", out, *sparsify,
            "--pool", f"{grid}x{grid}", "--pool-op", op, "--stride", str(stride),
            "--batch-size", "7", "--num-shards", "2", *FAST,
        ]
    )  # fmt: skip
    assert m["sparsify"] == "none"  # also the default with --pool: a pooled value is a rate
    want = _records(images)
    assert m["num_inputs"] == m["num_written"] == len(want) == 24 and m["num_errors"] == 0
    assert m["pooling"] == {"grid": grid, "op": op, "stride": stride}
    assert m["dim"] == grid * grid * HIDDEN
    matrix, keys, labels, splits = features.sparse_matrix(out)
    assert matrix.shape == (24, grid * grid * HIDDEN)
    assert sorted(keys) == sorted(want)  # every key exactly once
    encode = tf.saved_model.load(model).signatures["encode"]
    stack = np.stack([want[k][0].image for k in keys])
    acts = lambda x: encode(images=tf.constant(x))["activations"].numpy()  # noqa: E731
    maps = _naive_maps(acts, stack, stride)
    np.testing.assert_allclose(matrix.toarray(), _numpy_pool(maps, grid, op), rtol=1e-5, atol=1e-6)
    assert [want[k][0].label for k in keys] == list(labels)
    assert [want[k][1] for k in keys] == list(splits)


@pytest.mark.parametrize("op", POOL_OPS)
@pytest.mark.parametrize(("grid", "stride"), [(2, 1), (3, 3)])
def test_an_image_too_big_for_one_call_goes_in_bands(model, monkeypatch, op, grid, stride):
    """With the map bound at 4 rows, each image is encoded in bands (whose edges fall inside
    grid regions) and still pools to the NumPy reference; no call sees more than the bound."""
    images = np.random.default_rng(3).integers(0, 256, (3, 37, 29, 1), dtype=np.uint8)
    hp, wp = pooled.map_size(37, 29, K, stride)
    monkeypatch.setattr(pooled, "MAX_MAP_VALUES", 4 * wp * HIDDEN)
    loaded = tf.saved_model.load(model)
    calls = []  # map values of each encode_map call, recorded as the (compiled) call runs

    def encode_map(images, stride):
        out = loaded.signatures["encode_map"](images=images, stride=stride)
        record = lambda shape: calls.append(int(np.prod(shape)))  # noqa: E731
        tf.py_function(record, [tf.shape(out["maps"])], [])
        return out

    pooling = pooled.Pooling(grid, op, stride, K, HIDDEN)
    got = pooled.pooled_encoder(encode_map, pooling)(images=tf.constant(images))["activations"]
    assert len(calls) == 3 * -(-hp // 4)  # ceil(H' / 4) bands per image
    assert max(calls) <= pooled.MAX_MAP_VALUES and sum(calls) == 3 * hp * wp * HIDDEN
    encode = loaded.signatures["encode"]
    acts = lambda x: encode(images=tf.constant(x))["activations"].numpy()  # noqa: E731
    want = _numpy_pool(_naive_maps(acts, images, stride), grid, op)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("k", "flags", "needle"),
    [
        (10, ["--pool", "2x2"], "11x9 images are smaller than the model's 10x10 windows"),
        (K, ["--pool", "7x7"], "--pool 7x7 does not fit a 8x6 map"),
        (K, ["--pool", "3x3", "--stride", "4"], "--pool 3x3 does not fit a 2x2 map"),
        (K, ["--pool", "2x2", "--stride", "5"], "invalid --stride 5: expected 1..4"),
        (K, ["--pool", "2x3"], "invalid --pool '2x3'"),
    ],
)
def test_sizes_that_do_not_fit_are_one_error_line(images, model, tmp_path, k, flags, needle):
    path = model if k == K else _patch_model(tmp_path / "export", k)
    out = tmp_path / "feats"
    r = _cli("extract", "--data", images, "--model", path, "--output", str(out), *flags, *FAST)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sae extract: error: "), r.stderr[-2000:]
    assert needle in lines[0]
    assert not out.exists() or not any(out.iterdir())
