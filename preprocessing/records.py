"""The record schema: one tf.train.Example per image (or patch).

Every stage imports this module, so writer and readers cannot drift.

Features of one Example:
  image     bytes   raw uint8 pixels, row-major [height, width, channels]
  height    int64
  width     int64
  channels  int64   1 or 3
  key       bytes   the input's key (preprocessing/sources.py Item: path under the input
                    root, list entry or builtin/TFDS id), plus "#patch=N" for patches
  label     int64   index into the manifest's `label_names`; absent if unlabelled

`parse_batch` reads a batch of serialized Examples inside tf.data (vectorized,
after batching) and returns uint8 images of the static shape the manifest gives;
`decode` is the NumPy-side reader for tools and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocessing import wire

FORMAT_VERSION = 1
NO_LABEL = -1


@dataclass(frozen=True)
class Record:
    key: str
    image: np.ndarray  # uint8 [H, W, C]
    label: int | None = None


def encode(key: str, image: np.ndarray, label: int | None = None) -> bytes:
    """Serializes one image. image: uint8 [H, W, C] with C in {1, 3}."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
    h, w, c = image.shape
    features: dict[str, wire.FeatureValue] = {
        "image": np.ascontiguousarray(image).tobytes(),
        "height": [h],
        "width": [w],
        "channels": [c],
        "key": key.encode("utf-8"),
    }
    if label is not None:
        features["label"] = [int(label)]
    return wire.example_bytes(features)


def decode(serialized: bytes) -> Record:
    """Parses one serialized Example in NumPy (tools and tests)."""
    import tensorflow as tf

    f = tf.train.Example.FromString(serialized).features.feature
    h, w, c = (f[n].int64_list.value[0] for n in ("height", "width", "channels"))
    image = np.frombuffer(f["image"].bytes_list.value[0], np.uint8).reshape(h, w, c)
    label = f["label"].int64_list.value[0] if "label" in f else None
    return Record(f["key"].bytes_list.value[0].decode("utf-8"), image, label)


def feature_spec() -> dict:
    """tf.io feature spec; a missing label parses as NO_LABEL."""
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "channels": tf.io.FixedLenFeature([], tf.int64),
        "key": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=NO_LABEL),
    }


def parse_batch(serialized, shape: tuple[int, int, int]) -> dict:
    """Parses a batch inside tf.data.

    serialized: string [batch]. shape: (H, W, C) from the manifest.
    Returns {"image": uint8 [batch, H, W, C], "key": string [batch],
    "label": int64 [batch]}. A record whose pixel count does not match `shape`
    fails the reshape with an InvalidArgumentError (callers turn it into a
    clear error naming the shard).
    """
    import tensorflow as tf

    parsed = tf.io.parse_example(serialized, feature_spec())
    h, w, c = shape
    pixels = tf.io.decode_raw(parsed["image"], tf.uint8)
    tf.debugging.assert_equal(
        tf.stack([parsed["height"], parsed["width"], parsed["channels"]], axis=1),
        tf.constant([[h, w, c]], tf.int64),
        message=f"record shape does not match the manifest's {h}x{w}x{c}",
    )
    image = tf.reshape(pixels, [-1, h, w, c])
    return {"image": image, "key": parsed["key"], "label": parsed["label"]}
