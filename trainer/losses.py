"""The UFLDL sparse-autoencoder cost, exact under data parallelism.

    J = (1/m) sum_i 0.5 ||x_hat_i - x_i||^2          (SUM over pixels, m = GLOBAL batch)
      + (lambda/2) (||W1||^2 + ||W2||^2)             (kernels only)
      + beta sum_j KL(rho || rho_hat_j)              (rho_hat_j = (1/m) sum_i a_ij, per unit)
      [+ l1 (1/m) sum_i sum_j |a_ij|]                (optional article variant)

Distribution. Called inside `strategy.run` (or anywhere under the default
strategy), every replica sees only its slice of the global batch. So:
  * per-unit activation sums and the example count are all-reduced (SUM) across
    replicas and workers, and rho_hat = global sum / global count: every replica
    gets the rho_hat of the GLOBAL batch;
  * the reconstruction (and L1) sums are divided by the global count;
  * the batch-independent terms (weight decay, KL) enter each replica's loss
    divided by the number of replicas.
The replica losses then sum to J. Keras's optimizer SUMS gradients over
replicas, and the gradient of an all-reduce SUM is an all-reduce SUM of the
incoming gradients (tf.distribute's ReplicaContext.all_reduce custom gradient),
so the summed gradient is exactly dJ/dtheta, whatever the replica count. Under
the default strategy every all-reduce is the identity and N = 1.

Shapes: m = examples on this replica, n = pixels per example, s = hidden units.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


def all_reduce_sum(value):
    """Sums a tensor (or a nest of them) over all replicas; identity outside replica context."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context: the value is not split across replicas
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def num_replicas() -> int:
    """Replicas taking part in the current step (1 under the default strategy)."""
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def kl_divergence(rho: float, rho_hat: tf.Tensor, eps: float = 1e-6) -> tf.Tensor:
    """KL(rho || rho_hat_j) between Bernoulli means, per unit.

    rho: target mean activation in (0, 1). rho_hat: [s] mean activation of each unit.
    Returns [s]. rho_hat is clipped to [eps, 1 - eps] first, so the result is finite at
    0 and 1 (the clip passes no gradient outside the interval).
    """
    rho_hat = tf.clip_by_value(rho_hat, eps, 1.0 - eps)
    rho = tf.constant(rho, rho_hat.dtype)  # not tf.cast: a Python float would go via float32
    return rho * tf.math.log(rho / rho_hat) + (1.0 - rho) * tf.math.log(
        (1.0 - rho) / (1.0 - rho_hat)
    )


