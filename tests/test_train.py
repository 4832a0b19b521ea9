"""End-to-end tests of `sae train` on the built-in digits, in real processes.

Training runs as `python -m pipeline.cli train ...` subprocesses wherever the process
matters (signals, exit codes, TF device set-up, TF_CONFIG); TensorFlow's device
configuration is process-global, so nothing here splits the CPU in the test process.
Flag and config errors, which fail before any training, run `pipeline.cli.main` in-process.

The runs share one config, RUN (the digits preset with its size pinned here, so that a
preset change does not silently change what these tests prove): one uninterrupted run of it
(`trained`) is what the resumed and the two-worker runs must end with.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from preprocessing import job, manifest, records
from tests import helpers

SAE_TRAIN = [sys.executable, "-m", "pipeline.cli", "train"]
# 30 epochs of 10 steps: the epoch (10) differs from a pass over the train split
# (1615 // 128 = 12 steps), so resuming exercises the general data-order case. Checkpoints
# come at every epoch end and every 25 steps (mid-epoch); calls of up to 4 steps end at both
# (4, 4, 2, 4, 4, 2, 4, 1, 3, ...); per-step TensorBoard scalars every 3 steps, which divides
# neither, written at the first call boundary at or after each multiple.
RUN = ["--preset", "digits", "--set", "epochs=30", "--set", "steps_per_epoch=10",
       "--set", "checkpoint_every_steps=25", "--set", "global_batch_size=128",
       "--set", "steps_per_execution=4", "--set", "log_every_steps=3"]  # fmt: skip
TIMEOUT = 300  # seconds per training process: generous, the machine is shared


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def _train_args(data: str | Path, workdir: str | Path, *args: str) -> list[str]:
    return [*SAE_TRAIN, "--data", str(data), "--workdir", str(workdir), "--verbose", "0", *args]


def _train(data, workdir, *args: str, env=None) -> subprocess.CompletedProcess:
    return helpers.run(_train_args(data, workdir, *args), timeout=TIMEOUT, env=env or _env())


def _start(data, workdir, *args: str, env=None) -> subprocess.Popen:
    return helpers.start(_train_args(data, workdir, *args), env=env or _env())


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[str, str]]:
    """(stdout, stderr) of each; a timeout stops them all (a hung collective fails the test)."""
    return [(r.stdout, r.stderr) for r in helpers.finish(procs, timeout, what="training")]


_ok = helpers.ok


def _fingerprint(stdout: str) -> str:
    found = re.findall(r"weights fingerprint (\w+)", stdout)
    assert len(found) == 1, stdout
    return found[0]


def _checkpoint_step(workdir: Path) -> int:
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def _wait_for_checkpoint(workdir: Path, min_step: int, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        step = _checkpoint_step(workdir)
        if step >= min_step:
            return step
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (exit {proc.returncode}) before step {min_step}\n{err}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint at step >= {min_step} within {TIMEOUT} s")


def _killed_after_checkpoint(data, workdir: Path, *args: str) -> int:
    """Starts a training run, SIGKILLs it once a checkpoint at step >= 10 exists; returns the
    step of its last checkpoint (it wrote no metrics.json)."""
    proc = _start(data, workdir, *args)
    try:
        _wait_for_checkpoint(workdir, 10, proc)
        proc.kill()
    finally:
        _finish([proc], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "metrics.json").exists()
    return _checkpoint_step(workdir)


def _error_line(stderr: str) -> str:
    """The CLI's one-line error: exactly one such line, the last one, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len([ln for ln in lines if ln.startswith("sae train: error:")]) == 1, stderr
    assert lines[-1].startswith("sae train: error:"), stderr
    return lines[-1]


def _config(workdir: Path):
    from trainer.config import TrainConfig

    return TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))


def _restore(workdir: Path):
    """A model built from WORKDIR/config.json with its latest checkpoint restored."""
    from trainer import lbfgs
    from trainer import model as model_lib

    cfg = _config(workdir)
    if cfg.optimizer == "lbfgs":
        model = model_lib.SparseAutoencoder(cfg)
        optimizer = lbfgs.LBFGS(model.trainable_variables, cfg.lbfgs_memory)
    else:
        model = model_lib.build_model(cfg)
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    ckpt.restore(tf.train.latest_checkpoint(str(workdir / "checkpoints"))).assert_consumed()
    assert int(step) == _checkpoint_step(workdir) == int(optimizer.iterations)
    return model


