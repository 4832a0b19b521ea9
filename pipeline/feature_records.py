"""The feature schema: one record per input example, written by `sae extract`.

TFRecord (tf.train.Example), parseable with tf.io.parse_example into a SparseTensor:
  key      bytes    the input example's key (as in preprocessing/records.py)
  indices  int64[]  hidden units kept by the sparsifier, ascending
  values   float[]  their activations
  dim      int64    number of hidden units (the SparseTensor's dense size)
  split    bytes    "train" or "eval" (the input's split); "" for raw images
  label    int64    index into the manifest's label_names; absent if unlabelled

Parquet: the same columns (indices as list<int32>, values as list<float32>, label
nullable int64), for pandas / Spark / BigQuery.

Inside `sae extract`, a row travels to the shard writers as one payload (`encode_row`):
the TFRecord record followed by the Parquet columns, so neither writer parses a record
back (`row_example`, `row_record`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from preprocessing import wire

KIND = "sae-pipeline/features"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureRecord:
    key: str
    indices: np.ndarray  # int32 [k]
    values: np.ndarray  # float32 [k]
    dim: int
    split: str
    label: int | None = None


def encode(r: FeatureRecord) -> bytes:
    features: dict[str, wire.FeatureValue] = {
        "key": r.key.encode("utf-8"),
        "indices": np.asarray(r.indices, np.int64),
        "values": np.asarray(r.values, np.float32),
        "dim": [r.dim],
        "split": r.split.encode(),
    }
    if r.label is not None:
        features["label"] = [int(r.label)]
    return wire.example_bytes(features)


def decode(serialized: bytes) -> FeatureRecord:
    import tensorflow as tf

    f = tf.train.Example.FromString(serialized).features.feature
    return FeatureRecord(
        key=f["key"].bytes_list.value[0].decode("utf-8"),
        indices=np.asarray(f["indices"].int64_list.value, np.int32),
        values=np.asarray(f["values"].float_list.value, np.float32),
        dim=int(f["dim"].int64_list.value[0]),
        split=f["split"].bytes_list.value[0].decode(),
        label=int(f["label"].int64_list.value[0]) if "label" in f else None,
    )


# After the record and the columns: record bytes, kept units k, split bytes, label (-1 =
# none), dim.
_ROW_TAIL = struct.Struct("<IIIqI")


def encode_row(r: FeatureRecord) -> bytes:
    """The shard writers' payload: `encode(r)`, then indices int32 [k], values float32 [k]
    and the split, then _ROW_TAIL. Starting with the record keeps the writers' tie order
    (equal keys sort by payload bytes) that of the records."""
    example = encode(r)
    split = r.split.encode()
    indices = np.asarray(r.indices, "<i4")
    label = -1 if r.label is None else int(r.label)
    tail = _ROW_TAIL.pack(len(example), len(indices), len(split), label, r.dim)
    values = np.asarray(r.values, "<f4")
    return b"".join((example, indices.tobytes(), values.tobytes(), split, tail))


def row_example(payload: bytes) -> bytes:
    """The serialized tf.train.Example of an `encode_row` payload (a view, no copy)."""
    n = _ROW_TAIL.unpack_from(payload, len(payload) - _ROW_TAIL.size)[0]
    return memoryview(payload)[:n]


def row_record(key: str, payload: bytes) -> FeatureRecord:
    """The FeatureRecord of an `encode_row` payload, from its columns (no parsing)."""
    n, k, split_len, label, dim = _ROW_TAIL.unpack_from(payload, len(payload) - _ROW_TAIL.size)
    indices = np.frombuffer(payload, "<i4", k, n)
    values = np.frombuffer(payload, "<f4", k, n + 4 * k)
    split = bytes(payload[n + 8 * k : n + 8 * k + split_len]).decode()
    return FeatureRecord(key, indices, values, dim, split, None if label < 0 else label)


def feature_spec(dim: int) -> dict:
    """tf.io spec: "features" parses to a SparseTensor [dim] (or [batch, dim])."""
    import tensorflow as tf

    return {
        "key": tf.io.FixedLenFeature([], tf.string),
        "features": tf.io.SparseFeature("indices", "values", tf.float32, dim),
        "split": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }


def parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),
        ("indices", pa.list_(pa.int32())),
        ("values", pa.list_(pa.float32())),
        ("split", pa.string()),
        ("label", pa.int64()),
    ])  # fmt: skip


def parquet_bytes(recs: list[FeatureRecord]) -> bytes:
    """One Parquet file holding `recs`."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": [r.key for r in recs],
            "indices": [np.asarray(r.indices, np.int32) for r in recs],
            "values": [np.asarray(r.values, np.float32) for r in recs],
            "split": [r.split for r in recs],
            "label": [r.label for r in recs],
        },
        schema=parquet_schema(),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
