"""`sae evaluate-features`: are the sparse features any good? A linear probe.

    sae evaluate-features --features runs/feats --data runs/digits/data

Fits a logistic regression (inputs standardized with the train split's mean and std,
as is usual for a linear probe) on the train split and reports eval accuracy for the
sparse features, the raw pixels, and PCA with as many components as the features have
dimensions (fit on train pixels; capped at the pixel count). Writes FEATURES/probe.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from preprocessing import flags
from preprocessing.errors import ArgumentParser, UserError
from preprocessing.manifest import join


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


def probe(features_root: str, data_root: str, max_iter: int = 2000) -> dict:
    """Eval accuracies of logistic regression on sparse features, raw pixels and PCA."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
    dim = matrix.shape[1]
    pca = PCA(n_components=min(dim, raw.shape[1]), random_state=0).fit(raw[train])
    inputs = {"sparse_features": matrix.toarray(), "raw_pixels": raw, "pca": pca.transform(raw)}
    results = {}
    for name, x in inputs.items():
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
        clf.fit(x[train], labels[train])
        results[name] = round(float(clf.score(x[ev], labels[ev])), 4)
    return {
        "eval_accuracy": results,
        "dims": {"sparse_features": dim, "raw_pixels": raw.shape[1], "pca": pca.n_components_},
        "train_examples": int(train.sum()),
        "eval_examples": int(ev.sum()),
    }


def run(argv: Sequence[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    from pipeline import features
    from preprocessing import manifest

    # Both inputs checked before TensorFlow's import (seconds).
    features.load(args.features)
    manifest.load(args.data).check_shards()
    import tensorflow as tf

    result = probe(args.features, args.data, args.max_iter)
    with tf.io.gfile.GFile(join(args.features, "probe.json"), "w") as f:
        json.dump(result, f, indent=2)
    for name, acc in result["eval_accuracy"].items():
        print(
            f"evaluate-features: {name:<16} {result['dims'][name]:>5} dims  eval accuracy {acc:.4f}"
        )
    return result