def _weights(model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy() for v in model.trainable_variables}


def _eval_images(data_dir: Path) -> np.ndarray:
    """The eval split's images in file order, read with the record schema's NumPy decoder."""
    m = manifest.load(str(data_dir))
    ds = tf.data.TFRecordDataset(m.shard_paths("eval"), compression_type=m.compression or "")
    return np.stack([records.decode(r.numpy()).image for r in ds])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_eval_cost(images, w1, b1, w2, b2, cfg) -> tuple[float, float]:
    """UFLDL cost (docs/design.md, from the CS294A notes) in float64 NumPy.

    Over the whole split: rho_hat is the split's mean activation (UFLDL's J on a data set).
    images: uint8 [N, H, W, C]; w1 [n, s]. Returns (J, reconstruction term). Sigmoid
    decoder, "unit" normalization, no L1.
    """
    assert cfg.decoder == "sigmoid" and cfg.normalization == "unit" and cfg.l1_activity == 0
    x_all = images.reshape(len(images), -1).astype(np.float64) / 255.0
    w1, b1, w2, b2 = (np.asarray(v, np.float64) for v in (w1, b1, w2, b2))
    rho = cfg.rho
    wd = 0.5 * cfg.weight_decay * (np.sum(w1**2) + np.sum(w2**2))
    a = _sigmoid(x_all @ w1 + b1)
    x_hat = _sigmoid(a @ w2 + b2)
    rho_hat = np.clip(a.mean(axis=0), cfg.eps, 1 - cfg.eps)
    rec = 0.5 * np.sum((x_hat - x_all) ** 2) / len(x_all)
    kl = np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
    return rec + wd + cfg.beta * kl, rec


def _call_ends(cfg, total: int) -> list[int]:
    """The steps the trainer's calls end at: the next epoch end, checkpoint step or up to
    steps_per_execution steps, whichever comes first (trainer/loop.py)."""
    ends, step = [], 0
    while step < total:
        e, c = cfg.steps_per_epoch, cfg.checkpoint_every_steps
        step = min(total, (step // e + 1) * e, (step // c + 1) * c, step + cfg.steps_per_execution)
        ends.append(step)
    return ends


def _grid_shape(k: int, tile_h: int, tile_w: int, scale: int = 4) -> tuple[int, int]:
    """UFLDL display_network layout: near-square grid of k tiles, 1-pixel borders, scaled."""
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    return (rows * (tile_h + 1) + 1) * scale, (cols * (tile_w + 1) + 1) * scale


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)))


def _summaries(run_dir: Path) -> dict:
    """tag -> (plugin name, [(step, tensor as NumPy)]) of one TensorBoard run folder."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    kinds = (ea.TENSORS, ea.SCALARS, ea.HISTOGRAMS, ea.IMAGES)
    acc = ea.EventAccumulator(str(run_dir), size_guidance=dict.fromkeys(kinds, 0))
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        events = [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        out[tag] = (plugin, events)
    return out


# ----------------------------------------------------------------------------
# Fixtures: the dataset and one uninterrupted run of RUN.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "data"
    m = job.run(
        ["--input", "builtin:digits", "--output", str(out),
         "--direct_running_mode=in_memory", "--direct_num_workers=1"]
    )  # fmt: skip
    # numpy_eval_cost reads the eval split in file order, as the trainer's eval does.
    assert len(m["splits"]["eval"]["shards"]) == 1
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> tuple[Path, str]:
    """(workdir, stdout) of RUN trained without interruption."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    r = _ok(_train(data_dir, workdir, *RUN))
    return workdir, r.stdout


