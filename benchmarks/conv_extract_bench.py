"""Rows/s of `sae extract --pool` against a direct loop of the same signature and a naive loop.

    .venv/bin/python benchmarks/conv_extract_bench.py --out conv.json       # makes data + model
    .venv/bin/python benchmarks/conv_extract_bench.py --data runs/mnist \
        --model runs/mnist-conv/export --out conv.json

Without --data and --model it makes them in the workdir (reused when there), as README says:
    sae preprocess --input builtin:mnist --output W/data --eval-fraction 0.25
    sae train --data W/data --workdir W/train --preset mnist-conv --verbose 0
On the same shards (a `sae preprocess` output) and the same patch model, each contender runs as
a subprocess; rows/s = rows / wall seconds, interpreter, TensorFlow start-up and model loading
included (common.measure), median of --repeats interleaved runs:
  sae_2w  sae extract --data D --model M --pool G --output OUT --overwrite
              --direct_running_mode=multi_processing --direct_num_workers=2
          (writes TFRecord + Parquet rows, default --sparsify none with --pool)
  direct  this script's hidden --loop direct: one process; per split,
          tf.data.TFRecordDataset(shards).batch(256).map(records.parse_batch); per batch the
          SavedModel's `encode_map` pooled inside the batch (pipeline.pooled.pooled_encoder, the
          job's own encoder). It writes nothing, so it is an upper bound for the job.
  naive   --loop naive: the same reading; every KxK window of each batch cut out with NumPy
          (sliding_window_view), `encode` on them, the maps mean-pooled over the grid in NumPy
          (equal to direct's rows within 2e-7); all rows, or the first --naive-rows.
  naive_image  --loop naive_image: the same, one image's windows per `encode` call (the loop
          a user writes first: for each image, its windows, encode, pool).
  stages  --loop stages: where encode_map's time goes, on one batch of the shards: the
          convolution as TF's conv2d and as an im2col GEMM (extract_patches + matmul), the
          sigmoid and the grid pooling, each alone (median of 5), with the multiply-adds
          (2 H' W' K^2 C s per image) and GFLOP/s of the two convolutions.
Targets (issue 11): sae_2w >= 0.8x direct, >= 5x naive (both forms). `background_cores` says
how much other work ran meanwhile; this 2-core machine is shared, so trust figures only when it
is near 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import (
    add_repeats_arg,
    add_workdir_args,
    finish_report,
    log,
    measure,
    measure_sae_job,
    measured_run,
    median_run,
    open_workdir,
    quiet_env,
    ratio,
    run_interleaved,
    sae_command,
    start_report,
)

BATCH = 256  # `sae extract --batch-size` default
TARGET_DIRECT, TARGET_NAIVE = 0.8, 5.0


def _batches(data_dir: str, limit: int | None):
    """uint8 image batches [<= BATCH, H, W, C] of every split, at most `limit` rows."""
    import tensorflow as tf

    from preprocessing import manifest as manifest_lib
    from preprocessing import records

    data = manifest_lib.load(data_dir)
    rows = 0
    for split in ("train", "eval"):
        ds = tf.data.TFRecordDataset(data.shard_paths(split)).batch(BATCH)
        for batch in ds.map(lambda s: records.parse_batch(s, data.image_shape)):
            if limit is not None and rows >= limit:
                return
            images = batch["image"].numpy()[: None if limit is None else limit - rows]
            rows += len(images)
            yield images


def _naive(encode, images, k: int, stride: int, grid: int):
    """Windows cut out with NumPy -> `encode` -> mean over each grid region: [b, G*G*s]."""
    import numpy as np
    import tensorflow as tf

    windows = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # [b, H', W', C, K, K]
    b, hp, wp, c = windows.shape[:4]
    flat = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k, k, c)
    maps = encode(images=tf.constant(flat))["activations"].numpy().reshape(b, hp, wp, -1)
    rows, cols = np.arange(hp) * grid // hp, np.arange(wp) * grid // wp
    regions = [(i, j) for i in range(grid) for j in range(grid)]  # (grid row, grid column)
    pooled = [maps[:, rows == i][:, :, cols == j].mean(axis=(1, 2)) for i, j in regions]
    return np.stack(pooled, axis=1).reshape(b, -1)


def make_inputs(workdir: Path) -> tuple[str, str]:
    """(data, export) of builtin:mnist and the mnist-conv preset in `workdir`, made if missing."""
    data, train = workdir / "data", workdir / "train"
    preprocess = ["preprocess", "--input", "builtin:mnist", "--output", str(data)]
    preprocess += ["--eval-fraction", "0.25", "--overwrite"]
    train_cmd = ["train", "--data", str(data), "--workdir", str(train), "--preset", "mnist-conv"]
    steps = [
        (data / "manifest.json", preprocess),
        (train / "export" / "saved_model.pb", [*train_cmd, "--verbose", "0"]),
    ]
    for done, cmd in steps:
        if not done.exists():
            log(f"making {done.parent}: sae {' '.join(cmd)}")
            subprocess.run([sae_command(), *cmd], check=True, stdout=sys.stderr, env=quiet_env())
    return str(data), str(train / "export")


def loop(mode: str, data_dir: str, export_dir: str, grid: int, stride: int, limit: int | None):
    t_start = time.perf_counter()
    import tensorflow as tf

    from pipeline import pooled
    from trainer import artifacts

    info = artifacts.read_export_info(export_dir)
    model = tf.saved_model.load(export_dir)
    k = info.image_shape[0]
    pooling = pooled.Pooling(grid, "mean", stride, k, info.config.hidden)
    fast = pooled.pooled_encoder(model.signatures["encode_map"], pooling)
    startup, rows = time.perf_counter() - t_start, 0
    for images in _batches(data_dir, limit):
        if mode == "direct":
            fast(images=tf.constant(images))["activations"].numpy()
        elif mode == "naive":
            _naive(model.signatures["encode"], images, k, stride, grid)
        else:  # naive_image: one image's windows per `encode` call
            for image in images:
                _naive(model.signatures["encode"], image[None], k, stride, grid)
        rows += len(images)
    return {"rows": rows, "startup_seconds": round(startup, 2),
            "loop_seconds": round(time.perf_counter() - t_start - startup, 2)}  # fmt: skip


def stages(data_dir: str, export_dir: str, grid: int) -> dict:
    """Seconds per batch of each encode_map stage alone, on the first batch of the shards."""
    import numpy as np
    import tensorflow as tf

    from trainer import conv

    model = tf.saved_model.load(export_dir)
    w1 = model.model.w1  # the trainer's weights, tracked by the export's serving module
    images = next(_batches(data_dir, BATCH))
    x = tf.constant(images, tf.float32) / 255.0
    b, h, w, c = x.shape
    s = w1.shape[1]
    k = int(round((w1.shape[0] // c) ** 0.5))
    kernel = tf.reshape(w1, [k, k, c, s])
    conv2d = tf.function(lambda: tf.nn.conv2d(x, kernel, 1, "VALID"))

    @tf.function
    def im2col():
        patches = tf.image.extract_patches(x, [1, k, k, 1], [1] * 4, [1] * 4, "VALID")
        hp, wp = patches.shape[1], patches.shape[2]
        z = tf.matmul(tf.reshape(patches, [-1, k * k * c]), tf.reshape(kernel, [-1, s]))
        return tf.reshape(z, [b, hp, wp, s])

    z = conv2d()
    np.testing.assert_allclose(im2col().numpy(), z.numpy(), atol=1e-4)
    parts = {"conv2d": conv2d, "im2col_matmul": im2col,
             "sigmoid": tf.function(lambda: tf.sigmoid(z)),
             "pool_grid": tf.function(lambda: conv.pool_grid(z, grid, "mean"))}  # fmt: skip
    seconds = {}
    for name, f in parts.items():
        f()  # traced and warm
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            f().numpy()
            times.append(time.perf_counter() - t0)
        seconds[name] = round(float(np.median(times)), 4)
    flops = 2 * b * z.shape[1] * z.shape[2] * k * k * c * s
    rates = {n: round(flops / 1e9 / seconds[n], 1) for n in ("conv2d", "im2col_matmul")}
    return {"images": b, "map": list(z.shape[1:]), "gflop_per_batch": round(flops / 1e9, 2),
            "seconds": seconds, "gflop_per_s": rates}  # fmt: skip


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a `sae preprocess` output (default: builtin:mnist, made)")
    p.add_argument("--model", help="a patch model's export (default: mnist-conv, trained)")
    p.add_argument("--pool", type=int, default=2, help="grid side G (default: 2)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument(
        "--naive-rows", type=int, default=0, help="rows the naive loop encodes (default 0: all)"
    )
    add_repeats_arg(p, "each contender", 1)
    add_workdir_args(p, "the job's outputs and logs")
    p.add_argument(
        "--loop", choices=("direct", "naive", "naive_image", "stages"), help=argparse.SUPPRESS
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.loop == "stages":
        print(json.dumps(stages(args.data, args.model, args.pool)))
        return 0
    if args.loop:
        limit = args.naive_rows if args.loop.startswith("naive") and args.naive_rows else None
        print(json.dumps(loop(args.loop, args.data, args.model, args.pool, args.stride, limit)))
        return 0
    t_start = time.perf_counter()
    report = start_report("conv_extract", ["tensorflow", "apache-beam"])
    with open_workdir(args, "conv-bench-", scratch="out") as workdir:
        if not (args.data and args.model):
            args.data, args.model = make_inputs(workdir)
        me = [sys.executable, str(Path(__file__).resolve())]
        flags = ["--data", args.data, "--model", args.model, "--pool", str(args.pool)]
        flags += ["--stride", str(args.stride), "--naive-rows", str(args.naive_rows)]

        def sae(name):
            job = ["extract", "--data", args.data, "--model", args.model]
            job += ["--pool", f"{args.pool}x{args.pool}", "--stride", str(args.stride)]
            m, out = measure_sae_job(job, 2, workdir, name)
            from pipeline import features

            rows = features.load(str(out)).num_written
            return measured_run("rows", rows, m, {}, f"{rows} rows written")

        def own_loop(name):
            m = measure([*me, *flags, "--loop", name], workdir / "logs", name)
            inner = json.loads(m["stdout"].strip().splitlines()[-1])
            return measured_run("rows", inner["rows"], m, inner, f"{inner['rows']} rows encoded")

        contenders = {"sae_2w": sae, "direct": own_loop, "naive": own_loop, "naive_image": own_loop}
        runs = run_interleaved(contenders, args.repeats)
        report["runs"] = {name: median_run(r) for name, r in runs.items()}
        rate = {name: r["rows_per_s"] for name, r in report["runs"].items()}
        targets = {"direct": TARGET_DIRECT, "naive": TARGET_NAIVE, "naive_image": TARGET_NAIVE}
        report["targets"] = {}
        for other, target in targets.items():
            report[f"ratio_2w_vs_{other}"] = got = ratio(rate["sae_2w"], rate[other])
            report["targets"][f"vs_{other}"] = {"target": target, "pass": got >= target}
            log(f"sae_2w / {other} = {got} (target {target})")
        finish_report(report, t_start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
