"""Deterministic, exactly-once sharded writes for Beam jobs (local paths and gs://).

Each element goes to shard hash(key) % N of its group (a split, or "features"), N
from the group's size; a shard's elements are sorted by key and written to a
temporary name, then renamed. So a retried bundle rewrites the same file with the
same bytes, every element lands in exactly one shard, and two runs give
byte-identical output. Shards that no key hashed to are written empty, so the
`-of-N` names are complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable, Iterable
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing.manifest import join

# Enough data for >= 10 shards (TensorFlow's guidance for parallel reads and FILE
# auto-sharding) means at least this many elements per shard.
MIN_ELEMENTS_PER_SHARD = 1000


def write_atomically(path: str, chunks: Iterable[bytes], gzip: bool = False) -> None:
    """Writes to a temporary name, then renames: a reader never sees a partial file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    ctype = CompressionTypes.GZIP if gzip else CompressionTypes.UNCOMPRESSED
    with FileSystems.create(tmp, compression_type=ctype) as f:
        for chunk in chunks:
            f.write(chunk)
    if FileSystems.exists(path):  # a retried bundle wrote it before, with the same content
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def shard_of(key: str, num_shards: int) -> int:
    h = int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "little")
    return h % num_shards


def num_shards_for(count: int, nbytes: int, target_mb: float, fixed: int | None = None) -> int:
    """`fixed` if given; else enough shards of ~target_mb, and >= 10 when each gets
    >= MIN_ELEMENTS_PER_SHARD elements."""
    if fixed:
        return fixed
    by_size = math.ceil(nbytes / (target_mb * 1e6))
    return max(1, by_size, min(10, count // MIN_ELEMENTS_PER_SHARD))


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """(count, bytes) pairs -> their element-wise sum."""
    n = b = 0
    for count, nbytes in pairs:
        n, b = n + count, b + nbytes
    return n, b


# write(out, group, index, total, sorted [(key, payload)]) -> shard info dict.
ShardWriter = Callable[[str, str, int, int, list], dict]


class Sharded(NamedTuple):
    shards: beam.PCollection  # one info dict per shard (written by the ShardWriter)
    counts: beam.PCollection  # singleton {group: (elements, payload bytes)}


class WriteShards(beam.PTransform):
    """PCollection[(group, key, payload: bytes)] -> Sharded."""

    def __init__(self, out: str, writer: ShardWriter, target_mb: float, fixed: int | None):
        super().__init__()
        self.out, self.writer, self.target_mb, self.fixed = out, writer, target_mb, fixed

    def expand(self, elements):
        target_mb, fixed, out, writer = self.target_mb, self.fixed, self.out, self.writer
        counts = (
            elements
            | "SizeOf" >> beam.Map(lambda e: (e[0], (1, len(e[2]))))
            | "CountPerGroup" >> beam.CombinePerKey(_sum_pairs)
            | "CountsDict" >> beam.combiners.ToDict()
        )
        num_shards = beam.pvalue.AsSingleton(
            counts
            | "NumShards"
            >> beam.Map(
                lambda c: {g: num_shards_for(n, b, target_mb, fixed) for g, (n, b) in c.items()}
            )
        )

        def write(element, n):
            (group, index), items = element
            yield writer(out, group, index, n[group], sorted(items))

        written = (
            elements
            | "AssignShard"
            >> beam.Map(lambda e, n: ((e[0], shard_of(e[1], n[e[0]])), (e[1], e[2])), num_shards)
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShard" >> beam.FlatMap(write, num_shards)
        )

        def fill_empty(_, written, n):
            seen = {(s["group"], s["index"]) for s in written}
            for group, total in n.items():
                for index in range(total):
                    if (group, index) not in seen:
                        yield writer(out, group, index, total, [])

        empty = (
            elements.pipeline
            | "Once" >> beam.Create([None])
            | "FillEmpty" >> beam.FlatMap(fill_empty, beam.pvalue.AsList(written), num_shards)
        )
        shards = (written, empty) | "AllShards" >> beam.Flatten()
        return Sharded(shards, counts)


class WriteErrors(beam.PTransform):
    """PCollection[{"uri", "reason", ...}] -> singleton count; writes one sorted JSONL file
    (empty when there are no errors, so its presence says the report is complete)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, errors):
        path = self.path

        def write(element):
            lines = sorted(json.dumps(e, sort_keys=True) for e in element[1])
            write_atomically(path, (ln.encode() + b"\n" for ln in lines))
            yield len(lines)

        def empty_if_none(n: int) -> int:
            if n == 0:
                write_atomically(path, [])
            return n

        return (
            errors
            | "OneFile" >> beam.Map(lambda e: (0, e))
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.FlatMap(write)
            | "Sum" >> beam.CombineGlobally(sum)
            | "EmptyIfNone" >> beam.Map(empty_if_none)
        )


def shard_path(out: str, group: str, index: int, total: int, suffix: str) -> str:
    return join(out, f"{group}-{index:05d}-of-{total:05d}{suffix}")
