"""Feature dashboards (SAELens / Neuronpedia style): each much-used unit's filter beside the
eval inputs that activate it most, with its firing rate and mean activation.

    dash = compute("WORKDIR/train/export", "WORKDIR/data", max_images=2000)

Inputs are the first `max_images` eval images. A whole-image model (input = image size) is
run with the export's `encode`: one input per image, the top inputs are images. A patch
model (config.patch_size = K) is run with `encode_map` at stride 1: every KxK window is an
input; per unit and image only the image's best window is kept, so a unit's top inputs are
the best windows of different images, cut out of them. Statistics are over all inputs:
  mean activation  mean of a_j (the split's rho_hat_j)
  firing rate      fraction of inputs with a_j > 0.5 (as `l0` in metrics.json counts on)
Dead units (trainer.config.dead_units on the mean activation) are never shown. Cost: one
`encode_map` pass over max_images images, each call given at most MAP_BUDGET map values (a
batch of images, or a band of map rows of one large image), reduced to per-image maxima
before the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import pooled
from trainer.config import dead_units

FIRING_THRESHOLD = 0.5
MAP_BUDGET = 1 << 23  # map values per encode_map call (float64 on the host: 64 MB)


@dataclass(frozen=True)
class Unit:
    index: int
    filter: np.ndarray  # [K, K, C] float: W1[:, j] as an image
    firing_rate: float
    mean_activation: float
    top_inputs: np.ndarray  # uint8 [k, K, K, C], best first
    top_activations: np.ndarray  # float [k]
    top_keys: list[str]  # the eval image each input comes from


@dataclass(frozen=True)
class Dashboards:
    units: list[Unit]
    num_images: int  # eval images looked at
    num_inputs: int  # inputs (images or windows) the statistics are over
    num_dead: int
    patch: bool  # inputs are windows of images


def select_units(
    firing_rate: np.ndarray, mean_activation: np.ndarray, rho: float, n: int
) -> np.ndarray:
    """Indices of the n most-firing live units, most firing first (ties: higher mean)."""
    live = np.flatnonzero(~dead_units(np.asarray(mean_activation), rho))
    order = np.lexsort((-mean_activation[live], -firing_rate[live]))
    return live[order][:n]


def best_windows(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """maps [b, H', W', s] -> (best activation [b, s], its row [b, s], its column [b, s]):
    per image and unit the window with the largest activation (first one on ties)."""
    b, h, w, s = maps.shape
    flat = maps.reshape(b, h * w, s)
    at = flat.argmax(axis=1)  # [b, s]
    best = np.take_along_axis(flat, at[:, None, :], axis=1)[:, 0]
    return best, at // w, at % w


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """scores [n, s] -> indices [s, min(k, n)] of each column's k largest, largest first
    (lowest index first on ties)."""
    k = min(k, scores.shape[0])
    order = np.argsort(-scores, axis=0, kind="stable")
    return order[:k].T


def crop(
    images: np.ndarray,
    which: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """images [n, H, W, C]; which, rows, cols [m] -> the (h, w) = size windows [m, h, w, C]
    whose top-left pixels are (rows, cols) of images[which] (stride-1 map positions)."""
    h, w = size
    return np.stack(
        [images[i, r : r + h, c : c + w] for i, r, c in zip(which, rows, cols, strict=True)]
    )


def eval_images(data_root: str, max_images: int) -> tuple[list[str], np.ndarray]:
    """(keys, uint8 [n, H, W, C]) of the first max_images records of the eval split (the
    train split if there is no eval split)."""
    import tensorflow as tf

    from preprocessing import manifest, records

    m = manifest.load(data_root)
    paths = m.shard_paths("eval") or m.shard_paths("train")
    ds = tf.data.TFRecordDataset(paths, compression_type=m.compression or "").take(max_images)
    batch = records.parse_batch(tf.stack(list(ds)), m.image_shape) if paths else None
    if batch is None or not len(batch["key"]):
        return [], np.zeros((0, *m.image_shape), np.uint8)
    return [k.decode() for k in batch["key"].numpy()], batch["image"].numpy()


def compute(
    export_dir: str,
    data_root: str,
    max_images: int = 2000,
    num_units: int = 16,
    top: int = 8,
    batch_size: int = 100,
) -> Dashboards:
    """The dashboards of the model at export_dir on the eval split of data_root."""
    import tensorflow as tf

    from trainer import artifacts

    cfg = artifacts.read_export_info(export_dir).config
    keys, images = eval_images(data_root, max_images)
    model = tf.saved_model.load(export_dir)
    w1 = model.model.w1.numpy()  # [K*K*C, s]: the trainer's filters (whitened space if ZCA)
    kh, kw = cfg.input_shape[:2]
    patch = bool(cfg.patch_size) and images.shape[1:3] != (kh, kw)
    s = w1.shape[1]
    map_rows, map_cols = (images.shape[1] - kh + 1, images.shape[2] - kw + 1) if patch else (1, 1)
    best = np.full((len(images), s), -np.inf)  # per image and unit: its best window's a_j
    rows, cols = np.zeros((2, len(images), s), np.int64)  # and where that window is
    total, fired, inputs = np.zeros(s), np.zeros(s), 0
    calls = pooled.pieces(len(images), map_rows, map_cols, s, MAP_BUDGET, cap=batch_size)
    for lo, hi, first, stop in calls:
        if patch:
            x = tf.constant(images[lo:hi, pooled.image_rows(first, stop, kh, 1)])
            maps = model.signatures["encode_map"](images=x, stride=tf.constant(1))["maps"]
        else:
            x = tf.constant(images[lo:hi])
            maps = model.signatures["encode"](images=x)["activations"][:, None, None]
        maps = maps.numpy().astype(np.float64)  # [b, H', W', s]; H' = W' = 1 for whole images
        total += maps.sum(axis=(0, 1, 2))
        fired += (maps > FIRING_THRESHOLD).sum(axis=(0, 1, 2))
        inputs += maps.shape[0] * maps.shape[1] * maps.shape[2]
        part, part_rows, part_cols = best_windows(maps)
        better = part > best[lo:hi]  # strictly: an earlier band keeps ties (argmax's first)
        best[lo:hi] = np.where(better, part, best[lo:hi])
        rows[lo:hi] = np.where(better, part_rows + first, rows[lo:hi])
        cols[lo:hi] = np.where(better, part_cols, cols[lo:hi])
    if not inputs:
        return Dashboards([], 0, 0, 0, patch)
    mean, rate = total / inputs, fired / inputs
    chosen = select_units(rate, mean, cfg.rho, num_units)
    order = top_k(best[:, chosen], top)  # [units, top]
    units = [
        Unit(
            index=int(j),
            filter=w1[:, j].reshape(cfg.input_shape),
            firing_rate=float(rate[j]),
            mean_activation=float(mean[j]),
            top_inputs=crop(images, idx, rows[idx, j], cols[idx, j], (kh, kw)),
            top_activations=best[idx, j],
            top_keys=[keys[i] for i in idx],
        )
        for j, idx in zip(chosen, order, strict=True)
    ]
    return Dashboards(units, len(images), inputs, int(dead_units(mean, cfg.rho).sum()), patch)
