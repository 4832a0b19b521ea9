"""The Keras model: UFLDL cost, replica invariance, it learns and is sparse, variants.

Replica runs need logical devices fixed before TensorFlow starts, and other test files
start TensorFlow first, so they run in a subprocess (`_REPLICA_SCRIPT`) that prints JSON.
Two workers: tests/test_train.py runs the real command on two.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from preprocessing.errors import UserError
from tests.helpers import ok, run, tails
from tests.test_losses import numpy_cost_and_grads
from trainer import distribute
from trainer.config import apply_overrides, preset
from trainer.loop import evaluate_metrics
from trainer.model import NONFINITE_LOSS, SparseAutoencoder, build_model

ROOT = Path(__file__).resolve().parents[1]

# Runs the CASES named in argv[3] (comma-separated) through trainer.loop's train function with
# the default strategy (1 replica, one step per call) and with argv[1] ("mirrored" over argv[2]
# logical CPUs) at up to argv[4] steps per call; prints {case: [one, many]} as JSON. 70 examples
# at global batch 32: every pass over them ends with an uneven batch of 6 (3 per replica); each
# "epoch" of 6 steps is two passes (calls of 4 and 2 steps at 4 per call).
_REPLICA_SCRIPT = """
import json, sys
from trainer.distribute import make_strategy, task
strategy = make_strategy(sys.argv[1], cpu_replicas=int(sys.argv[2]))
import numpy as np, tensorflow as tf
from trainer import loop
from trainer.config import apply_overrides, preset
from trainer.lbfgs import LBFGS
from trainer.model import SparseAutoencoder, compile_model, make_optimizer

CASES = {
    "base": [],
    "variants": ["normalization=ufldl_patches", "batch_norm=before", "rho_hat_momentum=0.9",
                 "l1_activity=0.01", "tied_weights=true", "decoder=linear", "learning_rate=0.02"],
    "bn_after": ["batch_norm=after"],
    # Random 4x4 windows of the 8x8 images, drawn per step as trainer.data does, and ZCA.
    "patches": ["input_shape=4,4,1", "patch_size=4", "zca_epsilon=0.01", "decoder=linear"],
    # Full-batch L-BFGS: every step is one iteration on all 70 images (35 per replica).
    "lbfgs": ["optimizer=lbfgs", "normalization=ufldl_patches"],
}
images = np.random.default_rng(0).integers(0, 256, (70, 8, 8, 1), dtype=np.uint8)
keys = [f"img-{i}" for i in range(70)]

def run(strategy, overrides, as_dict, steps_per_call):
    cfg = apply_overrides(preset("tiny"), ["optimizer=sgd", "learning_rate=0.1", *overrides])
    with strategy.scope():
        model = SparseAutoencoder(cfg)
        if cfg.optimizer == "lbfgs":
            optimizer = LBFGS(model.trainable_variables, cfg.lbfgs_memory)
        else:
            optimizer = make_optimizer(cfg)
            compile_model(model, optimizer)
    data = {"image": images, "key": keys} if as_dict else images
    ds = tf.data.Dataset.from_tensor_slices(data).batch(cfg.train_batch(len(images)))
    if cfg.patch_size:
        from trainer.data import random_patches
        ds = ds.enumerate().map(lambda i, x: random_patches(x, cfg.patch_size, tf.stack([i, i])))
        model.fit_zca(images[:, 2:6, 2:6])
    train = loop.train_function(model, strategy, optimizer)
    iterator = iter(strategy.experimental_distribute_dataset(ds.repeat()))
    history = {}
    for _ in range(2):
        for m in model.metrics:
            m.reset_state()
        done = 0
        while done < 6:
            n = min(steps_per_call, 6 - done)
            logs, _ = train(iterator, tf.constant(n), tf.zeros(3))
            done += n
        for k, v in logs.items():
            history.setdefault(k, []).append(float(v))
    metrics = loop.evaluate_metrics(model, ds)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "history": history,
        "weights": {w.path: w.numpy().tolist() for w in model.weights},
        "unit_rho_hat": metrics.pop("rho_hat").tolist(),
        "eval": metrics,
    }

