"""`sae train`: a KL-sparse autoencoder on a preprocessed dataset, on 1 device to N workers.

    sae train --data runs/digits/data --workdir runs/digits/train --preset digits
    sae train ... --cpu-replicas 2            # MirroredStrategy on 2 logical CPU devices
    TF_CONFIG='{"cluster": ..., "task": ...}' sae train ...   # MultiWorkerMirroredStrategy

One code path: the strategy comes from `trainer.distribute`, the model and loss do
not know how many replicas there are; the loop is ours (trainer/loop.py), on public
TensorFlow and Keras API only. Rerunning the same command with the same --workdir resumes
from the last checkpoint at step granularity (see trainer/data.py for the data-order
guarantee).

WORKDIR/ config.json, checkpoints/, tensorboard/, export/ (SavedModel),
         metrics.json, filters.png, reconstructions.png
Exit codes: 0 done; 2 bad flags, config or data; 4 the loss became NaN/Inf (the last
good checkpoint is kept); 75 stopped by SIGTERM after saving a checkpoint, or another worker
was lost (retryable: rerun every worker to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import posixpath
import time
from collections.abc import Sequence

from preprocessing import flags, storage
from preprocessing import manifest as manifest_lib
from preprocessing.errors import ArgumentParser, UserError
from preprocessing.storage import join
from trainer import artifacts

EXIT_NAN = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: restart me


def make_parser() -> ArgumentParser:
    from trainer import config as config_lib

    p = ArgumentParser(
        prog="sae train",
        description="Train a KL-sparse autoencoder (UFLDL cost) on `sae preprocess` output.",
        epilog="Exit codes: 0 done; 2 bad flags/config/data; 4 NaN/Inf loss; "
        "75 stopped by SIGTERM after a checkpoint, or a peer worker lost (rerun to resume).",
    )
    p.add_argument(
        "--data", required=True, help="dataset folder (local or gs://) with manifest.json"
    )
    p.add_argument(
        "--workdir",
        required=True,
        help="run folder (local or gs://); rerunning with the same one resumes",
    )
    config_lib.add_arguments(p)
    p.add_argument(
        "--strategy",
        default="auto",
        choices=("auto", "default", "mirrored", "multiworker"),
        help="auto: multi-worker if TF_CONFIG names >1 task, mirrored if >1 GPU, "
        "else default (default: auto)",
    )
    p.add_argument(
        "--cpu-replicas",
        type=flags.non_negative_int,
        default=0,
        metavar="N",
        help="split the CPU into N logical devices and mirror over them "
        "(runs MirroredStrategy here exactly as on N GPUs)",
    )
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        help="warm start: initialize the weights from this checkpoint (or checkpoints folder) "
        "of a same-shape model; ignored when WORKDIR already has a checkpoint",
    )
    p.add_argument(
        "--verbose",
        type=int,
        default=2,
        choices=(0, 1, 2),
        help="progress: 0 silent, 1 a line every log_every_steps and per epoch, "
        "2 one line per epoch (default)",
    )
    return p


def _warm_start(model, init_from: str) -> None:
    """Starts from another run's weights, not its optimizer state or step: the weights are
    restored into a fresh twin model (which has no optimizer) and copied over."""
    import tensorflow as tf

    from trainer.model import SparseAutoencoder

    path = tf.train.latest_checkpoint(init_from) or init_from
    twin = SparseAutoencoder(model.config)
    try:
        tf.train.Checkpoint(model=twin).restore(
            path
        ).expect_partial().assert_existing_objects_matched()
        _copy_weights(model, twin)
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot warm-start from {init_from}: {reason}; it must be a checkpoint "
            "(or checkpoints folder) of a model with the same shape"
        ) from None
    print(f"train: warm start from {path}", flush=True)


def _float32(model):
    """The model itself, or under a mixed policy a float32 twin with its weights: exports
    serve float32 whatever the training precision."""
    from trainer.model import SparseAutoencoder

    if model.config.precision == "float32":
        return model
    twin = SparseAutoencoder(dataclasses.replace(model.config, precision="float32"))
    _copy_weights(twin, model)
    return twin


def _copy_weights(dst, src) -> None:
    """Every weight of `src` into the same-config model `dst` (its twin)."""
    for d, s in zip(dst.weights, src.weights, strict=True):
        d.assign(s)


ZCA_SAMPLES = 100_000  # inputs the whitening is estimated from (UFLDL's exercise: 100,000)


def _fit_zca(model, manifest) -> None:
    """ZCA whitening from the first training inputs (the stream of step 0 onwards, so every
    worker computes the same matrix); a resumed run restores it with the checkpoint."""
    import tensorflow as tf

    from trainer import data

    cfg = model.config
    batches = -(-ZCA_SAMPLES // cfg.global_batch_size)
    stream = data.train_stream(
        manifest,
        cfg.global_batch_size,
        cfg.seed,
        patch_size=cfg.patch_size,
        patches_per_image=cfg.patches_per_image,
    )
    model.fit_zca(tf.concat(list(stream.take(batches)), axis=0))
    print(f"train: ZCA whitening from {batches * cfg.global_batch_size} inputs", flush=True)


def _check_config_matches(workdir: str, cfg) -> None:
    previous = artifacts.config_if_any(workdir)
    if previous is not None and previous != cfg:
        old, new = previous.to_dict(), cfg.to_dict()
        diff = sorted(k for k in new if old.get(k) != new[k])
        raise UserError(
            f"{workdir} holds a run with a different config ({', '.join(diff)} differ); "
            "rerun with the same --preset/--set to resume, or use a new --workdir"
        )


def _fingerprint(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for v in model.trainable_variables:
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def run(argv: Sequence[str] | None = None) -> artifacts.Metrics:
    """Trains (or resumes) and returns the final eval metrics (also in WORKDIR/metrics.json)."""
    args = make_parser().parse_args(argv)
    from trainer import config as config_lib

    # Before TensorFlow's import (seconds): bad config and data that lies fail at once.
    cfg = config_lib.apply_overrides(config_lib.preset(args.preset), args.set)
    reads = [("--data", args.data)] + ([("--init-from", args.init_from)] if args.init_from else [])
    storage.check_access(reads=reads, writes=[("--workdir", args.workdir)])
    manifest = manifest_lib.load(args.data)
    manifest.check_shards()
    import tensorflow as tf

    try:
        return _train(args, cfg, manifest)
    except tf.errors.UnavailableError:
        if "TF_CONFIG" not in os.environ:
            raise
        # A collective failed: a peer crashed or was stopped. Every worker must restart
        # (a Kubernetes Job recreates them); the rerun resumes from the last checkpoint.
        raise UserError(
            f"lost contact with another worker (UnavailableError); {args.workdir} keeps the "
            "last checkpoint: rerun every worker with the same command to resume",
            exit_code=EXIT_PREEMPTED,
        ) from None


def _train(args: argparse.Namespace, cfg, manifest: manifest_lib.Manifest) -> artifacts.Metrics:
    from trainer import cluster, distribute

    cluster.ensure_tf_config()  # on a Kubernetes Indexed Job: TF_CONFIG from its environment
    # The strategy first: logical CPU devices can only be set before TF touches a device.
    strategy = distribute.make_strategy(args.strategy, args.cpu_replicas)

    import tensorflow as tf

    from trainer import data, export, lbfgs, loop, visualize
    from trainer import model as model_lib

    data.check_shape(manifest, cfg.input_shape, cfg.patch_size)
    data.check_readable(manifest)
    num_train = manifest.num_examples("train")
    batch = cfg.train_batch(num_train)
    if cfg.optimizer == "lbfgs" and not data.fits_in_memory(manifest, "train"):
        raise UserError(
            f"optimizer=lbfgs needs the train split in memory, but {manifest.root}'s "
            f"{num_train} images are more than {data.IN_MEMORY_BYTES / 2**20:.3g} MiB of pixels; "
            "use --set optimizer=adam"
        )
    chief = distribute.is_chief()
    workdir = args.workdir.rstrip("/")
    # Non-chief workers take part in every collective save but write to scratch space.
    out_dir = workdir if chief else distribute.worker_temp_dir(workdir)
    _check_config_matches(workdir, cfg)
    storage.makedirs(out_dir)
    if chief and not storage.exists(join(workdir, artifacts.CONFIG)):
        # Atomically: a restarted worker reads it (above) while a restarted chief starts.
        artifacts.write_config(workdir, cfg)

    with strategy.scope():
        model = model_lib.SparseAutoencoder(cfg)
        if cfg.optimizer == "lbfgs":
            optimizer = lbfgs.LBFGS(model.trainable_variables, cfg.lbfgs_memory)
        else:
            optimizer = model_lib.make_optimizer(cfg)
            optimizer.build(model.trainable_variables)
            model_lib.compile_model(model, optimizer)
    # The loop's own step (an optimizer may skip a step; the data stream does not).
    step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_counter)
    manager = tf.train.CheckpointManager(ckpt, join(out_dir, "checkpoints"), max_to_keep=3)
    latest = tf.train.latest_checkpoint(join(workdir, "checkpoints"))
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
    elif args.init_from:
        _warm_start(model, args.init_from)
    elif cfg.zca_epsilon:
        _fit_zca(model, manifest)
    # Checkpoints written before the step counter existed: the optimizer's count was it.
    step = int(step_counter.numpy()) or int(optimizer.iterations.numpy())
    per_epoch = data.steps_per_epoch(manifest, cfg)
    batching = (
        f"L-BFGS on the full batch of {batch} (memory {cfg.lbfgs_memory})"
        if cfg.optimizer == "lbfgs"
        else f"global batch {batch}"
        + (
            f" ({cfg.patches_per_image} windows of each of {batch // cfg.patches_per_image} images)"
            if cfg.patches_per_image > 1
            else ""
        )
    )
    print(
        f"train: {num_train} train / {manifest.num_examples('eval')} eval "
        f"examples, {strategy.num_replicas_in_sync} replica(s) "
        f"({type(strategy).__name__}), {batching}, "
        f"{cfg.epochs} epochs x {per_epoch} steps, up to {cfg.steps_per_execution} per call"
        + (f", {cfg.precision}" if cfg.precision != "float32" else "")
        + (f"; resuming at step {step} from {latest}" if latest else ""),
        flush=True,
    )

    eval_ds = data.eval_dataset(
        manifest,
        cfg.global_batch_size,
        patch_size=cfg.patch_size,
        seed=cfg.seed,
        patches_per_image=cfg.patches_per_image,
    )
    if cfg.eval_batches:
        eval_ds = eval_ds.take(cfg.eval_batches)
    # Read and parsed once when they fit: every evaluation (eval windows included) is the same.
    eval_in_memory = data.fits_in_memory(manifest, "eval")
    evaluate = loop.eval_function(model, strategy)
    start = time.time()
    try:
        # Inside: a small train split is read whole here, and a corrupt shard fails the read.
        stream = data.train_stream(
            manifest,
            batch,
            cfg.seed,
            start_step=step,
            patch_size=cfg.patch_size,
            patches_per_image=cfg.patches_per_image,
        )
        result = loop.run(
            model,
            strategy,
            cfg,
            stream=stream,
            eval_dataset=eval_ds,
            evaluate=evaluate,
            keep_eval_in_memory=eval_in_memory,
            optimizer=optimizer,
            manager=manager,
            step_counter=step_counter,
            start_step=step,
            steps_per_epoch=per_epoch,
            tb_dir=join(workdir, "tensorboard") if chief else None,
            verbose=args.verbose,
        )
    except loop.NonFiniteLoss as e:
        kept = tf.train.latest_checkpoint(join(workdir, "checkpoints"))
        steps = f"step {e.first}" if e.first == e.last else f"steps {e.first}-{e.last}"
        raise UserError(
            f"the loss became NaN/Inf in {steps}; "
            + (f"the last good checkpoint is kept: {kept}" if kept else "no checkpoint was saved")
            + "; lower learning_rate (--set learning_rate=...) and rerun with a new --workdir",
            exit_code=EXIT_NAN,
        ) from None
    except tf.errors.DataLossError as e:
        # The op's message names no file: read the shards to the end to name the bad one.
        data.check_readable(manifest, whole=True)
        raise UserError(
            f"a shard of {manifest.root} is corrupt ({data.error_reason(e)}); "
            "rerun `sae preprocess` for this dataset"
        ) from None
    step = result.step
    if result.stopped:
        raise UserError(
            f"stopped by SIGTERM at step {step}; checkpoint saved in "
            f"{join(workdir, 'checkpoints')}; rerun the same command to resume",
            exit_code=EXIT_PREEMPTED,
        )

    # Printed by every worker: equal fingerprints show the workers ended in sync.
    print(f"train: step {step}, weights fingerprint {_fingerprint(model)}", flush=True)
    values = loop.evaluate_metrics(model, eval_ds, evaluate)
    rho_hat = values.pop("rho_hat")
    values["train_seconds"] = round(time.time() - start, 2)
    metrics = artifacts.Metrics(values, step, tuple(rho_hat.round(5).tolist()))
    info = artifacts.ExportInfo(
        cfg, cfg.input_shape, tuple(manifest.label_names), manifest.root, step
    )
    # Every worker saves (the save may run collectives); only the chief's copy is kept.
    export.save(_float32(model), join(out_dir, "export"), info)
    if chief:
        artifacts.write_metrics(workdir, metrics)
        storage.publish(
            join(workdir, artifacts.FILTERS),
            visualize.png_bytes(visualize.filter_grid(model.w1.numpy(), cfg.input_shape)),
        )
        batch = next(iter(data.eval_dataset(manifest, 16, patch_size=cfg.patch_size)))
        x = model.normalize(batch).numpy()
        x_hat = model.reconstruct(batch).numpy()
        storage.publish(
            join(workdir, artifacts.RECONSTRUCTIONS),
            visualize.png_bytes(visualize.reconstruction_grid(x, x_hat)),
        )
        print(
            "train: eval "
            + ", ".join(
                f"{k} {values[k]:.4g}"
                for k in (
                    "loss",
                    "reconstruction",
                    "sparsity",
                    "mean_rho_hat",
                    "dead_fraction",
                    "fraction_variance_explained",
                )
            )
            + f"\ntrain: wrote {join(workdir, 'export')}, metrics.json, filters.png",
            flush=True,
        )
    else:
        # TensorFlow wrote this scratch folder (checkpoints, export): its filesystem removes it.
        tf.io.gfile.rmtree(out_dir)
        # The last worker to finish also removes tmp-workers/ (every worker made its folder
        # before training started, so an empty parent stays empty).
        parent = posixpath.dirname(out_dir)
        with contextlib.suppress(tf.errors.OpError):
            if not tf.io.gfile.listdir(parent):
                tf.io.gfile.rmtree(parent)
    return metrics
