"""What many test modules need: free ports, and subprocesses that cannot outlive a test.

``free_ports(n)`` / ``free_port()``  distinct TCP ports nothing listens on (yet).
``accepts(port)``                    whether something listens on a local port.
``start(cmd)`` / ``finish(procs)``   processes in their own process group, waited for
                                     together; on a timeout every group is stopped and the
                                     test fails with the output tails.
``run(cmd, timeout)``                start + finish of one process: a CompletedProcess.
``sae(*args)``                       ``run`` of the CLI (``python -m pipeline.cli``).
``ok(result)``                       asserts exit 0, showing the output tails otherwise.
``stop(proc)``                       SIGTERM to the leader, then SIGKILL to its group.

Why a process group: the jobs start children (Beam workers, a worker pool's SDK
harnesses, a simulator's pods); killing only the leader of a hung run leaves them holding
ports, files and the CPU for the rest of the suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Beam in the test process: on 2 cores, starting worker processes (each importing
# TensorFlow) costs more than they save on tiny data.
FAST = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
# The `labelled` fixture's images (tests/conftest.py): not square, so that a swap of a
# map's axes shows.
LABELLED_H, LABELLED_W = 11, 9
SAE = [sys.executable, "-m", "pipeline.cli"]
TAIL = 3000  # characters of stdout/stderr shown when a process fails
STOP_GRACE_S = 30.0  # between SIGTERM (a simulator stops its pods, removes its netns) and SIGKILL


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host`: all bound at once (so distinct), then released."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port; also a closed one (connections to it are refused until someone binds)."""
    return free_ports(1, host)[0]


def accepts(port: int, host: str = "localhost") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def tails(out: str | None, err: str | None) -> str:
    out, err = (out or "")[-TAIL:], (err or "")[-TAIL:]
    return f"--- stdout (tail) ---\n{out}\n--- stderr (tail) ---\n{err}"


def start(cmd: Sequence[str], **popen) -> subprocess.Popen:
    """Popen in a new process group, text output captured (pass stdout=/stderr= to change)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([str(c) for c in cmd], text=True, start_new_session=True, **popen)


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to the leader (it may clean up, e.g. a simulator its pods), SIGKILL to the
    whole group after `grace` seconds or as soon as the leader is gone (its orphans)."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(
    procs: Sequence[subprocess.Popen], timeout: float, what: str = "process"
) -> list[subprocess.CompletedProcess]:
    """Waits for all `procs` within `timeout` seconds in total, reading their pipes
    concurrently (one that fills its pipe cannot stall the others). On a timeout, stops
    every one of them (a hung collective or job server fails the test instead of hanging
    it) and fails with their output tails."""
    outputs: dict[int, tuple[str, str]] = {}

    def wait(i: int, p: subprocess.Popen) -> None:
        outputs[i] = p.communicate()

    threads = [threading.Thread(target=wait, args=item, daemon=True) for item in enumerate(procs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = any(t.is_alive() for t in threads)
        if hung:
            for p in procs:
                stop(p)
            for t in threads:
                t.join(30)
    if hung:
        report = [
            f"$ {' '.join(map(str, p.args))}\n{tails(*outputs.get(i, ('', '')))}"
            for i, p in enumerate(procs)
        ]
        pytest.fail(f"{what} timed out after {timeout:g} s:\n" + "\n".join(report), pytrace=False)
    return [
        subprocess.CompletedProcess(p.args, p.returncode, *outputs[i]) for i, p in enumerate(procs)
    ]


def run(cmd: Sequence[str], timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Runs `cmd` to completion (see `finish`), with no standard input."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    return finish([start(cmd, **popen)], timeout, what=f"`{' '.join(map(str, cmd))}`")[0]


def sae(*args: str | Path, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it."""
    return run([*SAE, *map(str, args)], timeout=timeout, **popen)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}: {' '.join(map(str, r.args))}\n" + tails(
        r.stdout, r.stderr
    )
    return r
