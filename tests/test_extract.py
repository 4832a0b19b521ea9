"""`sae extract` end to end on the real Beam runner, and the feature readers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline import extract, feature_records, features
from preprocessing import job, manifest, records, wire
from preprocessing.errors import UserError
from tests.collections import good_keys, messy_collection
from tests.helpers import FAST
from tests.helpers import sae as _cli


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    """A small trained model (its quality does not matter here)."""
    return tiny_model


def _encode_all(model_dir: str, data_root: str) -> dict[str, tuple[np.ndarray, int | None]]:
    """key -> (dense activations from the SavedModel, label), computed outside Beam."""
    m = manifest.load(data_root)
    fn = tf.saved_model.load(model_dir).signatures["encode"]
    recs = [
        records.decode(r.numpy())
        for s in ("train", "eval")
        for r in tf.data.TFRecordDataset(m.shard_paths(s))
    ]
    acts = fn(images=tf.constant(np.stack([r.image for r in recs])))["activations"].numpy()
    return {r.key: (a, r.label) for r, a in zip(recs, acts, strict=True)}


def test_sparsify_properties():
    rng = np.random.default_rng(0)
    acts = rng.random((6, 10)).astype(np.float32)
    for row, (idx, vals) in zip(acts, extract.sparsify(acts, "topk", 3), strict=True):
        assert len(idx) == 3 and (np.diff(idx) > 0).all()
        assert vals.min() >= np.sort(row)[-3]
    for row, (idx, vals) in zip(acts, extract.sparsify(acts, "threshold", 0.5), strict=True):
        np.testing.assert_array_equal(idx, np.flatnonzero(row >= 0.5))
        np.testing.assert_array_equal(vals, row[idx])
    assert all(len(i) == 10 for i, _ in extract.sparsify(acts, "none", 0))
    assert extract.parse_sparsify("default", 0.05) == ("threshold", 0.05)
    for bad in ("topk:0", "threshold:x", "nope", "none:3"):
        with pytest.raises(UserError, match="--sparsify"):
            extract.parse_sparsify(bad, 0.1)


def test_row_payload_round_trip():
    """The shard writers' payload gives back the TFRecord record and the Parquet columns
    exactly, without parsing the record."""
    rng = np.random.default_rng(0)
    for k, split, label in ((0, "", None), (1, "train", 0), (5, "eval", 7), (40, "", 3)):
        idx = np.sort(rng.choice(64, k, replace=False)).astype(np.int32)
        rec = feature_records.FeatureRecord(
            f"key/{k}", idx, rng.random(k).astype(np.float32), 64, split, label
        )
        payload = feature_records.encode_row(rec)
        assert bytes(feature_records.row_example(payload)) == feature_records.encode(rec)
        back = feature_records.row_record(rec.key, payload)
        np.testing.assert_array_equal(back.indices, rec.indices)
        np.testing.assert_array_equal(back.values, rec.values)
        assert (back.dim, back.split, back.label) == (64, split, label)
        parsed = feature_records.decode(bytes(feature_records.row_example(payload)))
        np.testing.assert_array_equal(parsed.values, back.values)


def test_round_trip_equals_the_models_encode(digits, model, tmp_path):
    out = str(tmp_path / "feats")
    m = extract.run(
        [
            "--data",
            digits,
            "--model",
            model,
            "--output",
            out,
            "--sparsify",
            "topk:4",
            "--num-shards",
            "3",
            *FAST,
        ]
    )
    n = manifest.load(digits).num_examples("train") + manifest.load(digits).num_examples("eval")
    assert m["num_inputs"] == m["num_written"] == n and m["num_errors"] == 0
    assert len(m["shards"]) == 3 and sum(s["num_examples"] for s in m["shards"]) == n
    assert m["l0"]["mean"] == 4 and m["l0"]["histogram"][4] == n
    want = _encode_all(model, digits)
    # As SparseTensors through tf.data.
    seen = {}
    for batch in features.dataset(out, batch_size=100):
        dense = tf.sparse.to_dense(batch["features"]).numpy()
        for key, row, label in zip(
            batch["key"].numpy(), dense, batch["label"].numpy(), strict=True
        ):
            seen[key.decode()] = (row, label)
    assert seen.keys() == want.keys()
    for key, (row, label) in seen.items():
        acts, want_label = want[key]
        top = np.argsort(-acts)[:4]
        np.testing.assert_allclose(row[top], acts[top], rtol=1e-5, atol=1e-6)
        assert np.count_nonzero(row) <= 4 and label == want_label
    # As a DataFrame and a scipy matrix: the same rows.
    df = features.dataframe(out)
    assert len(df) == n and df["key"].is_unique
    matrix, keys, labels, splits = features.sparse_matrix(out)
    assert matrix.shape == (n, m["dim"]) and set(splits) == {"train", "eval"}
    for i in (0, n // 2, n - 1):
        np.testing.assert_allclose(matrix[i].toarray()[0], seen[keys[i]][0], rtol=1e-6)
        assert labels[i] == seen[keys[i]][1]


def test_overwrite_swaps_sets_and_refuses_without_it(digits, model, tmp_path):
    out = tmp_path / "feats"
    base = ["--data", digits, "--model", model, "--output", str(out), *FAST]
    extract.run([*base, "--num-shards", "3"])
    with pytest.raises(UserError, match="not empty"):
        extract.run(base)
    m = extract.run([*base, "--num-shards", "2", "--overwrite", "--format", "parquet"])
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == [
        "features-00000-of-00002.parquet",
        "features-00001-of-00002.parquet",
        "manifest.json",
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(features.dataframe(str(out))) == m["num_written"]
    with pytest.raises(UserError, match="no tfrecord files"):
        features.dataset(str(out))


@pytest.mark.slow
def test_rerun_after_a_killed_run_is_exactly_once(model, tmp_path):
    # 20,000 patches encoded 16 at a time: long enough to be killed mid-run.
    data = str(tmp_path / "patches")
    job.run(
        [
            "--input",
            "builtin:natural-images",
            "--output",
            data,
            "--patches",
            "2000",
            "--patch-size",
            "8",
            "--channels",
            "1",
            *FAST,
        ]
    )
    out = tmp_path / "feats"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "extract",
        "--data",
        data,
        "--model",
        model,
        "--output",
        str(out),
        "--batch-size",
        "16",
        "--num-shards",
        "4",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob(".staging-*/.parts-*/*.part")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its Beam workers
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert _cli(*cmd[3:]).returncode == 2  # leftovers: refused without --overwrite
    r = _cli(*cmd[3:], "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    keys = [
        feature_records.decode(rec.numpy()).key
        for s in m["shards"]
        for rec in tf.data.TFRecordDataset(str(out / s["tfrecord"]))
    ]
    assert len(keys) == len(set(keys)) == m["num_inputs"] == m["num_written"] == 20_000
    assert not list(out.glob(".staging-*"))


def test_bad_records_become_error_entries(digits, model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    m = json.loads((data / "manifest.json").read_text())
    shard = data / m["splits"]["train"]["shards"][0]["path"]
    bad = [records.encode("odd-shape", np.zeros((4, 4, 1), np.uint8)), b"\x08\x96\x01garbage"]
    with open(shard, "ab") as f:
        for b in bad:
            f.write(wire.tfrecord_frame(b))
    out = tmp_path / "feats"
    res = extract.run(["--data", str(data), "--model", model, "--output", str(out), *FAST])
    total = m["splits"]["train"]["num_examples"] + m["splits"]["eval"]["num_examples"]
    assert res["num_errors"] == 2 and res["num_written"] == total
    assert res["num_inputs"] == total + 2
    errors = [json.loads(ln) for ln in (out / extract.ERRORS_FILE).read_text().splitlines()]
    reasons = {e["uri"]: e["reason"] for e in errors}
    assert "image is 4x4x1 but the model takes 8x8x1" in reasons["odd-shape"]
    assert "not a valid example" in reasons[str(shard)]


def test_raw_images_go_through_the_preprocessing_decode_path(model, tmp_path):
    expect = messy_collection(tmp_path / "src", np.random.default_rng(3))
    out = tmp_path / "feats"
    m = extract.run(
        [
            "--data",
            str(tmp_path / "src"),
            "--model",
            model,
            "--output",
            str(out),
            "--max-error-fraction",
            "0.5",
            *FAST,
        ]
    )
    assert m["num_inputs"] == len(expect)
    assert m["num_errors"] == sum(bad is not None for bad in expect.values())
    df = features.dataframe(str(out))
    assert set(df["key"]) == good_keys(expect, tmp_path / "src")
    assert m["label_names"] == ["cat", "dog"] and set(df["split"]) == {""}


def test_too_many_failures_use_the_shared_failure_rule(model, tmp_path):
    """As `sae preprocess`: `_FAILED.json` {"reason", "exit_code"} beside the error report
    (here the staged set's), no manifest, and the reason is the user's line."""
    messy_collection(tmp_path / "src", np.random.default_rng(4))
    out = tmp_path / "feats"
    argv = ["--data", str(tmp_path / "src"), "--model", model, "--output", str(out)]
    with pytest.raises(UserError, match="could not be encoded") as e:
        extract.run([*argv, "--max-error-fraction", "0", *FAST])
    assert e.value.exit_code == extract.EXIT_TOO_MANY_ERRORS
    (failed_file,) = out.glob(f".staging-*/{extract.FAILED_NAME}")
    failed = json.loads(failed_file.read_text())
    assert failed["exit_code"] == extract.EXIT_TOO_MANY_ERRORS
    assert str(e.value) == f"{failed['reason']}; no manifest was written"
    assert (failed_file.parent / extract.ERRORS_FILE).exists()
    assert not (out / manifest.MANIFEST_NAME).exists()


def test_gcs_in_and_out(digits, model, gcs_prefix):
    for src_root, dst in ((digits, f"{gcs_prefix}/data"), (str(Path(model)), f"{gcs_prefix}/m")):
        for path in Path(src_root).rglob("*"):
            if path.is_file():
                tf.io.gfile.makedirs(os.path.dirname(f"{dst}/{path.relative_to(src_root)}"))
                tf.io.gfile.copy(str(path), f"{dst}/{path.relative_to(src_root)}")
    out = f"{gcs_prefix}/feats"
    m = extract.run(
        ["--data", f"{gcs_prefix}/data", "--model", f"{gcs_prefix}/m", "--output", out, *FAST]
    )
    assert m["num_written"] == m["num_inputs"] > 0
    assert len(features.dataframe(out)) == m["num_written"]
    assert sum(1 for _ in features.dataset(out)) == m["num_written"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "/no/model"], "no model at /no/model"),
        (["--sparsify", "topk:0"], "invalid --sparsify"),
        (["--format", "csv"], "invalid --format"),
    ],
)
def test_cli_errors_are_one_line(digits, model, tmp_path, args, needle):
    base = {"--data": digits, "--model": model, "--output": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    r = _cli("extract", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_model_and_data_shape_mismatch_is_a_clear_error(model, tmp_path):
    data = str(tmp_path / "faces")
    job.run(["--input", "builtin:faces", "--output", data, *FAST])
    r = _cli("extract", "--data", data, "--model", model, "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert f"dataset {data}: image is 25x25x1 but the model at" in line
    assert "takes 8x8x1" in line