def global_rho_hat(activations: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean activation of each unit over the GLOBAL batch.

    activations: [m, s] on this replica. Returns (rho_hat [s], global count m_total []),
    identical on every replica. Differentiable: the all-reduce's gradient is an all-reduce.
    """
    count = tf.cast(tf.shape(activations)[0], activations.dtype)
    unit_sums, total = all_reduce_sum([tf.reduce_sum(activations, axis=0), count])
    return unit_sums / total, total


class CostTerms(NamedTuple):
    """The cost's terms over the GLOBAL batch (scalars, identical on every replica)."""

    reconstruction: tf.Tensor  # (1/m) sum_i 0.5 ||x_hat_i - x_i||^2
    weight_decay: tf.Tensor  # (lambda/2) sum_k ||W_k||^2
    sparsity: tf.Tensor  # beta sum_j KL(rho || rho_hat_j)
    l1: tf.Tensor  # l1 (1/m) sum_i sum_j |a_ij| (0 when off)
    total: tf.Tensor  # J, the sum of the above


def sparse_autoencoder_cost(
    x: tf.Tensor,
    x_hat: tf.Tensor,
    activations: tf.Tensor,
    kernels: list[tf.Tensor],
    *,
    rho: float,
    beta: float,
    weight_decay: float,
    l1_activity: float = 0.0,
    eps: float = 1e-6,
    rho_hat: tf.Tensor | None = None,
    count: tf.Tensor | None = None,
) -> tuple[tf.Tensor, CostTerms]:
    """UFLDL cost of this replica's slice of the global batch.

    x, x_hat: [m, n] inputs and reconstructions. activations: [m, s] hidden sigmoid
    outputs a (the units the sparsity and L1 terms act on). kernels: the weight matrices
    W1 [n, s] and W2 [s, n] (with tied weights pass W1 twice). rho_hat: optional [s] to use
    in the KL term instead of the global batch mean (e.g. a moving average); it should be
    identical on every replica. count: the global batch size m if the caller already
    all-reduced it (with `global_rho_hat`); computed here otherwise.

    Returns (replica_loss, terms). replica_loss []: this replica's share of J; the shares sum
    to J over replicas and their summed gradients equal dJ (see the module docstring). Take
    gradients of it. terms: CostTerms over the global batch, for reporting only (they carry
    no gradient).
    """
    dtype = x.dtype
    n_replicas = tf.cast(num_replicas(), dtype)
    m = count
    if rho_hat is None or m is None:
        batch_rho_hat, m = global_rho_hat(activations)
        rho_hat = batch_rho_hat if rho_hat is None else rho_hat

    rec_share = 0.5 * tf.reduce_sum(tf.square(x_hat - x)) / m
    l1_share = tf.constant(l1_activity, dtype) * tf.reduce_sum(tf.abs(activations)) / m
    wd = (
        0.5
        * tf.constant(weight_decay, dtype)
        * tf.add_n([tf.reduce_sum(tf.square(w)) for w in kernels])
    )
    kl = tf.constant(beta, dtype) * tf.reduce_sum(kl_divergence(rho, rho_hat, eps))
    replica_loss = rec_share + l1_share + (wd + kl) / n_replicas

    rec, l1 = all_reduce_sum([tf.stop_gradient(rec_share), tf.stop_gradient(l1_share)])
    wd, kl = tf.stop_gradient(wd), tf.stop_gradient(kl)
    return replica_loss, CostTerms(rec, wd, kl, l1, rec + wd + kl + l1)


def unit_normalize(images: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    """uint8 [b, H, W, C] -> pixels / 255 in [0, 1], float32 unless `dtype`."""
    return tf.cast(images, dtype) / tf.constant(255.0, dtype)


def ufldl_normalize(images: tf.Tensor, std: tf.Tensor | None = None, dtype=tf.float32):
    """UFLDL sampleIMAGES normalization. uint8 [b, H, W, C] -> [b, H, W, C] in [0.1, 0.9].

    Removes each example's mean (over its H*W*C values), clips to +-3 std, and maps
    [-3 std, 3 std] linearly to [0.1, 0.9] (the sigmoid decoder's comfortable range).
    std: the pooled standard deviation of mean-removed pixels (in units of pixels / 255);
    by default this batch's (all-reduced over replicas, so all replicas agree). UFLDL used
    the whole set's; `SparseAutoencoder` passes a running whole-training-set estimate.
    """
    x = centered(images, dtype)
    if std is None:
        sq, count = centered_moments(x)
        std = tf.sqrt(sq / count)
    return ufldl_rescale(x, std)


def ufldl_rescale(x_centered: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
    """Mean-removed pixels [b, H, W, C] -> clip to +-3 std -> [0.1, 0.9]; std: scalar."""
    limit = 3.0 * tf.cast(std, x_centered.dtype)
    # A constant batch (std 0) maps to the middle, 0.5, instead of dividing by zero.
    x = tf.math.divide_no_nan(tf.clip_by_value(x_centered, -limit, limit), limit)
    return (x + 1.0) * 0.4 + 0.1


def centered(images: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    """uint8 [b, H, W, C] -> [b, H, W, C] in [-1, 1]: pixels / 255 minus each example's mean."""
    x = unit_normalize(images, dtype)
    return x - tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)


def centered_moments(x_centered: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of squares [], number of values []) of mean-removed pixels over the GLOBAL batch.

    float64, all-reduced across replicas. The mean of mean-removed pixels is 0, so the
    pooled std is sqrt(sum / count). No gradient is needed.
    """
    x = tf.cast(tf.stop_gradient(x_centered), tf.float64)
    count = tf.cast(tf.size(x), tf.float64)
    sq, count = all_reduce_sum([tf.reduce_sum(tf.square(x)), count])
    return sq, count
