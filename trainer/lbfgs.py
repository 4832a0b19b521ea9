"""Full-batch L-BFGS, the optimizer of UFLDL's exercises, for train splits that fit in memory.

    with strategy.scope():
        opt = lbfgs.LBFGS(model.trainable_variables, memory=cfg.lbfgs_memory)
    logs = opt.step(objective)      # inside a tf.function; objective() -> (J, dJ flat, aux)

One `step` is one iteration on the full batch:
  1. the direction d = -H g from the newest `memory` curvature pairs (s = x_k+1 - x_k,
     y = g_k+1 - g_k) by the two-loop recursion (Nocedal & Wright, Algorithm 7.4), with
     H0 = s'y / y'y of the newest pair; without pairs d = -g;
  2. a backtracking line search on the Armijo condition f(x + t d) <= f(x) + 1e-4 t g'd, from
     t = 1 (t = min(1, 1 / ||g||_1) without pairs, as minFunc starts); each retry takes the
     minimum of the quadratic through f(x), g'd and f(x + t d), kept within [0.1 t, 0.5 t];
  3. the pair (s, y) is stored only if s'y > CURVATURE * s's: an Armijo-only search does not
     guarantee the curvature condition, and this keeps H positive definite.
If MAX_TRIALS trials fail (the loss is flat to float precision, or the direction is bad),
the weights stay and the pairs are dropped: the next iteration is a gradient step. Two
iterations in a row without progress (a failed search, or a decrease of f within STALL
float epsilons of |f|) mean a minimum to float precision (`converged`, as minFunc's progTol
stops it): every later step costs one evaluation (for its logs) and leaves the weights.

State besides the weights: the pairs, f and g at the current weights (an iteration whose
first trial is accepted costs one evaluation of J and dJ), and counters, all variables, so
checkpoints hold them and a resumed run computes the same iterates.

Distribution: `objective` returns J and dJ over the GLOBAL batch (the whole train split),
all-reduced, identical on every replica and worker (trainer/losses.py). The iteration runs
in cross-replica context on those values; each worker updates its own copies of the
variables. The scalars that steer control flow (g'd, ||g||_1, f(x + t d), s'y) are agreed
over all replicas first, so every worker takes the same branches and runs the same
collectives; like Keras's optimizers applying all-reduced gradients, the weights stay
identical across workers on identical hardware. The math does not depend on the replica
count (only the float32 rounding of the sums does).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from trainer import losses

ARMIJO = 1e-4  # sufficient decrease: f(x + t d) <= f(x) + ARMIJO t g'd
CURVATURE = 1e-10  # a pair is kept when s'y > CURVATURE * s's
MAX_TRIALS = 20  # line-search trials per iteration
STALL = 10  # a decrease of f below STALL * eps * |f| is no progress


def flatten(tensors: list) -> tf.Tensor:
    """[t_1, ..., t_k] of any shapes -> one float vector [sum of sizes], in that order."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def two_loop(g: tf.Tensor, s: tf.Tensor, y: tf.Tensor, newest: tf.Tensor, count: tf.Tensor):
    """-H g for the L-BFGS inverse-Hessian estimate H of `count` stored pairs.

    g: [P] gradient. s, y: [m, P] ring buffers of pairs; `newest` (int) indexes the newest,
    older ones precede it cyclically; count: pairs in use, 0..m. H0 = (s'y / y'y) I of the
    newest pair (I without pairs). Returns d [P].
    """
    m = tf.shape(s)[0]
    q = g
    alphas = tf.TensorArray(g.dtype, size=tf.maximum(count, 1))
    for i in tf.range(count):  # newest to oldest
        j = (newest - i) % m
        sj, yj = s[j], y[j]
        a = tf.tensordot(sj, q, 1) / tf.tensordot(yj, sj, 1)
        alphas = alphas.write(i, a)
        q -= a * yj
    gamma = tf.constant(1.0, g.dtype)
    if count > 0:
        gamma = tf.tensordot(s[newest], y[newest], 1) / tf.tensordot(y[newest], y[newest], 1)
    r = gamma * q
    for i in tf.range(count - 1, -1, -1):  # oldest to newest
        j = (newest - i) % m
        sj, yj = s[j], y[j]
        b = tf.tensordot(yj, r, 1) / tf.tensordot(yj, sj, 1)
        r += (alphas.read(i) - b) * sj
    return -r


def _agree(values: tf.Tensor) -> tf.Tensor:
    """The mean over replicas of a value every replica holds (cross-replica context): equal
    bits on every worker, whatever each computed locally."""
    strategy = tf.distribute.get_strategy()

    def replica():
        return losses.all_reduce_sum(tf.identity(values))

    total = strategy.experimental_local_results(strategy.run(replica))[0]
    return total / tf.cast(strategy.num_replicas_in_sync, values.dtype)


