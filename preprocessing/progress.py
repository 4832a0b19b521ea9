"""Progress of a Beam job on a local runner: workers count, the launcher prints.

Workers add their counts to small files in a temporary folder, one per process
(`Reporter`, picklable, handed to the DoFns); a thread of the launcher (jobkit.running)
prints `JOB: done/total UNIT (P%), R UNIT/s, ETA S` every PROGRESS_SECONDS. A count is one
file write per batch of hundreds of inputs, so it costs nothing measurable. Remote runners
(Dataflow, Flink, Spark) have their own UIs: there the Reporter has no folder and does
nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading

PROGRESS_SECONDS = 10.0
_TOTAL = "total"
_lock = threading.Lock()
_counts: dict[str, int] = {}  # per process: folder -> inputs this process has done


class Reporter:
    """Picklable; workers call `add`, one Map calls `set_total`. folder None = no-op."""

    def __init__(self, folder: str | None):
        self.folder = folder

    def add(self, n: int) -> None:
        if self.folder is None or not os.path.isdir(self.folder):
            return
        with _lock:  # a worker process may run several bundles at once, in threads
            _counts[self.folder] = done = _counts.get(self.folder, 0) + n
            _write(os.path.join(self.folder, f"done-{os.getpid()}"), done)

    def set_total(self, n: int) -> int:
        """Records the total (returns it, to be used in a beam.Map)."""
        if self.folder is not None and os.path.isdir(self.folder):
            _write(os.path.join(self.folder, _TOTAL), n)
        return n


def _write(path: str, n: int) -> None:
    tmp = f"{path}.tmp-{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(str(n))
    os.replace(tmp, path)  # a reader sees the old count or the new one, never half


def read(folder: str) -> tuple[int, int | None]:
    """(done, total or None) as the workers have reported them so far."""
    done, total = 0, None
    for name in os.listdir(folder):
        if ".tmp-" in name:  # being written
            continue
        with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, name)) as f:
            value = int(f.read())
            if name == _TOTAL:
                total = value
            else:
                done += value
    return done, total


def line(job: str, unit: str, done: int, total: int | None, seconds: float) -> str:
    """'JOB: 5120/20000 images (26%), 612 images/s, ETA 24 s' (parts unknown yet left out)."""
    rate = done / seconds if seconds > 0 else 0.0
    text = f"{job}: {done}/{total if total is not None else '?'} {unit}"
    if total:
        text += f" ({min(done, total) / total:.0%})"
    text += f", {rate:.0f} {unit}/s"
    if total and rate > 0:
        text += f", ETA {max(total - done, 0) / rate:.0f} s"
    return text
