"""`sae preprocess` with gs:// input and output, against the real GCS emulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from preprocessing import job, manifest, records
from preprocessing.errors import UserError
from tests.collections import good_keys, messy_collection


def test_gcs_in_and_out_multiprocess(gcs_prefix, tmp_path):
    local = tmp_path / "src"
    expect = messy_collection(local, np.random.default_rng(7))
    src = f"{gcs_prefix}/src"
    remote_expect = {}
    for path, bad in expect.items():
        uri = f"{src}/{path[len(str(local)) + 1 :]}"
        with FileSystems.create(uri) as f, open(path, "rb") as g:
            f.write(g.read())
        remote_expect[uri] = bad
    out = f"{gcs_prefix}/out"
    m = job.run([
        "--input", src, "--output", out, "--resize", "12x12", "--channels", "1",
        "--max-error-fraction", "0.5", "--num-shards", "2",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2",
    ])  # fmt: skip
    assert m["num_inputs"] == len(expect) == m["num_inputs_accepted"] + m["num_errors"]
    assert m["label_names"] == ["cat", "dog"]
    # Read back through TensorFlow's own gs:// client, as the trainer does.
    loaded = manifest.load(out)
    keys = set()
    for split in job.SPLITS:
        for r in tf.data.TFRecordDataset(loaded.shard_paths(split)):
            rec = records.decode(r.numpy())
            assert rec.image.shape == (12, 12, 1)
            keys.add(rec.key)
    # The same keys as the local copy would get: paths under the input root.
    assert keys == good_keys(expect, local)
    with tf.io.gfile.GFile(f"{out}/{job.ERRORS_FILE}") as f:
        errors = [json.loads(line) for line in f]
    assert {e["uri"] for e in errors} == {u for u, bad in remote_expect.items() if bad}
    # A second run into the same prefix is refused without --overwrite.
    with pytest.raises(UserError, match="not empty"):
        job.run(["--input", src, "--output", out, "--resize", "12x12"])
