"""The SavedModel export: loads with plain `tf.saved_model.load`, no project code.

    m = tf.saved_model.load("WORKDIR/export")
    a = m.signatures["encode"](images=uint8 [b, H, W, C])["activations"]      # [b, hidden]
    x_hat = m.signatures["reconstruct"](images=...)["reconstructions"]       # [b, H, W, C]
    x = m.signatures["normalize"](images=...)["inputs"]  # what x_hat approximates [b, H, W, C]
    maps = m.signatures["encode_map"](images=uint8 [b, H, W, C], stride=int32 S)["maps"]
                                            # [b, H', W', hidden], H, W >= K = the model's input

`encode_map` takes images of any height and width at least the model's input size K and
encodes every KxK window at stride 1 <= S <= K: maps[:, r, c] equals `encode` of the window at
(r*S, c*S) (trainer/conv.py says how each normalization is done by convolution).

The input normalization is inside the graph, so callers pass the raw uint8
pixels the records hold. `trainer.EXPORT_INFO` (JSON beside the SavedModel) records the
config, the image shape and the label names for tools like `sae extract`.

Exports are atomic: the SavedModel is written to a temporary sibling and renamed
into place, so a reader sees the old export or the new one, never half of one (on
object stores, where renames go file by file: the old one, none, or the new one).
TensorFlow writes the SavedModel itself; the export info and the move into place go
through preprocessing/storage.py, like every other file of the pipeline.
"""

from __future__ import annotations

import os
import shutil
import uuid

import tensorflow as tf

from preprocessing import storage
from preprocessing.storage import join
from trainer import EXPORT_INFO, artifacts, conv


class _Serving(tf.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        spec = tf.TensorSpec([None, *model.config.input_shape], tf.uint8, name="images")
        self.encode = tf.function(self._encode, input_signature=[spec], autograph=False)
        self.reconstruct = tf.function(self._reconstruct, input_signature=[spec], autograph=False)
        self.normalize = tf.function(self._normalize, input_signature=[spec], autograph=False)
        any_size = tf.TensorSpec([None, None, None, model.config.input_shape[2]], tf.uint8)
        stride = tf.TensorSpec([], tf.int32, name="stride")
        self.encode_map = tf.function(
            self._encode_map, input_signature=[any_size, stride], autograph=False
        )

    def _encode(self, images):
        return {"activations": self.model.encode(images)}

    def _reconstruct(self, images):
        return {"reconstructions": self.model.reconstruct(images)}

    def _normalize(self, images):
        return {"inputs": self.model.normalize(images)}

    def _encode_map(self, images, stride):
        k = self.model.config.input_shape[0]
        h, w = tf.shape(images)[1], tf.shape(images)[2]
        checks = [
            tf.debugging.assert_greater_equal(
                tf.minimum(h, w), k, message=f"encode_map: images must be at least {k}x{k}"
            ),
            tf.debugging.assert_greater_equal(stride, 1, message=f"encode_map: stride 1..{k}"),
            tf.debugging.assert_less_equal(stride, k, message=f"encode_map: stride 1..{k}"),
        ]
        with tf.control_dependencies(checks):
            # Convolution strides are static: one branch per allowed stride.
            maps = tf.switch_case(
                stride - 1,
                [lambda s=s: conv.encode_map(self.model, images, s) for s in range(1, k + 1)],
            )
        return {"maps": maps}


def save(model, path: str, info: artifacts.ExportInfo | dict) -> None:
    """Writes the SavedModel of `model` to `path` atomically (local or gs://), with `info`
    (checked against the ExportInfo schema) beside it."""
    if isinstance(info, dict):
        info = artifacts.ExportInfo.from_dict(info)
    serving = _Serving(model)
    tmp = f"{path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    tf.saved_model.save(
        serving,
        tmp,
        signatures={
            "encode": serving.encode,
            "reconstruct": serving.reconstruct,
            "normalize": serving.normalize,
            "encode_map": serving.encode_map,
        },
    )
    storage.publish_json(join(tmp, EXPORT_INFO), info.to_dict())
    _publish(tmp, path.rstrip("/"))


def _publish(tmp: str, path: str) -> None:
    """Moves the finished SavedModel at `tmp` to `path`; no reader sees a partial one."""
    if not storage.is_remote(path):  # a local directory rename is atomic
        old = None
        if os.path.exists(path):
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old)
        return
    # Object stores rename object by object. saved_model.pb is what makes a directory a
    # SavedModel (loaders and `models.resolve` look for it), so it goes away first and
    # comes back last: in between, readers find no model rather than half of one.
    storage.delete_if_exists(join(path, "saved_model.pb"))
    storage.delete(storage.files_under(path))
    # Folder markers (names ending in "/", which TensorFlow writes) are not files to move.
    rel = [f[len(tmp) + 1 :] for f in storage.files_under(tmp) if not f.endswith("/")]
    for batch in ([r for r in rel if r != "saved_model.pb"], ["saved_model.pb"]):
        storage.move([join(tmp, r) for r in batch], [join(path, r) for r in batch])
    storage.delete(storage.files_under(tmp))
