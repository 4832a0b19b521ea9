"""`sae preprocess` and `sae extract` on Beam's portable runner, as Flink and Spark run them.

Flink's and Spark's job servers take Beam Python pipelines through the portable job API and
run the Python code in SDK workers started by a worker pool (`--environment_type EXTERNAL`).
Beam ships both ends in Python; here they run as real processes on loopback ports, in a
working directory of their own (as on a cluster), and each job's output must equal the
default (local) runner's, byte for byte. Beam's local job service runs one SDK worker per
job (it reads neither --direct_num_workers nor --sdk_worker_parallelism); the default runner
here runs one per core, so the comparison also holds across worker counts. The pool's
`python -c` workers install no staged packages: this package must be installed there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import extract, features
from preprocessing import exiting, job, jobkit
from preprocessing.manifest import MANIFEST_NAME
from tests.collections import messy_collection
from tests.helpers import accepts, free_ports, start, stop

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 180  # both import Beam; on a busy 2-core machine that takes a while


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> list[str]:
    """Beam flags that run a job on a local job service with a worker pool (both started
    here, both stopped at the end of the module)."""
    cwd = tmp_path_factory.mktemp("portable")
    job_port, pool_port = free_ports(2)
    env = dict(os.environ)
    # The pool starts `python` from PATH: this venv's, which has the package installed.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop(exiting.LOCAL_WORKERS, None)  # a cluster's workers never inherit the launcher's
    services = {
        "job-service": (
            ["apache_beam.runners.portability.local_job_service_main", "--port", job_port]
        ),
        "worker-pool": ["apache_beam.runners.worker.worker_pool_main", "--service_port", pool_port],
    }
    procs = {}
    try:
        for name, (module, *args) in services.items():
            log = open(cwd / f"{name}.log", "wb")  # noqa: SIM115 - the process holds it
            procs[name] = start(
                [sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        for (name, proc), port in zip(procs.items(), (job_port, pool_port), strict=True):
            while not accepts(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (cwd / f"{name}.log").read_text()[-3000:]
                    pytest.fail(f"{name} did not start on port {port}:\n{log}", pytrace=False)
                time.sleep(0.5)
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
        ]
    finally:
        for proc in procs.values():
            stop(proc)  # the pool's SDK workers too


def _contents(root: Path) -> tuple[dict[str, bytes], dict]:
    """({relative path: bytes} of every file but the manifest, manifest without 'created')."""
    files = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    m = json.loads((root / MANIFEST_NAME).read_text())
    assert m.pop("created")
    return files, m


def _same_output(
    run, args: list[str], portable: list[str], tmp_path: Path, bitwise: bool = True
) -> dict:
    """Runs the job with relative paths (from tmp_path) on both runners; returns the files.
    The same files, each byte-identical, and the same manifest; with bitwise=False the feature
    rows (features-*) are compared as rows instead: the same keys, splits, labels and indices,
    values to float32 rounding (the runners batch rows differently, and on some CPUs a batch's
    size changes a value's last bits)."""
    outs = {}
    for name, beam_args in (("default", []), ("portable", portable)):
        run([*args, "--output", f"out-{name}", *beam_args])
        outs[name] = _contents(tmp_path / f"out-{name}")
    assert outs["portable"][0].keys() == outs["default"][0].keys()
    for path, data in outs["default"][0].items():
        if bitwise or not path.startswith("features-"):
            assert outs["portable"][0][path] == data, path
    if not bitwise:
        got, want = (
            features.sparse_matrix(str(tmp_path / f"out-{n}")) for n in ("portable", "default")
        )
        order = [np.argsort(m[1]) for m in (got, want)]
        for g, w in zip(got[1:], want[1:], strict=True):  # keys, labels, splits
            np.testing.assert_array_equal(g[order[0]], w[order[1]])
        a, b = got[0][order[0]], want[0][order[1]]
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.data, b.data, rtol=1e-6)
    assert outs["portable"][1] == outs["default"][1]
    return outs["default"][0]


def test_preprocess_on_the_portable_runner_equals_the_default_runner(
    portable, tmp_path, monkeypatch
):
    expect = messy_collection(tmp_path / "src", np.random.default_rng(7))
    monkeypatch.chdir(tmp_path)
    args = ["--input", "src", "--resize", "16x16", "--channels", "3"]
    files = _same_output(
        job.run, [*args, "--max-error-fraction", "0.5", "--num-shards", "2"], portable, tmp_path
    )
    # Not two empty outputs: records in each split, one error line per bad file.
    shards = [p for p in files if p.endswith(".tfrecord")]
    assert len(shards) == 4
    for split in ("train", "eval"):  # 8 and 2 examples: each split has records
        assert any(files[p] for p in shards if p.startswith(split)), split
    errors = files[job.ERRORS_FILE].decode().splitlines()
    assert len(errors) == sum(bad is not None for bad in expect.values())
    assert {json.loads(e)["uri"] for e in errors} <= set(expect)  # absolute paths


@pytest.mark.parametrize("data", ["dataset", "raw-images"])
def test_extract_on_the_portable_runner_equals_the_default_runner(
    data, digits, tiny_model, portable, tmp_path, monkeypatch
):
    if data == "raw-images":
        expect = messy_collection(tmp_path / "src", np.random.default_rng(8))
        src = "src"
    else:
        src = os.path.relpath(digits, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["--data", src, "--model", os.path.relpath(tiny_model, tmp_path), "--num-shards", "2"]
    files = _same_output(
        extract.run, [*args, "--max-error-fraction", "0.5"], portable, tmp_path, bitwise=False
    )
    assert sorted(files) == [
        extract.ERRORS_FILE,
        "features-00000-of-00002.parquet",
        "features-00000-of-00002.tfrecord",
        "features-00001-of-00002.parquet",
        "features-00001-of-00002.tfrecord",
    ]
    assert all(files[p] for p in files if p.startswith("features-"))
    errors = files[extract.ERRORS_FILE].decode().splitlines()
    if data == "raw-images":
        assert len(errors) == sum(bad is not None for bad in expect.values())
    else:
        assert errors == []


def _armed_in_the_worker(beam_args: list[str], out: Path) -> str:
    """What the fast-exit hook returns in the runner's worker ("True": it registered)."""
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        _ = (
            p
            | beam.Create([0])
            | beam.Map(lambda _: str(exiting.skip_teardown_at_worker_exit()))
            | beam.io.WriteToText(str(out), shard_name_template="")
        )
    return out.read_text().strip()


def test_fast_exit_arms_only_in_the_local_runners_workers(portable, tmp_path):
    """The local runner's workers skip the interpreter's teardown; the worker pool's
    (`python -c` processes, stopped with SIGTERM) keep their normal exit."""
    local = jobkit.default_beam_args(["--direct_num_workers=1"])
    assert _armed_in_the_worker(local, tmp_path / "local.txt") == "True"
    assert _armed_in_the_worker(portable, tmp_path / "portable.txt") == "False"
