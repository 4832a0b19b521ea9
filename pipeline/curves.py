"""The cost terms over steps, read back from a run's TensorBoard event files.

    curves = read_scalars("WORKDIR/train/tensorboard")
    curves["validation"]["epoch_loss"]   # [(step, value)], sorted by step

What `sae train` logs (trainer/loop.py): `train/` and `validation/` with `epoch_<term>` per
epoch (x = epoch index, the layout of Keras's TensorBoard callback, and for `train/` also
`epoch_learning_rate`, `epoch_seconds` and `epoch_training_share`); `units/` with
`batch_<term>` at the step about every log_every_steps steps. `cost_curves` keeps the
COST_TERMS of them (not the learning rate, timing or unit statistics) and puts them on one x
axis, the optimizer step: epoch e ends at step (e + 1) * steps_per_epoch.
"""

from __future__ import annotations

import math

import tensorflow as tf

from preprocessing import storage

# The UFLDL cost J = reconstruction + weight_decay + beta * sparsity, and its total.
COST_TERMS = ("loss", "reconstruction", "sparsity", "weight_decay")


def _value(v) -> float | None:
    if v.HasField("simple_value"):
        return float(v.simple_value)
    if v.HasField("tensor") and not v.tensor.tensor_shape.dim:
        arr = tf.make_ndarray(v.tensor)
        if arr.dtype.kind == "f":
            return float(arr)
    return None


def read_scalars(tb_dir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run (sub-folder: train, validation, units) -> tag -> [(step, value)] sorted by step.

    Images and histograms are skipped; a step logged twice (a resumed run) keeps the last.
    """
    out: dict[str, dict[str, dict[int, float]]] = {}
    root = tb_dir.rstrip("/")
    # Sorted by path: runs by name, a run's event files in the order they were written.
    for path in sorted(storage.glob(f"{root}/*/events.out.tfevents.*")):
        run = path[len(root) + 1 :].split("/")[0]
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for v in event.summary.value:
                value = _value(v)
                if value is not None and math.isfinite(value):
                    out.setdefault(run, {}).setdefault(v.tag, {})[int(event.step)] = value
    return {
        run: {tag: sorted(pts.items()) for tag, pts in tags.items()} for run, tags in out.items()
    }


def cost_curves(
    scalars: dict[str, dict[str, list[tuple[int, float]]]], steps_per_epoch: int
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """term -> {"train batches": ..., "train epochs": ..., "eval": ...}, each [(step,
    value)] against the optimizer step, for each term in COST_TERMS that was logged (series
    with no points left out)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for term in COST_TERMS:
        series = {
            "train batches": scalars.get("units", {}).get(f"batch_{term}", []),
            "train epochs": [
                ((e + 1) * steps_per_epoch, v)
                for e, v in scalars.get("train", {}).get(f"epoch_{term}", [])
            ],
            "eval": [
                ((e + 1) * steps_per_epoch, v)
                for e, v in scalars.get("validation", {}).get(f"epoch_{term}", [])
            ],
        }
        series = {k: v for k, v in series.items() if v}
        if series:
            out[term] = series
    return out