# ----------------------------------------------------------------------------
# 1. The CLI end to end: artifacts, metrics, pictures, TensorBoard, and it learns.
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end_writes_every_artifact_and_learns(data_dir, trained):
    workdir, stdout = trained
    cfg = _config(workdir)
    assert "1 replica(s)" in stdout
    for name in ("config.json", "metrics.json", "filters.png", "reconstructions.png"):
        assert (workdir / name).is_file(), name
    assert (workdir / "export" / "saved_model.pb").is_file()
    assert not list(workdir.glob("export.*")), "temporary export folders left behind"

    total = cfg.epochs * cfg.steps_per_epoch
    assert _checkpoint_step(workdir) == total
    model = _restore(workdir)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.trainable_variables))
    assert _fingerprint(stdout) == digest.hexdigest()[:16], "last checkpoint != final weights"

    metrics = json.loads((workdir / "metrics.json").read_text())
    keys = ("loss", "reconstruction", "weight_decay", "sparsity", "mean_rho_hat",
            "dead_fraction", "l0", "fraction_variance_explained")  # fmt: skip
    assert all(math.isfinite(metrics[k]) for k in keys), metrics
    assert metrics["step"] == total
    assert metrics["eval_examples"] == manifest.load(str(data_dir)).num_examples("eval")
    parts = metrics["reconstruction"] + metrics["weight_decay"] + metrics["sparsity"]
    assert metrics["loss"] == pytest.approx(parts, rel=1e-5)
    assert min(metrics[k] for k in ("reconstruction", "weight_decay", "sparsity")) >= 0
    assert 0 <= metrics["l0"] <= cfg.hidden and metrics["fraction_variance_explained"] <= 1
    assert len(metrics["rho_hat"]) == cfg.hidden
    assert np.mean(metrics["rho_hat"]) == pytest.approx(metrics["mean_rho_hat"], abs=1e-5)

    # The reported loss is the UFLDL cost of the final weights on the eval split
    # (independent NumPy code) ...
    images = _eval_images(data_dir)
    params = [v.numpy() for v in (model.w1, model.b1, model.w2, model.b2)]
    loss, rec = numpy_eval_cost(images, *params, cfg)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert metrics["reconstruction"] == pytest.approx(rec, rel=1e-4)
    # ... and it is less than half the untrained model's (same config, same seeded init).
    from trainer import model as model_lib

    untrained = model_lib.build_model(cfg)
    params0 = [v.numpy() for v in (untrained.w1, untrained.b1, untrained.w2, untrained.b2)]
    loss0, rec0 = numpy_eval_cost(images, *params0, cfg)
    assert metrics["loss"] < 0.5 * loss0, (metrics["loss"], loss0)
    # The KL term dominates the untrained cost, so also require the reconstruction to halve and
    # to beat the split's mean image as a predictor (fraction of variance explained > 0).
    assert metrics["reconstruction"] < 0.5 * rec0, (metrics["reconstruction"], rec0)
    assert metrics["fraction_variance_explained"] > 0.3
    # Sparse and alive: mean activation near rho, few dead units.
    assert abs(metrics["mean_rho_hat"] - cfg.rho) <= 0.3 * cfg.rho
    assert metrics["dead_fraction"] <= 0.1

    # Pictures: the display_network grid of 25 tiles of 8x8, and 16 input|reconstruction pairs.
    from trainer import visualize

    h, w, _ = cfg.input_shape
    filters = _png((workdir / "filters.png").read_bytes())
    assert filters.shape == _grid_shape(cfg.hidden, h, w)
    np.testing.assert_array_equal(
        filters, visualize.filter_grid(model.w1.numpy(), cfg.input_shape)[:, :, 0]
    )
    pairs = _png((workdir / "reconstructions.png").read_bytes())
    assert pairs.shape == _grid_shape(16, h, 2 * w)

    # TensorBoard: epoch scalars for every epoch, per-step scalars at the optimizer step, and
    # after each epoch the eval rho_hat histogram and the filter image.
    tb = workdir / "tensorboard"
    assert list(tb.rglob("events.out.tfevents.*"))
    train_runs, val_runs = _summaries(tb / "train"), _summaries(tb / "validation")
    units = _summaries(tb / "units")
    for run in (train_runs, val_runs):
        plugin, events = run["epoch_loss"]
        assert plugin == "scalars" and [s for s, _ in events] == list(range(cfg.epochs))
    # Each epoch's wall seconds and the share of them inside the training calls.
    for tag in ("epoch_seconds", "epoch_training_share"):
        plugin, events = train_runs[tag]
        assert plugin == "scalars" and [s for s, _ in events] == list(range(cfg.epochs)), tag
    seconds = [float(v) for _, v in train_runs["epoch_seconds"][1]]
    shares = [float(v) for _, v in train_runs["epoch_training_share"][1]]
    assert all(t > 0 for t in seconds) and all(0 < f <= 1 for f in shares), (seconds, shares)
    first, last = float(train_runs["epoch_loss"][1][0][1]), float(val_runs["epoch_loss"][1][-1][1])
    # The validation loss is J over the whole split, as in metrics.json; the mean of
    # per-batch costs is kept under its own name.
    assert last == pytest.approx(metrics["loss"], rel=1e-5) and last < first
    batch_mean = float(val_runs["epoch_loss_batch_mean"][1][-1][1])
    assert batch_mean == pytest.approx(metrics["loss_batch_mean"], rel=1e-5)
    plugin, events = units["batch_loss"]
    ends = _call_ends(cfg, total)
    every = cfg.log_every_steps
    crossing = [b for a, b in zip([0, *ends], ends) if b // every > a // every]  # noqa: B905
    assert plugin == "scalars" and [s for s, _ in events] == crossing
    assert len(crossing) < len(ends) < total  # some calls log nothing; calls are > 1 step
    epoch_ends = list(range(cfg.steps_per_epoch, total + 1, cfg.steps_per_epoch))
    plugin, events = units["eval_rho_hat"]
    assert plugin == "histograms" and [s for s, _ in events] == epoch_ends
    assert events[-1][1][:, 2].sum() == pytest.approx(cfg.hidden)  # one count per unit
    plugin, events = units["filters"]
    assert plugin == "images" and [s for s, _ in events] == epoch_ends
    from trainer import loop

    # The same grid, enlarged to about loop.FILTER_IMAGE_SIDE pixels instead of 4x.
    tb_image = _png(events[-1][1][2])
    want = loop.filter_image(model.w1.numpy(), cfg.input_shape)[..., 0]
    np.testing.assert_array_equal(tb_image, want)
    scale = loop.FILTER_IMAGE_SIDE // max(_grid_shape(cfg.hidden, h, w, scale=1))
    assert scale > 1 and tb_image.shape == _grid_shape(cfg.hidden, h, w, scale=scale)


# ----------------------------------------------------------------------------
# 2. The export is self-contained: plain TensorFlow in a fresh process.
# ----------------------------------------------------------------------------
LOAD_EXPORT = """
import sys

import numpy as np
import tensorflow as tf

export, images_path, out_path = sys.argv[1:]
m = tf.saved_model.load(export)
images = tf.constant(np.load(images_path))
a = m.signatures["encode"](images=images)["activations"].numpy()
x_hat = m.signatures["reconstruct"](images=images)["reconstructions"].numpy()
leaked = sorted({k.split(".")[0] for k in sys.modules} & {"trainer", "preprocessing", "pipeline"})
assert not leaked, f"the export imported project code: {leaked}"
np.savez(out_path, activations=a, reconstructions=x_hat)
"""


@pytest.mark.slow
def test_export_loads_without_project_code_and_matches_the_checkpoint(data_dir, trained, tmp_path):
    workdir, _ = trained
    images = _eval_images(data_dir)[:32]
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "load_export.py").write_text(LOAD_EXPORT)
    r = subprocess.run(
        [sys.executable, "-I", "load_export.py", str(workdir / "export"), "images.npy", "out.npz"],
        cwd=tmp_path,  # -I: no cwd / PYTHONPATH / user site on sys.path
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _ok(r)
    served = np.load(tmp_path / "out.npz")
    model = _restore(workdir)
    cfg = model.config
    assert served["activations"].shape == (32, cfg.hidden)
    assert served["reconstructions"].shape == (32, *cfg.input_shape)
    np.testing.assert_allclose(served["activations"], model.encode(images).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        served["reconstructions"], model.reconstruct(images).numpy(), atol=1e-5
    )
    from trainer import EXPORT_INFO

    info = json.loads((workdir / "export" / EXPORT_INFO).read_text())
    assert info["config"] == cfg.to_dict() and info["image_shape"] == list(cfg.input_shape)
    assert info["step"] == cfg.epochs * cfg.steps_per_epoch


# ----------------------------------------------------------------------------
# 3. Resume: after SIGKILL and after SIGTERM, ending with the uninterrupted run's weights.
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(data_dir, trained, tmp_path):
    workdir = tmp_path / "run"
    kept = _killed_after_checkpoint(data_dir, workdir, *RUN)
    cfg = _config(workdir)
    total = cfg.epochs * cfg.steps_per_epoch
    assert 10 <= kept < total

    r = _ok(_train(data_dir, workdir, *RUN))
    resumed = re.search(r"resuming at step (\d+)", r.stdout)
    assert resumed and int(resumed.group(1)) == kept, r.stdout
    assert json.loads((workdir / "metrics.json").read_text())["step"] == total
    # The data-order guarantee: the resumed run saw the same batches in the same order.
    assert _fingerprint(r.stdout) == _fingerprint(trained[1])


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_the_rerun_ends_with_the_uninterrupted_weights(
    data_dir, trained, tmp_path
):
    workdir = tmp_path / "run"
    proc = _start(data_dir, workdir, *RUN)
    try:
        _wait_for_checkpoint(workdir, 10, proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        ((_, stderr),) = _finish([proc], timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    line = _error_line(stderr)
    stopped = re.fullmatch(r"sae train: error: stopped by SIGTERM at step (\d+); .*", line)
    assert stopped, line
    step = int(stopped.group(1))
    assert _checkpoint_step(workdir) == step  # saved at the step it stopped, not an earlier one
    assert not (workdir / "metrics.json").exists()

    r = _ok(_train(data_dir, workdir, *RUN))
    assert f"resuming at step {step} " in r.stdout, r.stdout
    # Bitwise equal: on CPU every op here is deterministic for a fixed thread count, so no
    # tolerance is needed (a resume that replayed or skipped a batch would differ).
    assert _fingerprint(r.stdout) == _fingerprint(trained[1])


# ----------------------------------------------------------------------------
# 4. Two workers: stopped together by a SIGTERM to one, resumed, in sync, equal to 1 replica,
#    and only the chief writes. (Mirrored replicas: tests/test_model.py.)
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_stop_together_resume_and_train_like_one_replica(data_dir, trained, tmp_path):
    workdir = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in helpers.free_ports(2)]}

    def start_workers() -> list[subprocess.Popen]:
        return [
            _start(data_dir, workdir, *RUN,
                   env=_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                                  "task": {"type": "worker", "index": i}})))
            for i in range(2)
        ]  # fmt: skip

    # A SIGTERM to the non-chief only: both workers agree on it and stop at the same step.
    procs = start_workers()
    try:
        _wait_for_checkpoint(workdir, 10, procs[0])
        procs[1].send_signal(signal.SIGTERM)
    finally:
        outputs = _finish(procs)
    stopped = []
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 75, f"worker {i}: exit {p.returncode}\n{out}\n{err[-3000:]}"
        line = _error_line(err)
        stopped.append(int(re.fullmatch(r".*stopped by SIGTERM at step (\d+); .*", line)[1]))
    assert stopped[0] == stopped[1] == _checkpoint_step(workdir), stopped
    assert not (workdir / "metrics.json").exists()

    chiefs = {str(procs[0].pid)}
    procs = start_workers()
    chiefs.add(str(procs[0].pid))
    outputs = _finish(procs)
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"worker {i}: exit {p.returncode}\n{out}\n{err[-3000:]}"
        assert "2 replica(s)" in out and f"resuming at step {stopped[0]} " in out, out
    (chief_out, _), (other_out, _) = outputs
    assert _fingerprint(chief_out) == _fingerprint(other_out)
    assert "wrote" in chief_out and "wrote" not in other_out

    # Only the chief's files are in WORKDIR; the other worker's scratch space is gone.
    assert (workdir / "export" / "saved_model.pb").is_file()
    assert (workdir / "metrics.json").is_file()
    assert not (workdir / "tmp-workers").exists()
    assert not list(workdir.glob("export.*"))
    writers = {f.name.split(".")[-3] for f in (workdir / "tensorboard").rglob("events.out.*")}
    assert writers == chiefs, "TensorBoard files from the non-chief in WORKDIR"

    # The global batch is the same, so 2 workers x 1 replica compute what 1 replica does: to
    # float32 rounding (the summation order differs), not bitwise.
    metrics = json.loads((workdir / "metrics.json").read_text())
    alone = json.loads((trained[0] / "metrics.json").read_text())
    cfg = _config(workdir)
    assert metrics["step"] == alone["step"] == cfg.epochs * cfg.steps_per_epoch
    for k in ("loss", "reconstruction", "sparsity", "mean_rho_hat"):
        assert metrics[k] == pytest.approx(alone[k], rel=1e-4), k
    np.testing.assert_allclose(metrics["rho_hat"], alone["rho_hat"], atol=1e-4)
    w2, w1 = _weights(_restore(workdir)), _weights(_restore(trained[0]))
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], atol=1e-4, err_msg=name)


