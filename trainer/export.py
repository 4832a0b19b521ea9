"""The SavedModel export: loads with plain `tf.saved_model.load`, no project code.

    m = tf.saved_model.load("WORKDIR/export")
    a = m.signatures["encode"](images=uint8 [b, H, W, C])["activations"]      # [b, hidden]
    x_hat = m.signatures["reconstruct"](images=...)["reconstructions"]       # [b, H, W, C]
    x = m.signatures["normalize"](images=...)["inputs"]  # what x_hat approximates [b, H, W, C]

The input normalization is inside the graph, so callers pass the raw uint8
pixels the records hold. `EXPORT_INFO` (JSON beside the SavedModel) records the
config, the image shape and the label names for tools like `sae extract`.

Exports are atomic: the SavedModel is written to a temporary sibling and renamed
into place, so a reader sees the old export or the new one, never half of one.
"""

from __future__ import annotations

import json
import uuid

import tensorflow as tf

from preprocessing.manifest import join

EXPORT_INFO = "sae_export.json"


class _Serving(tf.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        spec = tf.TensorSpec([None, *model.config.input_shape], tf.uint8, name="images")
        self.encode = tf.function(self._encode, input_signature=[spec])
        self.reconstruct = tf.function(self._reconstruct, input_signature=[spec])
        self.normalize = tf.function(self._normalize, input_signature=[spec])

    def _encode(self, images):
        return {"activations": self.model.encode(images)}

    def _reconstruct(self, images):
        return {"reconstructions": self.model.reconstruct(images)}

    def _normalize(self, images):
        return {"inputs": self.model.normalize(images)}


def save(model, path: str, info: dict) -> None:
    """Writes the SavedModel of `model` to `path` atomically (local or gs://)."""
    serving = _Serving(model)
    tmp = f"{path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    tf.saved_model.save(
        serving,
        tmp,
        signatures={
            "encode": serving.encode,
            "reconstruct": serving.reconstruct,
            "normalize": serving.normalize,
        },
    )
    with tf.io.gfile.GFile(join(tmp, EXPORT_INFO), "w") as f:
        json.dump(info, f, indent=2)
    old = None
    if tf.io.gfile.exists(path):
        old = f"{path.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
        tf.io.gfile.rename(path, old)
    tf.io.gfile.rename(tmp, path)
    if old:
        tf.io.gfile.rmtree(old)


def load_info(path: str) -> dict:
    with tf.io.gfile.GFile(join(path, EXPORT_INFO)) as f:
        return json.load(f)
