"""`sae evaluate-features`: are the sparse features any good? A linear probe.

    sae evaluate-features --features runs/feats --data runs/digits/data

Fits a logistic regression (inputs standardized with the train split's mean and std,
as is usual for a linear probe) on the train split and reports eval accuracy for the
sparse features, the raw pixels, and PCA with as many components as the features have
dimensions (fit on the standardized train pixels; capped at the pixel count). The PCA
scores are not standardized again: that would whiten them and blow the near-zero-variance
directions (MNIST's always-blank border) up to unit variance, noise the classifier then fits.
So with as many components as pixels, PCA is a rotation of the raw pixels and the probe gives
the same accuracy for both. Writes FEATURES/probe.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from preprocessing import flags, storage
from preprocessing.errors import ArgumentParser, UserError
from preprocessing.storage import join

PROBE = "probe.json"  # in the feature set's folder


def make_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sae evaluate-features", description=__doc__.splitlines()[0])
    p.add_argument("--features", required=True, help="a `sae extract` output (local or gs://)")
    p.add_argument(
        "--data", required=True, help="the `sae preprocess` output the features were extracted from"
    )
    p.add_argument(
        "--max-iter",
        type=flags.positive_int,
        default=2000,
        help="logistic regression iterations (default: 2000)",
    )
    return p


def _pixels(data_root: str) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (flattened pixels / 255, label) for every record of the dataset."""
    import tensorflow as tf

    from preprocessing import manifest, records

    m = manifest.load(data_root)
    out = {}
    for split in ("train", "eval"):
        paths = m.shard_paths(split)
        if paths:
            for r in tf.data.TFRecordDataset(paths, compression_type=m.compression or ""):
                rec = records.decode(r.numpy())
                out[rec.key] = (rec.image.reshape(-1) / 255.0, rec.label)
    return out


def accuracies(
    features: np.ndarray,
    pixels: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    ev: np.ndarray,
    max_iter: int,
) -> tuple[dict[str, float], dict[str, int]]:
    """Eval accuracy and input dims of the three probes.

    features [n, d], pixels [n, p] (/ 255), labels [n], train and ev boolean masks [n].
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    components = min(features.shape[1], pixels.shape[1])
    probes = {
        "sparse_features": (features, [StandardScaler()]),
        "raw_pixels": (pixels, [StandardScaler()]),
        "pca": (pixels, [StandardScaler(), PCA(n_components=components, random_state=0)]),
    }
    results = {}
    for name, (x, steps) in probes.items():
        clf = make_pipeline(*steps, LogisticRegression(max_iter=max_iter))
        clf.fit(x[train], labels[train])
        results[name] = round(float(clf.score(x[ev], labels[ev])), 4)
    dims = {"sparse_features": features.shape[1], "raw_pixels": pixels.shape[1]}
    return results, {**dims, "pca": components}


def probe(features_root: str, data_root: str, max_iter: int = 2000) -> dict:
    """Eval accuracies of logistic regression on sparse features, raw pixels and PCA."""
    from pipeline import features

    matrix, keys, labels, splits = features.sparse_matrix(features_root)
    if (labels < 0).any():
        raise UserError(f"{features_root} has unlabelled rows; a probe needs labels")
    train, ev = splits == "train", splits == "eval"
    if not train.any() or not ev.any():
        raise UserError(f"{features_root} needs train and eval rows (extract both splits)")
    pixels = _pixels(data_root)
    missing = [k for k in keys if k not in pixels]
    if missing:
        raise UserError(f"{len(missing)} feature keys are not in {data_root} (e.g. {missing[0]})")
    raw = np.stack([pixels[k][0] for k in keys])
    results, dims = accuracies(matrix.toarray(), raw, labels, train, ev, max_iter)
    return {
        "eval_accuracy": results,
        "dims": dims,
        "train_examples": int(train.sum()),
        "eval_examples": int(ev.sum()),
    }


def run(argv: Sequence[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    from pipeline import features
    from preprocessing import manifest

    storage.check_access(reads=[("--data", args.data)], writes=[("--features", args.features)])
    # Both inputs checked before TensorFlow's import (seconds).
    features.load(args.features)
    manifest.load(args.data).check_shards()

    result = probe(args.features, args.data, args.max_iter)
    storage.publish_json(join(args.features, PROBE), result)
    for name, acc in result["eval_accuracy"].items():
        print(
            f"evaluate-features: {name:<16} {result['dims'][name]:>5} dims  eval accuracy {acc:.4f}"
        )
    return result


def read(features_root: str) -> dict | None:
    """FEATURES/probe.json as `probe` returned it, or None if the probe has not run:
    {"eval_accuracy": {name: accuracy}, "dims": {name: dims}, "train_examples",
    "eval_examples"}."""
    return storage.read_json_if_exists(join(features_root, PROBE))


def probe_path(features_root: str) -> str:
    return join(features_root, PROBE)
