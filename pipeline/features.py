"""Reading a feature set written by `sae extract`, for downstream models.

    from pipeline import features
    ds = features.dataset("runs/feats", batch_size=128)  # tf.data; "features" is a SparseTensor
    df = features.dataframe("runs/feats")  # pandas: key, indices, values, split, label
    X, keys, labels, splits = features.sparse_matrix("runs/feats")  # scipy CSR [n, dim]

All take local paths or gs:// URIs and read only the shards the manifest lists.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from pipeline import feature_records as fr
from preprocessing.errors import UserError
from preprocessing.manifest import MANIFEST_NAME, join


@dataclass(frozen=True)
class FeatureSet:
    root: str
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def paths(self, fmt: str) -> list[str]:
        if fmt not in self.manifest["formats"]:
            raise UserError(
                f"feature set {self.root} has no {fmt} files (formats: "
                f"{', '.join(self.manifest['formats'])}); rerun `sae extract --format`"
            )
        return [join(self.root, s[fmt]) for s in self.manifest["shards"]]


def load(root: str) -> FeatureSet:
    """Reads ROOT/manifest.json of a feature set; a missing one is a clear error."""
    import tensorflow as tf

    path = join(root, MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        raise UserError(f"no feature set at {root}: {path} is missing (incomplete or not run)")
    with tf.io.gfile.GFile(path) as f:
        manifest = json.load(f)
    if manifest.get("kind") != fr.KIND:
        raise UserError(f"{path} is not a sae-pipeline feature manifest")
    return FeatureSet(root.rstrip("/"), manifest)


def dataset(root: str, batch_size: int | None = None):
    """tf.data.Dataset of {"key", "features": SparseTensor [dim] or [batch, dim], "split", "label"}.

    label is -1 for unlabelled inputs. With batch_size, parsing is vectorized per batch.
    """
    import tensorflow as tf

    fs = load(root)
    spec = fr.feature_spec(fs.dim)
    ds = tf.data.TFRecordDataset(fs.paths("tfrecord"), num_parallel_reads=tf.data.AUTOTUNE)
    if batch_size:
        return ds.batch(batch_size).map(lambda s: tf.io.parse_example(s, spec))
    return ds.map(lambda s: tf.io.parse_single_example(s, spec))


def dataframe(root: str):
    """pandas DataFrame with one row per input: key, indices, values, split, label."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    tables = []
    for path in load(root).paths("parquet"):
        with tf.io.gfile.GFile(path, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    return pa.concat_tables(tables).to_pandas() if tables else fr.parquet_schema().empty_table()


def sparse_matrix(root: str):
    """(scipy.sparse.csr_matrix [n, dim], keys [n], labels [n] (-1 = none), splits [n])."""
    import scipy.sparse

    fs = load(root)
    df = dataframe(root)
    lengths = df["indices"].map(len).to_numpy()
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    flat = lambda col: np.concatenate(df[col].to_list()) if len(df) else np.zeros(0)  # noqa: E731
    matrix = scipy.sparse.csr_matrix(
        (flat("values").astype(np.float32), flat("indices").astype(np.int32), indptr),
        shape=(len(df), fs.dim),
    )
    labels = df["label"].fillna(-1).astype(np.int64).to_numpy()
    return matrix, df["key"].to_numpy(), labels, df["split"].to_numpy()
