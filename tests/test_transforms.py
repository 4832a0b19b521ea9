"""The Beam transforms one at a time, on Beam's test runner (TestPipeline, assert_that):
the shard writer and the error writer (preprocessing/sharding.py), ReadAndDecode
(preprocessing/decode.py) and extract's record parser, Encode and SumStats
(pipeline/extract.py). The end-to-end runs (test_preprocess, test_extract) cover them
together; these name the transform that breaks."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import extract
from pipeline import feature_records as fr
from preprocessing import decode, progress, records, sharding, sources, storage
from tests.collections import good_keys, messy_collection
from trainer import export
from trainer.config import apply_overrides, preset
from trainer.model import SparseAutoencoder

# In-process, one worker: what the jobs use for tiny data (tests/helpers.py FAST).
RUNNER = ["--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(argv=RUNNER)


# ----------------------------------------------------------------------------
# WriteShards, WriteErrors
# ----------------------------------------------------------------------------
def write_listing(out: str, group: str, index: int, total: int, recs: list) -> dict:
    """A ShardWriter: one JSON file of the shard's [key, payload] pairs, in the given order."""
    rows = [[k, bytes(v).decode()] for k, v in recs]
    path = sharding.shard_path(out, group, index, total, ".json")
    storage.publish(path, json.dumps(rows))
    return {"group": group, "index": index, "num_examples": len(recs)}


def test_write_shards_puts_each_element_in_its_hashed_shard_sorted_and_fills_empty_ones(
    tmp_path,
):
    shards = {"train": 4, "eval": 3}
    # Duplicate keys (a list file naming an image twice), one group with a shard no key hits.
    elements = [("train", f"k{i % 9}", f"p{i}".encode()) for i in range(40)]
    elements += [("eval", "only", b"x"), ("eval", "only", b"a")]
    batches = [elements[i : i + 5] for i in range(0, len(elements), 5)]
    out = str(tmp_path / "out")
    want: dict[tuple[str, int], list] = {
        (g, i): [] for g, n in shards.items() for i in range(n)
    }  # fmt: skip
    for group, key, payload in elements:
        want[(group, sharding.shard_of(key, shards[group]))].append([key, payload.decode()])
    with _pipeline() as p:
        sharded = (
            p
            | "Batches" >> beam.Create(batches)
            | "Write" >> sharding.WriteShards(out, write_listing, p | "N" >> beam.Create([shards]))
        )
        infos = [{"group": g, "index": i, "num_examples": len(v)} for (g, i), v in want.items()]
        assert_that(sharded.shards, equal_to(infos), label="OneInfoPerShard")
        nbytes = {g: sum(len(e[2]) for e in elements if e[0] == g) for g in shards}
        counts = {g: (sum(e[0] == g for e in elements), nbytes[g]) for g in shards}
        assert_that(sharded.counts, equal_to([counts]), label="Counts")
    for (group, index), rows in want.items():
        path = Path(sharding.shard_path(out, group, index, shards[group], ".json"))
        assert json.loads(path.read_text()) == sorted(rows), path  # by key, then payload
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(
        Path(sharding.shard_path(out, g, i, shards[g], ".json")).name for g, i in want
    )  # no part files or temporary names left


def test_write_errors_writes_one_sorted_file_and_counts_even_when_empty(tmp_path):
    errors = [{"uri": f"gs://b/{i}.png", "reason": "truncated"} for i in (3, 1, 2)]
    for name, elements in (("some", errors), ("none", [])):
        path = tmp_path / f"{name}.jsonl"
        with _pipeline() as p:
            pcoll = p | "Errors" >> beam.Create(elements)
            assert_that(pcoll | sharding.WriteErrors(str(path)), equal_to([len(elements)]))
        lines = path.read_text().splitlines()
        assert lines == sorted(json.dumps(e, sort_keys=True) for e in elements)


# ----------------------------------------------------------------------------
# ReadAndDecode
# ----------------------------------------------------------------------------
def test_read_and_decode_routes_every_input_to_an_example_or_an_error(tmp_path):
    root = tmp_path / "src"
    expect = messy_collection(root, np.random.default_rng(5))
    options = decode.DecodeOptions((8, 6, 3), resize=True, eval_fraction=0.3)
    good = good_keys(expect, root)
    labels = ["cat", "dog"]  # the class folders, sorted; top-level.png has none

    def label_of(key: str) -> int | None:
        top = key.split("/", 1)[0]
        return labels.index(top) if top in labels else None

    def summary(ex: decode.Example) -> tuple:
        assert ex.pixels.shape == (8, 6, 3) and ex.pixels.dtype == np.uint8
        return ex.key, ex.split, ex.label

    def reason_matches(error: dict) -> bool:
        return expect[error["uri"]] in error["reason"]

    with _pipeline() as p:
        d = p | decode.ReadAndDecode(sources.parse(str(root)), options, reporter=None)
        assert_that(d.num_inputs, equal_to([len(expect)]), label="NumInputs")
        assert_that(d.labels, equal_to([labels]), label="Labels")
        examples = d.examples | "Flat" >> beam.FlatMap(lambda b: b) | beam.Map(summary)
        want = [(k, decode.split_of(k, 0.3), label_of(k)) for k in good]
        assert_that(examples, equal_to(want), label="Examples")
        assert_that(
            d.errors | "Uri" >> beam.Map(lambda e: e["uri"]),
            equal_to([u for u, bad in expect.items() if bad]),
            label="ErrorUris",
        )
        assert_that(d.errors | beam.Map(reason_matches), equal_to([True] * 4), label="Reasons")
        assert_that(
            d.accepted | "Accepted" >> beam.CombineGlobally(sum), equal_to([len(good)]),
            label="AcceptedCount",
        )  # fmt: skip


