"""The trainer's own loop (trainer/loop.py): public API only, the math independent of how
the steps are grouped into calls, the same steps as Keras's `fit`, and mixed precision.

Under the default strategy, in this process; the distributed runs are in test_model.py (a
subprocess with 2 logical CPUs) and test_train.py (two workers, the real command).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import loop
from trainer import model as model_lib
from trainer.config import apply_overrides, preset

TRAINER = Path(__file__).resolve().parents[1] / "trainer"

# What `sae train` overrode or called before it owned its loop: each can break with any Keras
# 3 minor release.
PRIVATE_KERAS = [
    "make_train_function", "make_test_function", "make_predict_function",
    "_use_cached_eval_dataset", "_maybe_symbolic_build", "_for_keras_reduce",
    "keras.src", "keras._tf_keras",
]  # fmt: skip


def test_the_trainer_uses_no_private_keras_api():
    sources = {p.name: p.read_text() for p in sorted(TRAINER.glob("*.py"))}
    assert {"loop.py", "model.py", "train.py"} <= set(sources)
    for name, text in sources.items():
        for needle in PRIVATE_KERAS:
            assert needle not in text, f"trainer/{name} uses Keras's private {needle!r}"
    # The model overrides only the public Model methods a custom model is meant to.
    mine = [n for n in vars(model_lib.SparseAutoencoder) if not n.startswith("__")]
    overridden = {n for n in mine if hasattr(keras.Model, n)}
    assert overridden == {
        "call", "train_step", "test_step", "metrics", "get_config", "from_config",
    }, overridden  # fmt: skip
    assert not [n for n in overridden if n.startswith("_")]


# ----------------------------------------------------------------------------
# Helpers: a model under the default strategy and the loop's compiled train call.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def _model(overrides=()):
    cfg = apply_overrides(preset("digits"), ["global_batch_size=100", *overrides])
    model = model_lib.SparseAutoencoder(cfg)
    model_lib.compile_model(model, model_lib.make_optimizer(cfg))
    return model


def _train(model, images, calls: list[int]) -> list[dict]:
    """Runs the loop's train function with these call lengths; the logs after each call."""
    strategy = tf.distribute.get_strategy()
    train = loop.train_function(model, strategy)
    ds = tf.data.Dataset.from_tensor_slices(images).batch(model.config.global_batch_size)
    iterator = iter(strategy.experimental_distribute_dataset(ds.repeat()))
    out = []
    for n in calls:
        logs, agreed = train(iterator, tf.constant(n), tf.zeros(3))
        assert not agreed.numpy().any()
        out.append({k: float(v) for k, v in logs.items()})
    return out


def _weights(model) -> list[np.ndarray]:
    return [w.numpy() for w in model.weights]


