"""The `sae` command: a thin dispatcher over each job's `run(argv)`.

Every command has --help. A user error (bad flag value, missing input, corrupt
data) prints one line `sae <command>: error: ...` and exits with its code (2
unless the command documents another); never a traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Sequence

# name -> (module with run(argv), one-line help). Imported lazily: `sae --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipeline.run_all", "the whole pipeline on one input, with report.html"),
    "preprocess": ("preprocessing.job", "images -> sharded TFRecords + manifest (Apache Beam)"),
    "train": ("trainer.train", "train a KL-sparse autoencoder (tf.data + tf.distribute)"),
    "extract": ("pipeline.extract", "sparse features for every input -> TFRecord + Parquet (Beam)"),
    "evaluate-features": ("pipeline.probe", "linear probe: sparse features vs pixels vs PCA"),
    "retrain": ("pipeline.retrain", "train a candidate, gate it, promote it atomically"),
    "models": ("pipeline.models", "list, promote or roll back model versions"),
    "datasets": ("preprocessing.datasets_cli", "list or export the built-in datasets"),
    "k8s": ("pipeline.k8s_cli", "render, submit or simulate Kubernetes jobs (kustomize)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: sae <command> [options]   (sae <command> --help for its options)\n\n"
        "KL-sparse autoencoders on images, from a folder to features at scale.\n\n"
        "commands:\n" + "\n".join(lines) + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"sae: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    # TensorFlow's C++ start-up lines read as failures to a new user (errors that matter
    # surface as Python exceptions); --verbose of preprocess/extract, or
    # TF_CPP_MIN_LOG_LEVEL=0, shows them. Before TensorFlow is imported, anywhere.
    from preprocessing import tf_noise
    from preprocessing.errors import UserError

    verbose = name in ("preprocess", "extract") and "--verbose" in rest
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":
        tf_noise.quiet_import()

    # As PID 1 in a container, a process without a SIGTERM handler ignores SIGTERM; exit as
    # the default handler would (`sae train` installs its own, which checkpoints first).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    module = importlib.import_module(COMMANDS[name][0])
    try:
        if name != "k8s":  # k8s passes gs:// URIs on to the cluster's pods
            from preprocessing import storage

            # Every gs:// URI is reachable and listable before the command starts; the
            # jobs' run(argv) then check what they write (storage.check_access, once).
            storage.check_access(reads=storage.uris_in_argv(rest))
        module.run(rest)
    except UserError as e:
        print(f"sae {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sae {name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    return 0


def entry() -> None:
    """The console script: `main`, then exit without the interpreter's teardown (up to
    1.4 s with TensorFlow loaded; every output is written and closed by then)."""
    from preprocessing import exiting

    exiting.exit_now(main())


if __name__ == "__main__":
    entry()
