"""Training throughput (examples/s) of the sae trainer against its input-free bound and baselines.

    .venv/bin/python benchmarks/train_bench.py                          # full run
    .venv/bin/python benchmarks/train_bench.py --examples 5000 --epochs 2   # smoke run
    .venv/bin/python benchmarks/train_bench.py --workdir /tmp/tb --out tb.json   # reuses data

For each model size (`--sizes`, default 784x256 and 64x25; global batch 256) it:
1. Makes a TFRecord dataset with the real preprocessing job (`sae preprocess --input
   builtin:natural-images --patches P --patch-size K --channels 1 --num-shards 8
   --eval-fraction 0.15`, a subprocess), i.e. random KxK grey patches of the ten bundled
   photos; eval fraction 0.15 puts exactly one photo in the eval split, so the train split has
   9 * ceil(examples / 9) patches. A dataset already in --workdir is reused.
2. Times each contender on that train split, same batch, same number of steps: one warm-up
   epoch (tracing, first file opens, shuffle-buffer fill), then --epochs timed epochs of
   --steps-per-epoch steps (default: one pass, train examples // 256). Per epoch,
   examples/s = steps * 256 / wall seconds of the epoch; reported: the median over the timed
   epochs and its min/max. (a) and (b) run --repeats times (default 5), interleaved a, b, a,
   b, ...; each is reported by its median run (`repeats`, `examples_per_s_all`) and their
   ratio is the median of the back-to-back pairs' ratios, because single runs on this shared
   machine swung it by +-20% (the machine's speed drifts over seconds); a_sae_cli runs in the
   same rounds (a, b, cli, a, b, cli, ...) and each of its runs is set against the geometric
   mean of the (a) runs before and after it (the last against the one before). The TF
   contenders other than a_sae_cli run in this process, one after another:
     input_pipeline_only  `trainer.data.train_stream` iterated alone, no model: the most the
                     input pipeline can deliver here (and the CPU it needs to do so).
     a_sae_stream    the production input pipeline and the trainer's own loop:
                     `trainer.data.train_stream` reading the TFRecord shards from disk
                     (interleave, shuffle, batch, parse) into `trainer.loop.train_function`
                     (the compiled call `sae train` makes: a tf.range of
                     strategy.run(train_step)), calls of up to steps_per_execution (32) steps
                     ending at each epoch end, as in `sae train`. Nothing between calls: no
                     per-epoch work, evaluation or export (a_sae_cli has them).
     b_in_memory     the same loop and train_step fed the same uint8 images, already batched,
                     from memory: `from_tensor_slices(batches).repeat().prefetch` (the
                     input-free upper bound).
     c_keras_example1  the seed article's Example 1: Sequential Dense(s, sigmoid,
                     activity_regularizer=l1(1e-5)) -> Dense(n, sigmoid), compile('adam',
                     'mse'), fit(X, X, batch_size=256) on a float32 NumPy array of pixels / 255
                     (the train images, tiled to S * 256 rows so every epoch is S full batches).
     a_sae_cli       the real command: `sae train --data D --workdir W --preset P --set
                     hidden=s --set input_shape=K,K,1 --set global_batch_size=256 --set
                     epochs=2+E --set steps_per_epoch=S --set checkpoint_every_steps=0 --set
                     eval_batches=1 --verbose 0` as a subprocess (default cadences: an
                     evaluation and a checkpoint at every epoch end); an epoch is the time
                     between consecutive epoch-end TensorBoard events (train/epoch_loss, written
                     before that epoch's evaluation and checkpoint, so each interval holds one
                     epoch's training and the previous epoch's per-epoch work: 1 validation
                     batch, the checkpoint, the TensorBoard filter picture and histogram).
                     Its warm-up is two epochs, as (a)'s one holds (a)'s one-time trace: the
                     first epoch, and the interval after it, which holds the one-time traces
                     of the per-epoch work (evaluation, checkpoint, summaries; about 1 s here,
                     reported as first_interval_seconds). Its start-up, final eval and export
                     are excluded (whole_run_seconds).
   and in a subprocess of this script (so that TensorFlow and torch never share a process):
     d_torch         the same UFLDL cost (0.5 * sum-over-pixels squared error / m + lambda/2
                     (|W1|^2 + |W2|^2) + beta * sum_j KL(rho || rho_hat_j)) in a plain PyTorch
                     CPU loop: two nn.Linear, sigmoid, Adam, batches sliced from a float32 tensor
                     by a per-pass torch.randperm, loss.item() every step,
                     torch.set_num_threads(cpu count). Inputs are normalized beforehand, once
                     (untimed), so d does less per step than a, which normalizes uint8 in-graph.
     d_torch_dataloader  the same loop fed by DataLoader(TensorDataset(X), batch_size=256,
                     shuffle=True, drop_last=True), the textbook way.
   The model config is the preset (`mnist` for 784 inputs, `natural-patches` for 64, i.e. the
   UFLDL exercises' rho / beta / lambda / learning rate and pixel normalization) with hidden,
   input_shape and global_batch_size=256 overridden; d uses the same hyper-parameters.

Output: progress on stderr, one JSON object on stdout (and in --out FILE):
  sizes["784x256"].runs[NAME] = {examples_per_s (median), min, max, epoch_seconds [timed],
      warmup_seconds, cores_used (this process's CPU / wall over the timed epochs: the input
      pipeline's threads show here), background_cores (CPU other work used meanwhile; near 0
      for a clean number), steal_cores (the part of it the hypervisor gave to other guests:
      runs here took up to 2.7x as long with steal and no other process running), what};
      a skipped contender is {"skipped": "why"}, a failed one
      {"failed": "why"}.
  sizes[...].ratio_a_over_b    a_sae_stream / b_in_memory     target >= 0.95 (input never starves):
                               the median over the back-to-back pairs (ratio_a_over_b_pairs)
  sizes[...].ratio_a_over_d    a_sae_stream / the faster torch loop   target > 1
  sizes[...].ratio_a_cli_over_a   a_sae_cli / a_sae_stream     target >= 0.9 (the command's
                               per-epoch work costs under 10%): the median over the command's
                               runs, each against the (a) runs around it
  sizes[...].cli_training_share   the same question asked inside the command, free of the
                               machine's drift between two processes: the share of each timed
                               epoch's wall seconds that `sae train` spent in its training calls
                               (its TensorBoard train/epoch_training_share); the median over
                               all rounds' timed epochs, target >= 0.9
  sizes[...].ratio_a_over_c, ratio_input_only_over_b   for diagnosis: the article's baseline;
      the pipeline's headroom (near or below 1 means the pipeline alone cannot keep up).
  sizes[...].targets           thresholds and pass booleans (null when not measured)
  targets_all_pass             every target of every size passed (null if one was not measured)
With torch not installed, d is reported as "skipped: torch not installed" (install it with
`.venv/bin/pip install torch==2.13.0`, the CPU wheel; torch is not a runtime dependency).
Numbers other than (a) and (b) are single measurements, contenders run one after another: trust a
ratio only when background_cores is near 0 for both runs. PyTorch with as many threads as cores
slows down far more than TensorFlow when another process takes a core.

Run time on 2 cores (AMD EPYC), measured 2026-11-27 with the datasets reused from --workdir
and torch installed: 210 s for the default run (5 repeats of (a) and (b)); making the two
datasets adds about 1 min once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    add_repeats_arg,
    add_workdir_args,
    busy_cpu_seconds,
    cpu_seconds,
    finish_report,
    load_train_images,
    log,
    make_patch_dataset,
    median_run,
    open_workdir,
    package_version,
    quiet_env,
    ratio,
    run_interleaved,
    sae_command,
    start_report,
    steal_seconds,
)

BATCH = 256
NUM_SHARDS = 8
# sha256-hash split of the ten builtin photo keys: 0.15 sends exactly one (a whole photo's
# patches) to eval; the default 0.1 sends none. Checked after the job.
EVAL_FRACTION = 0.15
TRAIN_PHOTOS = 9
TARGET_A_OVER_B = 0.95
TARGET_CLI_OVER_A = 0.9  # the whole command, its per-epoch work included, vs its own loop
TORCH_PIN = "torch==2.13.0"
TORCH_MISSING = f"skipped: torch not installed (install it with: .venv/bin/pip install {TORCH_PIN})"


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            n, s = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NxS like 784x256, got {item!r}") from None
        side = math.isqrt(n)
        if n < 4 or side * side != n or s < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: inputs must be a square number of grey pixels (64, 784, ...) and "
                "hidden units >= 1"
            )
        out.append((n, s))
    return out


def preset_for(n: int) -> str:
    return "natural-patches" if n == 64 else "mnist"


def model_config(n: int, s: int):
    from trainer import config as config_lib

    side = math.isqrt(n)
    overrides = [f"hidden={s}", f"input_shape={side},{side},1", f"global_batch_size={BATCH}"]
    return config_lib.apply_overrides(config_lib.preset(preset_for(n)), overrides), overrides


# ----------------------------------------------------------------------------
# Data: the real preprocessing job, then the train split as a uint8 array.
# ----------------------------------------------------------------------------
def make_dataset(workdir: Path, side: int, examples: int) -> Path:
    """workdir/data-KxK-N: natural-image patches via `sae preprocess`; reused if complete."""
    out = workdir / f"data-{side}x{side}-{examples}"
    patches = -(-examples // TRAIN_PHOTOS)
    made, _ = make_patch_dataset(out, side, patches, NUM_SHARDS, EVAL_FRACTION)
    counts = {s: made.num_examples(s) for s in ("train", "eval")}
    if counts["eval"] == 0 or counts["train"] < examples:
        raise SystemExit(f"{out}: unexpected split sizes {counts}; the eval split hash changed?")
    return out


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------
def epoch_rates(seconds: list[float], steps: int, batch: int = BATCH) -> dict:
    """examples/s of epochs of `steps` batches of `batch` taking `seconds`: median, min, max,
    and the seconds."""
    rates = [steps * batch / t for t in seconds]
    return {
        "examples_per_s": round(statistics.median(rates), 1),
        "min": round(min(rates), 1),
        "max": round(max(rates), 1),
        "epoch_seconds": [round(t, 4) for t in seconds],
    }


class EpochMeter:
    """Per epoch (`start()` ... `stop()`): wall seconds, this process's CPU, and the machine's
    busy CPU and steal over it."""

    def __init__(self):
        self.epochs: list[tuple[float, float, float, float]] = []

    @staticmethod
    def _now() -> tuple[float, float, float, float]:
        return (
            time.perf_counter(),
            cpu_seconds(resource.RUSAGE_SELF),
            busy_cpu_seconds(),
            steal_seconds(),
        )

    def start(self) -> None:
        self._t = self._now()

    def stop(self) -> None:
        self.epochs.append(tuple(b - a for a, b in zip(self._t, self._now(), strict=True)))

    def summary(self, steps: int, what: str, batch: int = BATCH) -> dict:
        """Epoch 0 is the warm-up; the rest are timed."""
        seconds = [e[0] for e in self.epochs]
        warmup, timed = seconds[0], seconds[1:]
        wall = sum(timed)
        cpu, busy, steal = (sum(e[i] for e in self.epochs[1:]) for i in (1, 2, 3))
        return {
            **epoch_rates(timed, steps, batch),
            "warmup_seconds": round(warmup, 3),
            "cores_used": round(cpu / wall, 2),
            "background_cores": round(max(0.0, busy - cpu) / wall, 2),
            "steal_cores": round(steal / wall, 2),
            "what": what,
        }


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """An EpochMeter around each epoch of `fit`."""

        def __init__(self):
            super().__init__()
            self.meter = EpochMeter()

        def on_epoch_begin(self, epoch, logs=None):
            self.meter.start()

        def on_epoch_end(self, epoch, logs=None):
            self.meter.stop()

    return EpochTimer()


def run_fit(model, data, steps: int, epochs: int, what: str, **fit_kwargs) -> dict:
    timer = _epoch_timer()
    model.fit(data, epochs=1 + epochs, callbacks=[timer], verbose=0, **fit_kwargs)
    r = timer.meter.summary(steps, what)
    _log_rate(r)
    return r


def _log_rate(r: dict, name: str = "") -> None:
    log(
        f"  {name}{r['examples_per_s']:.0f} examples/s (min {r['min']:.0f}, max {r['max']:.0f}), "
        f"{r['cores_used']} cores used, background {r['background_cores']} cores "
        f"(steal {r['steal_cores']})"
    )


# ----------------------------------------------------------------------------
# The TensorFlow contenders (in this process).
# ----------------------------------------------------------------------------
def run_loop(cfg, dataset, steps: int, epochs: int, what: str) -> dict:
    """The trainer's own compiled loop (`trainer.loop.train_function`) alone: calls of up
    to cfg.steps_per_execution steps, ending at each epoch end as in `sae train`; nothing
    between calls. An epoch ends when its last call has returned its logs."""
    import keras
    import tensorflow as tf

    from trainer import loop
    from trainer import model as model_lib

    keras.backend.clear_session()
    strategy = tf.distribute.get_strategy()
    model = model_lib.SparseAutoencoder(cfg)
    model_lib.compile_model(model, model_lib.make_optimizer(cfg))
    train = loop.train_function(model, strategy)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    no_requests = tf.zeros(3)
    meter = EpochMeter()
    for _ in range(1 + epochs):
        meter.start()
        done = 0
        while done < steps:
            n = min(cfg.steps_per_execution, steps - done)
            logs, _ = train(iterator, tf.constant(n), no_requests)
            done += n
        float(logs["loss"])
        meter.stop()
    r = meter.summary(steps, what, cfg.global_batch_size)
    _log_rate(r)
    return r


def bench_sae_stream(cfg, manifest, steps: int, epochs: int) -> dict:
    from trainer import data

    stream = data.train_stream(manifest, cfg.global_batch_size, cfg.seed)
    what = "trainer.data.train_stream (TFRecord shards on disk) -> trainer.loop's train function"
    return run_loop(cfg, stream, steps, epochs, what)


def bench_input_only(cfg, manifest, steps: int, epochs: int) -> dict:
    """The production stream alone, no model: how fast the input pipeline can go here."""
    from trainer import data

    it = iter(data.train_stream(manifest, cfg.global_batch_size, cfg.seed))
    meter = EpochMeter()
    for _ in range(1 + epochs):
        meter.start()
        for _ in range(steps):
            next(it)
        meter.stop()
    what = "trainer.data.train_stream iterated alone (no model): the input pipeline's ceiling"
    r = meter.summary(steps, what)
    _log_rate(r)
    return r


def bench_in_memory(cfg, images: np.ndarray, steps: int, epochs: int) -> dict:
    import tensorflow as tf

    k = len(images) // BATCH
    batches = images[: k * BATCH].reshape(k, BATCH, *images.shape[1:])
    ds = tf.data.Dataset.from_tensor_slices(batches).repeat().prefetch(tf.data.AUTOTUNE)
    what = "same loop, uint8 batches from memory: from_tensor_slices(batches).repeat().prefetch"
    return run_loop(cfg, ds, steps, epochs, what)


def bench_keras_example1(images: np.ndarray, n: int, s: int, steps: int, epochs: int) -> dict:
    import keras

    keras.backend.clear_session()
    model = keras.Sequential(
        [
            keras.Input((n,)),
            keras.layers.Dense(
                s, activation="sigmoid", activity_regularizer=keras.regularizers.l1(1e-5)
            ),
            keras.layers.Dense(n, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = images.reshape(len(images), n).astype(np.float32) / 255.0
    x = np.resize(x, (steps * BATCH, n))  # tiles the rows: every epoch is `steps` full batches
    what = "article Example 1: Sequential Dense/Dense, compile('adam','mse'), fit(X, X) on NumPy"
    return run_fit(model, x, steps, epochs, what, y=x, batch_size=BATCH)


def bench_sae_cli(n: int, overrides, data_dir: Path, workdir: Path, steps: int, epochs: int):
    """`sae train` as a user runs it; epochs timed from its TensorBoard epoch-end events."""
    import tensorflow as tf

    run_dir = workdir / "cli-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [
        *overrides,
        f"epochs={2 + epochs}",
        f"steps_per_epoch={steps}",
        "checkpoint_every_steps=0",
        "eval_batches=1",
    ]
    cmd = [sae_command(), "train", "--data", str(data_dir), "--workdir", str(run_dir)]
    cmd += ["--preset", preset_for(n), *(a for item in sets for a in ("--set", item))]
    cmd += ["--verbose", "0"]
    cpu0, busy0, steal0 = cpu_seconds(resource.RUSAGE_CHILDREN), busy_cpu_seconds(), steal_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=quiet_env())
    wall = time.perf_counter() - t0
    cpu, busy = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0, busy_cpu_seconds() - busy0
    steal = steal_seconds() - steal0
    ends, shares = {}, {}
    for path in sorted((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.tag == "epoch_loss":
                    ends[event.step] = event.wall_time
                if v.tag == "epoch_training_share":
                    shares[event.step] = float(tf.make_ndarray(v.tensor))
    shutil.rmtree(run_dir, ignore_errors=True)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        return {"failed": f"exit {proc.returncode}: {tail}", "command": " ".join(cmd)}
    if len(ends) != 2 + epochs:
        return {"failed": f"found {len(ends)} epoch-end events, expected {2 + epochs}"}
    times = [ends[e] for e in sorted(ends)]
    # The first event ends the warm-up epoch; the interval after it holds the first traces of
    # the per-epoch work; the intervals after that are the timed epochs.
    first, *seconds = [b - a for a, b in zip(times, times[1:], strict=False)]
    r = {
        **epoch_rates(seconds, steps),
        "first_interval_seconds": round(first, 3),
        # The command's own account of the same epochs (epoch e's share covers the interval
        # that ends with epoch e's event).
        "training_shares": [round(shares[e], 4) for e in sorted(ends)[2:]],
        "whole_run_seconds": round(wall, 2),
        # Over the whole run (start-up, final eval and export included), not per epoch.
        "cores_used": round(cpu / wall, 2),
        "background_cores": round(max(0.0, busy - cpu) / wall, 2),
        "steal_cores": round(steal / wall, 2),
        "what": "`sae train` subprocess; epoch = interval between epoch-end TensorBoard events",
        "command": " ".join(cmd),
    }
    log(
        f"  {r['examples_per_s']:.0f} examples/s (min {r['min']:.0f}, max {r['max']:.0f}); "
        f"whole run {wall:.1f} s, background {r['background_cores']} cores "
        f"(steal {r['steal_cores']})"
    )
    return r


# ----------------------------------------------------------------------------
# The PyTorch contender (hidden --torch-worker mode, run as a subprocess).
# ----------------------------------------------------------------------------
def ufldl_normalize_np(images: np.ndarray) -> np.ndarray:
    """uint8 [N, ...] -> float32 [N, n]: the UFLDL sampleIMAGES normalization over the whole set."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    x -= x.mean(axis=1, keepdims=True)
    limit = 3.0 * x.std()
    return ((np.clip(x, -limit, limit) / limit + 1.0) * 0.4 + 0.1).astype(np.float32)