# ----------------------------------------------------------------------------
# Invariances.
# ----------------------------------------------------------------------------
def test_steps_per_call_do_not_change_training(digits):
    runs = {}
    for calls in ([1] * 16, [4] * 4, [7, 1, 5, 3], [16]):
        model = _model()
        logs = _train(model, digits, calls)
        runs[tuple(calls)] = (logs[-1], _weights(model), int(model.optimizer.iterations))
    (logs1, w1, it1), *others = runs.values()
    assert it1 == 16
    for logs, w, it in others:
        assert it == it1
        for key, value in logs1.items():
            assert logs[key] == pytest.approx(value, rel=1e-6), key
        for a, b in zip(w1, w, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_loop_runs_the_steps_kerass_fit_runs(digits):
    """The model is a plain Keras model: `fit` on the default strategy takes the same steps."""
    ours, theirs = _model(), _model()
    ours_logs = _train(ours, digits, [8, 4])
    ds = tf.data.Dataset.from_tensor_slices(digits).batch(100).repeat()
    history = theirs.fit(ds, epochs=1, steps_per_epoch=12, verbose=0).history
    for key, value in history.items():
        assert ours_logs[-1][key] == pytest.approx(value[-1], rel=1e-6), key
    for a, b in zip(_weights(ours), _weights(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluation_reads_the_split_once_and_resets(digits):
    model = _model()
    ds = tf.data.Dataset.from_tensor_slices(digits).batch(500)
    evaluate = loop.eval_function(model, tf.distribute.get_strategy())
    first = loop.evaluate_metrics(model, ds, evaluate)
    again = loop.evaluate_metrics(model, ds, evaluate)  # the same function, metrics reset
    assert first["eval_examples"] == again["eval_examples"] == len(digits)
    for key in ("loss", "reconstruction", "mean_rho_hat", "l0"):
        assert again[key] == pytest.approx(first[key], rel=1e-6), key
    np.testing.assert_allclose(first["rho_hat"], model.encode(digits).numpy().mean(0), atol=1e-5)


# ----------------------------------------------------------------------------
# Mixed precision: 16-bit compute, float32 loss / KL / rho_hat, agrees with float32.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_agrees_with_float32(precision, digits):
    full, mixed = _model(), _model([f"precision={precision}"])
    assert mixed.compute_dtype == precision.removeprefix("mixed_")
    assert all(w.dtype == "float32" for w in mixed.weights)
    if precision == "mixed_float16":  # dynamic loss scaling, public Keras API
        assert isinstance(mixed.optimizer, tf.keras.optimizers.LossScaleOptimizer)
    _, terms, rho_hat, (x, a, x_hat), _ = mixed.cost(digits[:100], training=False)
    assert {t.dtype for t in (*terms, rho_hat, x, a, x_hat)} == {tf.float32}
    assert mixed.encode(digits[:4]).dtype == tf.float32

    calls = [20] * 6
    want, got = _train(full, digits, calls), _train(mixed, digits, calls)
    for w, g in zip(want, got, strict=True):  # running means over 120 steps, as they fall
        for key in ("loss", "reconstruction", "sparsity", "mean_rho_hat"):
            assert g[key] == pytest.approx(w[key], rel=0.02, abs=2e-3), key
    assert got[-1]["loss"] < 0.5 * got[0]["loss"]  # and it learns
    ds = tf.data.Dataset.from_tensor_slices(digits).batch(500)
    m_full, m_mixed = loop.evaluate_metrics(full, ds), loop.evaluate_metrics(mixed, ds)
    for key in ("loss", "reconstruction", "fraction_variance_explained", "mean_rho_hat"):
        assert m_mixed[key] == pytest.approx(m_full[key], rel=0.03), key


# ----------------------------------------------------------------------------
# The loop's cadences.
# ----------------------------------------------------------------------------
def _event_steps(run_dir: Path, tag: str) -> list[int]:
    steps = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


@pytest.mark.parametrize("seconds", [0.0, 3600.0])
def test_evaluation_and_checkpoints_by_steps_or_by_seconds(seconds, digits, tmp_path):
    """0 s: every epoch end evaluates and saves; an hour: only the last step does (the
    clock never asks), plus every checkpoint_every_steps."""
    model = _model([f"eval_every_seconds={seconds}", f"checkpoint_every_seconds={seconds}",
                    "epochs=4", "steps_per_epoch=6", "checkpoint_every_steps=8",
                    "steps_per_execution=5", "log_every_steps=4"])  # fmt: skip
    cfg = model.config
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, step=step)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path / "ckpt"), max_to_keep=None)
    ds = tf.data.Dataset.from_tensor_slices(digits).batch(cfg.global_batch_size)
    result = loop.run(
        model, tf.distribute.get_strategy(), cfg, stream=ds.repeat(), eval_dataset=ds.take(2),
        manager=manager, step_counter=step, start_step=0, steps_per_epoch=6,
        tb_dir=str(tmp_path / "tb"), verbose=0,
    )  # fmt: skip
    assert result == loop.Result(step=24, stopped=False) and int(step) == 24
    epochs = [0, 1, 2, 3] if not seconds else [3]
    assert _event_steps(tmp_path / "tb" / "train", "epoch_loss") == [0, 1, 2, 3]
    assert _event_steps(tmp_path / "tb" / "validation", "epoch_loss") == epochs
    assert _event_steps(tmp_path / "tb" / "units", "eval_rho_hat") == [6 * (e + 1) for e in epochs]
    # Calls end at 5, 6, 8, 12, 16, 18, 23, 24: batch scalars at the first end past each 4k.
    assert _event_steps(tmp_path / "tb" / "units", "batch_loss") == [5, 8, 12, 16, 23, 24]
    saved = [int(p.rsplit("-", 1)[1]) for p in manager.checkpoints]
    assert saved == ([6, 8, 12, 16, 18, 24] if not seconds else [8, 16, 24])


def test_a_converged_lbfgs_keeps_its_weights_and_the_epoch_line_says_so(digits, tmp_path, capsys):
    from trainer import lbfgs

    cfg = apply_overrides(preset("digits"), ["optimizer=lbfgs", "epochs=2", "steps_per_epoch=3"])
    model = model_lib.SparseAutoencoder(cfg)
    opt = lbfgs.LBFGS(model.trainable_variables, cfg.lbfgs_memory)
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=opt, step=step), str(tmp_path), max_to_keep=1
    )
    ds = tf.data.Dataset.from_tensor_slices(digits).batch(len(digits))  # the full batch

    def run(start: int) -> None:
        loop.run(
            model, tf.distribute.get_strategy(), cfg, stream=ds.repeat(), eval_dataset=ds,
            manager=manager, step_counter=step, start_step=start, steps_per_epoch=3,
            tb_dir=None, verbose=2, optimizer=opt,
        )  # fmt: skip

    initial = _weights(model)
    run(0)  # six iterations: the weights move, far from converged
    first = capsys.readouterr().out
    assert "converged" not in first and int(opt.iterations) == 6
    assert not np.array_equal(_weights(model)[0], initial[0])
    opt.stalls.assign(2)  # as after two iterations without progress
    before, evaluations = _weights(model), int(opt.evaluations)
    cfg = apply_overrides(cfg, ["epochs=3"])
    run(6)
    out = capsys.readouterr().out
    assert "train: epoch 3/3, step 9:" in out and "L-BFGS converged" in out, out
    for a, b in zip(_weights(model), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(opt.evaluations) == evaluations + 3  # one per step, for the logs
