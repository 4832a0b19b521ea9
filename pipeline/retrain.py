"""`sae retrain`: scheduled retraining that never ships a worse model.

    sae retrain --data gs://b/new-images --models-root gs://b/models [--warm-start]

1. Takes a preprocessed dataset, or preprocesses SRC into ROOT/datasets/<version>/.
2. Trains a candidate into ROOT/versions/<version>/ (optionally warm-started from the
   current model's weights).
3. Evaluates the candidate AND the current model on the same eval set (--eval-data,
   default: the eval split of the data just trained on), through their SavedModels.
4. Gate: reconstruction not worse than the current model's by more than
   --max-reconstruction-increase (relative), mean rho_hat within --rho-tolerance of rho
   (relative), dead-unit fraction at most --max-dead-fraction. The first model only
   needs the absolute checks.
5. Promotes by compare-and-swap on ROOT/CURRENT (see pipeline/models.py) against the
   model it was compared with; if another retrain promoted meanwhile, it does not.
verdict.json in the version dir records the decision and its reasons either way.
Exit codes: 0 finished (promoted or not: see the verdict); 2 bad flags or data; 3/4/75
as `sae preprocess` / `sae train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline import models
from preprocessing import flags, sources, storage
from preprocessing import manifest as manifest_lib
from preprocessing.errors import ArgumentParser, UserError
from preprocessing.storage import join
from trainer.config import dead_units


@dataclass(frozen=True)
class Gate:
    max_reconstruction_increase: float = 0.05  # relative to the current model's
    rho_tolerance: float = 0.3  # |mean rho_hat - rho| <= tolerance * rho
    max_dead_fraction: float = 0.1


def decide(candidate: dict, current: dict | None, gate: Gate) -> tuple[bool, list[str]]:
    """Pure gate: (promote?, reasons). Metrics dicts as from `evaluate_export`."""
    reasons = []
    rho = candidate["rho"]
    off = abs(candidate["mean_rho_hat"] - rho) / rho
    if off > gate.rho_tolerance:
        reasons.append(
            f"mean rho_hat {candidate['mean_rho_hat']:.4g} is {off:.0%} from rho "
            f"{rho:g} (limit {gate.rho_tolerance:.0%})"
        )
    if candidate["dead_fraction"] > gate.max_dead_fraction:
        reasons.append(
            f"dead-unit fraction {candidate['dead_fraction']:.3f} > {gate.max_dead_fraction:.3f}"
        )
    if current is not None:
        limit = current["reconstruction"] * (1 + gate.max_reconstruction_increase)
        if candidate["reconstruction"] > limit:
            reasons.append(
                f"reconstruction {candidate['reconstruction']:.5g} is worse than the current "
                f"model's {current['reconstruction']:.5g} by more than "
                f"{gate.max_reconstruction_increase:.0%}"
            )
    return not reasons, reasons


def evaluate_export(
    export_dir: str, data_root: str, split: str = "eval", batch_size: int = 1024
) -> dict:
    """Gate metrics of a SavedModel on a dataset split, through its signatures only.

    reconstruction = mean over examples of 0.5 ||x_hat - x||^2 (the UFLDL term), with x
    the model's own normalization of the pixels; rho_hat_j = mean activation of unit j.
    """
    import tensorflow as tf

    from trainer import artifacts, data

    info = artifacts.read_export_info(export_dir)
    dataset = manifest_lib.load(data_root)
    patch_size = info.config.patch_size  # a patch model sees windows
    if patch_size:
        data.check_shape(dataset, info.image_shape, patch_size)
    elif dataset.image_shape != info.image_shape:
        raise UserError(
            f"eval data {data_root} holds {dataset.image_shape} images but the "
            f"model {export_dir} takes {info.image_shape}"
        )
    sig = tf.saved_model.load(export_dir).signatures
    sq, count, act_sum = 0.0, 0, None
    windows = data.eval_dataset(
        dataset,
        batch_size,
        split=split,
        patch_size=patch_size,
        patches_per_image=info.config.patches_per_image,
    )
    for images in windows:
        x = sig["normalize"](images=images)["inputs"].numpy().astype(np.float64)
        x_hat = sig["reconstruct"](images=images)["reconstructions"].numpy()
        a = sig["encode"](images=images)["activations"].numpy().astype(np.float64)
        sq += float(((x_hat - x) ** 2).sum())
        count += len(a)
        act_sum = a.sum(0) if act_sum is None else act_sum + a.sum(0)
    rho = info.config.rho
    rho_hat = act_sum / count
    return {
        "reconstruction": 0.5 * sq / count,
        "mean_rho_hat": float(rho_hat.mean()),
        "dead_fraction": float(dead_units(rho_hat, rho).mean()),
        "rho": rho,
        "examples": count,
    }


def make_parser() -> ArgumentParser:
    from trainer import config

    p = ArgumentParser(
        prog="sae retrain",
        description="Train a candidate on new data, gate it against the current model, "
        "promote it atomically if it is not worse. Unknown flags go to `sae preprocess` "
        "(e.g. --resize, Beam options).",
        epilog="Exit codes: 0 finished (promoted or not; see verdict.json); 2 bad flags/data; "
        "3, 4, 75 as sae preprocess / sae train.",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="SRC",
        help="a `sae preprocess` output, or images to preprocess first",
    )
    p.add_argument("--models-root", required=True, help="local path or gs:// URI")
    p.add_argument("--eval-data", help="fixed eval dataset (default: --data's eval split)")
    config.add_arguments(p)
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="initialize the candidate from the current model's weights",
    )
    g = Gate()
    p.add_argument(
        "--max-reconstruction-increase",
        type=flags.non_negative_number,
        default=g.max_reconstruction_increase,
        help=f"relative (default: {g.max_reconstruction_increase})",
    )
    p.add_argument(
        "--rho-tolerance",
        type=flags.non_negative_number,
        default=g.rho_tolerance,
        help=f"relative to rho (default: {g.rho_tolerance})",
    )
    p.add_argument(
        "--max-dead-fraction",
        type=flags.fraction,
        default=g.max_dead_fraction,
        help=f"(default: {g.max_dead_fraction})",
    )
    return p


def run(argv: Sequence[str] | None = None) -> models.Verdict:
    """Returns the verdict (also written to the version's verdict.json)."""
    args, passthrough = make_parser().parse_known_args(argv)
    storage.check_access(
        reads=[("--data", args.data), ("--eval-data", args.eval_data)],
        writes=[("--models-root", args.models_root)],
    )
    from preprocessing import job as preprocess_job
    from trainer import config, train

    # Before any preprocessing: `sae train` would check the config only after it.
    config.apply_overrides(config.preset(args.preset), args.set)
    if args.eval_data:  # read only after training otherwise
        manifest_lib.load(args.eval_data).check_shards(("eval",))
    root = args.models_root.rstrip("/")
    version = models.new_version()
    vdir = join(root, "versions", version)
    data = args.data
    if not manifest_lib.is_dataset(data):
        # Checked here, so a bad --data is reported as --data, not as preprocess's --input.
        sources.parse(args.data, flag="--data")
        data = join(root, "datasets", version)
        print(f"retrain: preprocessing {args.data} -> {data}", flush=True)
        preprocess_job.run(["--input", args.data, "--output", data, *passthrough])
    elif passthrough:
        raise UserError(
            f"unknown flags {' '.join(passthrough)} (only used when --data needs preprocessing)"
        )
    current, token = models.read_current(root)
    train_args = ["--data", data, "--workdir", vdir, *config.to_argv(args)]
    if args.warm_start and current is not None:
        train_args += ["--init-from", join(root, "versions", current, "checkpoints")]
    print(f"retrain: training candidate {version} (current: {current})", flush=True)
    train.run(train_args)

    eval_data = args.eval_data or data
    candidate = evaluate_export(join(vdir, "export"), eval_data)
    incumbent = (
        evaluate_export(join(root, "versions", current, "export"), eval_data)
        if current is not None
        else None
    )
    gate = Gate(args.max_reconstruction_increase, args.rho_tolerance, args.max_dead_fraction)
    ok, reasons = decide(candidate, incumbent, gate)
    promoted = ok and models.compare_and_swap(root, token, version)
    if ok and not promoted:
        reasons.append(
            "CURRENT changed during evaluation (another promotion won); rerun to "
            "compare against the new model"
        )
    verdict = models.Verdict(
        version=version,
        promoted=promoted,
        reasons=tuple(reasons or ["passed the gate"]),
        compared_with=current,
        candidate=candidate,
        current=incumbent,
        gate=asdict(gate),
        eval_data=eval_data,
        data=data,
        decided_at=models.utc_now(),
    )
    storage.publish_json(join(vdir, models.VERDICT), verdict.to_dict())
    print(
        f"retrain: {version} {'PROMOTED' if promoted else 'not promoted'}: "
        f"{'; '.join(verdict.reasons)}",
        flush=True,
    )
    return verdict
