"""preprocessing/storage.py: URIs, atomic publish, typed readers, the fast access check.

Real parts: the local filesystem, the GCS emulator (tests/gcs_emulator.py) and, for
permissions the emulator cannot express, a read-only front in front of it that answers
every object write with Cloud Storage's own 403 reply (what a principal with
roles/storage.objectViewer gets).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from preprocessing import jobkit, storage
from preprocessing.errors import UserError
from trainer import artifacts
from trainer.config import TrainConfig


# ----------------------------------------------------------------------------
# URIs, reading and publishing.
# ----------------------------------------------------------------------------
def test_join_and_absolute():
    assert storage.join("gs://b/run/", "train", "metrics.json") == "gs://b/run/train/metrics.json"
    assert storage.join("", "a", "b") == "a/b"
    assert storage.absolute("gs://b/x") == "gs://b/x"
    assert storage.absolute("rel/x") == os.path.join(os.getcwd(), "rel/x")


def _round_trip(root: str) -> None:
    uri = storage.join(root, "deep", "er", "f.json")
    assert not storage.exists(uri)
    storage.publish_json(uri, {"a": [1, 2]})
    storage.publish_json(uri, {"a": [3]})  # replaces
    assert storage.read_json(uri) == {"a": [3]}
    storage.publish(storage.join(root, "b.bin"), b"\x00\xff")
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\xff"
    assert sorted(storage.files_under(root)) == sorted([uri, storage.join(root, "b.bin")])
    assert storage.glob(storage.join(root, "*.bin")) == [storage.join(root, "b.bin")]
    storage.move([storage.join(root, "b.bin")], [storage.join(root, "moved", "b.bin")])
    assert storage.read_bytes(storage.join(root, "moved", "b.bin")) == b"\x00\xff"
    storage.delete([uri])
    assert storage.read_json_if_exists(uri) is None
    # Nothing left over: no temporary names beside what was published.
    assert storage.files_under(root) == [storage.join(root, "moved", "b.bin")]


def test_round_trip_local(tmp_path):
    _round_trip(str(tmp_path / "root"))


def test_round_trip_gcs(gcs_prefix):
    _round_trip(gcs_prefix)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_publish_that_fails_midway_leaves_the_old_file(where, tmp_path, request):
    root = request.getfixturevalue("gcs_prefix") if where == "gcs" else str(tmp_path)
    uri = storage.join(root, "shard")
    storage.publish(uri, b"old")

    def chunks():
        yield b"new, partial"
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError):
        storage.publish_chunks(uri, chunks())
    assert storage.read_bytes(uri) == b"old"
    assert storage.files_under(root) == [uri]


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="run it first"):
        storage.read_json(str(tmp_path / "none.json"), missing="run it first")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=f"{bad} is not valid JSON.*; rerun X"):
        storage.read_json(str(bad), fix="rerun X")


# ----------------------------------------------------------------------------
# Typed readers.
# ----------------------------------------------------------------------------
def test_training_artifacts_round_trip(tmp_path):
    cfg = TrainConfig(hidden=7, rho=0.02)
    artifacts.write_config(str(tmp_path), cfg)
    assert artifacts.read_config(str(tmp_path)) == cfg
    m = artifacts.Metrics.from_dict(
        {"loss": 1.5, "reconstruction": 1.0, "mean_rho_hat": 0.02, "dead_fraction": 0.0,
         "fraction_variance_explained": 0.9, "l0": 3.0, "step": 12, "rho_hat": [0.01, 0.03]}
    )  # fmt: skip
    artifacts.write_metrics(str(tmp_path), m)
    back = artifacts.read_metrics(str(tmp_path))
    assert back == m and back.loss == 1.5 and back.step == 12 and back.rho_hat == (0.01, 0.03)
    assert back.values["l0"] == 3.0 and artifacts.is_trained(str(tmp_path))
    info = artifacts.ExportInfo(cfg, (8, 8, 1), ("a", "b"), "data", 12)
    assert artifacts.ExportInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_typed_readers_refuse_what_they_cannot_read(tmp_path):
    with pytest.raises(UserError, match="run `sae train`"):
        artifacts.read_config(str(tmp_path))
    (tmp_path / artifacts.METRICS).write_text(json.dumps({"loss": 1.0, "step": 1}))
    with pytest.raises(UserError, match="not a sae-pipeline metrics file"):
        artifacts.read_metrics(str(tmp_path))
    (tmp_path / artifacts.CONFIG).write_text(json.dumps({"hidden": 5, "colour": "red"}))
    with pytest.raises(UserError, match="unknown config key"):
        artifacts.read_config(str(tmp_path))


# ----------------------------------------------------------------------------
# The finalizers' one failure rule.
# ----------------------------------------------------------------------------
def test_failure_signal_round_trip(tmp_path):
    manifest = str(tmp_path / "manifest.json")
    assert jobkit.fail(str(tmp_path), "3 of 4 inputs were rejected; see X", 3, num_inputs=4) == []
    recorded = json.loads((tmp_path / jobkit.FAILED_NAME).read_text())
    assert recorded == {"reason": "3 of 4 inputs were rejected; see X", "exit_code": 3,
                        "num_inputs": 4}  # fmt: skip
    with pytest.raises(UserError, match="rejected; see X; no manifest was written") as e:
        jobkit.outcome(str(tmp_path), manifest)
    assert e.value.exit_code == 3
    os.remove(tmp_path / jobkit.FAILED_NAME)
    storage.publish_json(manifest, {"kind": "k"})
    assert jobkit.outcome(str(tmp_path), manifest) == {"kind": "k"}


# ----------------------------------------------------------------------------
# The access check against a bucket these credentials may read but not write.
# ----------------------------------------------------------------------------
class _ReadOnlyFront(http.server.ThreadingHTTPServer):
    """Forwards reads to the emulator; answers writes (POST, PUT, PATCH, DELETE) with the
    403 Cloud Storage sends a principal that lacks storage.objects.create."""

    daemon_threads = True

    def __init__(self, emulator: str):
        self.target = urllib.parse.urlsplit(emulator).netloc
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _FrontHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # a client closing its keep-alive connection is not news


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _refuse(self):
        self._body()
        self.server.requests.append((self.command, self.path))
        payload = json.dumps(
            {
                "error": {
                    "code": 403,
                    "message": "caller does not have storage.objects.create "
                    "access to the Google Cloud Storage object.",
                    "errors": [{"reason": "forbidden"}],
                }
            }  # fmt: skip
        ).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def do_GET(self):
        self.server.requests.append((self.command, self.path))
        conn = http.client.HTTPConnection(self.server.target, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        conn.request("GET", self.path, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()


@pytest.fixture
def read_only(gcs_emulator, gcs_prefix, monkeypatch):
    """(the front, a gs:// prefix with one object): STORAGE_EMULATOR_HOST points at the
    front for this test (and its child processes)."""
    storage.publish(storage.join(gcs_prefix, "photos", "a.png"), b"x")
    front = _ReadOnlyFront(gcs_emulator.endpoint)
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", front.endpoint)
    yield front, gcs_prefix
    front.shutdown()
    front.server_close()


def test_write_forbidden_is_one_line_and_fast(read_only):
    front, prefix = read_only
    storage.check_access(reads=[("--input", f"{prefix}/photos")])  # reading is allowed
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        storage.check_access(writes=[("--output", f"{prefix}/out")])
    assert time.monotonic() - t0 < 20
    msg = str(e.value)
    assert msg.startswith(f"--output {prefix}/out: these credentials may read bucket")
    assert "not create objects" in msg and "roles/storage.objectAdmin" in msg
    assert "\n" not in msg and e.value.exit_code == 2
    # One request for the write probe: no client retries.
    assert [m for m, _ in front.requests].count("POST") == 1


def test_the_write_probe_leaves_nothing(gcs_prefix):
    uri = f"{gcs_prefix}/out"
    storage.check_access(writes=[("--output", uri)])
    assert storage.files_under(uri) == []  # the output folder is still empty


def test_each_uri_is_checked_once_per_process(read_only):
    front, prefix = read_only
    storage.check_access(reads=[("--input", f"{prefix}/photos")])
    first = len(front.requests)
    assert first >= 1
    for _ in range(2):  # e.g. `sae run` checks, then the preprocess job it runs checks again
        storage.check_access(reads=[("--input", f"{prefix}/photos")])
    assert len(front.requests) == first
    for _ in range(2):
        with pytest.raises(UserError):
            storage.check_access(writes=[("--output", f"{prefix}/out")])
    assert [m for m, _ in front.requests].count("POST") == 2  # a failure is not remembered


def test_missing_bucket_and_unreachable_endpoint(gcs_emulator, monkeypatch):
    with pytest.raises(UserError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.check_access(writes=[("--workdir", "gs://no-such-bucket-x/run")])
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot reach Cloud Storage at http://127.0.0.1:9"):
        storage.check_access(reads=[("--data", "gs://b/x")])
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize(
    "job, argv",
    [
        ("preprocessing.job", ["--input", "builtin:digits", "--output", "{p}/ds"]),
        ("pipeline.probe", ["--features", "{p}/feats", "--data", "{p}/photos"]),
        ("preprocessing.datasets_cli", ["export", "digits", "{p}/png"]),
        ("pipeline.run_all", ["--workdir", "{p}/run"]),
        ("trainer.train", ["--data", "{p}/ds", "--workdir", "{p}/train", "--preset", "tiny"]),
    ],
)
def test_every_jobs_run_checks_what_it_writes(read_only, job, argv):
    """run(argv) itself checks (tests and users call it without the CLI)."""
    import importlib

    _, prefix = read_only
    with pytest.raises(UserError, match="may read bucket .* but not create objects"):
        importlib.import_module(job).run([a.format(p=prefix) for a in argv])


def test_the_cli_exits_2_with_one_line(read_only, tmp_path):
    _, prefix = read_only
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "preprocess", "--input", "builtin:digits",
         "--output", f"{prefix}/ds"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sae preprocess: error: --output {prefix}/ds")
    assert "Traceback" not in r.stderr
    # The check itself, not the interpreter's and the imports' start-up, is what is bounded.
    assert time.monotonic() - t0 < 120
