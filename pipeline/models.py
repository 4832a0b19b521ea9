"""Where a model lives: a trainer export, or a models root with a CURRENT pointer.

EXPORT/saved_model.pb                   a `sae train` export (WORKDIR/export)
ROOT/CURRENT -> "<version>"             the promoted version of a models root
ROOT/versions/<version>/export/         its export
"""

from __future__ import annotations

import tensorflow as tf

from preprocessing.errors import UserError
from preprocessing.manifest import join

CURRENT = "CURRENT"


def resolve(uri: str) -> tuple[str, str | None]:
    """(export dir, version or None) for a model URI; raises UserError if there is none."""
    uri = uri.rstrip("/")
    if tf.io.gfile.exists(join(uri, "saved_model.pb")):
        return uri, None
    pointer = join(uri, CURRENT)
    if tf.io.gfile.exists(pointer):
        with tf.io.gfile.GFile(pointer) as f:
            version = f.read().strip()
        export = join(uri, "versions", version, "export")
        if not tf.io.gfile.exists(join(export, "saved_model.pb")):
            raise UserError(f"{pointer} names version {version!r} but {export} has no model")
        return export, version
    raise UserError(
        f"no model at {uri}: expected a `sae train` export (WORKDIR/export with "
        "saved_model.pb) or a models root with a CURRENT file"
    )