# ----------------------------------------------------------------------------
# 5. Full-batch L-BFGS: it learns monotonically, resumes exactly, two workers agree.
# ----------------------------------------------------------------------------
LBFGS_RUN = [*RUN, "--set", "optimizer=lbfgs"]


@pytest.mark.slow
def test_lbfgs_learns_monotonically_resumes_exactly_and_two_workers_agree(data_dir, tmp_path):
    straight = tmp_path / "straight"
    r = _ok(_train(data_dir, straight, *LBFGS_RUN))
    train_count = manifest.load(str(data_dir)).num_examples("train")
    assert f"L-BFGS on the full batch of {train_count} (memory 20)" in r.stdout, r.stdout
    # Every accepted iteration lowers J (Armijo), so its epoch means never rise.
    losses = [float(v) for _, v in _summaries(straight / "tensorboard" / "train")["epoch_loss"][1]]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0], losses
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False)), losses
    alone = json.loads((straight / "metrics.json").read_text())
    assert alone["step"] == 300 and alone["dead_fraction"] == 0.0

    # Killed after a checkpoint and rerun: the curvature pairs and the cached gradient are in
    # the checkpoint, so the resumed run computes the uninterrupted one's iterates, bitwise.
    workdir = tmp_path / "killed"
    kept = _killed_after_checkpoint(data_dir, workdir, *LBFGS_RUN)
    resumed = _ok(_train(data_dir, workdir, *LBFGS_RUN))
    assert f"resuming at step {kept} " in resumed.stdout, resumed.stdout
    assert _fingerprint(resumed.stdout) == _fingerprint(r.stdout)

    # Two workers: the same iterates in both (they agree on every line-search decision), and
    # those of one replica to float32 rounding, which the iterations amplify about tenfold per
    # ten (measured 2026-12-02 on an AMD EPYC against one replica, J: 8e-6 relative after 10
    # iterations, 1.3e-4 after 20, 8.7e-4 after 30; an Intel host had 1e-4 after 30), so they
    # are compared after 10. A worker missing the other's half of the batch or of the
    # gradient would be off by far more.
    short = [*LBFGS_RUN, "--set", "epochs=1"]
    _ok(_train(data_dir, tmp_path / "short", *short))
    alone = json.loads((tmp_path / "short" / "metrics.json").read_text())
    workdir = tmp_path / "workers"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in helpers.free_ports(2)]}
    procs = [
        _start(data_dir, workdir, *short,
               env=_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                              "task": {"type": "worker", "index": i}})))
        for i in range(2)
    ]  # fmt: skip
    outputs = _finish(procs)
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"worker {i}: exit {p.returncode}\n{out}\n{err[-3000:]}"
    (chief_out, _), (other_out, _) = outputs
    assert "2 replica(s)" in chief_out
    assert _fingerprint(chief_out) == _fingerprint(other_out)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["step"] == alone["step"] == 10
    for k in ("loss", "reconstruction", "mean_rho_hat"):
        assert metrics[k] == pytest.approx(alone[k], rel=1e-4), k
    assert metrics["sparsity"] == pytest.approx(alone["sparsity"], rel=2e-3)
    w2, w1 = _weights(_restore(workdir)), _weights(_restore(tmp_path / "short"))
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], atol=1e-3, err_msg=name)


