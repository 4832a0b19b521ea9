"""Leaving a finished process without the interpreter's teardown.

Tearing down an interpreter that imported TensorFlow takes ~1.4 s of CPU, one that imported
Apache Beam ~0.6 s (measured on 2 cores): the modules' objects are freed one by one, and
nothing a finished job needs happens there (our files are closed when written, Beam's
runner has received every output). Beam's local runner stops its worker processes one
after another, so a job also waited that long per worker.

Only the local runner's workers skip it, the one place it was measured to help: the
launcher marks them (`mark_local_workers`: an environment variable its worker processes
inherit). Elsewhere workers exit normally: Beam's worker pool (`--environment_type
EXTERNAL`, as Flink and Spark run Python) starts `python -c "...SdkHarness(...).run()"`
processes and stops them with SIGTERM, and the SDK container (Dataflow, DOCKER) runs
`sdk_worker_main` in a process the launcher did not start (tests/test_portable.py).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys

SDK_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"
LOCAL_WORKERS = "SAE_LOCAL_BEAM_WORKERS"  # set for the worker processes of the local runner


def mark_local_workers() -> None:
    """Lets the local runner's worker processes, started from this one, skip the teardown."""
    os.environ[LOCAL_WORKERS] = "1"


def exit_now(status: int) -> None:
    """Flushes logs, stdout and stderr, then ends the process with `status` at once."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


@functools.cache  # once per process
def skip_teardown_at_worker_exit() -> bool:
    """In a local Beam SDK worker process: at exit, skip the teardown (call from DoFn.setup).

    The worker exits only after the runner said it has no more work. The exit status is
    kept: 1 after an unhandled exception, else 0 (the harness never calls sys.exit). Only a
    worker's own main module registers this, never a process running `sae` or the tests
    (in-process runners call setup there too), and only in a worker of the local runner
    (see the module docstring). Returns whether it registered.
    """
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(main, "name", None) != SDK_WORKER_MAIN or os.environ.get(LOCAL_WORKERS) != "1":
        return False
    # atexit runs the last-registered handler first: before TensorFlow's and Beam's own.
    atexit.register(lambda: exit_now(1 if getattr(sys, "last_value", None) is not None else 0))
    return True