class LBFGS(tf.Module):
    """L-BFGS state over `params` (see the module docstring); create in strategy.scope()."""

    def __init__(self, params: list, memory: int, name: str = "lbfgs"):
        super().__init__(name=name)
        self.params = list(params)
        self._sizes = [int(tf.size(p)) for p in self.params]
        size = sum(self._sizes)
        dtype = self.params[0].dtype

        def state(value, name):
            return tf.Variable(value, trainable=False, name=name)

        self.s = state(tf.zeros([memory, size], dtype), "s")
        self.y = state(tf.zeros([memory, size], dtype), "y")
        self.pairs = state(tf.constant(0, tf.int64), "pairs")  # stored since the last reset
        self.loss = state(tf.constant(0.0, dtype), "loss")  # f at the current weights
        self.grad = state(tf.zeros([size], dtype), "grad")  # g at the current weights
        self.fresh = state(tf.constant(False), "fresh")  # loss/grad hold the current weights
        self.stalls = state(tf.constant(0, tf.int64), "stalls")  # iterations without progress
        self.iterations = state(tf.constant(0, tf.int64), "iterations")
        self.evaluations = state(tf.constant(0, tf.int64), "evaluations")
        self.learning_rate = state(tf.constant(0.0, dtype), "step_size")  # last accepted t

    @property
    def converged(self) -> tf.Tensor:
        """Two iterations in a row without progress (see the module docstring)."""
        return self.stalls >= 2

    def _assign(self, flat: tf.Tensor) -> None:
        for p, part in zip(self.params, tf.split(flat, self._sizes), strict=True):
            p.assign(tf.reshape(part, p.shape))

    def step(self, objective: Callable[[], tuple]):
        """One iteration. objective() -> (f [], g [P], aux) at the current weights, global
        values (see the module docstring); aux is any nest of tensors. Returns the aux of the
        accepted point (of the current one when no trial is accepted)."""
        if self.converged:  # one evaluation, for the aux (the logs); the weights stay
            self.evaluations.assign_add(1)
            _, _, aux = objective()
        else:
            aux = self._iterate(objective)
        self.iterations.assign_add(1)
        return aux

    def _iterate(self, objective: Callable[[], tuple]):
        dtype = self.grad.dtype
        m = tf.cast(tf.shape(self.s)[0], tf.int64)

        def evaluate():
            self.evaluations.assign_add(1)
            return objective()

        x = flatten(self.params)
        if not self.fresh:  # once per run: the first iteration of a fresh start
            f, g, _ = evaluate()
            self.loss.assign(f)
            self.grad.assign(g)
        f0, g0 = self.loss.read_value(), self.grad.read_value()
        count = tf.cast(tf.minimum(self.pairs, m), tf.int32)
        newest = tf.cast((self.pairs - 1) % m, tf.int32)
        d = two_loop(g0, self.s, self.y, newest, count)
        gtd, g_l1 = tf.unstack(
            _agree(tf.stack([tf.tensordot(g0, d, 1), tf.reduce_sum(tf.abs(g0))]))
        )
        if gtd >= 0.0:  # not a descent direction (round-off): restart from the gradient
            self.pairs.assign(0)
            d = -g0
            gtd = _agree(-tf.tensordot(g0, g0, 1))
        t = tf.constant(1.0, dtype)
        if self.pairs == 0:
            t = tf.minimum(t, 1.0 / g_l1)

        def trial(t):
            self._assign(x + t * d)
            f1, g1, aux1 = evaluate()
            return f1, g1, aux1, f1 <= f0 + ARMIJO * t * gtd  # False for NaN too

        f1, g1, aux1, accepted = trial(t)
        trials = 1
        while not accepted and trials < MAX_TRIALS:
            # Minimum of q(u) = f0 + gtd u + c u^2 through q(t) = f1 (c > 0 when rejected);
            # a NaN or Inf f1 (overflow far out) halves t instead.
            c = (f1 - f0 - gtd * t) / (t * t)
            u = -gtd / (2.0 * c)
            t = tf.where(tf.math.is_finite(u), tf.clip_by_value(u, 0.1 * t, 0.5 * t), 0.5 * t)
            f1, g1, aux1, accepted = trial(t)
            trials += 1
        if accepted:
            s_new, y_new = t * d, g1 - g0
            sy, ss = tf.unstack(
                _agree(tf.stack([tf.tensordot(s_new, y_new, 1), tf.tensordot(s_new, s_new, 1)]))
            )
            if sy > CURVATURE * ss:
                # A whole-matrix assign: MirroredVariables have no scatter update.
                slot = [[tf.cast(self.pairs % m, tf.int32)]]
                self.s.assign(tf.tensor_scatter_nd_update(self.s, slot, s_new[None]))
                self.y.assign(tf.tensor_scatter_nd_update(self.y, slot, y_new[None]))
                self.pairs.assign_add(1)
            self.loss.assign(f1)
            self.grad.assign(g1)
            self.learning_rate.assign(t)
            eps = tf.constant(np.finfo(dtype.as_numpy_dtype).eps, dtype)
            progress = f0 - f1 > STALL * eps * tf.abs(f0)
            self.stalls.assign(tf.where(progress, tf.constant(0, tf.int64), self.stalls + 1))
        else:  # the weights stay; the next iteration starts from the gradient
            self._assign(x)
            f1, g1, aux1 = evaluate()
            self.pairs.assign(0)
            self.stalls.assign_add(1)
        self.fresh.assign(True)
        return aux1
