"""Bad invocations of every command, as a new user would type them (issue #12).

Each case runs `python -m pipeline.cli ...` as a real process and asserts the documented
exit code, exactly one line on stderr (the error, which says what is wrong), no traceback,
and that nothing was written: the case's output is absent, or the old output is left as it
was. Cases that can only be caught while reading (a shard holding other than its manifest's
count) assert instead that no result (export, manifest) was written.

All cases run once, two at a time, in a module fixture; each test checks one result.
Slow: some 70 processes that import Beam (and some TensorFlow), a few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from preprocessing import manifest as manifest_lib
from preprocessing import tf_noise
from tests.helpers import free_port, sae

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # {data}, {model}, {feats}, {out}, {files}... filled in per case
    needle: str  # in the error line
    code: int = 2
    result: str | None = None  # only this must be absent (read-time checks), not all output
    env: tuple[tuple[str, str | None], ...] = ()  # changes to the environment; None: unset


def _c(name, argv: str, needle: str, code: int = 2, result: str | None = None, env=()) -> Case:
    return Case(name, tuple(argv.split()), needle, code, result, tuple(env))


PRE = "preprocess --input builtin:digits --output {out}"
TRAIN = "train --data {data} --workdir {out} --preset tiny"
EXTRACT = "extract --data {data} --model {model} --output {out}"
RETRAIN = "retrain --data {data} --models-root {out}"
# Cloud Storage that cannot be reached: the emulator's variable aimed at a closed port.
UNREACHABLE = (("STORAGE_EMULATOR_HOST", "http://127.0.0.1:{closed_port}"),)
# No credentials anywhere: no key file, an empty gcloud config, no metadata server.
NO_CREDENTIALS = (
    ("STORAGE_EMULATOR_HOST", None),
    ("GOOGLE_APPLICATION_CREDENTIALS", None),
    ("CLOUDSDK_CONFIG", "{files}/empty"),
    ("NO_GCE_CHECK", "true"),
)
STORAGE_SECONDS = 20

# fmt: off
CASES = [
    # --- numeric flags: one shared range check, the flag named ---
    _c("pre-num-shards-negative", f"{PRE} --num-shards -1",
       "--num-shards: expected an integer >= 1"),
    _c("pre-num-shards-zero", f"{PRE} --num-shards 0", "got '0'"),
    _c("pre-shard-mb-zero", f"{PRE} --target-shard-mb 0",
       "--target-shard-mb: expected a number > 0"),
    _c("pre-shard-mb-nan", f"{PRE} --target-shard-mb nan", "got 'nan'"),
    _c("pre-eval-fraction", f"{PRE} --eval-fraction 1.5",
       "--eval-fraction: expected a number >= 0 and <= 1"),
    _c("pre-max-error-fraction", f"{PRE} --max-error-fraction -0.1", "--max-error-fraction"),
    _c("pre-patches-zero", f"{PRE} --patches 0", "--patches: expected an integer >= 1"),
    _c("pre-patch-size-text", f"{PRE} --patches 4 --patch-size abc",
       "--patch-size: expected an integer"),
    _c("pre-max-pixels", f"{PRE} --max-pixels 0", "--max-pixels"),
    _c("pre-resize", f"{PRE} --resize 0x5", "expected HxW"),
    _c("pre-channels", f"{PRE} --channels 2", "--channels: invalid choice"),
    _c("pre-seed", f"{PRE} --seed x", "--seed: invalid int value"),
    _c("train-cpu-replicas", f"{TRAIN} --cpu-replicas -1",
       "--cpu-replicas: expected an integer >= 0"),
    _c("train-set-zero", f"{TRAIN} --set hidden=0", "invalid hidden=0"),
    _c("train-set-inf", f"{TRAIN} --set learning_rate=inf", "expected a finite number"),
    _c("train-set-unknown", f"{TRAIN} --set nosuch=1", "unknown config key 'nosuch'"),
    _c("train-preset", f"{TRAIN} --preset nope", "--preset: invalid choice"),
    _c("extract-batch-size", f"{EXTRACT} --batch-size 0", "--batch-size: expected an integer >= 1"),
    _c("extract-max-error-fraction", f"{EXTRACT} --max-error-fraction 2", "--max-error-fraction"),
    _c("extract-num-shards", f"{EXTRACT} --num-shards -3", "--num-shards"),
    _c("extract-shard-mb", f"{EXTRACT} --target-shard-mb -1", "--target-shard-mb"),
    _c("extract-sparsify", f"{EXTRACT} --sparsify topk:0", "invalid --sparsify"),
    _c("extract-format", f"{EXTRACT} --format csv", "invalid --format"),
    _c("extract-sparsify-nan", f"{EXTRACT} --sparsify threshold:nan", "invalid --sparsify"),
    _c("retrain-dead-fraction", f"{RETRAIN} --max-dead-fraction 2", "--max-dead-fraction"),
    _c("retrain-rho-tolerance", f"{RETRAIN} --rho-tolerance -1", "--rho-tolerance"),
    _c("retrain-set", f"{RETRAIN} --set epochs=0", "invalid epochs=0"),
    _c("probe-max-iter", "evaluate-features --features {out} --data {data} --max-iter 0",
       "--max-iter: expected an integer >= 1"),
    _c("k8s-workers", "k8s render --workers 0", "--workers: expected an integer >= 1"),
    _c("k8s-timeout", "k8s submit --timeout -1", "--timeout: expected a number >= 0"),
    _c("k8s-poll", "k8s submit --poll -5", "--poll"),
    # --- paths: say what the flag and the file really are ---
    _c("pre-missing-dir", "preprocess --input {files}/nosuch --output {out}",
       "--input {files}/nosuch does not exist"),
    _c("pre-single-image", "preprocess --input {files}/photo.jpg --output {out}",
       "--input {files}/photo.jpg is a single file"),
    _c("pre-json-file", "preprocess --input {files}/notes.json --output {out}", "is a single file"),
    _c("pre-empty-folder", "preprocess --input {files}/empty --output {out}",
       "the folder has no files"),
    _c("pre-glob", "preprocess --input {files}/*.png --output {out}", "the glob matches no files"),
    _c("pre-list-missing", "preprocess --input {files}/list.csv --output {out}",
       "list file {files}/list.csv does not exist; check the --input path"),
    _c("pre-builtin", "preprocess --input builtin:nope --output {out}", "unknown built-in"),
    _c("pre-output-not-empty", "preprocess --input builtin:digits --output {old}", "is not empty"),
    _c("extract-data-missing", "extract --data {files}/nosuch --model {model} --output {out}",
       "--data {files}/nosuch does not exist"),
    _c("extract-data-file", "extract --data {files}/photo.jpg --model {model} --output {out}",
       "--data {files}/photo.jpg is a single file"),
    _c("extract-model-missing", "extract --data {data} --model {files}/nosuch --output {out}",
       "no model at"),
    _c("extract-output-not-empty", "extract --data {data} --model {model} --output {old}",
       "is not empty"),
    _c("retrain-data-missing", "retrain --data {files}/nosuch --models-root {out}",
       "--data {files}/nosuch does not exist"),
    _c("train-data-missing", "train --data {files}/nosuch --workdir {out}", "no dataset at"),
    _c("train-data-is-images", "train --data {files}/empty --workdir {out}",
       "manifest.json is missing"),
    _c("probe-features-missing", "evaluate-features --features {files}/nosuch --data {data}",
       "no feature set at {files}/nosuch"),
    _c("datasets-unknown", "datasets export nope {out}", "invalid choice: 'nope'"),
    _c("unknown-command", "nosuch --x 1", "unknown command 'nosuch'"),
    # --- silent empty results ---
    _c("extract-split-unknown", f"{EXTRACT} --split nosuch", "invalid --split 'nosuch'"),
    _c("extract-split-empty", "extract --data {no_eval} --model {model} --output {out} "
       "--split eval", "has no examples in split(s) eval"),
    _c("pre-all-rejected", "preprocess --input {files}/junk --output {out} --resize 8x8 "
       "--channels 1 --max-error-fraction 1", "2 of 2 inputs were rejected (all of them",
       code=3, result="manifest.json"),
    # --- data that lies about itself ---
    _c("train-empty-shard", "train --data {empty_shard} --workdir {out}", "is empty (0 bytes)"),
    _c("train-missing-shard", "train --data {missing_shard} --workdir {out}", "is missing"),
    _c("train-garbage-shard", "train --data {garbage_shard} --workdir {out}",
       "is not a TFRecord file"),
    _c("retrain-eval-data-bad", f"{RETRAIN} --eval-data {{bad_manifest}}", "is not valid JSON"),
    _c("train-bad-manifest", "train --data {bad_manifest} --workdir {out}", "is not valid JSON"),
    _c("train-count-lies", "train --data {count_lies} --workdir {out} --preset tiny",
       "records but the manifest counts", result="export"),
    _c("extract-empty-shard", "extract --data {empty_shard} --model {model} --output {out}",
       "is empty (0 bytes)"),
    _c("extract-garbage-shard", "extract --data {garbage_shard} --model {model} --output {out}",
       "is not a TFRecord file"),
    _c("extract-count-lies", "extract --data {count_lies} --model {model} --output {out}",
       "records but its manifest counts", result="manifest.json"),
    # --- storage unreachable or forbidden: one request, one line, every command ---
    _c("gcs-no-credentials", "preprocess --input gs://b/photos --output {out}",
       "--input gs://b/photos: no Google Cloud credentials found", env=NO_CREDENTIALS),
    _c("gcs-no-credentials-retrain", "retrain --data {data} --models-root gs://b/models",
       "no Google Cloud credentials found", env=NO_CREDENTIALS),
    _c("gcs-no-bucket", "preprocess --input gs://no-such-bucket/photos --output {out}",
       "bucket 'no-such-bucket' does not exist"),
    _c("gcs-no-bucket-probe", "evaluate-features --features gs://no-such-bucket/f --data {data}",
       "bucket 'no-such-bucket' does not exist"),
]
# Cloud Storage unreachable, for reads and writes of every command: (command line, the
# flag and URI the error line names).
CASES += [
    _c(f"gcs-unreachable-{argv.split()[0]}-{i}", argv,
       f"{where}: cannot reach Cloud Storage", env=UNREACHABLE)
    for i, (argv, where) in enumerate([
        ("preprocess --input gs://b/photos --output {out}", "--input gs://b/photos"),
        ("preprocess --input builtin:digits --output gs://b/ds", "--output gs://b/ds"),
        ("train --data {data} --workdir gs://b/run", "--workdir gs://b/run"),
        ("extract --data {data} --model gs://b/models --output {out}", "--model gs://b/models"),
        ("models list --models-root gs://b/models", "--models-root gs://b/models"),
        ("datasets export digits gs://b/png", "gs://b/png"),
    ])
]
# fmt: on


def _cli(argv: list[str], cwd: Path, changes: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI's job
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return sae(*argv, cwd=cwd, env=env)


def _tree(path: Path) -> dict[str, str]:
    """Relative path -> content digest of every file under `path`."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _broken_copies(data: Path, base: Path) -> dict[str, Path]:
    """Copies of the dataset with one lie each."""
    m = manifest_lib.load(str(data))
    first = m.data["splits"]["train"]["shards"][0]["path"]
    out = {}
    for name in ("empty_shard", "missing_shard", "garbage_shard", "bad_manifest", "count_lies",
                 "no_eval"):  # fmt: skip
        out[name] = base / name
        shutil.copytree(data, out[name])
    (out["empty_shard"] / first).write_bytes(b"")
    (out["missing_shard"] / first).unlink()
    with (out["garbage_shard"] / first).open("r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 4)
    (out["bad_manifest"] / manifest_lib.MANIFEST_NAME).write_text("{not json")
    for name, edit in (("count_lies", "lie"), ("no_eval", "no_eval")):
        path = out[name] / manifest_lib.MANIFEST_NAME
        d = json.loads(path.read_text())
        if edit == "lie":  # one more than the shard holds
            d["splits"]["train"]["shards"][0]["num_examples"] += 1
            d["splits"]["train"]["num_examples"] += 1
        else:
            d["splits"]["eval"] = {"num_examples": 0, "shards": []}
        path.write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, gcs_emulator, digits, tiny_training) -> dict:
    """name -> (completed process, the case's folder, its placeholders, seconds)."""
    base = tmp_path_factory.mktemp("bad")
    data = Path(digits)
    # A good run is quiet too: none of TensorFlow's C++ start-up lines.
    stderr = (tiny_training / "stderr.txt").read_text()
    assert not tf_noise.NOISE.search(stderr), stderr[-2000:]
    files = base / "files"
    (files / "empty").mkdir(parents=True)
    (files / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a photo")
    (files / "notes.json").write_text("{}")
    (files / "junk").mkdir()
    for name in ("a.png", "b.jpg"):
        (files / "junk" / name).write_bytes(b"not an image")
    paths = {"data": data, "model": tiny_training / "w" / "export", "files": files,
             "closed_port": free_port(), **_broken_copies(data, base)}  # fmt: skip

    def one(case: Case):
        tmp = base / "cases" / case.name
        tmp.mkdir(parents=True)
        old = tmp / "old"
        old.mkdir()
        (old / "keep.txt").write_text("old output")
        fill = {k: str(v) for k, v in paths.items()} | {"out": str(tmp / "out"), "old": str(old)}
        argv = [a.format(**fill) for a in case.argv]
        env = {k: v if v is None else v.format(**fill) for k, v in case.env}
        start = time.monotonic()
        r = _cli(argv, tmp, env)
        return case, r, tmp, fill, time.monotonic() - start

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(one, CASES))
    return {case.name: rest for case, *rest in done}


def test_enough_cases_across_commands():
    commands = {c.argv[0] for c in CASES}
    assert len(CASES) >= 40
    assert {"preprocess", "train", "extract", "retrain", "evaluate-features", "k8s",
            "datasets", "models"} <= commands  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_invocation_is_one_line_and_writes_nothing(results, case):
    r, tmp, fill, seconds = results[case.name]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == case.code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(("sae: error: ", f"sae {case.argv[0]}: error: ")), lines[0]
    assert case.needle.format(**fill) in lines[0], lines[0]
    out = tmp / "out"
    if case.result:
        assert not (out / case.result).exists()
    else:
        assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    assert _tree(tmp / "old") == {"keep.txt": hashlib.sha256(b"old output").hexdigest()}
    assert sorted(p.name for p in tmp.iterdir()) == ["old", *(["out"] if out.exists() else [])]
    if case.name.startswith("gcs-"):
        assert seconds < STORAGE_SECONDS, f"took {seconds:.1f} s"
