"""The UFLDL sparse autoencoder as a Keras 3 model (TensorFlow backend).

The model takes uint8 images [b, H, W, C] (or a dict with an "image" entry) and
normalizes them itself, so an exported model takes what the records hold.
`sae train` runs `train_step` / `test_step` in its own loop (trainer/loop.py) under any
tf.distribute strategy (build the model inside `strategy.scope()`); the loss and gradients
do not depend on the replica count (see trainer/losses.py). The steps are plain Keras ones:
`compile` + `fit` / `evaluate` work too under the default strategy.

Precision (config.precision): "float32", or a Keras mixed policy ("mixed_float16",
"mixed_bfloat16") under which the matmuls and sigmoids run in 16 bits while the variables,
the normalized inputs, rho_hat, the KL term and the loss stay float32; float16 adds loss
scaling (`make_optimizer`). `normalize`, `encode` and `reconstruct` return float32 (or the
variable dtype) whatever the policy.

Logged by the train and test steps (means over the epoch or split, weighted by batch size):
  loss, reconstruction, weight_decay, sparsity, [l1_activity]   the cost and its terms
  mean_rho_hat                 mean over units of rho_hat_j
the test step also reports, over the whole split (from its metric state):
  dead_fraction                units with rho_hat_j < rho / 10
  saturated_fraction           units with rho_hat_j > 0.9 (on for almost every input)
  l0                           mean number of units per example with a_j > 0.5
                               (more on than off; scale-free for a sigmoid)
  fraction_variance_explained  1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, in the
                               normalized input space, mean(x) = the split's mean image
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from trainer import lbfgs, losses
from trainer.config import TrainConfig, dead_units

SATURATED_RHO_HAT = 0.9  # a unit is saturated when rho_hat_j > this
L0_THRESHOLD = 0.5  # an activation counts as "on" above this
# The message of train_step's check of the loss (tf.errors.InvalidArgumentError).
NONFINITE_LOSS = "sparse autoencoder loss"


def images_of(data):
    """The uint8 images from a batch: a tensor, an (images, ...) tuple or {"image": ...}."""
    if isinstance(data, (tuple, list)):
        data = data[0]
    if isinstance(data, dict):
        data = data["image"]
    return data


@keras.saving.register_keras_serializable(package="sae")
class SparseAutoencoder(keras.Model):
    """KL-sparse autoencoder (UFLDL / CS294A), one hidden layer.

    x = normalize(images) flattened to [m, n];  n = H*W*C, s = config.hidden
    a     = sigmoid(x W1 + b1)                  W1 [n, s], b1 [s]   (hidden code)
    x_hat = f(a W2 + b2)                        W2 [s, n] (W1^T if tied), b2 [n];
                                                f = sigmoid or identity (config.decoder)
    J = (1/m) sum_i 0.5 ||x_hat_i - x_i||^2     SUM over pixels, m = GLOBAL batch size
      + (lambda/2) (||W1||^2 + ||W2||^2)        kernels only
      + beta sum_j KL(rho || rho_hat_j)         rho_hat_j = (1/m) sum_i a_ij, PER UNIT
      [+ l1_activity (1/m) sum_i sum_j a_ij]    optional
    Init: W ~ U[-r, r], r = sqrt(6) / sqrt(n + s + 1); biases 0; seeded by config.seed.
    Optional BatchNormalization before or after the hidden sigmoid (config.batch_norm): with
    "after" the KL/L1 terms act on a and the decoder reads BN(a).
    """

    def __init__(self, config: TrainConfig, **kwargs):
        # An explicit dtype (tests pass "float64") wins over the config's precision.
        kwargs.setdefault("dtype", config.precision)
        super().__init__(name=kwargs.pop("name", "sparse_autoencoder"), **kwargs)
        self.config = config
        h, w, c = config.input_shape
        n, s = h * w * c, config.hidden
        self.num_inputs, self.num_hidden = n, s
        r = math.sqrt(6.0) / math.sqrt(n + s + 1)
        uniform = keras.initializers.RandomUniform

        self.w1 = self.add_weight((n, s), uniform(-r, r, seed=config.seed), name="w1")
        self.b1 = self.add_weight((s,), "zeros", name="b1")
        self.w2 = None
        if not config.tied_weights:
            self.w2 = self.add_weight((s, n), uniform(-r, r, seed=config.seed + 1), name="w2")
        self.b2 = self.add_weight((n,), "zeros", name="b2")
        self.batch_norm = None
        if config.batch_norm != "none":
            # synchronized: the batch statistics are those of the GLOBAL batch.
            self.batch_norm = keras.layers.BatchNormalization(
                synchronized=True, dtype=self.dtype_policy, name="batch_norm"
            )
            self.batch_norm.build((None, s))

        # Written identically by every replica (all-reduced values): keep the first's.
        state = dict(trainable=False, aggregation="only_first_replica", initializer="zeros")
        if config.normalization == "ufldl_patches":
            # Running pooled moments of mean-removed pixels over all training batches.
            self.pixel_sq_sum = self.add_weight((), dtype="float64", name="pixel_sq_sum", **state)
            self.pixel_count = self.add_weight((), dtype="float64", name="pixel_count", **state)
        if config.zca_epsilon > 0:
            # Set once by `fit_zca` before training; the identity until then.
            self.zca_mean = self.add_weight((n,), name="zca_mean", **state)
            self.zca_matrix = self.add_weight(
                (n, n), name="zca_matrix", **{**state, "initializer": "identity"}
            )
        if config.rho_hat_momentum > 0:
            self.rho_hat_ema = self.add_weight((s,), name="rho_hat_ema", **state)
            self.rho_hat_steps = self.add_weight((), name="rho_hat_steps", **state)

        # Means over steps weighted by batch size; over an eval split, mean_rho_hat's weighted
        # mean of batch means is exactly the mean over units of the split's rho_hat.
        names = ["loss", "reconstruction", "weight_decay", "sparsity", "mean_rho_hat"]
        if config.l1_activity > 0:
            names.insert(4, "l1_activity")
        self.trackers = {k: keras.metrics.Mean(name=k) for k in names}
        self.unit_stats = UnitStatistics(n, s, config.rho)
        self.built = True

    # -- forward --------------------------------------------------------------------------

    def normalize(self, images, training: bool = False) -> tf.Tensor:
        """uint8 [b, H, W, C] -> model inputs x [b, H, W, C] (variable dtype), per config."""
        images = images_of(images)
        dtype = self.dtype_policy.variable_dtype
        if self.config.normalization == "unit":
            x = losses.unit_normalize(images, dtype)
            if self.config.zca_epsilon > 0:
                flat = tf.reshape(x, [-1, self.num_inputs]) - self.zca_mean
                x = tf.reshape(tf.matmul(flat, self.zca_matrix), tf.shape(x))
            return x
        centered = losses.centered(images, dtype)
        batch_sq, batch_count = losses.centered_moments(centered)
        sq, count = self.pixel_sq_sum, self.pixel_count
        if training:  # fold this global batch into the running whole-set estimate
            sq, count = sq + batch_sq, count + batch_count
            self.pixel_sq_sum.assign(sq)
            self.pixel_count.assign(count)
        else:  # before any training there is no estimate: use this batch's std
            untrained = tf.equal(count, 0.0)
            sq = tf.where(untrained, batch_sq, sq)
            count = tf.where(untrained, batch_count, count)
        return losses.ufldl_rescale(centered, std=tf.sqrt(sq / count))

    def fit_zca(self, images) -> None:
        """Sets the ZCA whitening from uint8 samples [N, H, W, C] (config.zca_epsilon > 0).

        UFLDL's linear-decoder exercise: mean = the mean input, Sigma = the covariance of
        x - mean, U diag(lambda) U^T = Sigma, Z = U diag(1 / sqrt(lambda + eps)) U^T
        (symmetric, so rows or columns alike). In float64 NumPy: one eigendecomposition.
        """
        import numpy as np

        x = tf.reshape(losses.unit_normalize(images_of(images), tf.float64), [-1, self.num_inputs])
        x = x.numpy()
        mean = x.mean(axis=0)
        centred = x - mean
        lam, u = np.linalg.eigh(centred.T @ centred / len(x))
        zca = (u / np.sqrt(np.maximum(lam, 0.0) + self.config.zca_epsilon)) @ u.T
        self.zca_mean.assign(mean.astype(self.zca_mean.dtype))
        self.zca_matrix.assign(zca.astype(self.zca_matrix.dtype))

    def _forward(self, images, training: bool):
        """Returns x [m, n], a [m, s] (sigmoid outputs), x_hat [m, n], all in the variable
        dtype; in between, the compute dtype (16 bits under a mixed policy)."""
        x = tf.reshape(self.normalize(images, training), [-1, self.num_inputs])
        c = self.compute_dtype
        w1 = tf.cast(self.w1, c)
        z = tf.matmul(tf.cast(x, c), w1) + tf.cast(self.b1, c)
        if self.config.batch_norm == "before":
            z = self.batch_norm(z, training=training)
        a = tf.sigmoid(z)
        d = self.batch_norm(a, training=training) if self.config.batch_norm == "after" else a
        w2 = tf.transpose(w1) if self.w2 is None else tf.cast(self.w2, c)
        out = tf.matmul(d, w2) + tf.cast(self.b2, c)
        x_hat = tf.sigmoid(out) if self.config.decoder == "sigmoid" else out
        return x, tf.cast(a, x.dtype), tf.cast(x_hat, x.dtype)

    def call(self, images, training: bool = False) -> tf.Tensor:
        """uint8 images -> reconstructions [b, H, W, C] in the normalized input space."""
        _, _, x_hat = self._forward(images, training)
        return tf.reshape(x_hat, [-1, *self.config.input_shape])

    def encode(self, images) -> tf.Tensor:
        """uint8 [b, H, W, C] (or {"image": ...}) -> hidden activations a [b, s] in (0, 1)."""
        return self._forward(images, training=False)[1]

    def reconstruct(self, images) -> tf.Tensor:
        """uint8 [b, H, W, C] -> x_hat [b, H, W, C] float, in the space of `normalize(images)`."""
        return self(images, training=False)

    def kernels(self) -> list:
        """The weight matrices the weight decay acts on: [W1, W2] (W1 twice when tied)."""
        return [self.w1, self.w1 if self.w2 is None else self.w2]

    # -- cost -----------------------------------------------------------------------------

    def cost(self, images, training: bool = False):
        """The cost of this replica's slice of the global batch.

        Returns (replica_loss [], CostTerms over the global batch, rho_hat [s] of the global
        batch, (x [m, n], a [m, s], x_hat [m, n]) of this replica, global batch size []).
        Differentiate replica_loss (see trainer/losses.py). In training mode this also updates
        the running normalization statistics and the rho_hat moving average, if enabled.
        """
        cfg = self.config
        x, a, x_hat = self._forward(images, training)
        rho_hat, count = losses.global_rho_hat(a)
        kl_rho_hat = rho_hat
        if training and cfg.rho_hat_momentum > 0:
            # Bias-corrected EMA, as in Adam: step 1 uses the batch value exactly.
            mom = cfg.rho_hat_momentum
            steps = self.rho_hat_steps + 1.0
            ema = mom * self.rho_hat_ema + (1.0 - mom) * rho_hat
            kl_rho_hat = ema / (1.0 - tf.pow(tf.constant(mom, ema.dtype), steps))
            self.rho_hat_ema.assign(tf.stop_gradient(ema))
            self.rho_hat_steps.assign(steps)
        replica_loss, terms = losses.sparse_autoencoder_cost(
            x, x_hat, a, self.kernels(), rho=cfg.rho, beta=cfg.beta,
            weight_decay=cfg.weight_decay, l1_activity=cfg.l1_activity, eps=cfg.eps,
            rho_hat=kl_rho_hat, count=count,
        )  # fmt: skip
        return replica_loss, terms, rho_hat, (x, a, x_hat), count

    @tf.autograph.experimental.do_not_convert
    def record(self, terms: losses.CostTerms, rho_hat, count) -> dict:
        """Adds a step's global cost terms to the running means (replica context); returns
        the means."""
        values = {
            "loss": terms.total,
            "reconstruction": terms.reconstruction,
            "weight_decay": terms.weight_decay,
            "sparsity": terms.sparsity,
            "l1_activity": terms.l1,
            "mean_rho_hat": tf.reduce_mean(rho_hat),
        }
        # Every replica adds the same global values, so each replica's mean is the global one.
        for name, tracker in self.trackers.items():
            tracker.update_state(values[name], sample_weight=count)
        return {name: t.result() for name, t in self.trackers.items()}

    @tf.autograph.experimental.do_not_convert
    def train_step(self, data):
        images = images_of(data)
        with tf.GradientTape() as tape:
            replica_loss, terms, rho_hat, _, count = self.cost(images, training=True)
            # The identity, except under float16's LossScaleOptimizer (which unscales).
            scaled_loss = self.optimizer.scale_loss(replica_loss)
        tf.debugging.check_numerics(terms.total, NONFINITE_LOSS)
        # Keras's optimizer all-reduces (SUMs) these over replicas before applying them.
        grads = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return self.record(terms, rho_hat, count)

    @tf.autograph.experimental.do_not_convert
    def objective(self, data):
        """The full-batch objective of `trainer.lbfgs`, in replica context: (J [], dJ [P]
        flattened in `trainable_variables` order, (CostTerms, rho_hat [s], count [])), all over
        the GLOBAL batch and identical on every replica. The replica gradients sum to dJ
        (trainer/losses.py), so their all-reduced sum is it."""
        images = images_of(data)
        with tf.GradientTape() as tape:
            replica_loss, terms, rho_hat, _, count = self.cost(images, training=True)
        grads = tape.gradient(replica_loss, self.trainable_variables)
        loss, grad = losses.all_reduce_sum([replica_loss, lbfgs.flatten(grads)])
        return loss, grad, (terms, rho_hat, count)

    @tf.autograph.experimental.do_not_convert
    def test_step(self, data):
        images = images_of(data)
        _, terms, rho_hat, (x, a, x_hat), count = self.cost(images, training=False)
        logs = self.record(terms, rho_hat, count)
        self.unit_stats.update_state(x, a, x_hat)
        return {**logs, **self.unit_stats.result()}

    @property
    def metrics(self):
        return [*self.trackers.values(), self.unit_stats]

    def unit_rho_hat(self) -> tf.Tensor:
        """rho_hat_j [s] over everything the test step saw since the metrics' last reset."""
        return self.unit_stats.unit_rho_hat()

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(TrainConfig.from_dict(config["config"]), name=config.get("name"))


