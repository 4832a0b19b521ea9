"""The shared test helpers (tests/helpers.py) keep their promises: a hung process and its
children are stopped, the failure shows the output, pipes are read while waiting."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import accepts, finish, free_ports, run, start


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_timeout_stops_the_whole_group_and_fails_with_the_output_tail(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; echo started; wait"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)timed out after 2 s.*started"):
        run(["sh", "-c", script], timeout=2)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the background child outlived the timeout"


def test_processes_that_fill_their_pipes_do_not_stall_the_wait():
    loud = [sys.executable, "-c", "import sys; sys.stdout.write('x' * 2_000_000)"]
    done = finish([start(loud), start(loud)], timeout=60)
    assert [len(r.stdout) for r in done] == [2_000_000, 2_000_000]
    assert [r.returncode for r in done] == [0, 0]


def test_free_ports_are_distinct_and_closed():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and not any(accepts(p, "127.0.0.1") for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # really free
        s.listen()
        assert accepts(ports[0], "127.0.0.1")
