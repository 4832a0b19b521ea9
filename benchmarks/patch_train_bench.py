"""Patch training on photos: windows/s of the trainer's loop fed by `trainer.data.train_stream`
with one or many windows per photo, against a NumPy sampler written by hand.

    .venv/bin/python benchmarks/patch_train_bench.py                  # full run
    .venv/bin/python benchmarks/patch_train_bench.py --repeats 1 --steps 10   # smoke run
    .venv/bin/python benchmarks/patch_train_bench.py --workdir /tmp/pb --out pb.json   # reuses data

1. The collection: --photos random --side x --side grey crops (some mirrored; numpy seed 0) of
   the ten photographs of builtin:natural-images, written as PNGs and turned into a dataset
   by the real job (`sae preprocess --input PNGS --output DATA --num-shards 8
   --eval-fraction 0.05`; 1100 256x256 crops: 1049 train photos, 69 MB of pixels, so the
   trainer keeps them in memory). A dataset already in --workdir is reused.
2. The model: the mnist-conv preset's 8x8 -> 400 autoencoder (linear decoder, global batch
   1024 windows) without its ZCA whitening (the whitening is fitted once, before training;
   the steps cost the same), trained by `trainer.loop.train_function`, the compiled call of
   `sae train` (calls of steps_per_execution = 32 steps).
3. The contenders feed that same loop 1024 windows per step (train_bench.run_loop); each runs
   one warm-up epoch (tracing, filling buffers) and one timed epoch of --steps steps
   (sae_p1_streaming: 1/8 of them, about as many seconds), --repeats times, interleaved:
     sae_p1           train_stream, patches_per_image 1: one window of each of 1024 photos
                      per step, cut straight from the split in memory.
     sae_pP           train_stream, patches_per_image P (--per-image, default 128): P windows
                      of each of 1024 / P photos per step.
     sae_p1_streaming, sae_pP_streaming  the same two with the collection streamed from the
                      shards, as for a collection over 512 MiB (data.IN_MEMORY_BYTES set to 0
                      in this process): every photo a step uses is read and parsed whole.
     numpy_by_hand    what a user writes: the train photos in one NumPy array, per step 1024 / P
                      random photos, P random corners each, windows cut by fancy indexing,
                      fed by tf.data.Dataset.from_generator(...).prefetch(AUTOTUNE).
     precut_bound     40 batches of windows cut beforehand, from memory
                      (from_tensor_slices(...).repeat().prefetch): no input work at all.
   windows/s = steps * 1024 / the timed seconds; the median run is reported.

Target: sae_pP >= numpy_by_hand (1.0x). Also reported: sae_pP / precut_bound (no target: on 2
cores the input's work shares the cores with the step, for the NumPy sampler as for ours),
sae_pP / sae_p1 and sae_pP_streaming / sae_p1_streaming (what several windows per photo buy).

Output: progress on stderr, one JSON object on stdout (and in --out FILE):
  runs[NAME] = {windows_per_s, min, max, epoch_seconds, warmup_seconds, cores_used,
      background_cores, steal_cores, windows_per_s_all, repeats, what}; ratio_pP_vs_p1,
  ratio_pP_vs_p1_streaming, ratio_pP_vs_bound, ratio_pP_vs_numpy, targets.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import train_bench
from common import (
    add_repeats_arg,
    add_workdir_args,
    finish_report,
    load_train_images,
    log,
    median_run,
    open_workdir,
    quiet_env,
    ratio,
    run_interleaved,
    sae_command,
    start_report,
)

BATCH = 1024
PATCH = 8
TARGET_VS_NUMPY = 1.0


def make_collection(workdir: Path, photos: int, side: int) -> Path:
    """workdir/data-NxS: `sae preprocess` of `photos` random side x side grey crops of the
    bundled photographs; reused if there."""
    import numpy as np
    from PIL import Image

    from preprocessing import builtin
    from preprocessing import manifest as manifest_lib

    out = workdir / f"data-{photos}x{side}"
    if manifest_lib.is_dataset(str(out)):
        log(f"reusing {out}")
        return out
    pngs = workdir / f"png-{photos}x{side}"
    pngs.mkdir(parents=True, exist_ok=True)
    images, _ = builtin.load("natural-images")
    grey = [np.asarray(Image.fromarray(b.pixels).convert("L")) for b in images]
    rng = np.random.default_rng(0)
    log(f"writing {photos} crops to {pngs}")
    for i in range(photos):
        g = grey[i % len(grey)]
        r, c = rng.integers(0, g.shape[0] - side + 1), rng.integers(0, g.shape[1] - side + 1)
        crop = g[r : r + side, c : c + side]
        crop = crop[:, ::-1] if rng.integers(2) else crop
        Image.fromarray(np.ascontiguousarray(crop)).save(pngs / f"{i:05d}.png")
    cmd = [sae_command(), "preprocess", "--input", str(pngs), "--output", str(out)]
    cmd += ["--num-shards", "8", "--eval-fraction", "0.05", "--overwrite"]
    log(" ".join(cmd[1:]))
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=quiet_env())
    return out


def model_config(per_image: int):
    from trainer import config as config_lib

    sets = ["zca_epsilon=0", f"global_batch_size={BATCH}", f"patches_per_image={per_image}"]
    return config_lib.apply_overrides(config_lib.preset("mnist-conv"), sets)


def numpy_windows(photos, per_image: int, seed: int = 0):
    """The hand-written sampler: an endless generator of uint8 [BATCH, K, K, C] windows,
    per_image of each of BATCH / per_image random photos."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, h, w, _ = photos.shape
    offsets = np.arange(PATCH)
    while True:
        which = np.repeat(rng.integers(0, n, BATCH // per_image), per_image)
        r = rng.integers(0, h - PATCH + 1, BATCH)[:, None] + offsets  # [B, K]
        c = rng.integers(0, w - PATCH + 1, BATCH)[:, None] + offsets
        yield photos[which[:, None, None], r[:, :, None], c[:, None, :]]


def timed_loop(cfg, dataset, steps: int, what: str) -> dict:
    """train_bench's run of the trainer's compiled loop on `dataset`: one warm-up epoch of
    `steps` steps, then `steps` timed ones; its examples are windows here."""
    r = train_bench.run_loop(cfg, dataset, steps, 1, what)
    return {"windows_per_s": r.pop("examples_per_s"), **r}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=1100, help="photos in the collection")
    p.add_argument("--side", type=int, default=256, help="their side in pixels (default 256)")
    p.add_argument("--per-image", type=int, default=128, help="P of sae_pP (default 128)")
    p.add_argument(
        "--steps",
        type=int,
        default=384,
        help="timed steps per run (default 384; sae_p1_streaming runs 1/8 of them)",
    )
    add_repeats_arg(p, "each contender", 5)
    add_workdir_args(p, "the collection (PNGs and dataset)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if BATCH % args.per_image:
        raise SystemExit(f"--per-image must divide {BATCH}")
    t_start = time.perf_counter()
    report = start_report("patch_train", ["tensorflow"])
    with open_workdir(args, "patch-bench-") as workdir:
        data_dir = make_collection(workdir, args.photos, args.side)
        import tensorflow as tf

        from trainer import data

        manifest, photos = load_train_images(data_dir)
        p = args.per_image
        one, many = model_config(1), model_config(p)
        precut = [next(numpy_windows(photos, p, seed)) for seed in range(40)]
        slow_steps = max(1, args.steps // 8)  # sae_p1_streaming is 10x slower: as many seconds

        in_memory_bytes = data.IN_MEMORY_BYTES

        def stream(cfg, streaming: bool):
            # Read when the stream is made: 0 sends even this small collection to the shards.
            data.IN_MEMORY_BYTES = 0 if streaming else in_memory_bytes
            per_image = cfg.patches_per_image
            return data.train_stream(
                manifest, BATCH, 0, patch_size=PATCH, patches_per_image=per_image
            )

        spec = tf.TensorSpec([BATCH, PATCH, PATCH, photos.shape[3]], tf.uint8)
        contenders = {
            "sae_p1": lambda _: timed_loop(
                one, stream(one, False), args.steps, "train_stream, 1 window per photo"
            ),
            "sae_pP": lambda _: timed_loop(
                many, stream(many, False), args.steps, f"train_stream, {p} windows per photo"
            ),
            "sae_p1_streaming": lambda _: timed_loop(
                one, stream(one, True), slow_steps, "sae_p1, streamed from the shards"
            ),
            "sae_pP_streaming": lambda _: timed_loop(
                many, stream(many, True), args.steps, "sae_pP, streamed from the shards"
            ),
            "numpy_by_hand": lambda _: timed_loop(
                many,
                tf.data.Dataset.from_generator(
                    lambda: numpy_windows(photos, p), output_signature=spec
                ).prefetch(tf.data.AUTOTUNE),
                args.steps,
                f"NumPy fancy indexing, {p} windows per photo, from_generator",
            ),
            "precut_bound": lambda _: timed_loop(
                many,
                tf.data.Dataset.from_tensor_slices(precut).repeat().prefetch(tf.data.AUTOTUNE),
                args.steps,
                "windows cut beforehand, from memory: no input work",
            ),
        }
        runs = run_interleaved(contenders, args.repeats)
        data.IN_MEMORY_BYTES = in_memory_bytes
        report["collection"] = {
            "train_photos": manifest.num_examples("train"),
            "shape": list(manifest.image_shape),
            "per_image": p,
            "batch": BATCH,
        }
        report["runs"] = {n: median_run(r, "windows_per_s") for n, r in runs.items()}
        rate = {n: r["windows_per_s"] for n, r in report["runs"].items()}
        report["ratio_pP_vs_p1"] = ratio(rate["sae_pP"], rate["sae_p1"])
        report["ratio_pP_vs_p1_streaming"] = ratio(
            rate["sae_pP_streaming"], rate["sae_p1_streaming"]
        )
        report["ratio_pP_vs_bound"] = got_bound = ratio(rate["sae_pP"], rate["precut_bound"])
        report["ratio_pP_vs_numpy"] = got_numpy = ratio(rate["sae_pP"], rate["numpy_by_hand"])
        report["targets"] = {
            "vs_numpy": {"target": TARGET_VS_NUMPY, "pass": got_numpy >= TARGET_VS_NUMPY},
        }
        log(
            f"sae_pP / sae_p1 = {report['ratio_pP_vs_p1']}, / bound = {got_bound}, "
            f"/ numpy = {got_numpy}"
        )
        finish_report(report, t_start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
