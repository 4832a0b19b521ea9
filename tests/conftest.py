"""Shared fixtures: the digits dataset and a tiny model trained on it, and a local GCS
emulator (see tests/gcs_emulator.py).

``digits``        session: builtin:digits preprocessed (3 shards, eval fraction 0.2), built
                  once per run (pytest-xdist workers share it). Read-only: copy it to change
                  it; a test that writes into it fails at the end of the session.
``tiny_model``    session: export dir of ``sae train --preset tiny`` on ``digits``; same rules.
``tiny_training`` session: the folder of that run: its workdir ``w``, its ``stderr.txt``.
``labelled``      session: 24 labelled LABELLED_H x LABELLED_W grey PNGs (3 classes),
                  preprocessed, about a third in the eval split; same rules.

``gcs_emulator``  session: the running emulator (:class:`GcsEmulator`); while it
                  runs, os.environ points google-cloud-storage, Beam's gcsio and
                  tf.io.gfile at it, in this process and in every child process.
``gcs_bucket``    session: name of an (empty at start) bucket in the emulator.
``gcs_prefix``    per test: a fresh ``gs://<bucket>/<uuid>`` prefix (no trailing
                  slash); its objects are deleted after the test.

GCS_EMULATOR_VERBOSE=1 logs every request to <pytest tmp>/gcs-emulator0/emulator.log.

Request one of them before the first gs:// access of the test process: clients
read the environment when they are created (Beam caches its credentials and
TensorFlow its GCS filesystem for the life of the process).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import helpers
from tests.gcs_emulator import DEFAULT_BUCKET, EmulatorStartError, GcsEmulator, patched_environ

# Several shards, so that readers interleave files (the streaming input path, per-shard
# checks); an eval split big enough for the probe and the gate.
DIGITS_FLAGS = ["--input", "builtin:digits", "--num-shards", "3", "--eval-fraction", "0.2"]


# The modules that take minutes, longest first (pytest --durations, 2026-12-01). They are
# collected first, so that pytest-xdist (make test: --dist loadfile --no-loadscope-reorder)
# starts them first and no worker is left running one of them alone at the end. The order
# only changes when modules run, never what they check.
LONG_MODULES = (
    "test_train.py",
    "test_model.py",
    "test_retrain.py",
    "test_extract.py",
    "test_portable.py",
    "test_bad_invocations.py",
    "test_k8s_sim.py",
    "test_run.py",
    "test_preprocess.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], None]):
    """`build(folder)` once per test run, also across pytest-xdist workers (they share the
    parent of their base temp folders); yields the folder, then fails the session if a
    test changed what is in it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait for the first build
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            done.write_text(_digest(folder))
    yield folder
    assert _digest(folder) == done.read_text(), (
        f"a test wrote into the shared fixture {folder}: copy it first (shutil.copytree)"
    )


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    from preprocessing import job

    def build(folder: Path) -> None:
        job.run([*DIGITS_FLAGS, "--output", str(folder), "--quiet", *helpers.FAST])

    yield from map(str, _built_once(tmp_path_factory, "digits", build))


@pytest.fixture(scope="session")
def tiny_training(digits, tmp_path_factory) -> Path:
    """`sae train --preset tiny` on digits, as a user runs it (its quality does not matter):
    a folder with the workdir ``w`` and the run's ``stderr.txt``."""

    # Unset: quieting TensorFlow's C++ start-up lines is the CLI's job (a check reads stderr).
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}

    def build(folder: Path) -> None:
        r = helpers.ok(helpers.sae("train", "--data", digits, "--workdir", folder / "w",
                                   "--preset", "tiny", "--verbose", "0", env=env))  # fmt: skip
        (folder / "stderr.txt").write_text(r.stderr)

    yield from _built_once(tmp_path_factory, "tiny-model", build)


@pytest.fixture(scope="session")
def tiny_model(tiny_training: Path) -> str:
    return str(tiny_training / "w" / "export")


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> str:
    import numpy as np
    from PIL import Image

    from preprocessing import job

    def build(folder: Path) -> None:
        rng = np.random.default_rng(0)
        for i in range(24):
            (folder / "pngs" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (helpers.LABELLED_H, helpers.LABELLED_W), np.uint8)
            Image.fromarray(pixels).save(folder / "pngs" / f"c{i % 3}" / f"im{i:02d}.png")
        job.run(["--input", str(folder / "pngs"), "--output", str(folder / "data"),
                 "--eval-fraction", "0.34", "--quiet", *helpers.FAST])  # fmt: skip

    for folder in _built_once(tmp_path_factory, "labelled", build):
        yield str(folder / "data")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    emulator = GcsEmulator(
        tmp_path_factory.mktemp("gcs-emulator"),
        verbose=os.environ.get("GCS_EMULATOR_VERBOSE") == "1",  # log requests to emulator.log
    )
    try:
        emulator.start()
    except EmulatorStartError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        with patched_environ(emulator.env()):
            yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator) -> str:
    return gcs_emulator.create_bucket(DEFAULT_BUCKET)


@pytest.fixture
def gcs_prefix(gcs_emulator, gcs_bucket):
    name = uuid.uuid4().hex
    yield f"gs://{gcs_bucket}/{name}"
    gcs_emulator.delete_prefix(gcs_bucket, name)