def torch_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    images = np.load(spec["images"])
    if spec["normalization"] == "ufldl_patches":
        x_all = torch.from_numpy(ufldl_normalize_np(images))
    else:
        x_all = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    n, s = x_all.shape[1], spec["hidden"]
    rho, beta, lam, eps = spec["rho"], spec["beta"], spec["weight_decay"], spec["eps"]
    sigmoid_decoder = spec["decoder"] == "sigmoid"
    steps, epochs = spec["steps"], spec["epochs"]

    class SparseAutoencoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(n, s)
            self.decoder = torch.nn.Linear(s, n)
            r = math.sqrt(6.0) / math.sqrt(n + s + 1)
            for layer in (self.encoder, self.decoder):
                torch.nn.init.uniform_(layer.weight, -r, r)
                torch.nn.init.zeros_(layer.bias)

        def forward(self, x):
            a = torch.sigmoid(self.encoder(x))
            out = self.decoder(a)
            return a, torch.sigmoid(out) if sigmoid_decoder else out

    def cost(model, x, a, x_hat):
        rec = 0.5 * (x_hat - x).pow(2).sum() / x.shape[0]
        wd = 0.5 * lam * (model.encoder.weight.pow(2).sum() + model.decoder.weight.pow(2).sum())
        rho_hat = a.mean(dim=0).clamp(eps, 1.0 - eps)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return rec + wd + beta * kl.sum()

    def manual_batches():
        while True:
            perm = torch.randperm(len(x_all))
            for i in range(len(x_all) // BATCH):
                yield x_all[perm[i * BATCH : (i + 1) * BATCH]]

    def dataloader_batches():
        ds = torch.utils.data.TensorDataset(x_all)
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True)
        while True:
            for (x,) in loader:
                yield x

    results = {}
    for name, batches, what in (
        ("d_torch", manual_batches, "PyTorch loop, batches x[randperm slice] of a float tensor"),
        ("d_torch_dataloader", dataloader_batches, "PyTorch loop, DataLoader(TensorDataset)"),
    ):
        model = SparseAutoencoder()
        opt = torch.optim.Adam(model.parameters(), lr=spec["learning_rate"])
        it = batches()
        meter = EpochMeter()
        for _ in range(1 + epochs):
            meter.start()
            total = 0.0
            for _ in range(steps):
                x = next(it)
                a, x_hat = model(x)
                loss = cost(model, x, a, x_hat)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
            meter.stop()
            if not math.isfinite(total):
                raise SystemExit(f"{name}: the loss became {total}")
        results[name] = meter.summary(steps, what)
        results[name]["final_epoch_mean_loss"] = round(total / steps, 4)
    results["torch_threads"] = torch.get_num_threads()
    return results