out = {}
for name in sys.argv[3].split(","):
    as_dict = name == "variants"  # {"image", "key"} batches: uint8 and strings, no float
    out[name] = [run(tf.distribute.get_strategy(), CASES[name], as_dict, 1),
                 run(strategy, CASES[name], as_dict, int(sys.argv[4]))]
print("RESULT " + json.dumps({"task": task(), "cases": out}))
"""


def _replicas(args: list[str]) -> dict:
    """The JSON that _REPLICA_SCRIPT prints, run with `args` in a fresh process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    # 4 cases x 2 runs: minutes on a busy machine.
    r = ok(run([sys.executable, "-c", _REPLICA_SCRIPT, *args], timeout=540, cwd=ROOT, env=env))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, tails(r.stdout, r.stderr)
    return json.loads(lines[-1][len("RESULT ") :])


def _assert_same_run(one: dict, many: dict, replicas: int) -> None:
    assert (one["replicas"], many["replicas"]) == (1, replicas)
    for key, values in one["history"].items():
        np.testing.assert_allclose(many["history"][key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    assert one["weights"].keys() == many["weights"].keys()
    for path, w in one["weights"].items():
        np.testing.assert_allclose(many["weights"][path], w, rtol=1e-5, atol=1e-5, err_msg=path)
    for key, value in one["eval"].items():
        np.testing.assert_allclose(many["eval"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(many["unit_rho_hat"], one["unit_rho_hat"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_and_two_mirrored_replicas_train_identically():
    result = _replicas(["mirrored", "2", "base,variants,bn_after,patches,lbfgs", "4"])
    for name, (one, two) in result["cases"].items():
        assert one["eval"]["eval_examples"] == 70, name
        _assert_same_run(one, two, replicas=2)


def test_strategy_names_and_tasks(monkeypatch):
    with pytest.raises(UserError, match="unknown strategy 'tpu'.*auto, default, mirrored"):
        distribute.make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.make_strategy("default") is tf.distribute.get_strategy()
    assert distribute.make_strategy("auto").num_replicas_in_sync == 1
    assert distribute.is_chief() and distribute.worker_temp_dir("gs://b/run") == "gs://b/run"

    def tf_config(kind, index, chief=False):
        cluster = {"worker": ["w0:1", "w1:1"], **({"chief": ["c:1"]} if chief else {})}
        monkeypatch.setenv(
            "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})
        )

    tf_config("worker", 0)
    assert distribute.is_chief()
    tf_config("worker", 1)
    assert not distribute.is_chief()
    assert distribute.worker_temp_dir("gs://b/run/") == "gs://b/run/tmp-workers/worker-1"
    tf_config("worker", 0, chief=True)
    assert not distribute.is_chief()
    tf_config("chief", 0, chief=True)
    assert distribute.is_chief()


def test_cpu_replicas_after_tf_started_is_a_clear_error():
    tf.constant(1.0).numpy()  # TensorFlow has initialized its devices
    with pytest.raises(RuntimeError, match="before any other TensorFlow operation"):
        distribute.make_strategy("mirrored", cpu_replicas=3)


# -- the model computes the UFLDL cost ---------------------------------------------------


def _images(n=10, shape=(4, 4, 1), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.mark.parametrize("decoder", ["sigmoid", "linear"])
def test_model_cost_and_gradients_match_numpy_in_float64(decoder):
    cfg = apply_overrides(preset("tiny"), ["input_shape=4x4x1", "hidden=5", f"decoder={decoder}"])
    model = SparseAutoencoder(cfg, dtype="float64")
    images = _images()
    with tf.GradientTape() as tape:
        loss, terms, *_ = model.cost(tf.constant(images), training=True)
    names = ["w1", "b1", "w2", "b2"]
    grads = dict(zip(names, tape.gradient(loss, model.trainable_variables), strict=True))
    params = {k: getattr(model, k).numpy() for k in ("w1", "b1", "w2", "b2")}
    x = images.reshape(10, -1) / 255.0
    want, want_grads, _ = numpy_cost_and_grads(
        x, **params, decoder=decoder, rho=cfg.rho, beta=cfg.beta, lam=cfg.weight_decay
    )
    assert loss.dtype == tf.float64
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(terms.total.numpy(), want, rtol=1e-12)
    for k, g in want_grads.items():
        np.testing.assert_allclose(grads[k].numpy(), g, rtol=1e-9, atol=1e-13, err_msg=k)


def test_the_lbfgs_objective_is_the_numpy_cost_flattened_in_variable_order():
    from trainer import lbfgs

    cfg = apply_overrides(preset("tiny"), ["input_shape=4x4x1", "hidden=5", "optimizer=lbfgs"])
    model = SparseAutoencoder(cfg, dtype="float64")
    images = _images()
    loss, grad, (terms, rho_hat, count) = model.objective(tf.constant(images))
    params = {k: getattr(model, k).numpy() for k in ("w1", "b1", "w2", "b2")}
    want, want_grads, _ = numpy_cost_and_grads(
        images.reshape(10, -1) / 255.0, **params, decoder="sigmoid", rho=cfg.rho,
        beta=cfg.beta, lam=cfg.weight_decay,
    )  # fmt: skip
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-12)
    assert terms.total.numpy() == pytest.approx(want, rel=1e-12) and int(count) == 10
    assert [v.path.split("/")[-1] for v in model.trainable_variables] == ["w1", "b1", "w2", "b2"]
    flat = np.concatenate([want_grads[k].ravel() for k in ("w1", "b1", "w2", "b2")])
    np.testing.assert_allclose(grad.numpy(), flat, rtol=1e-9, atol=1e-13)
    # L-BFGS writes a flat vector back in the same order.
    opt = lbfgs.LBFGS(model.trainable_variables, memory=2)
    opt._assign(tf.constant(np.arange(flat.size, dtype=np.float64)))
    np.testing.assert_array_equal(lbfgs.flatten(model.trainable_variables).numpy(),
                                  np.arange(flat.size))  # fmt: skip


def test_init_follows_ufldl_and_is_seeded():
    cfg = apply_overrides(preset("tiny"), ["input_shape=28,28,1", "hidden=196"])
    model = SparseAutoencoder(cfg)
    r = np.sqrt(6) / np.sqrt(784 + 196 + 1)
    for w in (model.w1, model.w2):
        w = w.numpy()
        assert np.abs(w).max() <= r and np.abs(w).max() > 0.99 * r
        assert abs(w.mean()) < 0.01 * r
    assert not np.any(model.b1.numpy()) and not np.any(model.b2.numpy())
    assert model.w1.shape == (784, 196) and model.w2.shape == (196, 784)
    again = SparseAutoencoder(cfg)
    np.testing.assert_array_equal(again.w1.numpy(), model.w1.numpy())
    other = SparseAutoencoder(apply_overrides(cfg, ["seed=1"]))
    assert not np.allclose(other.w1.numpy(), model.w1.numpy())
    assert not np.allclose(model.w2.numpy(), model.w1.numpy().T)


# -- it learns and is sparse -------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def test_learns_digits_and_is_sparse(digits):
    """With Keras's own `fit` (the default strategy): the model is a plain Keras model."""
    cfg = preset("digits")
    steps = cfg.steps_per_epoch or len(digits) // cfg.global_batch_size
    model = build_model(cfg, cfg.execution_steps(steps))
    train = (
        tf.data.Dataset.from_tensor_slices(digits)
        .shuffle(len(digits), seed=0)
        .repeat()
        .batch(cfg.global_batch_size)
    )
    evaluation = tf.data.Dataset.from_tensor_slices(digits).batch(512)
    before = evaluate_metrics(model, evaluation)
    model.fit(train, epochs=cfg.epochs, steps_per_epoch=steps, verbose=0)
    after = evaluate_metrics(model, evaluation)

    assert model.steps_per_execution > 1
    assert after["loss"] < 0.5 * before["loss"]
    assert after["reconstruction"] < 0.5 * before["reconstruction"]
    assert abs(after["mean_rho_hat"] - cfg.rho) < 0.3 * cfg.rho
    assert after["dead_fraction"] <= 0.1 and after["saturated_fraction"] == 0.0
    assert after["fraction_variance_explained"] > 0.5
    assert after["eval_examples"] == len(digits)
    # The per-unit rho_hat is the mean of `encode` over the eval split.
    rho_hat = model.unit_rho_hat().numpy()
    np.testing.assert_allclose(rho_hat, model.encode(digits).numpy().mean(axis=0), atol=1e-5)
    assert rho_hat.shape == (cfg.hidden,)
    # Per UNIT: most units sit near rho, not only their average.
    assert np.mean(np.abs(rho_hat - cfg.rho) < 0.5 * cfg.rho) > 0.8


def test_eval_statistics_match_numpy(digits):
    cfg = apply_overrides(preset("digits"), ["rho=0.3"])
    model = build_model(cfg)
    got = evaluate_metrics(model, tf.data.Dataset.from_tensor_slices(digits).batch(500))
    x = digits.reshape(len(digits), -1) / 255.0
    a = model.encode(digits).numpy().astype(np.float64)
    x_hat = model.reconstruct(digits).numpy().reshape(len(digits), -1).astype(np.float64)
    rho_hat = a.mean(axis=0)
    fve = 1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(axis=0)) ** 2)
    assert got["mean_rho_hat"] == pytest.approx(rho_hat.mean(), rel=1e-5)
    assert got["dead_fraction"] == pytest.approx(np.mean(rho_hat < 0.03))
    assert got["saturated_fraction"] == pytest.approx(np.mean(rho_hat > 0.9))
    assert got["l0"] == pytest.approx(np.mean(np.sum(a > 0.5, axis=1)), rel=1e-5)
    assert got["fraction_variance_explained"] == pytest.approx(fve, rel=1e-4)
    assert got["reconstruction"] == pytest.approx(0.5 * np.sum((x - x_hat) ** 2) / len(x), 1e-4)


def test_eval_kl_and_cost_are_the_whole_splits_whatever_the_batch_size(digits):
    """UFLDL's J on a split uses the split's rho_hat: the same for any eval batching."""
    cfg = apply_overrides(preset("digits"), ["rho=0.3"])
    model = build_model(cfg)
    ds = tf.data.Dataset.from_tensor_slices(digits)
    by = {b: evaluate_metrics(model, ds.batch(b)) for b in (128, len(digits))}
    a = model.encode(digits).numpy().astype(np.float64)
    rho_hat = np.clip(a.mean(axis=0), cfg.eps, 1 - cfg.eps)
    rho = cfg.rho
    kl = np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
    for got in by.values():
        assert got["sparsity"] == pytest.approx(cfg.beta * kl, rel=1e-5)
        parts = got["reconstruction"] + got["weight_decay"] + got["sparsity"]
        assert got["loss"] == pytest.approx(parts, rel=1e-6)
    # One batch of the whole split: the batch mean is the split value; 128s are not
    # (the KL of a mean is below the mean of the batches' KLs: KL is convex in rho_hat).
    whole = by[len(digits)]
    assert whole["sparsity_batch_mean"] == pytest.approx(whole["sparsity"], rel=1e-5)
    assert by[128]["sparsity_batch_mean"] > by[128]["sparsity"] * (1 + 1e-4)


# -- interface ---------------------------------------------------------------------------


def test_encode_and_reconstruct_shapes_and_dtypes():
    model = SparseAutoencoder(apply_overrides(preset("tiny"), ["input_shape=6,5,3", "hidden=7"]))
    images = _images(4, (6, 5, 3))
    a = model.encode(images)
    assert a.shape == (4, 7) and a.dtype == tf.float32
    assert np.all((a.numpy() > 0) & (a.numpy() < 1))
    x_hat = model.reconstruct(images)
    assert x_hat.shape == (4, 6, 5, 3) and x_hat.dtype == tf.float32
    np.testing.assert_allclose(model.encode({"image": images, "label": [0] * 4}), a)
    assert model.normalize(images).shape == (4, 6, 5, 3)


def test_save_and_load_give_the_same_features(tmp_path):
    cfg = apply_overrides(preset("tiny"), ["batch_norm=after", "normalization=ufldl_patches"])
    model = build_model(cfg)
    images = _images(64, (8, 8, 1))
    model.fit(tf.data.Dataset.from_tensor_slices(images).batch(32), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, SparseAutoencoder) and loaded.config == cfg
    np.testing.assert_array_equal(loaded.encode(images), model.encode(images))


# -- variants ----------------------------------------------------------------------------


def _fit(overrides, images, epochs=1):
    cfg = apply_overrides(preset("tiny"), ["global_batch_size=64", *overrides])
    model = build_model(cfg)
    ds = tf.data.Dataset.from_tensor_slices(images).batch(cfg.global_batch_size)
    return model, model.fit(ds, epochs=epochs, verbose=0).history


def test_tied_weights_train(digits):
    model, history = _fit(["tied_weights=true", "learning_rate=0.02"], digits[:512], epochs=8)
    assert model.w2 is None and len(model.trainable_variables) == 3
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    # (lambda/2)(||W1||^2 + ||W1^T||^2) = lambda ||W1||^2
    _, terms, *_ = model.cost(digits[:8])
    want = model.config.weight_decay * np.sum(model.w1.numpy() ** 2)
    assert terms.weight_decay.numpy() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("where", ["before", "after"])
def test_batch_norm_variants_add_no_loss_term(where, digits):
    model, history = _fit([f"batch_norm={where}"], digits[:256], epochs=2)
    assert np.all(np.isfinite(history["loss"]))
    assert model.batch_norm is not None and model.batch_norm.synchronized
    _, terms, *_ = model.cost(digits[:64])
    total = terms.reconstruction + terms.weight_decay + terms.sparsity
    assert terms.total.numpy() == pytest.approx(total.numpy(), rel=1e-6)
    assert terms.l1.numpy() == 0.0
    # BatchNormalization's gamma/beta are not kernels: no weight decay on them.
    assert len(model.kernels()) == 2


def test_l1_variant_adds_its_term_per_example(digits):
    model, history = _fit(["l1_activity=0.05"], digits[:256], epochs=2)
    assert "l1_activity" in history
    images = digits[:64]
    _, terms, *_ = model.cost(images)
    a = model.encode(images).numpy()
    want_l1 = 0.05 * np.sum(np.abs(a)) / len(images)  # per example, not per batch
    assert terms.l1.numpy() == pytest.approx(want_l1, rel=1e-5)
    total = terms.reconstruction + terms.weight_decay + terms.sparsity + terms.l1
    assert terms.total.numpy() == pytest.approx(total.numpy(), rel=1e-6)


def test_rho_hat_momentum_first_step_is_exact(digits):
    images = digits[:64]
    plain, _ = _fit(["optimizer=sgd"], images)
    smooth, _ = _fit(["optimizer=sgd", "rho_hat_momentum=0.9"], images)
    # Bias-corrected: on the first step the moving average is the batch's rho_hat itself.
    np.testing.assert_allclose(smooth.w1.numpy(), plain.w1.numpy(), atol=1e-6)
    assert smooth.rho_hat_steps.numpy() == 1
    initial = SparseAutoencoder(smooth.config)
    np.testing.assert_allclose(
        smooth.rho_hat_ema.numpy() / (1 - 0.9),
        initial.encode(images).numpy().mean(axis=0),
        atol=1e-6,
    )


def test_ufldl_normalization_learns_the_whole_set_std(digits):
    images = digits[:256]
    model, _ = _fit(["normalization=ufldl_patches"], images)
    p = images.reshape(len(images), -1) / 255.0
    p = p - p.mean(axis=1, keepdims=True)
    std = np.sqrt(model.pixel_sq_sum.numpy() / model.pixel_count.numpy())
    assert std == pytest.approx(np.sqrt(np.mean(p**2)), rel=1e-6)
    x = model.normalize(images).numpy().reshape(len(images), -1)
    want = (np.clip(p, -3 * std, 3 * std) / (3 * std) + 1) * 0.4 + 0.1
    np.testing.assert_allclose(x, want, atol=1e-6)
    # Inference does not depend on the batch: one image normalizes as it does in a batch.
    np.testing.assert_allclose(model.normalize(images[:1]).numpy().ravel(), x[0], atol=1e-7)


def test_nan_loss_fails_loudly():
    model = build_model(apply_overrides(preset("tiny"), ["learning_rate=1e30", "optimizer=sgd"]))
    ds = tf.data.Dataset.from_tensor_slices(_images(64, (8, 8, 1))).batch(32).repeat()
    with pytest.raises(tf.errors.InvalidArgumentError, match=NONFINITE_LOSS):
        model.fit(ds, epochs=1, steps_per_epoch=5, verbose=0)
