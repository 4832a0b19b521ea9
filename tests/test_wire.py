"""The TensorFlow-free writers agree with TensorFlow's own parsers."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from preprocessing import wire


@pytest.mark.parametrize(
    "features",
    [
        {"b": b"", "i": [0], "f": np.zeros(0, np.float32)},
        {"b": bytes(range(256)) * 40, "i": [1, 127, 128, 2**40, -1, -(2**63)]},
        {"f": np.array([0.5, -1e30, np.inf, 3.25], np.float32), "i": []},
        {"key": "ünïcode/ключ".encode(), "i": [2**63 - 1]},
        {"i": [0, 1, 127, 128, 300, 2**14, 2**35, 2**63 - 1, -1, -(2**40)] * 5},  # vectorized
        {"i": [0, 1, 127, 128, 129, 255, 256, 2**14 - 1] * 4},  # 1-2 bytes each (indices)
        {"i": list(range(1600))},  # a dense row's indices
    ],
)
def test_example_bytes_parse_with_tensorflow(features):
    ex = tf.train.Example.FromString(wire.example_bytes(features))
    assert set(ex.features.feature) == set(features)
    for name, value in features.items():
        f = ex.features.feature[name]
        if isinstance(value, bytes):
            assert f.bytes_list.value == [value]
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(np.array(f.float_list.value, np.float32), value)
        else:
            assert list(f.int64_list.value) == value
            # An int64 array (what feature records pass) encodes as its list does.
            assert wire.example_bytes({name: np.array(value, np.int64)}) == wire.example_bytes(
                {name: value}
            )


def test_tfrecord_frames_read_by_tensorflow_with_crc_checks(tmp_path):
    records = [b"", b"x", bytes(range(256)) * 1000]
    path = tmp_path / "r.tfrecord"
    path.write_bytes(b"".join(wire.tfrecord_frame(r) for r in records))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
    corrupt = bytearray(path.read_bytes())
    corrupt[-10] ^= 0xFF  # flip a byte of the last record's data: its CRC no longer matches
    path.write_bytes(bytes(corrupt))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(path)))
