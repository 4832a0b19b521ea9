"""The training loop of `sae train`, written out (Orbit-style) on public TensorFlow/Keras API.

    result = loop.run(model, strategy, cfg, stream=..., eval_dataset=..., manager=..., ...)
    metrics = loop.evaluate_metrics(model, eval_dataset)        # the final, whole-split values

One compiled call runs `num_steps` training steps: a `tf.range` loop of
`strategy.run(model.train_step)` inside a `tf.function`, `num_steps` a tensor (one trace for
every call length). Between calls, in Python: the SIGTERM check, progress lines, per-step
scalars, and at step boundaries that no call straddles (epoch ends, every
`checkpoint_every_steps`, the last step) the epoch scalars, the evaluation and the checkpoint.
Evaluation is a plain distributed loop over the eval batches, also one `tf.function`.

AutoGraph (Python control flow on tensors -> graph ops) converts only what needs it: the
training call's `tf.range` loop and the L-BFGS step (trainer/lbfgs.py). The model's steps
are marked `do_not_convert` and the other functions here, the export's signatures and the
pooled encoder are `autograph=False`: their branches are on Python values, and converting
them and the Keras code below them cost 3.5 s of every `sae train` start-up (9.5 s -> 6.0 s
after the imports for --preset tiny, measured 2026-12-02).

Multi-worker: every worker must make the same calls (they run collectives), so every
decision is a function of the step, except three that are not: SIGTERM and the seconds
cadences. Those are requests each worker passes into its next call, where they are summed
over all replicas; all workers act on the sum after that call. A SIGTERM to any worker stops
all of them at the same step, each after saving.

Checkpoints: `tf.train.CheckpointManager` numbered by the step (the loop's own counter
`step`, in the checkpoint: an optimizer skipping an overflowing float16 step does not count
it, but that step consumed its batch). Every worker saves (the other workers into their
scratch folder); only the chief writes TensorBoard events:
  WORKDIR/tensorboard/train/       epoch_<term> (the epoch's means), epoch_learning_rate,
                                   epoch_seconds (from the previous epoch's end: its
                                   evaluation and checkpoint included), epoch_training_share
                                   (the part of them inside training calls)
                  validation/      epoch_<term>, epoch_dead_fraction, ... of each evaluation
                                   (loss and sparsity over the whole split, as in
                                   metrics.json; epoch_*_batch_mean: means of batch values)
                  units/           batch_<term> (the epoch's running means, every log_every_steps),
                                   eval_rho_hat (histogram) and filters (image) per evaluation
train/ and validation/ are at x = the epoch index (the layout of Keras's TensorBoard
callback, which `pipeline.curves` reads); units/ at x = the step, so a resumed run continues
its curves.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorboard.plugins.image import metadata as image_metadata

from preprocessing.manifest import join
from trainer import lbfgs, losses, visualize
from trainer.model import NONFINITE_LOSS, images_of

# Requests a worker passes into a call, summed over replicas (see the module docstring).
STOP, CHECKPOINT, EVALUATE = range(3)


# ----------------------------------------------------------------------------
# The compiled functions.
# ----------------------------------------------------------------------------
def _first_local(strategy: tf.distribute.Strategy, values: dict) -> dict:
    # Every replica computed the same global values: keep the first local one.
    return {k: strategy.experimental_local_results(v)[0] for k, v in values.items()}


def train_function(model, strategy: tf.distribute.Strategy, optimizer=None):
    """`train(iterator, num_steps, requests) -> (logs, agreed)`: runs num_steps >= 1 steps of
    `model.train_step` on the distributed iterator, or with an `lbfgs.LBFGS` optimizer
    num_steps L-BFGS iterations, each on one (full) batch. requests: float32 [3], this
    worker's (STOP, CHECKPOINT, EVALUATE) flags; agreed: bool [3], whether any worker raised
    each. logs: after the last step, the running means since the metrics' last reset."""

    def keras_step(iterator):
        return _first_local(strategy, strategy.run(model.train_step, args=(next(iterator),)))

    def first(value):
        return strategy.experimental_local_results(value)[0]

    def lbfgs_step(iterator):
        batch = next(iterator)

        def objective():
            return tf.nest.map_structure(first, strategy.run(model.objective, args=(batch,)))

        terms, rho_hat, count = optimizer.step(objective)
        tf.debugging.check_numerics(terms.total, NONFINITE_LOSS)
        return _first_local(strategy, strategy.run(model.record, args=(terms, rho_hat, count)))

    one_step = lbfgs_step if isinstance(optimizer, lbfgs.LBFGS) else keras_step

    def agree(requests):
        # identity: a copy on this replica's device (MirroredStrategy reduces nothing else).
        return losses.all_reduce_sum(tf.identity(requests))

    @tf.function
    def train(iterator, num_steps, requests):
        agreed = strategy.experimental_local_results(strategy.run(agree, args=(requests,)))[0]
        logs = one_step(iterator)
        for _ in tf.range(num_steps - 1):
            logs = one_step(iterator)
        return logs, agreed > 0

    return train


