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
