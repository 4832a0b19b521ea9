"""`sae run`: preprocess, train, extract and probe in one command, then write report.html.

    sae run                                  # builtin:digits into ./runs/<timestamp>/
    sae run --input builtin:mnist --preset mnist-conv --eval-fraction 0.25   # pooled conv features
    sae run --input ~/photos --resize 32x32 --preset digits --set input_shape=32,32,1 \
        --workdir runs/photos

WORKDIR/ data/ (sae preprocess), train/ (sae train), features/ (sae extract, probe.json),
         report.html (feature dashboards, cost curves, the probe, filters: pipeline/report.py)
Rerunning with the same --workdir skips finished stages (a stage is finished when its
manifest or metrics exist) and resumes an interrupted training from its checkpoint.
Flags this command does not know go to `sae preprocess` (e.g. --resize); the Beam options
among them (--runner, --direct_num_workers, ...) and --quiet / --verbose go to `sae extract`
too.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from preprocessing.errors import ArgumentParser
from preprocessing.manifest import MANIFEST_NAME, join


def make_parser() -> ArgumentParser:
    from trainer import config

    p = ArgumentParser(
        prog="sae run",
        description="The whole pipeline in one command: preprocess, train, extract, probe, "
        "report. Unknown flags go to `sae preprocess`; Beam options among them also to "
        "`sae extract`.",
    )
    p.add_argument(
        "--input",
        default="builtin:digits",
        metavar="SRC",
        help="images (folder, gs://, list file, tfds:, builtin:) (default: builtin:digits)",
    )
    p.add_argument(
        "--workdir",
        help="run folder (default: ./runs/<UTC timestamp>); rerun with the same one to resume",
    )
    config.add_arguments(p)
    p.add_argument("--sparsify", default="default", help="as `sae extract --sparsify`")
    p.add_argument(
        "--pool",
        default="3x3",
        metavar="GRID",
        help="a patch model (patch_size > 0) is applied to whole images and pooled over this "
        "grid, as `sae extract --pool` (default: 3x3)",
    )
    p.add_argument(
        "--dashboard-images",
        type=int,
        default=2000,
        metavar="N",
        help="the report's feature dashboards look at the first N eval images (default: 2000)",
    )
    return p


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def _read_json(path: str) -> dict:
    from pipeline import models

    return models.read_json(path)


def _leftovers(path: str) -> list[str]:
    """['--overwrite'] when an interrupted stage left files behind (its manifest is missing)."""
    from preprocessing import jobkit

    return ["--overwrite"] if jobkit.existing_files(path) else []


def _beam_args(passthrough: list[str]) -> list[str]:
    """Of the flags meant for `sae preprocess`, the Beam options (the ones it does not
    know) and --quiet / --verbose: what every Beam stage gets."""
    from preprocessing import job as preprocess_job

    known, beam_args = preprocess_job.make_parser().parse_known_args(
        ["--input", "-", "--output", "-", *passthrough]
    )
    return beam_args + ["--quiet"] * known.quiet + ["--verbose"] * known.verbose


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs every unfinished stage; returns the summary written into the report."""
    args, passthrough = make_parser().parse_known_args(argv)
    import tensorflow as tf

    from pipeline import curves, dashboards, extract, probe, report
    from preprocessing import job as preprocess_job
    from trainer import config, train

    workdir = (
        args.workdir or f"runs/{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    ).rstrip("/")
    data, train_dir, feats = (join(workdir, d) for d in ("data", "train", "features"))
    tf.io.gfile.makedirs(workdir)

    def stage(name: str, done: bool, where: str) -> bool:
        print(f"run: {name}: " + (f"done already ({where})" if done else f"-> {where}"), flush=True)
        return not done

    beam_args = _beam_args(passthrough)
    if stage("preprocess", _exists(join(data, MANIFEST_NAME)), data):
        preprocess_job.run(
            ["--input", args.input, "--output", data, *_leftovers(data), *passthrough]
        )
    if stage("train", _exists(join(train_dir, "metrics.json")), train_dir):
        train.run(["--data", data, "--workdir", train_dir, *config.to_argv(args)])
    if stage("extract", _exists(join(feats, MANIFEST_NAME)), feats):
        trained = _read_json(join(train_dir, "config.json"))
        pool = ["--pool", args.pool] if trained.get("patch_size") else []
        extract.run(
            [
                "--data",
                data,
                "--model",
                join(train_dir, "export"),
                "--output",
                feats,
                "--sparsify",
                args.sparsify,
                *pool,
                *_leftovers(feats),
                *beam_args,
            ]
        )
    dataset = _read_json(join(data, MANIFEST_NAME))
    probe_path = join(feats, "probe.json")
    if dataset["label_names"] and stage("probe", _exists(probe_path), probe_path):
        probe.run(["--features", feats, "--data", data])

    metrics = _read_json(join(train_dir, "metrics.json"))
    features = _read_json(join(feats, MANIFEST_NAME))
    config = _read_json(join(train_dir, "config.json"))
    summary: dict = {
        "input": args.input,
        "workdir": workdir,
        "examples (train / eval)": f"{dataset['splits']['train']['num_examples']} / "
        f"{dataset['splits']['eval']['num_examples']}",
        "rejected inputs": dataset["num_errors"],
        "model": f"{config['input_shape']} -> {config['hidden']} hidden, rho {config['rho']}, "
        f"beta {config['beta']}, lambda {config['weight_decay']}",
        "training steps": metrics["step"],
        "eval loss": metrics["loss"],
        "eval reconstruction": metrics["reconstruction"],
        "eval mean rho_hat": metrics["mean_rho_hat"],
        "dead units": f"{metrics['dead_fraction']:.0%}",
        "fraction of variance explained": metrics["fraction_variance_explained"],
        "feature rows": features["num_written"],
        "mean nonzeros per feature row": features["l0"]["mean"],
    }
    if _exists(probe_path):
        summary["linear probe, eval accuracy"] = _read_json(probe_path)["eval_accuracy"]
    summary["eval metrics"] = {k: v for k, v in metrics.items() if k != "rho_hat"}
    with tf.io.gfile.GFile(join(train_dir, "filters.png"), "rb") as f:
        filters = f.read()
    with tf.io.gfile.GFile(join(train_dir, "reconstructions.png"), "rb") as f:
        recon = f.read()
    dash = dashboards.compute(join(train_dir, "export"), data, max_images=args.dashboard_images)
    tb = curves.read_scalars(join(train_dir, "tensorboard"))
    per_epoch = config["steps_per_epoch"] or max(
        1, dataset["splits"]["train"]["num_examples"] // config["global_batch_size"]
    )  # as trainer.data.steps_per_epoch
    html = report.run_report(
        summary,
        filters,
        recon,
        metrics["rho_hat"],
        config["rho"],
        dashboards=dash,
        curves=curves.cost_curves(tb, per_epoch),
        probe=_read_json(probe_path) if _exists(probe_path) else None,
    )
    with tf.io.gfile.GFile(join(workdir, "report.html"), "w") as f:
        f.write(html)
    for key, value in summary.items():
        if not isinstance(value, dict) or key.startswith("linear"):
            shown = (
                ", ".join(f"{k} {v:.3f}" for k, v in value.items())
                if isinstance(value, dict)
                else f"{value:.4g}"
                if isinstance(value, float)
                else value
            )
            print(f"run: {key}: {shown}")
    print(f"run: wrote {join(workdir, 'report.html')}", flush=True)
    return summary
