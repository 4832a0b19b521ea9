"""Reading a feature set written by `sae extract`, for downstream models.

    from pipeline import features
    ds = features.dataset("runs/feats", batch_size=128)  # tf.data; "features" is a SparseTensor
    df = features.dataframe("runs/feats")  # pandas: key, indices, values, split, label
    X, keys, labels, splits = features.sparse_matrix("runs/feats")  # scipy CSR [n, dim]
    fs = features.load("runs/feats")  # the manifest, typed: fs.dim, fs.num_written, ...

All take local paths or gs:// URIs and read only the shards the manifest lists.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipeline import feature_records as fr
from preprocessing import storage
from preprocessing.errors import UserError
from preprocessing.manifest import MANIFEST_NAME
from preprocessing.storage import join


@dataclass(frozen=True)
class FeatureSet:
    """A feature manifest (FEATURES/manifest.json, written last by `sae extract`), read
    with `load`: the typed view every stage reads it through."""

    root: str
    manifest: dict  # the JSON as written; read it through the properties below

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.manifest["formats"])

    @property
    def num_inputs(self) -> int:
        return int(self.manifest["num_inputs"])

    @property
    def num_written(self) -> int:
        """Feature rows written (one per encoded input)."""
        return int(self.manifest["num_written"])

    @property
    def num_errors(self) -> int:
        return int(self.manifest["num_errors"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def l0_mean(self) -> float:
        """Mean number of kept (nonzero) units per row."""
        return float(self.manifest["l0"]["mean"])

    @property
    def dead_units(self) -> list[int]:
        return [int(u) for u in self.manifest["dead_units"]]

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest.get("label_names") or [])

    @property
    def model_export(self) -> str:
        return str(self.manifest["model_export"])

    def paths(self, fmt: str) -> list[str]:
        if fmt not in self.formats:
            raise UserError(
                f"feature set {self.root} has no {fmt} files (formats: "
                f"{', '.join(self.formats)}); rerun `sae extract --format`"
            )
        return [join(self.root, s[fmt]) for s in self.manifest["shards"]]


def load(root: str) -> FeatureSet:
    """Reads ROOT/manifest.json of a feature set; a missing one is a clear error."""
    path = join(root, MANIFEST_NAME)
    manifest = storage.read_json(
        path,
        missing=f"no feature set at {root}: {path} is missing (incomplete or not run)",
        fix="rerun `sae extract --overwrite`",
    )
    if not isinstance(manifest, dict) or manifest.get("kind") != fr.KIND:
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

    tables = [pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in load(root).paths("parquet")]
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
