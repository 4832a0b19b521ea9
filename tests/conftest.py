"""Shared fixtures: a local GCS emulator (see tests/gcs_emulator.py).

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

import os
import uuid

import pytest

from tests.gcs_emulator import DEFAULT_BUCKET, EmulatorStartError, GcsEmulator, patched_environ


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