def eval_function(model, strategy: tf.distribute.Strategy):
    """`evaluate(batches) -> dict of NumPy values`: resets the model's metrics, runs
    `model.test_step` on every distributed batch (a distributed dataset, or a list of its
    batches kept in memory), and returns the split's logs plus `rho_hat` [s] and `examples`,
    the number of examples evaluated.

    One call per batch, not one for the whole split: iterating a dataset inside a
    tf.function builds its iterator on every call (0.3 s for the eval input pipeline here,
    more than one evaluation batch takes), while a list of batches in memory costs nothing
    to walk again."""

    def step(batch):
        model.test_step(batch)
        return losses.all_reduce_sum(tf.shape(images_of(batch), out_type=tf.int64)[0])

    @tf.function(reduce_retracing=True, autograph=False)
    def eval_batch(batch):
        return strategy.experimental_local_results(strategy.run(step, args=(batch,)))[0]

    def results():
        out = {name: t.result() for name, t in model.trackers.items()}
        out.update(model.unit_stats.result())
        out.update(rho_hat=model.unit_rho_hat())
        return out

    @tf.function(autograph=False)
    def read_results():
        # In replica context: each replica holds the global values.
        return _first_local(strategy, strategy.run(results))

    def evaluate(batches) -> dict:
        for m in model.metrics:
            m.reset_state()
        # Counted here: a metric's variables are per replica, and how a read adds them up
        # depends on the context; the ratios the metrics report do not.
        examples = sum(int(eval_batch(batch)) for batch in batches)
        return {**{k: v.numpy() for k, v in read_results().items()}, "examples": examples}

    return evaluate


def evaluate_metrics(model, dataset, evaluate=None) -> dict:
    """Eval values over all of the (finite) `dataset`, as plain floats, and "rho_hat" [s].

    Keys: loss, reconstruction, weight_decay, sparsity, [l1_activity], mean_rho_hat,
    dead_fraction, saturated_fraction, l0, fraction_variance_explained, eval_examples,
    loss_batch_mean, sparsity_batch_mean, rho_hat (NumPy).

    `sparsity` and `loss` are UFLDL's J over the whole split: the KL term of the split's
    rho_hat (its mean activations), so they do not depend on the eval batch size. The KL
    of a mean is not the mean of batch KLs (it is convex in rho_hat): the mean over
    batches, each with its own rho_hat, is kept as `*_batch_mean`. The other terms are
    linear in the examples, so their example-weighted batch means are the split's values.
    `evaluate`: an `eval_function` to reuse (one is made for the model's strategy).
    """
    strategy = model.distribute_strategy
    evaluate = evaluate or eval_function(model, strategy)
    out = whole_split(model.config, evaluate(strategy.experimental_distribute_dataset(dataset)))
    out["eval_examples"] = int(out.pop("examples"))
    return out


def whole_split(cfg, logs: dict) -> dict:
    """An `eval_function` result with `sparsity` and `loss` made the split's (see
    `evaluate_metrics`) and the batch means kept as `*_batch_mean`; values as floats,
    rho_hat [s] as it is."""
    out = {k: v if k == "rho_hat" else float(v) for k, v in logs.items()}
    rho_hat = tf.constant(out["rho_hat"], tf.float64)
    kl = tf.reduce_sum(losses.kl_divergence(cfg.rho, rho_hat, cfg.eps))
    out["loss_batch_mean"] = out["loss"]
    out["sparsity_batch_mean"] = out["sparsity"]
    out["sparsity"] = cfg.beta * float(kl)
    linear = ("reconstruction", "weight_decay", "l1_activity")
    out["loss"] = sum(out.get(k, 0.0) for k in linear) + out["sparsity"]
    return out


# ----------------------------------------------------------------------------
# SIGTERM: a flag, read between calls.
# ----------------------------------------------------------------------------
class _Stop:
    requested = False

    @classmethod
    def handler(cls, signum, frame):  # noqa: ARG003
        cls.requested = True


@contextlib.contextmanager
def _sigterm_flag():
    _Stop.requested = False
    previous = signal.signal(signal.SIGTERM, _Stop.handler)
    try:
        yield _Stop
    finally:
        signal.signal(signal.SIGTERM, previous)
        _Stop.requested = False


# ----------------------------------------------------------------------------
# TensorBoard (chief only).
# ----------------------------------------------------------------------------
FILTER_IMAGE_SIDE = 512  # TensorBoard's filter picture is enlarged to about this many pixels


