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

from preprocessing import storage
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
    workdir = (
        args.workdir or f"runs/{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    ).rstrip("/")
    storage.check_access(reads=[("--input", args.input)], writes=[("--workdir", workdir)])

    from pipeline import curves, dashboards, extract, features, probe, report
    from preprocessing import job as preprocess_job
    from preprocessing import manifest
    from trainer import artifacts, config, train
    from trainer import data as data_lib

    data, train_dir, feats = (join(workdir, d) for d in ("data", "train", "features"))
    storage.makedirs(workdir)

    def stage(name: str, done: bool, where: str) -> bool:
        print(f"run: {name}: " + (f"done already ({where})" if done else f"-> {where}"), flush=True)
        return not done

    beam_args = _beam_args(passthrough)
    if stage("preprocess", manifest.is_dataset(data), data):
        preprocess_job.run(
            ["--input", args.input, "--output", data, *_leftovers(data), *passthrough]
        )
    if stage("train", artifacts.is_trained(train_dir), train_dir):
        train.run(["--data", data, "--workdir", train_dir, *config.to_argv(args)])
    if stage("extract", storage.exists(join(feats, MANIFEST_NAME)), feats):
        pool = ["--pool", args.pool] if artifacts.read_config(train_dir).patch_size else []
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
    dataset = manifest.load(data)
    probe_path = probe.probe_path(feats)
    if dataset.label_names and stage("probe", storage.exists(probe_path), probe_path):
        probe.run(["--features", feats, "--data", data])

    metrics = artifacts.read_metrics(train_dir)
    feature_set = features.load(feats)
    cfg = artifacts.read_config(train_dir)
    summary: dict = {
        "input": args.input,
        "workdir": workdir,
        "examples (train / eval)": f"{dataset.num_examples('train')} / "
        f"{dataset.num_examples('eval')}",
        "rejected inputs": dataset.num_errors,
        "model": f"{list(cfg.input_shape)} -> {cfg.hidden} hidden, rho {cfg.rho}, "
        f"beta {cfg.beta}, lambda {cfg.weight_decay}",
        "training steps": metrics.step,
        "eval loss": metrics.loss,
        "eval reconstruction": metrics.reconstruction,
        "eval mean rho_hat": metrics.mean_rho_hat,
        "dead units": f"{metrics.dead_fraction:.0%}",
        "fraction of variance explained": metrics.fraction_variance_explained,
        "feature rows": feature_set.num_written,
        "mean nonzeros per feature row": feature_set.l0_mean,
    }
    probed = probe.read(feats)
    if probed is not None:
        summary["linear probe, eval accuracy"] = probed["eval_accuracy"]
    summary["eval metrics"] = {k: v for k, v in metrics.to_dict().items() if k != "rho_hat"}
    filters = storage.read_bytes(join(train_dir, artifacts.FILTERS))
    recon = storage.read_bytes(join(train_dir, artifacts.RECONSTRUCTIONS))
    dash = dashboards.compute(join(train_dir, "export"), data, max_images=args.dashboard_images)
    tb = curves.read_scalars(join(train_dir, "tensorboard"))
    per_epoch = data_lib.steps_per_epoch(dataset, cfg)
    html = report.run_report(
        summary,
        filters,
        recon,
        list(metrics.rho_hat),
        cfg.rho,
        dashboards=dash,
        curves=curves.cost_curves(tb, per_epoch),
        probe=probed,
    )
    storage.publish(join(workdir, "report.html"), html)
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