# ----------------------------------------------------------------------------
# 6. Clear errors: one line, the right exit code, no traceback.
# ----------------------------------------------------------------------------
def _sae_in_process(capsys, *argv: str) -> tuple[int, str]:
    from pipeline import cli

    code = cli.main(["train", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--workdir", "W"], "the following arguments are required: --data"),
        (["--data", "{empty}", "--workdir", "W"], "manifest.json is missing"),
        (["--data", "{data}", "--workdir", "W", "--set", "input_shape=28,28,1"],
         "holds 8x8x1 images but the model expects 28x28x1"),
        (["--data", "{data}", "--workdir", "W", "--preset", "nope"], "invalid choice: 'nope'"),
        (["--data", "{data}", "--workdir", "W", "--set", "nope=1"], "unknown config key 'nope'"),
        (["--data", "{data}", "--workdir", "W", "--set", "hidden=-3"], "invalid hidden=-3"),
        (["--data", "{data}", "--workdir", "{other}", *RUN, "--set", "hidden=30"],
         "holds a run with a different config (hidden differ)"),
    ],
)  # fmt: skip
def test_flag_config_and_data_errors_are_one_clear_line(capsys, data_dir, tmp_path, args, needle):
    other = tmp_path / "other"  # a workdir of RUN (its config.json is all that matters)
    other.mkdir()
    from trainer import config as config_lib

    overrides = [a for a in RUN[2:] if a != "--set"]
    cfg = config_lib.apply_overrides(config_lib.preset("digits"), overrides)
    (other / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "empty").mkdir()
    paths = {"data": data_dir, "empty": tmp_path / "empty", "other": other}
    argv = [a.format(**paths) if a.startswith("{") else str(tmp_path / a) if a == "W" else a
            for a in args]  # fmt: skip
    code, err = _sae_in_process(capsys, *argv)
    assert code == 2
    assert needle in _error_line(err), err
    assert not (tmp_path / "W").exists(), "nothing is written before the checks pass"


