"""Full-batch L-BFGS: `sae train --set optimizer=lbfgs` against SciPy's L-BFGS on NumPy.

    .venv/bin/python benchmarks/lbfgs_bench.py --out lbfgs.json          # makes the data
    .venv/bin/python benchmarks/lbfgs_bench.py --data runs/mnist --iterations 200 --out F

Without --data it makes builtin:mnist in the workdir (reused when there):
    sae preprocess --input builtin:mnist --output W/data --eval-fraction 0.25
Both contenders minimize the same UFLDL cost (--preset mnist: 784 -> 196, rho 0.1, lambda
3e-3, beta 3, sigmoid decoder, pixels / 255) over the same train split, from UFLDL's
initialization, for --iterations iterations; each runs as a subprocess, median of --repeats
interleaved runs:
  sae    sae train --data D --workdir W --preset mnist --set optimizer=lbfgs --set epochs=1
             --set steps_per_epoch=ITERATIONS --set checkpoint_every_steps=0 --verbose 0
         (its train_seconds also hold the one evaluation of the eval split and the checkpoint
         at the end, with the 20 curvature pairs)
  scipy  this script's hidden --loop scipy: what a UFLDL port writes by hand, at its fastest
         here: scipy.optimize.minimize(method="L-BFGS-B", jac=True) on a NumPy cost and
         gradient with float32 matrix products (float64 ones took twice as long), the train
         images from a .npy file made beforehand, memory 20 pairs as sae's (SciPy's default
         is 10).
Reported per contender: wall seconds of the whole process (start-up included), the seconds
of the iterations alone (sae: its metrics' train_seconds; scipy: around minimize), seconds
per iteration, evaluations of J and dJ, and the final train J recomputed by this script's
NumPy cost from the final weights (for sae, from its checkpoint, next to the J it kept
there). `iteration_ratio_scipy_over_sae` > 1 means sae's iterations are faster. No target in
issue 11; this says what the option costs. Trust figures only when `background_cores` is
near 0 (this 2-core machine is shared).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    add_repeats_arg,
    add_workdir_args,
    finish_report,
    load_train_images,
    log,
    measure,
    median_run,
    open_workdir,
    quiet_env,
    ratio,
    run_interleaved,
    sae_command,
    start_report,
)

RHO, LAMBDA, BETA, HIDDEN, MEMORY = 0.1, 3e-3, 3.0, 196, 20


def ufldl_cost(theta: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    """UFLDL's J and dJ (flat, float64) for x [m, n] in [0, 1]; theta = (W1 [n, s], W2 [s, n],
    b1 [s], b2 [n]) flattened in that order. Matrix products in float32."""
    m, n = x.shape
    s = HIDDEN
    t = theta.astype(np.float32)
    w1, w2 = t[: n * s].reshape(n, s), t[n * s : 2 * n * s].reshape(s, n)
    b1, b2 = t[2 * n * s : 2 * n * s + s], t[2 * n * s + s :]
    a = 1.0 / (1.0 + np.exp(-(x @ w1 + b1)))
    x_hat = 1.0 / (1.0 + np.exp(-(a @ w2 + b2)))
    rho_hat = a.mean(axis=0, dtype=np.float64)
    kl = RHO * np.log(RHO / rho_hat) + (1 - RHO) * np.log((1 - RHO) / (1 - rho_hat))
    cost = (
        0.5 * np.sum(np.square(x_hat - x), dtype=np.float64) / m
        + 0.5
        * LAMBDA
        * (np.sum(np.square(w1, dtype=np.float64)) + np.sum(np.square(w2, dtype=np.float64)))
        + BETA * kl.sum()
    )
    d3 = (x_hat - x) * x_hat * (1 - x_hat) / m
    sparse = (BETA * (-RHO / rho_hat + (1 - RHO) / (1 - rho_hat)) / m).astype(np.float32)
    d2 = (d3 @ w2.T + sparse) * a * (1 - a)
    grad = np.concatenate([
        (x.T @ d2 + LAMBDA * w1).ravel(), (a.T @ d3 + LAMBDA * w2).ravel(), d2.sum(0), d3.sum(0)
    ])  # fmt: skip
    return float(cost), grad.astype(np.float64)


def scipy_loop(images_npy: str, iterations: int, out: str) -> None:
    """The scipy contender, in its own process: writes {seconds, iterations, evaluations,
    train_loss} to `out`."""
    from scipy.optimize import minimize

    x = np.load(images_npy).reshape(-1, 784).astype(np.float32) / 255.0
    n, s = x.shape[1], HIDDEN
    r = np.sqrt(6.0) / np.sqrt(n + s + 1)  # UFLDL's initialization
    rng = np.random.default_rng(0)
    theta0 = np.concatenate([rng.uniform(-r, r, 2 * n * s), np.zeros(s + n)])
    evaluations = 0

    def fun(theta):
        nonlocal evaluations
        evaluations += 1
        return ufldl_cost(theta, x)

    t0 = time.perf_counter()
    res = minimize(fun, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": iterations, "maxcor": MEMORY})  # fmt: skip
    seconds = time.perf_counter() - t0
    Path(out).write_text(json.dumps({
        "seconds": round(seconds, 2), "iterations": int(res.nit), "evaluations": evaluations,
        "train_loss": round(ufldl_cost(res.x, x)[0], 4), "scipy_message": str(res.message),
    }))  # fmt: skip


def train_images(data_dir: str, path: Path) -> np.ndarray:
    """The train split's uint8 images, also saved to `path` (.npy) for the scipy contender."""
    _, images = load_train_images(Path(data_dir))
    np.save(path, images)
    return images


