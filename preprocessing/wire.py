"""TensorFlow's on-disk formats, written without importing TensorFlow.

Beam workers that only write records then skip TensorFlow's import (seconds of CPU and
~350 MB per worker process). Both are checked against TensorFlow's own parsers in
tests/test_wire.py.

  example_bytes   a serialized tf.train.Example (protobuf wire format)
  tfrecord_frame  one record in TFRecord framing (length, masked CRC32C, data, CRC)
  tfrecord_header_ok  whether bytes start like a TFRecord frame (a cheap file check)
"""

from __future__ import annotations

import functools
import struct

import google_crc32c
import numpy as np

_BYTE = [bytes([i]) for i in range(0x80)]

# A feature value: bytes -> BytesList; ints (a list or an int array) -> Int64List; float32
# array -> FloatList.
FeatureValue = bytes | list[int] | np.ndarray


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:  # the common case: one byte (field tags, small lengths and values)
        return _BYTE[n]
    n &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varints(values) -> bytes:
    """Packed varints of int64 values; vectorized for long lists (feature indices)."""
    if len(values) < 16:
        return b"".join(_varint(int(v)) for v in values)
    v = np.asarray(values, np.int64)
    if v.min() >= 0 and v.max() < 1 << 14:
        return _small_varints(v)
    v = v.view(np.uint64)[:, None]
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = (v >> shifts) & np.uint64(0x7F)  # 7-bit groups, least significant first
    nonzero = (v >> shifts) != 0
    nbytes = np.where(nonzero.any(1), 10 - np.argmax(nonzero[:, ::-1], axis=1), 1)
    position = np.arange(10)[None, :]
    more = (position < nbytes[:, None] - 1).astype(np.uint64) * np.uint64(0x80)
    return (groups | more).astype(np.uint8)[position < nbytes[:, None]].tobytes()


def _small_varints(v: np.ndarray) -> bytes:
    """Packed varints of int64 values in [0, 2**14), one or two bytes each: the feature
    indices of every model up to 16,384 units. A dense row of 1,600 indices took 1.1 ms by
    the general path, more than its whole record's other work."""
    two = v >= 0x80
    pairs = np.empty((len(v), 2), np.uint8)
    pairs[:, 0] = (v & 0x7F) | (two << 7)  # low 7 bits, continuation bit if a second byte
    pairs[:, 1] = v >> 7
    return pairs[np.stack([np.ones_like(two), two], axis=1)].tobytes()


def _len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value: FeatureValue) -> bytes:
    """A tf.train.Feature message: bytes_list = 1, float_list = 2, int64_list = 3."""
    if isinstance(value, bytes):
        return _len_field(1, _len_field(1, value))
    if isinstance(value, np.ndarray) and value.dtype == np.float32:
        packed = value.astype("<f4").tobytes()
        return _len_field(2, _len_field(1, packed) if len(value) else b"")
    packed = _varints(value)
    return _len_field(3, _len_field(1, packed) if len(packed) else b"")


def example_bytes(features: dict[str, FeatureValue]) -> bytes:
    """Serializes {name: value} as a tf.train.Example (Features.feature is a map)."""
    return _len_field(1, b"".join(_entry(name, value) for name, value in features.items()))


def _entry(name: str, value: FeatureValue) -> bytes:
    """One map entry: key = 1 (the name), value = 2 (the Feature)."""
    if isinstance(value, list) and len(value) == 1:
        return _one_int_entry(name, int(value[0]))
    return _len_field(1, _key_field(name) + _len_field(2, _feature(value)))


@functools.cache
def _key_field(name: str) -> bytes:
    return _len_field(1, name.encode("utf-8"))


@functools.lru_cache(maxsize=4096)
def _one_int_entry(name: str, value: int) -> bytes:
    # Sizes, channels and labels repeat on every record: encode each (name, value) once.
    return _len_field(1, _key_field(name) + _len_field(2, _feature([value])))


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord_frame(record: bytes | memoryview) -> bytes:
    """One record in TFRecord framing: length, CRC of length, data, CRC of data."""
    record = bytes(record)  # a view (a shard merge's records) becomes one record's copy
    length = struct.pack("<Q", len(record))
    return length + _masked_crc(length) + record + _masked_crc(record)


TFRECORD_HEADER_BYTES = 12


def tfrecord_header_ok(head: bytes) -> bool:
    """Whether `head` (a file's first TFRECORD_HEADER_BYTES) is a length and its CRC."""
    return len(head) >= TFRECORD_HEADER_BYTES and _masked_crc(head[:8]) == head[8:12]
