"""Exiting without the interpreter's teardown keeps exit statuses and output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from preprocessing import builtin, exiting
from tests.helpers import ROOT, run

_PROBE = """
import atexit, sys, types
if sys.argv[1] != "sae":  # what a Beam SDK worker process looks like to the check
    sys.modules["__main__"].__spec__ = types.SimpleNamespace(
        name="apache_beam.runners.worker.sdk_worker_main")
atexit.register(print, " teardown", end="")  # stands for TensorFlow's and Beam's teardown
from preprocessing.exiting import skip_teardown_at_worker_exit
skip_teardown_at_worker_exit()
print("flushed", end="")
if sys.argv[2] == "raise":
    raise RuntimeError("worker failed")
sys.exit(int(sys.argv[2]))
"""


def _run(*args: str, local_worker: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(exiting.LOCAL_WORKERS, None)
    if local_worker:
        env[exiting.LOCAL_WORKERS] = "1"  # as the local runner's workers inherit it
    return run([sys.executable, *args], timeout=120, env=env)


@pytest.mark.parametrize(
    "process, ending, code",
    [
        ("worker", "0", 0),
        ("worker", "raise", 1),
        ("remote-worker", "0", 0),
        ("remote-worker", "raise", 1),
        ("sae", "3", 3),
        ("sae", "raise", 1),
    ],
)
def test_local_workers_skip_the_teardown_but_keep_status_and_output(process, ending, code):
    """A worker of the local runner leaves with os._exit after flushing; a failure still
    exits non-zero; any other process (a worker the launcher did not start, the one running
    `sae`, or pytest) keeps its normal exit."""
    proc = _run("-c", _PROBE, process, ending, local_worker=process == "worker")
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stdout == ("flushed" if process == "worker" else "flushed teardown")
    assert ("RuntimeError: worker failed" in proc.stderr) == (ending == "raise")


def test_the_sae_command_exits_with_its_status_and_output_flushed(tmp_path):
    ok = _run("-m", "pipeline.cli", "datasets", "list")
    assert ok.returncode == 0, ok.stderr[-2000:]
    # The last line got out: the last dataset's description.
    last = builtin.NAMES[-1]
    assert ok.stdout.splitlines()[-1].split() == [
        f"builtin:{last}",
        *builtin.DESCRIPTIONS[last].split(),
    ]
    bad = _run("-m", "pipeline.cli", "preprocess", "--input", str(tmp_path / "missing"),
               "--output", str(tmp_path / "out"))  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("sae preprocess: error: ")