def test_lbfgs_on_a_train_split_too_big_for_memory_is_one_clear_line(
    capsys, data_dir, tmp_path, monkeypatch
):
    from trainer import data

    monkeypatch.setattr(data, "IN_MEMORY_BYTES", 64 * 1000)  # 1,000 8x8 images; it has 1,615
    workdir = tmp_path / "W"
    code, err = _sae_in_process(capsys, "--data", str(data_dir), "--workdir", str(workdir),
                                *LBFGS_RUN)  # fmt: skip
    assert code == 2
    line = _error_line(err)
    assert "optimizer=lbfgs needs the train split in memory" in line, line
    assert "1615 images are more than" in line and "use --set optimizer=adam" in line, line
    assert not workdir.exists()


@pytest.mark.slow
def test_corrupt_shard_and_nan_loss_fail_with_one_clear_line(data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    shard = bad / manifest.load(str(bad)).data["splits"]["train"]["shards"][0]["path"]
    size = shard.stat().st_size
    with shard.open("r+b") as f:  # garbage in the middle: the first record still reads
        f.seek(size // 2)
        f.write(b"\xde\xad\xbe\xef" * 64)
    # One step per call: checkpoints are taken between calls, so this saves after every step.
    explode = ["--set", "decoder=linear", "--set", "optimizer=sgd", "--set", "learning_rate=1e6",
               "--set", "epochs=1", "--set", "checkpoint_every_steps=1",
               "--set", "steps_per_execution=1"]  # fmt: skip
    procs = [
        _start(bad, tmp_path / "w-corrupt", "--set", "epochs=1"),
        _start(data_dir, tmp_path / "w-nan", *explode),
    ]
    (_, corrupt_err), (_, nan_err) = _finish(procs)

    assert procs[0].returncode == 2, corrupt_err[-3000:]
    line = _error_line(corrupt_err)
    assert f"shard {shard} " in line and "corrupted record at" in line, line
    assert "rerun `sae preprocess`" in line

    assert procs[1].returncode == 4, nan_err[-3000:]
    line = _error_line(nan_err)
    assert "NaN" in line and "the last good checkpoint is kept" in line, line
    kept = re.search(r"checkpoint is kept: (\S+);", line).group(1)
    assert kept == tf.train.latest_checkpoint(str(tmp_path / "w-nan" / "checkpoints"))
    # One step per call: the line names the step, and the checkpoint kept is the one before.
    bad_step = int(re.search(r"NaN/Inf in step (\d+);", line).group(1))
    assert kept.endswith(f"ckpt-{bad_step - 1}"), (bad_step, kept)
    reader = tf.train.load_checkpoint(kept)
    for name in reader.get_variable_to_shape_map():
        if name.startswith("model/w"):
            assert np.isfinite(reader.get_tensor(name)).all(), name