class UnitStatistics(keras.metrics.Metric):
    """Sums over a split, all-reduced per batch: every replica holds the global sums.

    State (float64): examples, per-unit activation sums [s], activations above
    L0_THRESHOLD, squared reconstruction error, per-input sums [n] and the sum of squares of
    the inputs (for the variance about the split's mean image).
    """

    def __init__(self, num_inputs: int, num_hidden: int, rho: float, name="unit_statistics"):
        super().__init__(name=name, dtype="float64")
        self.rho = rho

        def var(shape, name):
            return self.add_variable(shape, "zeros", dtype="float64", name=name)

        self.count = var((), "count")
        self.unit_sum = var((num_hidden,), "unit_sum")
        self.active = var((), "active")
        self.sq_error = var((), "sq_error")
        self.x_sum = var((num_inputs,), "x_sum")
        self.x_sq_sum = var((), "x_sq_sum")
        self._state = [self.count, self.unit_sum, self.active, self.sq_error, self.x_sum,
                       self.x_sq_sum]  # fmt: skip

    def update_state(self, x, a, x_hat):
        """x, x_hat: [m, n]; a: [m, s] (this replica's slice)."""
        x, a, x_hat = (tf.cast(t, tf.float64) for t in (x, a, x_hat))
        batch = [
            tf.cast(tf.shape(x)[0], tf.float64),
            tf.reduce_sum(a, axis=0),
            tf.reduce_sum(tf.cast(a > L0_THRESHOLD, tf.float64)),
            tf.reduce_sum(tf.square(x_hat - x)),
            tf.reduce_sum(x, axis=0),
            tf.reduce_sum(tf.square(x)),
        ]
        for v, b in zip(self._state, losses.all_reduce_sum(batch), strict=True):
            v.assign_add(b)

    def unit_rho_hat(self) -> tf.Tensor:
        return tf.math.divide_no_nan(self.unit_sum, self.count)

    def result(self) -> dict:
        rho_hat = self.unit_rho_hat()
        variance = self.x_sq_sum - tf.reduce_sum(tf.square(self.x_sum)) / tf.maximum(self.count, 1)
        return {
            "dead_fraction": _fraction(dead_units(rho_hat, self.rho)),
            "saturated_fraction": _fraction(rho_hat > SATURATED_RHO_HAT),
            "l0": tf.math.divide_no_nan(self.active, self.count),
            "fraction_variance_explained": 1.0 - tf.math.divide_no_nan(self.sq_error, variance),
        }

    def reset_state(self):
        for v in self._state:
            v.assign(tf.zeros_like(v))