# ----------------------------------------------------------------------------
# Extract: the record parser, Encode, SumStats
# ----------------------------------------------------------------------------
HIDDEN = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """An untrained 5x4x1 model with random weights: some units fire, some do not."""
    cfg = apply_overrides(preset("tiny"), ["input_shape=5,4,1", f"hidden={HIDDEN}", "rho=0.1"])
    model = SparseAutoencoder(cfg)
    rng = np.random.default_rng(2)
    model.w1.assign(rng.normal(0, 0.05, model.w1.shape).astype(np.float32))
    model.b1.assign(np.array([-30, -1, 0, 1, -0.5, 0.5], np.float32))
    path = str(tmp_path_factory.mktemp("model") / "export")
    export.save(model, path, {"config": cfg.to_dict(), "image_shape": [5, 4, 1]})
    return path


def test_parse_input_record_turns_bad_records_into_error_entries():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 4, 1), np.uint8)
    elements = [
        ("a.tfrecord", records.encode("good", image, 1)),
        ("a.tfrecord", records.encode("odd-shape", image[:4], 0)),
        ("b.tfrecord", b"\x08\x96\x01garbage"),
    ]
    with _pipeline() as p:
        parsed = (
            p
            | beam.Create(elements)
            | beam.FlatMap(
                extract.parse_input_record, (5, 4, 1), {"a.tfrecord": "eval", "b.tfrecord": "train"}
            ).with_outputs("errors", main="examples")
        )
        got = parsed.examples | beam.Map(
            lambda ex: (ex.split, ex.key, ex.label, ex.pixels.tobytes())
        )
        assert_that(got, equal_to([("eval", "good", 1, image.tobytes())]), label="Examples")
        uris = parsed.errors | "Uri" >> beam.Map(lambda e: e["uri"])
        assert_that(uris, equal_to(["odd-shape", "b.tfrecord"]), label="Errors")
        shape_reason = parsed.errors | beam.Filter(lambda e: e["uri"] == "odd-shape")
        assert_that(
            shape_reason | beam.Map(lambda e: "4x4x1 but the model takes 5x4x1" in e["reason"]),
            equal_to([True]),
            label="ShapeReason",
        )


@pytest.mark.parametrize(("kind", "value"), [("threshold", 0.5), ("topk", 2), ("none", 0)])
def test_encode_and_sum_stats_equal_the_models_encode_outside_beam(model_dir, kind, value):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (11, 5, 4, 1), np.uint8)
    examples = [decode.Example("train", f"k{i:02d}", i % 3, px) for i, px in enumerate(pixels)]
    cuts = [(0, 4), (4, 9), (9, 11)]
    batches = [examples[a:b] for a, b in cuts]
    encode = tf.saved_model.load(model_dir).signatures["encode"]
    # The same batches as the DoFn's: on some CPUs a batch's size changes the last bits.
    acts = np.concatenate(
        [encode(images=tf.constant(pixels[a:b]))["activations"].numpy() for a, b in cuts]
    )
    rows = extract.sparsify(acts, kind, value)
    want = [
        (ex.key, idx.tolist(), vals.tolist(), ex.label)
        for ex, (idx, vals) in zip(examples, rows, strict=True)
    ]
    kept = np.zeros_like(acts, np.int64)
    for i, (idx, _) in enumerate(rows):
        kept[i, idx] = 1

    def features(batch: list) -> list:
        out = []
        for group, key, payload in batch:
            r = fr.decode(bytes(fr.row_example(payload)))  # the TFRecord's Example
            row = fr.row_record(key, payload)  # the Parquet row's columns
            assert group == "features" and r.key == key and r.dim == row.dim == HIDDEN
            assert (row.indices.tolist(), row.values.tolist(), row.label, row.split) == (
                r.indices.tolist(),
                r.values.tolist(),
                r.label,
                r.split,
            )
            out.append((r.key, r.indices.tolist(), r.values.tolist(), r.label))
        return out

    def close_to_numpy(stats) -> bool:
        count, hist, kept_sum, act_sum = stats
        nnz = [len(idx) for idx, _ in rows]
        return (
            count == len(examples)
            and hist.tolist() == np.bincount(nnz, minlength=HIDDEN + 1).tolist()
            and kept_sum.tolist() == kept.sum(0).tolist()
            and np.allclose(act_sum, acts.astype(np.float64).sum(0), rtol=1e-5)
        )

    with _pipeline() as p:
        encoded = (
            p
            | beam.Create(batches)
            | beam.ParDo(extract.Encode(model_dir, kind, value, progress.Reporter(None)))
            .with_outputs("stats", main="features")
        )  # fmt: skip
        got = encoded.features | beam.FlatMap(features)
        assert_that(got, equal_to(want), label="Features")
        stats = encoded.stats | beam.CombineGlobally(extract.SumStats())
        assert_that(stats | beam.Map(close_to_numpy), equal_to([True]), label="Stats")
