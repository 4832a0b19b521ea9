"""The training config: one frozen dataclass, named presets, `key=value` overrides.

    cfg = apply_overrides(preset("mnist"), ["hidden=200", "global_batch_size=512"])

Every construction path (presets, overrides, `from_dict` on a run's config.json)
goes through `TrainConfig.__post_init__`, so an invalid value never reaches the
trainer. Errors are `UserError`s that name the key and the valid values.

Presets (`sae train --data DATASET --workdir RUN --preset NAME [--set key=value ...]`):
  tiny             8x8x1 -> 16, a few steps; for tests and smoke runs (seconds).
  digits           scikit-learn's 1,797 8x8 digits, 64 -> 100 (overcomplete, as UFLDL's
                   self-taught MNIST features), 1,200 Adam steps: 4 s of training on 2 CPU cores.
                   The loss falls below 1, rho_hat_j is about 0.1 for every unit (none dead),
                   about 85% of the variance is explained, and a linear probe on the sparse
                   features is as accurate as on the raw pixels (README).
  mnist            The UFLDL exercise: 28x28 MNIST, 784 -> 196, rho 0.1, lambda 3e-3, beta 3
                   (pixels / 255); 12,000 Adam steps at 3e-3, global batch 256, about 800
                   passes over builtin:mnist's 3,748 train images (--eval-fraction 0.25).
                   Measured 2026-12-02 on 2 CPU cores: 74 s of training, eval J 13.1, mean
                   rho_hat 0.107, no dead units, 70% of the variance explained; the filters are
                   pen strokes (bars, arcs, hooks) with a few whole-digit templates left
                   (README). Training longer is what made them strokes: at 3,000 steps (eval J
                   14.0) most were templates, and 24,000 steps (eval J 12.9) look like 12,000.
                   Tried and not better (2026-12-02, SciPy L-BFGS, 200-400 iterations on all
                   5,000 images): lambda 1e-2 or rho 0.05 give cleaner whole-digit templates,
                   lambda 1e-3 / 3e-4 or rho 0.2 noisier mixes, tied weights digit outlines
                   with strokes inside, a linear decoder noisy tiles. Full-batch L-BFGS
                   (`--set optimizer=lbfgs --set epochs=4 --set steps_per_epoch=50`: 200
                   iterations, 29 s of training) reaches a lower J sooner (eval 12.96) but
                   leaves more whole-digit outlines than Adam's minibatch noise does.
  mnist-conv       8x8 windows of builtin:mnist (patch_size 8), 64 -> 400, rho 0.05, beta 3,
                   lambda 3e-3, ZCA whitening with epsilon 1 and the linear decoder (UFLDL's
                   linear-decoder exercise), Adam at 1e-2; 3,000 steps at global batch 1024 (one
                   random window per image per step). Measured 2026-12-01 (`make demo`, 2 shared
                   cores: 1 min 19 s end to end when quiet, 6 min 18 s at load 6 to 12; README):
                   eval mean rho_hat 0.050 (every unit's between 0.049 and 0.055), no dead
                   units, 82% of the variance explained; the filters are pen-stroke pieces
                   (arcs, bars, corners) in every tile. Pooled with
                   `--pool 2x2` the features reach 0.972 linear-probe accuracy on the 1,252 eval
                   images (0.966 with 3x3; the noise-filter preset had 0.971 and 0.982). Why
                   this and not the earlier settings: on pixels / 255 (not centred)
                   the units sat on a plateau near 18% of the variance explained for the first
                   1,500 steps, firing at rho through their biases, and lambda 1e-4 left most of
                   them noise (86% explained, noise-like tiles); lambda 3e-3 on uncentred pixels
                   never left the plateau in 1,500 steps (20%). The whitening (epsilon 1 is
                   mostly centring: it keeps the filters smooth, 0.1 gave high-frequency noise)
                   removes the plateau, so lambda can be UFLDL's; lambda 1e-2 gave smoother
                   blobs, 60% explained and a 0.967 probe.
  natural-patches  The UFLDL sparseae exercise: 10k random 8x8 patches of natural images,
                   64 -> 25, rho 0.01, lambda 1e-4, beta 3, `ufldl_patches` normalization,
                   sigmoid decoder; 10k Adam steps on 10k patches (under a minute on 2 CPU
                   cores). Expected: oriented edge detectors (README: on the whitened built-in
                   photos, eval mean rho_hat 0.013, 55% of the variance explained). On the
                   unwhitened builtin:natural-images (--eval-fraction 0.2) the filters are
                   blurrier oriented edges and gradients; the training batches' mean rho_hat
                   ends near 0.011, while the held-out photo gets 0.004 and 28% of its
                   variance explained (measured 2026-11-27).
                   The same from the whole photographs, no patches cut beforehand:
                   `--set patch_size=8 --set patches_per_image=125` on the photos resized
                   to 512x512 (125 windows of each of 8 photos per step; README): the same
                   oriented edges, eval mean rho_hat 0.0127, 62% explained (2026-12-02).
                   The alternative for mean-removed or whitened data
                   that is not squashed into [0.1, 0.9] is the linear decoder:
                   `--set decoder=linear` (UFLDL's linear-decoder exercise).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from preprocessing.errors import UserError

Decoder = Literal["sigmoid", "linear"]
BatchNorm = Literal["none", "before", "after"]
Normalization = Literal["unit", "ufldl_patches"]
Optimizer = Literal["adam", "sgd", "lbfgs"]
Precision = Literal["float32", "mixed_float16", "mixed_bfloat16"]


# A unit is dead when its mean activation over a split is below DEAD_FACTOR * rho.
DEAD_FACTOR = 0.1


def dead_units(rho_hat, rho: float):
    """rho_hat [s] (NumPy or TF: mean activation of each unit over a split) -> bool [s]:
    the units that (almost) never fire, as every report and gate counts them."""
    return rho_hat < DEAD_FACTOR * rho


@dataclass(frozen=True)
class TrainConfig:
    # Image shape (H, W, C) the model expects. Must equal the dataset manifest's image_shape
    # (the trainer checks and fails with both shapes in the message).
    input_shape: tuple[int, int, int] = (8, 8, 1)
    # Number of hidden units s (the code length).
    hidden: int = 25
    # Output nonlinearity f of x_hat = f(W2 a + b2): "sigmoid" for data in [0, 1], "linear"
    # (identity) for mean-removed or whitened data (UFLDL's linear decoder).
    decoder: Decoder = "sigmoid"
    # Target mean activation of every hidden unit (sparsity target), in (0, 1).
    rho: float = 0.1
    # Weight of the sparsity penalty beta * sum_j KL(rho || rho_hat_j).
    beta: float = 3.0
    # lambda of the weight decay (lambda / 2) * (||W1||^2 + ||W2||^2); kernels only, never biases.
    weight_decay: float = 3e-3
    # Tied weights: W2 = W1^T (one matrix). The weight decay still reads ||W1||^2 + ||W2||^2,
    # i.e. lambda * ||W1||^2, so the cost is the UFLDL cost with W2 substituted.
    tied_weights: bool = False
    # Article variant, off by default: adds l1_activity * (1/m) sum_i sum_j |a_ij| (per example,
    # summed over units, averaged over the GLOBAL batch). Defined explicitly because Keras 3
    # adds `activity_regularizer` losses unscaled (a sum over the batch) while tf.keras 2 divided
    # them by the batch size, so the same coefficient meant different things in the two.
    l1_activity: float = 0.0
    # Article variant, off by default: BatchNormalization (synchronized across replicas) on the
    # hidden pre-activations ("before" the sigmoid) or on the activations ("after" it). With
    # "after" the KL and L1 terms still act on the sigmoid outputs a (the features); the
    # decoder reads BN(a).
    batch_norm: BatchNorm = "none"
    # Off (0) = exact UFLDL: rho_hat is the mean over this step's global batch. In (0, 1): the
    # KL term uses a bias-corrected exponential moving average of rho_hat over steps with this
    # momentum (the current batch enters with weight 1 - momentum, and the gradient flows only
    # through it). It smooths minibatch noise; UFLDL's full-batch L-BFGS had none. Evaluation
    # always uses the batch's own rho_hat.
    rho_hat_momentum: float = 0.0
    # How uint8 pixels become model inputs (inside the model, so the export takes uint8):
    #   "unit":          x = pixels / 255, in [0, 1].
    #   "ufldl_patches": UFLDL sampleIMAGES: remove each example's mean, clip to +-3 std, map
    #                    to [0.1, 0.9]. UFLDL took the std over the whole set; we take the pooled
    #                    std of the mean-removed pixels over all training batches seen so far
    #                    (all-reduced across replicas; it converges to the whole-set value and
    #                    needs nothing from the manifest). Inference uses the stored value.
    normalization: Normalization = "unit"
    # Train on random patch_size x patch_size windows of the dataset's images instead of whole
    # images (0 = off: the image is the model input). input_shape is then the window,
    # (K, K, C), and the images may be of any size >= K. Each step takes patches_per_image
    # windows of each image it reads, at offsets drawn by a stateless RNG from (seed, step), so the
    # stream stays a pure function of (dataset, seed) and resuming stays exact. The export's
    # `encode_map` then encodes every window of whole images (trainer/conv.py).
    patch_size: int = 0
    # Windows cut from every image a step reads (patch_size > 0): a step reads
    # global_batch_size / patches_per_image images (it must divide), so an epoch is a pass
    # over the images, not the windows. 1 suits many small images (MNIST); photos of
    # hundreds of pixels a side want hundreds, else every 8x8 window costs reading a whole
    # photo, and a collection of fewer photos than global_batch_size cannot train at all.
    patches_per_image: int = 1
    # ZCA whitening of the inputs after the `unit` normalization, as in UFLDL's linear-decoder
    # exercise: x' = (x - mean) U diag(1 / sqrt(lambda + zca_epsilon)) U^T, with mean, U and
    # lambda from the first ZCA_SAMPLES training inputs (trainer/train.py), stored in the model
    # (checkpoints, export). 0 = off. Whitened inputs are not in [0, 1]: use decoder=linear.
    zca_epsilon: float = 0.0
    # Optimizer: minibatch "adam" (the scalable default) or "sgd" at learning_rate, or
    # "lbfgs", UFLDL's full-batch L-BFGS (trainer/lbfgs.py): every step is one iteration on
    # the WHOLE train split (which must fit in memory, data.IN_MEMORY_BYTES), with its own
    # line search, so learning_rate is unused and global_batch_size only sizes the eval
    # batches and the ZCA sample. It needs the same cost at every step: whole images
    # (patch_size 0), rho_hat_momentum 0, and float32.
    optimizer: Optimizer = "adam"
    learning_rate: float = 1e-2
    # L-BFGS only: curvature pairs kept (minFunc's default is 100; each costs 2 x 4 bytes per
    # weight in memory and in every checkpoint).
    lbfgs_memory: int = 20
    # Examples per step over ALL replicas and workers; the per-replica batch is derived.
    global_batch_size: int = 256
    epochs: int = 10
    # Steps per epoch; 0 = one full pass over the train split.
    steps_per_epoch: int = 0
    # Save a checkpoint every this many steps, exactly (0 = only at the end of each epoch),
    # and at the end of every epoch.
    checkpoint_every_steps: int = 100
    # Also save when this many seconds have passed since the last save (0 = off): checked
    # between function calls; the workers of a multi-worker run agree on it (any worker's
    # clock can call for it). With it, epoch ends save only if checkpoint_every_steps or the
    # clock asks.
    checkpoint_every_seconds: float = 0.0
    # Eval batches per evaluation; 0 = the whole eval split.
    eval_batches: int = 0
    # The evaluation after an epoch (validation scalars, the eval rho_hat histogram, the filter
    # image in TensorBoard) runs at every epoch end (0), or only at epoch ends at least this
    # many seconds after the previous one (agreed across workers); the last epoch always
    # evaluates. steps_per_epoch is the cadence by steps.
    eval_every_seconds: float = 0.0
    # Per-step scalars (TensorBoard units/batch_*, and the progress line of --verbose 1) at the
    # first call boundary at or after every multiple of this many steps (0 = none).
    log_every_steps: int = 10
    # Up to this many steps run inside one TensorFlow function call: for small models the
    # per-call Python overhead costs more than the step itself. A call also ends at every
    # epoch end and checkpoint step, so nothing waits for a call to finish but the SIGTERM
    # check, the seconds cadences and the log lines (up to that many steps late).
    # 1 = one call per step. The math does not depend on it. (`execution_steps` picks a
    # divisor of the epoch for Keras's own `fit`, which needs one.)
    steps_per_execution: int = 32
    # Numeric precision of training: "float32", or a Keras mixed-precision policy for GPUs,
    # "mixed_bfloat16" (Ampere and later, TPUs; also runs on CPU) or "mixed_float16" (with
    # dynamic loss scaling): matmuls and sigmoids in 16 bits, while the variables, the
    # normalized inputs, rho_hat, the KL term and the loss stay float32. The export is float32.
    precision: Precision = "float32"
    # Seeds the weight initialization and the input shuffling.
    seed: int = 0
    # rho_hat is clipped to [eps, 1 - eps] before the logs of the KL term.
    eps: float = 1e-6

    def __post_init__(self) -> None:
        _coerce_and_check_types(self)
        c = self
        checks = [
            (
                len(c.input_shape) == 3 and all(d >= 1 for d in c.input_shape),
                "input_shape",
                "three positive sizes H,W,C, e.g. 28,28,1",
            ),
            (c.hidden >= 1, "hidden", "an integer >= 1"),
            (0.0 < c.rho < 1.0, "rho", "a float strictly between 0 and 1"),
            (c.beta >= 0.0, "beta", "a float >= 0"),
            (c.weight_decay >= 0.0, "weight_decay", "a float >= 0"),
            (c.l1_activity >= 0.0, "l1_activity", "a float >= 0"),
            (0.0 <= c.rho_hat_momentum < 1.0, "rho_hat_momentum", "a float in [0, 1)"),
            (c.learning_rate > 0.0, "learning_rate", "a float > 0"),
            (c.global_batch_size >= 1, "global_batch_size", "an integer >= 1"),
            (c.epochs >= 1, "epochs", "an integer >= 1"),
            (c.steps_per_epoch >= 0, "steps_per_epoch", "an integer >= 0 (0 = full pass)"),
            (c.checkpoint_every_steps >= 0, "checkpoint_every_steps", "an integer >= 0"),
            (c.checkpoint_every_seconds >= 0, "checkpoint_every_seconds", "seconds >= 0 (0 = off)"),
            (c.eval_every_seconds >= 0, "eval_every_seconds", "seconds >= 0 (0 = every epoch)"),
            (c.log_every_steps >= 0, "log_every_steps", "an integer >= 0 (0 = none)"),
            (c.eval_batches >= 0, "eval_batches", "an integer >= 0 (0 = whole split)"),
            (c.steps_per_execution >= 1, "steps_per_execution", "an integer >= 1"),
            (0.0 < c.eps < 0.5, "eps", "a float in (0, 0.5)"),
            (c.patch_size >= 0, "patch_size", "an integer >= 0 (0 = whole images)"),
            (
                not c.patch_size or c.input_shape[:2] == (c.patch_size, c.patch_size),
                "patch_size",
                f"the window size of input_shape (now {'x'.join(map(str, c.input_shape))}); "
                f"set input_shape={c.patch_size},{c.patch_size},C too",
            ),
            (c.patches_per_image >= 1, "patches_per_image", "an integer >= 1"),
            (
                c.patches_per_image == 1 or c.patch_size,
                "patches_per_image",
                "1 with patch_size 0 (whole images have no windows to cut)",
            ),
            (
                c.patches_per_image < 1 or c.global_batch_size % c.patches_per_image == 0,
                "patches_per_image",
                f"a divisor of global_batch_size={c.global_batch_size} (a step reads "
                "global_batch_size / patches_per_image whole images)",
            ),
            (c.zca_epsilon >= 0.0, "zca_epsilon", "a float >= 0 (0 = no whitening)"),
            (c.lbfgs_memory >= 1, "lbfgs_memory", "an integer >= 1"),
            (
                c.optimizer != "lbfgs" or not c.patch_size,
                "optimizer",
                "adam or sgd with patch_size > 0 (random windows change the cost at every "
                "step; lbfgs needs one fixed full batch)",
            ),
            (
                c.optimizer != "lbfgs" or not c.rho_hat_momentum,
                "optimizer",
                "adam or sgd with rho_hat_momentum > 0 (lbfgs has no minibatch noise to smooth)",
            ),
            (
                c.optimizer != "lbfgs" or c.precision == "float32",
                "optimizer",
                "adam or sgd with a mixed precision (lbfgs's line search needs float32)",
            ),
            (
                not c.zca_epsilon or c.normalization == "unit",
                "zca_epsilon",
                "0 with normalization=ufldl_patches (ZCA whitening follows the unit one)",
            ),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise UserError(f"invalid {key}={getattr(c, key)!r}: expected {expected}")

    def train_batch(self, num_train: int) -> int:
        """Examples per training step, given the train split's size: all of them for
        lbfgs (full batch), else global_batch_size."""
        return num_train if self.optimizer == "lbfgs" else self.global_batch_size

    def images_per_step(self, num_train: int) -> int:
        """Images a training step reads: train_batch, or with patches, that many windows'
        worth of images (patches_per_image windows each)."""
        return self.train_batch(num_train) // self.patches_per_image

    def execution_steps(self, steps_per_epoch: int, start_step: int = 0) -> int:
        """Steps per function call: the largest k <= steps_per_execution dividing
        steps_per_epoch and the steps already done in the epoch a run resumes in, so no call
        runs past an epoch's end and every call boundary is a multiple of k."""
        into = start_step % steps_per_epoch
        return max(
            k
            for k in range(1, self.steps_per_execution + 1)
            if steps_per_epoch % k == 0 and into % k == 0
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Builds and validates a config from `to_dict` output (e.g. a run's config.json)."""
        unknown = sorted(set(d) - set(_hints()))
        if unknown:
            raise UserError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(_hints())}"
            )
        return cls(**d)


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce_and_check_types(cfg: TrainConfig) -> None:
    """Checks each field's type; ints are accepted for floats and lists for the shape."""
    for name, hint in _hints().items():
        value = getattr(cfg, name)
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                choices = ", ".join(typing.get_args(hint))
                raise UserError(f"invalid {name}={value!r}: choose one of {choices}")
        elif hint is bool:
            if not isinstance(value, bool):
                raise UserError(f"invalid {name}={value!r}: expected true or false")
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"invalid {name}={value!r}: expected an integer")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"invalid {name}={value!r}: expected a number")
            object.__setattr__(cfg, name, float(value))
        elif typing.get_origin(hint) is tuple:
            ok = isinstance(value, (tuple, list)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            )
            if not ok:
                raise UserError(f"invalid {name}={value!r}: expected integers like 28,28,1")
            object.__setattr__(cfg, name, tuple(value))


PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        input_shape=(8, 8, 1), hidden=16, weight_decay=1e-4, global_batch_size=32,
        epochs=1, steps_per_epoch=5, checkpoint_every_steps=5, eval_batches=2,
    ),
    "digits": TrainConfig(
        input_shape=(8, 8, 1), hidden=100, rho=0.1, beta=3.0, weight_decay=1e-4,
        learning_rate=1e-2, global_batch_size=128, epochs=12, steps_per_epoch=100,
    ),
    "mnist": TrainConfig(
        input_shape=(28, 28, 1), hidden=196, rho=0.1, beta=3.0, weight_decay=3e-3,
        learning_rate=3e-3, global_batch_size=256, epochs=30, steps_per_epoch=400,
        checkpoint_every_steps=2000,
    ),
    "mnist-conv": TrainConfig(
        input_shape=(8, 8, 1), patch_size=8, hidden=400, rho=0.05, beta=3.0, weight_decay=3e-3,
        decoder="linear", zca_epsilon=1.0, learning_rate=1e-2, global_batch_size=1024,
        epochs=30, steps_per_epoch=100,
        checkpoint_every_steps=1000,
    ),
    "natural-patches": TrainConfig(
        input_shape=(8, 8, 1), hidden=25, rho=0.01, beta=3.0, weight_decay=1e-4,
        decoder="sigmoid", normalization="ufldl_patches", learning_rate=1e-2,
        global_batch_size=1000, epochs=100, steps_per_epoch=100, checkpoint_every_steps=1000,
    ),
}  # fmt: skip


