"""trainer/lbfgs.py: the two-loop recursion against the dense BFGS update, convergence on a
quadratic, and a checkpointed resume that continues the same iterates.

The sparse autoencoder under L-BFGS: 1 vs 2 replicas in test_model.py (the "lbfgs" case),
`sae train --set optimizer=lbfgs` (learning, resume, errors) in test_train.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import lbfgs


def _dense_inverse_hessian(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """BFGS's inverse-Hessian update applied to the pairs oldest first, from H0 = gamma I
    with gamma = s'y / y'y of the newest pair (Nocedal & Wright, eq. 6.17 and 7.20)."""
    s_new, y_new = pairs[-1]
    h = np.eye(len(s_new)) * (s_new @ y_new) / (y_new @ y_new)
    for s, y in pairs:
        rho = 1.0 / (y @ s)
        left = np.eye(len(s)) - rho * np.outer(s, y)
        h = left @ h @ left.T + rho * np.outer(s, s)
    return h


def test_two_loop_is_the_dense_bfgs_inverse_hessian_in_a_wrapped_ring_buffer():
    rng = np.random.default_rng(0)
    size, memory, stored = 6, 3, 5  # 5 pairs into 3 slots: the buffer has wrapped
    a = rng.normal(size=(size, size))
    a = a @ a.T + np.eye(size)  # y = A s: curvature s'y > 0
    history = [(s, a @ s) for s in rng.normal(size=(stored, size))]
    s_buf, y_buf = np.zeros((memory, size)), np.zeros((memory, size))
    for k, (s, y) in enumerate(history):
        s_buf[k % memory], y_buf[k % memory] = s, y
    g = rng.normal(size=size)
    d = lbfgs.two_loop(
        tf.constant(g), tf.constant(s_buf), tf.constant(y_buf),
        newest=tf.constant((stored - 1) % memory), count=tf.constant(memory),
    )  # fmt: skip
    want = -_dense_inverse_hessian(history[-memory:]) @ g
    np.testing.assert_allclose(d.numpy(), want, rtol=1e-10)
    # No pairs: the gradient itself.
    d0 = lbfgs.two_loop(tf.constant(g), tf.constant(s_buf), tf.constant(y_buf),
                        newest=tf.constant(0), count=tf.constant(0))  # fmt: skip
    np.testing.assert_allclose(d0.numpy(), -g)


def _quadratic(size: int = 30, seed: int = 0):
    """f(x) = 0.5 x'Ax - b'x with a well-conditioned SPD A: (variable, objective, minimizer)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size, size))
    a = a @ a.T / size + np.eye(size)
    b = rng.normal(size=size)
    x = tf.Variable(tf.zeros([size], tf.float64))
    a_t, b_t = tf.constant(a), tf.constant(b)

    def objective():
        with tf.GradientTape() as tape:
            f = 0.5 * tf.tensordot(x, tf.linalg.matvec(a_t, x), 1) - tf.tensordot(b_t, x, 1)
        return f, lbfgs.flatten(tape.gradient(f, [x])), {"f": f}

    return x, objective, np.linalg.solve(a, b)


def test_lbfgs_minimizes_a_quadratic_then_stops_at_float_precision():
    x, objective, minimizer = _quadratic()
    opt = lbfgs.LBFGS([x], memory=10)
    step = tf.function(lambda: opt.step(objective)["f"])
    values = [float(step()) for _ in range(15)]
    # Armijo: the accepted values never increase.
    assert all(b <= a for a, b in zip(values, values[1:], strict=False)), values
    np.testing.assert_allclose(x.numpy(), minimizer, atol=1e-6)
    # The cached f and g: the first iteration evaluates twice (the start, one trial); the
    # later ones accept their first trial, a quasi-Newton step of 1.
    assert (int(opt.iterations), int(opt.evaluations)) == (15, 16)
    assert float(opt.learning_rate) == 1.0 and not bool(opt.converged)
    # Past the minimum the line searches fail (f is flat to float64): then it stops.
    for _ in range(20):
        step()
    assert bool(opt.converged)
    at_stop, evaluations = x.numpy(), int(opt.evaluations)
    assert float(step()) == pytest.approx(values[-1], abs=1e-12)
    assert int(opt.evaluations) == evaluations + 1  # one evaluation, for the logs
    np.testing.assert_array_equal(x.numpy(), at_stop)
    np.testing.assert_allclose(at_stop, minimizer, atol=1e-8)


def test_a_restored_checkpoint_continues_the_same_iterates(tmp_path):
    def run(steps: int, restore_from=None, save_to=None) -> np.ndarray:
        x, objective, _ = _quadratic()
        opt = lbfgs.LBFGS([x], memory=4)  # 4 < iterations: the ring buffer wraps
        ckpt = tf.train.Checkpoint(x=x, optimizer=opt)
        if restore_from:
            ckpt.restore(restore_from).assert_existing_objects_matched()
        step = tf.function(lambda: opt.step(objective))
        for _ in range(steps):
            step()
        if save_to:
            return ckpt.save(save_to)
        return x.numpy()

    straight = run(12)
    path = run(5, save_to=str(tmp_path / "ckpt"))
    resumed = run(7, restore_from=path)
    np.testing.assert_array_equal(resumed, straight)


def test_a_flat_or_nan_objective_leaves_the_weights_and_clears_the_memory():
    x = tf.Variable([1.0, 2.0], dtype=tf.float64)
    start = x.numpy().copy()

    def nan_away_from_start():  # finite only at the start: every trial is rejected
        with tf.GradientTape() as tape:
            d = tf.reduce_sum(tf.square(x - start))
            f = tf.where(d > 0, tf.constant(np.nan, tf.float64), tf.reduce_sum(x))
        return f, lbfgs.flatten(tape.gradient(f, [x])), {"f": f}

    opt = lbfgs.LBFGS([x], memory=3)
    step = tf.function(lambda: opt.step(nan_away_from_start))
    aux = step()
    np.testing.assert_array_equal(x.numpy(), start)
    assert float(aux["f"]) == pytest.approx(3.0)  # the aux of the point it stayed at
    assert int(opt.pairs) == 0
    assert int(opt.evaluations) == 1 + lbfgs.MAX_TRIALS + 1  # start, trials, back at start
    assert not bool(opt.converged)  # one failure: next, a gradient step
    step()
    np.testing.assert_array_equal(x.numpy(), start)
    assert bool(opt.converged)  # two in a row: nowhere to go
