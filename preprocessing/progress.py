"""Running a Beam job: progress lines on local runners, the job id on remote ones.

    with progress.running(options, "preprocess", "images", quiet=args.quiet) as (p, reporter):
        ... build the pipeline; DoFns call reporter.add(n), a Map calls reporter.set_total
    # the pipeline has run when the block ends

Local runners (the launcher's machine runs every worker): workers add their counts to
small files in a temporary folder, one per process, and a thread of the launcher prints
`JOB: done/total UNIT (P%), R UNIT/s, ETA S` every PROGRESS_SECONDS. A count is one file
write per batch of hundreds of inputs, so it costs nothing measurable. Remote runners
(Dataflow, Flink, Spark) have their own UIs: the Reporter does nothing there, and the
job id is printed when the runner's result has one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

PROGRESS_SECONDS = 10.0
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner")
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


def is_local(options: PipelineOptions) -> bool:
    return options.get_all_options().get("runner") in LOCAL_RUNNERS


def describe_runner(options: PipelineOptions) -> str:
    """'FnApiRunner (multi_processing, 2 workers)', 'DataflowRunner', ...: what a job's
    first line says it runs on."""
    o = options.get_all_options()
    if not is_local(options):
        return str(o.get("runner"))
    mode = o.get("direct_running_mode") or "in_memory"
    workers = o.get("direct_num_workers") or 1
    return f"{o.get('runner')} ({mode}" + (f", {workers} workers)" if mode != "in_memory" else ")")


@contextlib.contextmanager
def running(
    options: PipelineOptions, job: str, unit: str, quiet: bool = False
) -> Iterator[tuple[beam.Pipeline, Reporter]]:
    """Yields (a pipeline to build, its Reporter); runs the pipeline when the block ends
    without an exception, printing progress (local runners, unless quiet) or the job id."""
    p = beam.Pipeline(options=options)
    local = is_local(options) and not quiet
    folder = tempfile.mkdtemp(prefix=f"sae-{job}-progress-") if local else None
    try:
        yield p, Reporter(folder)
        stop = threading.Event()
        printer = None
        if folder is not None:
            printer = threading.Thread(target=_print_every, args=(folder, job, unit, stop))
            printer.daemon = True
            printer.start()
        try:
            result = p.run()
            if not local:
                print_job(job, options, result)
            result.wait_until_finish()
        finally:
            stop.set()
            if printer is not None:
                printer.join()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def print_job(job: str, options: PipelineOptions, result) -> None:
    """The remote job's id (and, on Dataflow, its console page), when the result has one."""
    job_id = getattr(result, "job_id", None)
    if not callable(job_id):
        return
    o = options.get_all_options()
    where = ""
    if o.get("runner") == "DataflowRunner":
        where = (
            f": https://console.cloud.google.com/dataflow/jobs/{o.get('region')}/"
            f"{job_id()}?project={o.get('project')}"
        )
    print(f"{job}: submitted job {job_id()}{where}", flush=True)


def _print_every(folder: str, job: str, unit: str, stop: threading.Event) -> None:
    t0 = time.monotonic()
    while not stop.wait(PROGRESS_SECONDS):
        done, total = read(folder)
        print(line(job, unit, done, total, time.monotonic() - t0), flush=True)
