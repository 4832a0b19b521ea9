"""The TF cost against an independent NumPy float64 UFLDL implementation.

`numpy_cost_and_grads` is written from the CS294A notes (the cost as docs/design.md states
it), not from trainer/losses.py: forward pass, cost, and the backprop deltas
    delta3 = (x_hat - x) * f'(z3)
    delta2 = (delta3 W2^T + beta (-rho / rho_hat + (1 - rho) / (1 - rho_hat)) [+ l1]) * a (1 - a)
The TF gradients come from tf.GradientTape, and are also checked by centred finite
differences.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import losses

RHO, BETA, LAMBDA = 0.1, 3.0, 3e-3


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_cost_and_grads(x, w1, b1, w2, b2, *, decoder, rho, beta, lam, l1=0.0):
    """UFLDL cost and gradients. x [m, n]; w1 [n, s]; b1 [s]; w2 [s, n]; b2 [n] (float64).

    Returns (J, {"w1", "b1", "w2", "b2"} gradients, terms dict).
    """
    m = x.shape[0]
    a = _sigmoid(x @ w1 + b1)
    z3 = a @ w2 + b2
    x_hat = _sigmoid(z3) if decoder == "sigmoid" else z3
    rho_hat = a.mean(axis=0)
    rec = 0.5 * np.sum((x_hat - x) ** 2) / m
    wd = 0.5 * lam * (np.sum(w1**2) + np.sum(w2**2))
    kl = beta * np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
    l1_term = l1 * np.sum(np.abs(a)) / m
    fprime = x_hat * (1 - x_hat) if decoder == "sigmoid" else 1.0
    delta3 = (x_hat - x) * fprime
    sparsity_delta = beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))
    delta2 = (delta3 @ w2.T + sparsity_delta + l1) * a * (1 - a)
    grads = {
        "w1": x.T @ delta2 / m + lam * w1,
        "b1": delta2.sum(axis=0) / m,
        "w2": a.T @ delta3 / m + lam * w2,
        "b2": delta3.sum(axis=0) / m,
    }
    terms = {"reconstruction": rec, "weight_decay": wd, "sparsity": kl, "l1": l1_term}
    return rec + wd + kl + l1_term, grads, terms


def _problem(seed=0, m=10, n=16, s=5):
    rng = np.random.default_rng(seed)
    r = np.sqrt(6) / np.sqrt(n + s + 1)
    x = rng.uniform(0, 1, (m, n))
    params = {
        "w1": rng.uniform(-r, r, (n, s)),
        "b1": rng.normal(0, 0.1, s),
        "w2": rng.uniform(-r, r, (s, n)),
        "b2": rng.normal(0, 0.1, n),
    }
    return x, params


def _tf_cost(x, p, decoder, l1=0.0):
    """Forward pass in TF (float64) + trainer.losses.sparse_autoencoder_cost."""
    a = tf.sigmoid(x @ p["w1"] + p["b1"])
    z3 = a @ p["w2"] + p["b2"]
    x_hat = tf.sigmoid(z3) if decoder == "sigmoid" else z3
    return losses.sparse_autoencoder_cost(
        x, x_hat, a, [p["w1"], p["w2"]], rho=RHO, beta=BETA, weight_decay=LAMBDA, l1_activity=l1
    )


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a + b), 1e-300)


@pytest.mark.parametrize("decoder", ["sigmoid", "linear"])
@pytest.mark.parametrize("l1", [0.0, 0.05])
def test_cost_and_gradients_match_numpy_backprop(decoder, l1):
    x, p = _problem()
    want_j, want_grads, want_terms = numpy_cost_and_grads(
        x, **p, decoder=decoder, rho=RHO, beta=BETA, lam=LAMBDA, l1=l1
    )
    tvars = {k: tf.Variable(v, dtype=tf.float64) for k, v in p.items()}
    with tf.GradientTape() as tape:
        loss, terms = _tf_cost(tf.constant(x), tvars, decoder, l1)
    grads = tape.gradient(loss, tvars)

    assert loss.dtype == tf.float64
    np.testing.assert_allclose(loss.numpy(), want_j, rtol=1e-12)
    np.testing.assert_allclose(terms.total.numpy(), want_j, rtol=1e-12)
    for name, value in want_terms.items():
        np.testing.assert_allclose(getattr(terms, name).numpy(), value, rtol=1e-12, atol=1e-15)
    for k, g in want_grads.items():
        assert _rel(grads[k].numpy(), g) < 1e-6, k
        np.testing.assert_allclose(grads[k].numpy(), g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("decoder", ["sigmoid", "linear"])
def test_gradients_match_centred_finite_differences(decoder):
    x, p = _problem(seed=1, m=8, n=9, s=4)
    names = list(p)
    shapes = [p[k].shape for k in names]
    sizes = [int(np.prod(s)) for s in shapes]
    xt = tf.constant(x)

    def unflatten(theta):
        parts = tf.split(theta, sizes)
        return {k: tf.reshape(t, s) for k, t, s in zip(names, parts, shapes, strict=True)}

    @tf.function
    def cost(theta):
        return _tf_cost(xt, unflatten(theta), decoder, l1=0.01)[0]

    theta = tf.Variable(np.concatenate([p[k].ravel() for k in names]))
    with tf.GradientTape() as tape:
        j = cost(theta)
    grad = tape.gradient(j, theta).numpy()

    eps = 1e-4
    base = theta.numpy()
    numeric = np.empty_like(base)
    for i in range(base.size):
        e = np.zeros_like(base)
        e[i] = eps
        numeric[i] = (cost(tf.constant(base + e)) - cost(tf.constant(base - e))).numpy() / (2 * eps)
    assert _rel(numeric, grad) < 1e-9


def test_kl_is_zero_at_target_and_positive_elsewhere():
    rho = 0.05
    rho_hat = tf.constant([0.05, 0.01, 0.2, 0.5, 0.99], tf.float64)
    kl = losses.kl_divergence(rho, rho_hat).numpy()
    assert kl.shape == (5,)
    assert abs(kl[0]) < 1e-15
    assert np.all(kl[1:] > 0)
    # Per unit, not one averaged scalar: a dead and a saturated unit are both penalized.
    both = losses.kl_divergence(0.5, tf.constant([0.0, 1.0], tf.float64)).numpy()
    assert np.all(both > 1.0)


def test_kl_clipping_keeps_it_finite():
    rho_hat = tf.constant([0.0, 1.0], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(rho_hat)
        kl = losses.kl_divergence(0.1, rho_hat, eps=1e-6)
    assert np.all(np.isfinite(kl.numpy()))
    assert np.all(np.isfinite(tape.gradient(kl, rho_hat).numpy()))


def test_rho_hat_is_per_unit_mean_over_batch():
    a = tf.constant([[0.0, 1.0, 0.5], [0.2, 1.0, 0.1]])
    rho_hat, count = losses.global_rho_hat(a)
    np.testing.assert_allclose(rho_hat.numpy(), [0.1, 1.0, 0.3])
    assert count.numpy() == 2


def test_reconstruction_sums_over_pixels():
    # Not Keras MSE (mean over pixels): one example, 4 pixels each off by 1 -> 0.5 * 4 = 2.
    x = tf.zeros([1, 4])
    x_hat = tf.ones([1, 4])
    a = tf.fill([1, 3], 0.1)
    _, terms = losses.sparse_autoencoder_cost(
        x, x_hat, a, [tf.zeros([4, 3])], rho=0.1, beta=3.0, weight_decay=0.0
    )
    assert terms.reconstruction.numpy() == pytest.approx(2.0)
    assert terms.sparsity.numpy() == pytest.approx(0.0, abs=1e-6)


def test_unit_normalize():
    images = tf.constant([[[[0], [255]], [[51], [102]]]], tf.uint8)
    x = losses.unit_normalize(images)
    assert x.dtype == tf.float32
    np.testing.assert_allclose(x.numpy().ravel(), [0, 1, 0.2, 0.4], rtol=1e-6)


def test_ufldl_normalize_matches_sample_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    # UFLDL sampleIMAGES with the pooled std of this batch's mean-removed pixels.
    p = images.reshape(20, -1).astype(np.float64) / 255
    p = p - p.mean(axis=1, keepdims=True)
    pstd = 3 * np.sqrt(np.mean(p**2))
    want = (np.clip(p, -pstd, pstd) / pstd + 1) * 0.4 + 0.1

    got = losses.ufldl_normalize(tf.constant(images))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy().reshape(20, -1), want, atol=1e-6)
    assert got.numpy().min() >= 0.1 - 1e-6 and got.numpy().max() <= 0.9 + 1e-6

    given = losses.ufldl_normalize(tf.constant(images), std=tf.constant(0.1, tf.float64))
    want_given = (np.clip(p, -0.3, 0.3) / 0.3 + 1) * 0.4 + 0.1
    np.testing.assert_allclose(given.numpy().reshape(20, -1), want_given, atol=1e-6)

    flat = losses.ufldl_normalize(tf.fill([2, 4, 4, 1], tf.constant(7, tf.uint8)))
    np.testing.assert_allclose(flat.numpy(), 0.5)