def bench_torch(cfg, images: np.ndarray, workdir: Path, steps: int, epochs: int) -> dict:
    npy = workdir / "torch-images.npy"
    np.save(npy, images)
    spec = {
        "images": str(npy),
        "hidden": cfg.hidden,
        "rho": cfg.rho,
        "beta": cfg.beta,
        "weight_decay": cfg.weight_decay,
        "eps": cfg.eps,
        "decoder": cfg.decoder,
        "normalization": cfg.normalization,
        "learning_rate": cfg.learning_rate,
        "steps": steps,
        "epochs": epochs,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, env=quiet_env())
    finally:
        npy.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        log(f"  the torch worker failed (exit {proc.returncode}):\n{tail}")
        failed = {"failed": f"exit {proc.returncode}: {tail}"}
        return {"d_torch": failed, "d_torch_dataloader": failed, "torch_threads": None}
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    for name in ("d_torch", "d_torch_dataloader"):
        _log_rate(out[name], f"{name}: ")
    return out


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------
def _rate(runs: dict, name: str) -> float | None:
    r = runs.get(name) or {}
    return r.get("examples_per_s")


def bench_size(n: int, s: int, args, workdir: Path) -> dict:
    side = math.isqrt(n)
    cfg, overrides = model_config(n, s)
    data_dir = make_dataset(workdir, side, args.examples)
    manifest, images = load_train_images(data_dir)
    steps = args.steps_per_epoch or len(images) // BATCH
    log(f"{n}x{s}: {len(images)} train examples, {steps} steps x {args.epochs} timed epochs")
    runs: dict = {}
    log(f"{n}x{s} input_pipeline_only ...")
    runs["input_pipeline_only"] = bench_input_only(cfg, manifest, steps, args.epochs)

    def logged(run):
        def go(name: str) -> dict:
            log(f"{n}x{s} {name} ...")
            return run()

        return go

    contenders = {
        "a_sae_stream": logged(lambda: bench_sae_stream(cfg, manifest, steps, args.epochs)),
        "b_in_memory": logged(lambda: bench_in_memory(cfg, images, steps, args.epochs)),
    }
    if not args.skip_cli:
        contenders["a_sae_cli"] = logged(
            lambda: bench_sae_cli(n, overrides, data_dir, workdir, steps, args.epochs)
        )
    repeated = run_interleaved(contenders, args.repeats)
    for name, rs in repeated.items():
        ok = [r for r in rs if "examples_per_s" in r]
        runs[name] = median_run(ok, key="examples_per_s") if ok else rs[-1]
    if args.skip_cli:
        runs["a_sae_cli"] = {"skipped": "--skip-cli"}
    log(f"{n}x{s} c_keras_example1 ...")
    runs["c_keras_example1"] = bench_keras_example1(images, n, s, steps, args.epochs)
    torch_threads = None
    if args.skip_torch:
        runs["d_torch"] = runs["d_torch_dataloader"] = {"skipped": "--skip-torch"}
    elif package_version("torch") is None:
        log(f"torch is not installed: {TORCH_MISSING}")
        runs["d_torch"] = runs["d_torch_dataloader"] = {"skipped": TORCH_MISSING}
    else:
        log(f"{n}x{s} d_torch, d_torch_dataloader (subprocess) ...")
        out = bench_torch(cfg, images, workdir, steps, args.epochs)
        torch_threads = out.pop("torch_threads")
        runs.update(out)

    a, b = _rate(runs, "a_sae_stream"), _rate(runs, "b_in_memory")
    # Paired: each (a, b) pair ran back to back, so a slow spell of the machine hits both.
    pairs = [
        ra["examples_per_s"] / rb["examples_per_s"]
        for ra, rb in zip(repeated["a_sae_stream"], repeated["b_in_memory"], strict=True)
    ]
    torch_rates = [r for r in (_rate(runs, "d_torch"), _rate(runs, "d_torch_dataloader")) if r]
    d = max(torch_rates) if torch_rates else None
    a_over_b, a_over_d = round(statistics.median(pairs), 3), ratio(a, d)
    # The whole command against its own loop, each command run against the (a) runs right
    # before and after it (this round's and the next one's): a drift of the machine's speed
    # across the round then cancels to first order.
    a_rates = [r["examples_per_s"] for r in repeated["a_sae_stream"]]
    cli_pairs = [
        rc["examples_per_s"] / math.sqrt(a_rates[i] * a_rates[min(i + 1, len(a_rates) - 1)])
        for i, rc in enumerate(repeated.get("a_sae_cli", []))
        if "examples_per_s" in rc
    ]
    cli_over_a = round(statistics.median(cli_pairs), 3) if cli_pairs else None
    cli_shares = [f for r in repeated.get("a_sae_cli", []) for f in r.get("training_shares", [])]
    cli_share = round(statistics.median(cli_shares), 3) if cli_shares else None
    return {
        "model": f"{n} -> {s}",
        "preset": preset_for(n),
        "overrides": overrides,
        "config": cfg.to_dict(),
        "data": {
            "dir": str(data_dir),
            "source": f"builtin:natural-images, {side}x{side}x1 patches",
            "train_examples": len(images),
            "train_shards": len(manifest.shard_paths("train")),
        },
        "batch_size": BATCH,
        "steps_per_epoch": steps,
        "timed_epochs": args.epochs,
        "torch_threads": torch_threads,
        "runs": runs,
        "ratio_a_over_b": a_over_b,
        "ratio_a_over_b_pairs": [round(r, 3) for r in pairs],
        "ratio_a_over_c": ratio(a, _rate(runs, "c_keras_example1")),
        "ratio_a_over_d": a_over_d,
        "ratio_a_cli_over_a": cli_over_a,
        "ratio_a_cli_over_a_pairs": [round(r, 3) for r in cli_pairs],
        "cli_training_share": cli_share,
        "ratio_input_only_over_b": ratio(_rate(runs, "input_pipeline_only"), b),
        "targets": {
            "a_over_b_min": TARGET_A_OVER_B,
            "a_over_b_pass": None if a_over_b is None else a_over_b >= TARGET_A_OVER_B,
            "a_over_d_vs": "the faster of d_torch and d_torch_dataloader",
            "a_faster_than_d_pass": None if a_over_d is None else a_over_d > 1.0,
            "a_cli_over_a_min": TARGET_CLI_OVER_A,
            "a_cli_over_a_pass": None if cli_over_a is None else cli_over_a >= TARGET_CLI_OVER_A,
            "cli_training_share_min": TARGET_CLI_OVER_A,
            "cli_training_share_pass": (
                None if cli_share is None else cli_share >= TARGET_CLI_OVER_A
            ),
        },
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Examples/s of `sae train` (TFRecords from disk) vs the same model fed from "
        "memory, the article's Keras Example 1 and a PyTorch CPU loop. JSON on stdout.",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=30_000,
        help="train examples per size, at least (default: 30000)",
    )
    p.add_argument(
        "--epochs", type=int, default=10, help="timed epochs after 1 warm-up (default: 10)"
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=0,
        help="steps per epoch; 0 = one pass over the train split (default: 0)",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=_sizes("784x256,64x25"),
        help="models as INPUTSxHIDDEN, comma-separated (default: 784x256,64x25)",
    )
    p.add_argument("--skip-torch", action="store_true", help="do not run the PyTorch contender")
    p.add_argument("--skip-cli", action="store_true", help="do not run the `sae train` subprocess")
    add_workdir_args(p, "where datasets and scratch files go; datasets there are reused")
    add_repeats_arg(p, "(a) and (b)", default=5)
    # Hidden: the PyTorch contender, run by this script as a subprocess.
    p.add_argument("--torch-worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.torch_worker:
        print(json.dumps(torch_worker(json.loads(args.torch_worker))), flush=True)
        return 0
    if args.examples < BATCH or args.epochs < 1 or args.steps_per_epoch < 0:
        raise SystemExit(f"need --examples >= {BATCH}, --epochs >= 1, --steps-per-epoch >= 0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.skip_torch and package_version("torch") is None:
        log(f"torch is not installed; d_torch will be reported as {TORCH_MISSING!r}")

    with open_workdir(args, "train_bench-") as workdir:
        t_start = time.perf_counter()
        report: dict = {
            **start_report("train", ["tensorflow", "keras", "numpy", "torch"]),
            "batch_size": BATCH,
            "timed": "per epoch: wall seconds of `steps_per_epoch` training steps after 1 "
            "warm-up epoch; examples/s = steps * batch / seconds; median (min, max) over timed "
            "epochs",
            "sizes": {},
        }
        for n, s in args.sizes:
            report["sizes"][f"{n}x{s}"] = bench_size(n, s, args, workdir)
    passes = [
        v
        for size in report["sizes"].values()
        for k, v in size["targets"].items()
        if k.endswith("_pass")
    ]
    report["targets_all_pass"] = None if None in passes else all(passes)
    finish_report(report, t_start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