def preset(name: str) -> TrainConfig:
    """The named preset; an unknown name raises UserError listing the valid ones."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _parse(key: str, text: str, hint: Any) -> Any:
    text = text.strip()
    if hint is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"invalid {key}={text!r}: expected true or false")
    if typing.get_origin(hint) is tuple:
        parts = text.lower().replace("x", ",").split(",")
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise UserError(
                f"invalid {key}={text!r}: expected integers like 28,28,1 or 28x28x1"
            ) from None
    if hint in (int, float):
        try:
            value = hint(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # nan and inf pass the range checks' comparisons
            kind = "an integer" if hint is int else "a finite number"
            raise UserError(f"invalid {key}={text!r}: expected {kind}")
        return value
    return text  # a Literal: __post_init__ checks the choice


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Returns `cfg` with each "key=value" applied, parsed by the field's type.

    bool: true/false; tuple: "28,28,1" or "28x28x1"; choices are checked by the config.
    An unknown key or an invalid value raises UserError.
    """
    hints = _hints()
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"invalid override {item!r}: expected key=value, e.g. hidden=196")
        if key not in hints:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(hints)}")
        changes[key] = _parse(key, text, hints[key])
    return dataclasses.replace(cfg, **changes)


def add_arguments(parser) -> None:
    """--preset and --set, for every command that trains (train, retrain, run)."""
    parser.add_argument(
        "--preset",
        default="digits",
        choices=sorted(PRESETS),
        help="named config (default: digits); see trainer/config.py",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set hidden=64 (repeatable)",
    )


def to_argv(args) -> list[str]:
    """The --preset/--set flags of parsed `args`, to pass on to `sae train`."""
    return ["--preset", args.preset, *(x for s in args.set for x in ("--set", s))]