def sae_weights_loss(workdir: Path, x: np.ndarray) -> dict:
    """Iterations, evaluations and J kept in sae's last checkpoint, and J recomputed here."""
    import tensorflow as tf

    ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(workdir / "checkpoints")))

    def get(name: str) -> np.ndarray:
        return ckpt.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

    theta = np.concatenate([get(f"model/{k}").ravel() for k in ("w1", "w2", "b1", "b2")])
    return {
        "iterations": int(get("optimizer/iterations")),
        "evaluations": int(get("optimizer/evaluations")),
        "train_loss_kept": round(float(get("optimizer/loss")), 4),
        "train_loss": round(ufldl_cost(theta.astype(np.float64), x)[0], 4),
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a `sae preprocess` output of 28x28x1 images (default: "
                   "builtin:mnist made in the workdir)")  # fmt: skip
    p.add_argument("--iterations", type=int, default=200, help="L-BFGS iterations (default 200)")
    add_repeats_arg(p, "each contender")
    add_workdir_args(p, "data, the images as .npy, logs")
    p.add_argument("--loop", choices=("scipy",), help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.loop == "scipy":
        scipy_loop(args.images, args.iterations, args.result)
        return 0
    t_start = time.perf_counter()
    report = start_report("lbfgs", ["tensorflow", "scipy", "numpy"])
    with open_workdir(args, "lbfgs-bench-", scratch="runs") as workdir:
        data = args.data
        if data is None:
            data = str(workdir / "data")
            from preprocessing import manifest as manifest_lib

            if not manifest_lib.is_dataset(data):
                subprocess.run([sae_command(), "preprocess", "--input", "builtin:mnist",
                                "--output", data, "--eval-fraction", "0.25"],
                               check=True, env=quiet_env())  # fmt: skip
        images_npy = workdir / "train-images.npy"
        images = train_images(data, images_npy)
        count = len(images)
        x = images.reshape(count, -1).astype(np.float32) / 255.0
        log(f"{count} train images, {args.iterations} iterations, {args.repeats} repeats")
        logs = workdir / "logs"
        run_ids = itertools.count()

        def sae(name: str) -> dict:
            run = workdir / "runs" / f"{name}-{next(run_ids)}"
            cmd = [sae_command(), "train", "--data", data, "--workdir", str(run),
                   "--preset", "mnist", "--set", "optimizer=lbfgs", "--set", "epochs=1",
                   "--set", f"steps_per_epoch={args.iterations}",
                   "--set", "checkpoint_every_steps=0", "--verbose", "0"]  # fmt: skip
            m = measure(cmd, logs, run.name)
            metrics = json.loads((run / "metrics.json").read_text())
            r = {"wall_seconds": m["seconds"], "seconds": metrics["train_seconds"],
                 **sae_weights_loss(run, x), "background_cores": m["background_cores"],
                 "steal_cores": m["steal_cores"], "command": m["command"]}  # fmt: skip
            r["seconds_per_iteration"] = round(r["seconds"] / r["iterations"], 4)
            log(
                f"  sae: {r['seconds']} s for {r['iterations']} iterations ({r['wall_seconds']} "
                f"s wall), J {r['train_loss']}, background {r['background_cores']} cores"
            )
            return r

        def scipy(name: str) -> dict:
            result = workdir / "runs" / f"{name}.json"
            result.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--loop", "scipy", "--images", str(images_npy),
                   "--iterations", str(args.iterations), "--result", str(result)]  # fmt: skip
            m = measure(cmd, logs, name)
            r = {"wall_seconds": m["seconds"], **json.loads(result.read_text()),
                 "background_cores": m["background_cores"], "steal_cores": m["steal_cores"],
                 "command": m["command"]}  # fmt: skip
            r["seconds_per_iteration"] = round(r["seconds"] / r["iterations"], 4)
            log(
                f"  scipy: {r['seconds']} s for {r['iterations']} iterations "
                f"({r['wall_seconds']} s wall), J {r['train_loss']}, "
                f"background {r['background_cores']} cores"
            )
            return r

        runs = run_interleaved({"sae": sae, "scipy": scipy}, args.repeats)
        medians = {k: median_run(v, "seconds_per_iteration") for k, v in runs.items()}
        report.update(
            train_images=count,
            iterations=args.iterations,
            contenders=medians,
            iteration_ratio_scipy_over_sae=ratio(
                medians["scipy"]["seconds_per_iteration"], medians["sae"]["seconds_per_iteration"]
            ),
            wall_ratio_scipy_over_sae=ratio(
                medians["scipy"]["wall_seconds"], medians["sae"]["wall_seconds"]
            ),
        )
    finish_report(report, t_start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
