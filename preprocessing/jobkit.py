"""What both Beam jobs (`sae preprocess`, `sae extract`) share around their pipelines:
runner defaults, logging, the output folder rule, the package version for manifests,
running the pipeline with progress (local runners) or the remote job's id, and the
finalizer's outcome.

    options = PipelineOptions(jobkit.default_beam_args(beam_args))
    jobkit.refuse_non_empty(out, args.overwrite)
    with jobkit.running(options, "preprocess", "images", args.quiet) as (p, reporter):
        ...  # build; DoFns call reporter.add(n); the finalizer publishes the manifest
             # or calls jobkit.fail(folder, reason, exit_code)
    manifest = jobkit.outcome(folder, manifest_uri)  # or the recorded UserError

The one rule for the end of a job: its last step checks the accounting and then
publishes the manifest, last, or (too many rejected inputs, no row, lost records)
writes `_FAILED.json` {"reason", "exit_code", ...} beside the job's error report and
no manifest. A manifest therefore means complete; `outcome` turns `_FAILED.json` into
the one-line error and exit code the user sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from preprocessing import exiting, progress, storage
from preprocessing.errors import UserError
from preprocessing.manifest import MANIFEST_NAME, join

LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner")
# Written instead of the manifest when a job fails after writing its error report.
FAILED_NAME = "_FAILED.json"


def configure_logging(verbose: bool) -> None:
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    # The DirectRunner relays every worker's start-up warnings; they are noise to users.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
        logging.INFO if verbose else logging.ERROR
    )


def default_beam_args(beam_args: list[str]) -> list[str]:
    """The local runner, multi-processing with one worker per core, unless told otherwise.

    FnApiRunner is the engine of Beam's DirectRunner. Naming it pins that engine: since
    Beam 2.6x the DirectRunner first tries to download and start the Prism runner, which
    needs internet access and handles these worker options differently. Its workers, and
    only they, may skip the interpreter's teardown (preprocessing/exiting.py).
    """
    joined = " ".join(beam_args)
    args = list(beam_args)
    if "--runner" not in joined:
        exiting.mark_local_workers()
        args.append("--runner=FnApiRunner")
        if "--direct_running_mode" not in joined:
            args.append("--direct_running_mode=multi_processing")
        if "--direct_num_workers" not in joined:
            args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    return args


def package_version() -> str:
    """This package's installed version, for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-pipeline")
    except PackageNotFoundError:
        return "unknown"


def existing_files(out: str) -> list[str]:
    """Every file under `out` (local or gs://), manifest first."""
    paths = storage.files_under(out)
    # Manifest first: deleted in this order, a reader never sees a manifest over a
    # half-deleted output.
    return sorted(paths, key=lambda p: not p.endswith("/" + MANIFEST_NAME))


def refuse_non_empty(out: str, overwrite: bool, flag: str = "--output") -> list[str]:
    """The output rule of every job: an output folder with files in it is refused unless
    --overwrite. Returns the files that are there (for the job to replace)."""
    existing = existing_files(out)
    if existing and not overwrite:
        raise UserError(
            f"{flag} {out} is not empty ({len(existing)} files); choose another {flag} "
            "or pass --overwrite to replace it"
        )
    return existing


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
) -> Iterator[tuple[beam.Pipeline, progress.Reporter]]:
    """Yields (a pipeline to build, its Reporter); runs the pipeline when the block ends
    without an exception, printing progress (local runners, unless quiet) or the job id."""
    p = beam.Pipeline(options=options)
    local = is_local(options) and not quiet
    folder = tempfile.mkdtemp(prefix=f"sae-{job}-progress-") if local else None
    try:
        yield p, progress.Reporter(folder)
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
    while not stop.wait(progress.PROGRESS_SECONDS):
        done, total = progress.read(folder)
        print(progress.line(job, unit, done, total, time.monotonic() - t0), flush=True)


def fail(folder: str, reason: str, exit_code: int, **details) -> list:
    """A finalizer's failure signal (see the module docstring): FOLDER/_FAILED.json, beside
    the job's error report. `reason` is the user's one line (what, where, what to do);
    `details` are counts for whoever inspects the folder. Returns [] (no manifest)."""
    record = {"reason": reason, "exit_code": exit_code, **details}
    storage.publish_json(join(folder, FAILED_NAME), record)
    return []


def outcome(folder: str, manifest_uri: str) -> dict:
    """After the pipeline ran: the manifest it published, or raises the UserError its
    finalizer recorded in FOLDER/_FAILED.json (`fail`)."""
    failed = storage.read_json_if_exists(join(folder, FAILED_NAME))
    if failed is not None:
        raise UserError(
            f"{failed['reason']}; no manifest was written", exit_code=int(failed["exit_code"])
        )
    return storage.read_json(
        manifest_uri,
        missing=f"the job ended without writing {manifest_uri} or {FAILED_NAME}; "
        "rerun it with --overwrite",
    )