def _fraction(mask: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.cast(mask, tf.float64))


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """The optimizer named by the config (create it inside the strategy's scope); under
    mixed_float16 wrapped in Keras's LossScaleOptimizer (dynamic loss scaling), which skips
    the update of a step whose scaled gradients overflow. Not for "lbfgs", which is no
    Keras optimizer: `sae train` makes a `trainer.lbfgs.LBFGS` over the model's weights."""
    if config.optimizer == "lbfgs":
        raise ValueError("optimizer=lbfgs: use trainer.lbfgs.LBFGS(model.trainable_variables)")
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(config.learning_rate)
    else:
        optimizer = keras.optimizers.Adam(config.learning_rate)
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_model(config: TrainConfig, steps_per_execution: int = 1) -> SparseAutoencoder:
    """A compiled SparseAutoencoder (for Keras's own `fit` / `evaluate`, e.g. under the
    default strategy); call inside `strategy.scope()` to distribute it. `sae train` runs
    its own loop instead (trainer/loop.py), with a model compiled by `compile_model`."""
    model = SparseAutoencoder(config)
    compile_model(model, make_optimizer(config), steps_per_execution)
    return model


def compile_model(model: SparseAutoencoder, optimizer, steps_per_execution: int = 1) -> None:
    """Compiles `model` with `optimizer` (this only attaches them); inside the strategy's scope."""
    # No XLA: Keras's "auto" turns it on whenever a GPU is present, and XLA cannot compile a
    # step whose batch dict carries string keys; measured on 2 CPU cores, XLA also made the
    # 64 -> 25 step slower once several steps run per call.
    model.compile(optimizer=optimizer, jit_compile=False, steps_per_execution=steps_per_execution)
