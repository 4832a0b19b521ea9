"""The shard merge's order: by key, ties by payload, whatever order the parts came in."""

from __future__ import annotations

import random

from preprocessing import sharding


def test_records_sort_by_key_and_equal_keys_by_payload_in_any_input_order():
    records = [(f"k{i % 7}", memoryview(f"payload-{i}".encode())) for i in range(50)]
    want = sorted((k, v.tobytes()) for k, v in records)
    for seed in range(5):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        got = [(k, v.tobytes()) for k, v in sharding.sort_records(shuffled)]
        assert got == want


def test_a_local_part_is_indexed_to_the_same_records_as_read_whole(tmp_path):
    records = [(f"key-{i % 4}", f"payload {i}".encode() * (i + 1)) for i in range(30)]
    path = tmp_path / "train-00000-x.part"
    path.write_bytes(
        b"".join(
            sharding._PART_HEADER.pack(len(k.encode()), len(v)) + k.encode() + v for k, v in records
        )
    )
    whole = [(k, bytes(v)) for k, v in sharding._read_part(str(path))]
    with sharding._part_records([str(path)]) as indexed:
        assert [(k, bytes(v)) for k, v in indexed] == whole == records
        in_order = [(k, bytes(v)) for k, v in sharding.sort_records(indexed)]
    assert in_order == sorted(records)