def filter_image(w1: np.ndarray, image_shape) -> np.ndarray:
    """TensorBoard's filter picture: `visualize.filter_grid`, enlarged by a whole factor to
    about FILTER_IMAGE_SIDE pixels, never shrunk. Bounded, because the cost is per pixel:
    filters.png's 4x of 512 32x32 tiles is 9 million pixels, 1.3 s a picture on 2 cores."""
    grid = visualize.filter_grid(w1, image_shape, scale=1)
    scale = max(1, FILTER_IMAGE_SIDE // max(grid.shape[:2]))
    return visualize.enlarge(grid, scale)


def _compiled(writer, write):
    """`write(*tensors)` (summary ops) as one compiled call into `writer`, at a given step:
    eager summary ops cost about 0.7 ms each in Python dispatch, and the loop writes dozens
    per epoch between training calls."""

    @tf.function(reduce_retracing=True, autograph=False)
    def call(step, *args):
        with writer.as_default(step=step):
            write(*args)

    return lambda step, *args: call(tf.constant(step, tf.int64), *args)


_IMAGE_METADATA = image_metadata.create_summary_metadata(display_name=None, description=None)


def _write_scalars(values: dict) -> None:
    for name, value in values.items():
        tf.summary.scalar(name, value)


def _write_units(rho_hat, image) -> None:
    tf.summary.histogram("eval_rho_hat", rho_hat)
    # tf.summary.image's record, with the PNG at zlib level 1: smooth trained filters take
    # 57 ms at its default level (6) for 512 tiles of 32x32, 13 ms at level 1.
    png = tf.image.encode_png(image, compression=1)
    shape = tf.shape(image)
    size = [tf.as_string(shape[1]), tf.as_string(shape[0])]  # width, height
    tf.summary.write("filters", tf.stack([*size, png]), metadata=_IMAGE_METADATA)


class _Summaries:
    """The three TensorBoard runs; every method is a no-op without a folder (non-chief)."""

    def __init__(self, tb_dir: str | None):
        self.enabled = bool(tb_dir)
        names = ("train", "validation", "units") if self.enabled else ()
        self.writers = {n: tf.summary.create_file_writer(join(tb_dir, n)) for n in names}
        self._scalars = {n: _compiled(w, _write_scalars) for n, w in self.writers.items()}
        self._units = _compiled(self.writers["units"], _write_units) if self.enabled else None

    def scalars(self, run: str, prefix: str, values: dict, step: int) -> None:
        if not self.enabled:
            return
        # Tensors, not Python floats: a new float would be a new trace.
        tensors = {f"{prefix}{k}": tf.constant(v, tf.float32) for k, v in values.items()}
        self._scalars[run](step, tensors)

    def units(self, rho_hat: np.ndarray, w1: np.ndarray, image_shape, step: int) -> None:
        if not self.enabled:
            return
        self._units(step, tf.constant(rho_hat), tf.constant(filter_image(w1, image_shape)))

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def _line(values: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
class NonFiniteLoss(Exception):
    """The loss became NaN or Inf in one of the steps first..last (1-based, of one call)."""

    def __init__(self, first: int, last: int):
        super().__init__(f"the loss became NaN/Inf in steps {first}..{last}")
        self.first, self.last = first, last


@dataclass
class Result:
    step: int  # the step training stopped at (== total unless stopped)
    stopped: bool  # by SIGTERM (on any worker), after saving a checkpoint at `step`


def run(
    model,
    strategy: tf.distribute.Strategy,
    cfg,
    *,
    stream: tf.data.Dataset,
    eval_dataset: tf.data.Dataset,
    manager: tf.train.CheckpointManager,
    step_counter: tf.Variable,
    start_step: int,
    steps_per_epoch: int,
    tb_dir: str | None,
    verbose: int = 2,
    evaluate=None,
    keep_eval_in_memory: bool = False,
    optimizer=None,
) -> Result:
    """Trains from `start_step` to cfg.epochs * steps_per_epoch (see the module docstring).

    stream: the batches from start_step on (infinite); eval_dataset: the batches of one
    evaluation; evaluate: an `eval_function` to reuse (else one is made); step_counter: the
    checkpointed step variable (assigned before each save); keep_eval_in_memory: read the
    eval batches once and keep them (for eval sets that fit); optimizer: None for the model's
    compiled Keras optimizer, or an `lbfgs.LBFGS` (its epoch `learning_rate` scalar is the
    step size t it last accepted);
    tb_dir: the TensorBoard folder, None on non-chief workers; verbose: 0 silent, 1 a line
    every log_every_steps and per epoch, 2 a line per epoch. Raises NonFiniteLoss (from the
    check in `train_step` or after each L-BFGS iteration), else what the steps raise.
    """
    total = cfg.epochs * steps_per_epoch
    optimizer = optimizer or model.optimizer
    train = train_function(model, strategy, optimizer)
    evaluate = evaluate or eval_function(model, strategy)
    iterator = iter(strategy.experimental_distribute_dataset(stream))
    dist_eval = strategy.experimental_distribute_dataset(eval_dataset)
    if keep_eval_in_memory:
        dist_eval = list(dist_eval)  # read once; every evaluation walks the same batches
    summaries = _Summaries(tb_dir)
    every_ckpt, every_log = cfg.checkpoint_every_steps, cfg.log_every_steps
    clock = time.monotonic
    # An epoch's seconds run from the previous epoch's end (its scalars) to this one's, so
    # they hold the previous epoch's evaluation and checkpoint; in_steps: the part of them
    # spent inside training calls.
    last_save = last_eval = epoch_mark = clock()
    in_steps = 0.0
    step = start_step
    for m in model.metrics:
        m.reset_state()

    def save() -> None:
        nonlocal last_save
        step_counter.assign(step)
        manager.save(checkpoint_number=step)
        last_save = clock()

    with _sigterm_flag() as stop:
        try:
            while step < total:
                if verbose and step % steps_per_epoch == 0:
                    # Keras's form: tools match it (`sae k8s simulate --kill '1@/Epoch 3\//'`
                    # stops a worker once the epoch-2 checkpoint is saved).
                    print(f"Epoch {step // steps_per_epoch + 1}/{cfg.epochs}", flush=True)
                # The call ends at the next epoch end or checkpoint step, whichever is first.
                ends = [total, (step // steps_per_epoch + 1) * steps_per_epoch]
                ends.append(step + cfg.steps_per_execution)
                if every_ckpt:
                    ends.append((step // every_ckpt + 1) * every_ckpt)
                num_steps = min(ends) - step
                requests = np.zeros(3, np.float32)
                requests[STOP] = stop.requested
                secs = cfg.checkpoint_every_seconds
                requests[CHECKPOINT] = bool(secs) and clock() - last_save >= secs
                secs = cfg.eval_every_seconds
                requests[EVALUATE] = bool(secs) and clock() - last_eval >= secs
                called = clock()
                try:
                    logs, agreed = train(iterator, tf.constant(num_steps), tf.constant(requests))
                    agreed = agreed.numpy()
                except tf.errors.InvalidArgumentError as e:
                    if NONFINITE_LOSS not in e.message:
                        raise
                    raise NonFiniteLoss(step + 1, step + num_steps) from None
                before, step = step, step + num_steps
                in_steps += clock() - called

                means = {k: float(v) for k, v in logs.items()}
                if every_log and step // every_log > before // every_log:
                    summaries.scalars("units", "batch_", means, step)
                    if verbose == 1:
                        print(f"train: step {step}/{total}: {_line(means)}", flush=True)

                if step % steps_per_epoch == 0:
                    epoch = step // steps_per_epoch - 1
                    lr = float(tf.convert_to_tensor(optimizer.learning_rate))
                    now = clock()
                    seconds = now - epoch_mark
                    timing = {"seconds": seconds, "training_share": in_steps / seconds}
                    epoch_mark, in_steps = now, 0.0
                    values = {**means, "learning_rate": lr, **timing}
                    summaries.scalars("train", "epoch_", values, epoch)
                    line = f"train: epoch {epoch + 1}/{cfg.epochs}, step {step}: {_line(means)}"
                    if not cfg.eval_every_seconds or agreed[EVALUATE] or step == total:
                        ev = whole_split(cfg, evaluate(dist_eval))
                        rho_hat = ev.pop("rho_hat")
                        ev.pop("examples")
                        summaries.scalars("validation", "epoch_", ev, epoch)
                        summaries.units(rho_hat, model.w1.numpy(), cfg.input_shape, step)
                        last_eval = clock()
                        line += f"; eval loss {ev['loss']:.4g}"
                    if isinstance(optimizer, lbfgs.LBFGS) and bool(optimizer.converged):
                        line += "; L-BFGS converged (the weights no longer change)"
                    for m in model.metrics:
                        m.reset_state()
                    if verbose:
                        share = f"{timing['training_share']:.0%} in training steps"
                        print(f"{line} ({seconds:.1f} s, {share})", flush=True)

                epoch_end = step % steps_per_epoch == 0 and not cfg.checkpoint_every_seconds
                if (
                    agreed[STOP]
                    or agreed[CHECKPOINT]
                    or epoch_end
                    or step == total
                    or (every_ckpt and step % every_ckpt == 0)
                ):
                    save()
                if agreed[STOP]:
                    return Result(step, stopped=True)
        finally:
            summaries.close()
    return Result(step, stopped=False)
