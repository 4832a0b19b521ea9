"""The GCS emulator fixture, proven against every client the project uses.

Real clients, no mocks: google-cloud-storage, Beam FileSystems / gcsio (batch
copy and delete included) and DirectRunner pipelines (in-process and with
worker subprocesses), tf.io.gfile and tf.data, and a child process that
inherits only the environment.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

from tests.gcs_emulator import FAKE_TOKEN, EmulatorStartError, GcsEmulator
from tests.helpers import run


def _split(gs_path: str) -> tuple[str, str]:
    bucket, _, name = gs_path.removeprefix("gs://").partition("/")
    return bucket, name


# --------------------------------------------------------------------------- #
# google-cloud-storage                                                        #
# --------------------------------------------------------------------------- #


def test_storage_client_round_trip(gcs_emulator, gcs_prefix):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client()  # configured by the environment alone
    base_url = client._connection.API_BASE_URL
    assert base_url == gcs_emulator.endpoint
    assert isinstance(client._credentials, AnonymousCredentials)
    assert client.project == gcs_emulator.project

    bucket_name, prefix = _split(gcs_prefix)
    bucket = client.bucket(bucket_name)
    bucket.blob(f"{prefix}/a.txt").upload_from_string(b"alpha")
    big = os.urandom(600 * 1024)  # > chunk_size: a multi-request resumable upload
    bucket.blob(f"{prefix}/dir/big.bin", chunk_size=256 * 1024).upload_from_string(big)

    assert bucket.blob(f"{prefix}/a.txt").download_as_bytes() == b"alpha"
    assert bucket.blob(f"{prefix}/dir/big.bin").download_as_bytes() == big
    assert bucket.blob(f"{prefix}/dir/big.bin").download_as_bytes(start=10, end=19) == big[10:20]
    names = sorted(b.name for b in client.list_blobs(bucket_name, prefix=f"{prefix}/"))
    assert names == [f"{prefix}/a.txt", f"{prefix}/dir/big.bin"]
    bucket.delete_blob(f"{prefix}/a.txt")
    assert not bucket.blob(f"{prefix}/a.txt").exists()


def test_conditional_create_only_if_absent(gcs_prefix):
    from google.api_core.exceptions import PreconditionFailed
    from google.cloud import storage

    bucket_name, prefix = _split(gcs_prefix)
    bucket = storage.Client().bucket(bucket_name)
    name = f"{prefix}/model/LATEST"

    bucket.blob(name).upload_from_string(b"v1", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob(name).upload_from_string(b"v2", if_generation_match=0)
    blob = bucket.get_blob(name)
    assert blob.download_as_bytes() == b"v1"
    assert blob.generation is not None  # downloads report x-goog-generation, as on GCS

    # Compare-and-swap on the generation, as a promotion step would do.
    bucket.blob(name).upload_from_string(b"v3", if_generation_match=blob.generation)
    with pytest.raises(PreconditionFailed):  # stale generation
        bucket.blob(name).upload_from_string(b"v4", if_generation_match=blob.generation)
    assert bucket.blob(name).download_as_bytes() == b"v3"

    # The start of a resumable upload (a larger object) checks it too.
    big = os.urandom(300 * 1024)
    with pytest.raises(PreconditionFailed):
        bucket.blob(name, chunk_size=256 * 1024).upload_from_string(big, if_generation_match=0)
    assert bucket.blob(name).download_as_bytes() == b"v3"


# --------------------------------------------------------------------------- #
# Apache Beam                                                                 #
# --------------------------------------------------------------------------- #


def test_beam_filesystems(gcs_prefix):
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.gcp.gcsio import GcsIO

    def write(path, data):
        with FileSystems.create(path) as f:
            f.write(data)

    def listing(pattern):
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)

    write(f"{gcs_prefix}/in/a.txt", b"A")
    write(f"{gcs_prefix}/in/sub/b.txt", b"BB")
    write(f"{gcs_prefix}/in/sub/deeper/c.txt", b"CCC")

    assert listing(f"{gcs_prefix}/**") == [
        f"{gcs_prefix}/in/a.txt",
        f"{gcs_prefix}/in/sub/b.txt",
        f"{gcs_prefix}/in/sub/deeper/c.txt",
    ]
    assert listing(f"{gcs_prefix}/in/*.txt") == [f"{gcs_prefix}/in/a.txt"]
    assert len(FileSystems.match([f"{gcs_prefix}/**"], limits=[1])[0].metadata_list) == 1
    [meta] = FileSystems.match([f"{gcs_prefix}/in/sub/b.txt"])[0].metadata_list
    assert meta.size_in_bytes == 2
    assert FileSystems.exists(f"{gcs_prefix}/in/a.txt")
    assert not FileSystems.exists(f"{gcs_prefix}/in/missing.txt")
    with FileSystems.open(f"{gcs_prefix}/in/sub/deeper/c.txt") as f:
        assert f.read() == b"CCC"

    FileSystems.rename([f"{gcs_prefix}/in/a.txt"], [f"{gcs_prefix}/out/a.txt"])
    FileSystems.copy([f"{gcs_prefix}/in/sub/"], [f"{gcs_prefix}/copy/"])  # a "directory"
    assert listing(f"{gcs_prefix}/**") == [
        f"{gcs_prefix}/copy/b.txt",
        f"{gcs_prefix}/copy/deeper/c.txt",
        f"{gcs_prefix}/in/sub/b.txt",
        f"{gcs_prefix}/in/sub/deeper/c.txt",
        f"{gcs_prefix}/out/a.txt",
    ]
    FileSystems.delete([f"{gcs_prefix}/in/sub/b.txt", f"{gcs_prefix}/in/sub/deeper/c.txt"])
    assert listing(f"{gcs_prefix}/in/**") == []

    # The batch API (multipart/mixed) that Beam's rename/finalize steps use.
    gcs = GcsIO()
    pairs = [(f"{gcs_prefix}/copy/b.txt", f"{gcs_prefix}/batch/{i}") for i in range(3)]
    assert gcs.copy_batch(pairs) == [(s, d, None) for s, d in pairs]
    paths = [d for _, d in pairs] + [f"{gcs_prefix}/batch/absent"]
    assert gcs.delete_batch(paths) == [(p, None) for p in paths]  # 404 counts as deleted
    assert listing(f"{gcs_prefix}/batch/*") == []


def _record_worker(element, marker_dir):
    """Runs in a Beam worker: writes through gcsio from there, returns the pid."""
    from apache_beam.io.filesystems import FileSystems

    pid = os.getpid()
    with FileSystems.create(f"{marker_dir}/{pid}-{element}") as f:
        f.write(b"x")
    return pid


@pytest.mark.parametrize(
    "mode",
    [
        ["--direct_running_mode=in_memory"],
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ],
    ids=["in_memory", "multi_processing"],
)
def test_beam_direct_runner_text_round_trip(gcs_prefix, mode):
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    lines = [f"line-{i}" for i in range(40)]
    options = PipelineOptions(["--runner=DirectRunner", *mode])
    markers = f"{gcs_prefix}/markers"

    with beam.Pipeline(options=options) as p:
        written = p | beam.Create(lines) | beam.io.WriteToText(f"{gcs_prefix}/x/out", num_shards=3)
        _ = written | beam.Map(lambda _path: 0) | beam.Map(_record_worker, marker_dir=markers)
    shards = sorted(m.path for m in FileSystems.match([f"{gcs_prefix}/x/out*"])[0].metadata_list)
    assert shards == [f"{gcs_prefix}/x/out-0000{i}-of-00003" for i in range(3)]

    with beam.Pipeline(options=options) as p:
        assert_that(p | beam.io.ReadFromText(f"{gcs_prefix}/x/**"), equal_to(lines))

    pids = {
        int(m.path.rsplit("/", 1)[1].split("-")[0])
        for m in FileSystems.match([f"{markers}/*"])[0].metadata_list
    }
    assert pids
    if "multi_processing" in mode[0]:
        assert os.getpid() not in pids, "the marker should come from a worker subprocess"
    else:
        assert pids == {os.getpid()}


# --------------------------------------------------------------------------- #
# TensorFlow                                                                  #
# --------------------------------------------------------------------------- #


def test_tf_gfile_and_tfrecord_round_trip(gcs_prefix):
    import tensorflow as tf

    gfile = tf.io.gfile
    assert not gfile.exists(f"{gcs_prefix}/t/a.txt")
    with gfile.GFile(f"{gcs_prefix}/t/a.txt", "wb") as f:
        f.write(b"hello tf")
    assert gfile.exists(f"{gcs_prefix}/t/a.txt")
    with gfile.GFile(f"{gcs_prefix}/t/a.txt", "rb") as f:
        assert f.read() == b"hello tf"
    assert gfile.stat(f"{gcs_prefix}/t/a.txt").length == 8

    records = [f"record-{i}".encode() * 50 for i in range(200)]  # ~2 MB
    with tf.io.TFRecordWriter(f"{gcs_prefix}/t/data-00000.tfrecord") as writer:
        for r in records:
            writer.write(r)
    gfile.makedirs(f"{gcs_prefix}/t/sub/dir")
    assert gfile.isdir(f"{gcs_prefix}/t/sub")

    assert gfile.glob(f"{gcs_prefix}/t/*.tfrecord") == [f"{gcs_prefix}/t/data-00000.tfrecord"]
    assert sorted(gfile.listdir(f"{gcs_prefix}/t")) == ["a.txt", "data-00000.tfrecord", "sub/"]
    dataset = tf.data.TFRecordDataset(gfile.glob(f"{gcs_prefix}/t/*.tfrecord"))
    assert [r.numpy() for r in dataset] == records

    gfile.rename(f"{gcs_prefix}/t/a.txt", f"{gcs_prefix}/t/b.txt")
    assert not gfile.exists(f"{gcs_prefix}/t/a.txt")
    gfile.remove(f"{gcs_prefix}/t/b.txt")
    assert sorted(gfile.listdir(f"{gcs_prefix}/t")) == ["data-00000.tfrecord", "sub/"]


# --------------------------------------------------------------------------- #
# Child processes, isolation, robustness                                      #
# --------------------------------------------------------------------------- #

_CHILD = textwrap.dedent(
    """
    import json, sys
    prefix = sys.argv[1]
    from google.cloud import storage
    from apache_beam.io.filesystems import FileSystems
    import tensorflow as tf
    bucket_name, _, name = prefix[len("gs://"):].partition("/")
    seen = storage.Client().bucket(bucket_name).blob(name + "/from-parent").download_as_bytes()
    with FileSystems.create(prefix + "/from-child-beam") as f:
        f.write(seen + b"+beam")
    with tf.io.gfile.GFile(prefix + "/from-child-tf", "wb") as f:
        f.write(seen + b"+tf")
    print(json.dumps({"seen": seen.decode()}))
    """
)


def test_child_process_inherits_the_emulator(gcs_prefix):
    from google.cloud import storage

    bucket_name, prefix = _split(gcs_prefix)
    bucket = storage.Client().bucket(bucket_name)
    bucket.blob(f"{prefix}/from-parent").upload_from_string(b"parent")
    proc = run([sys.executable, "-c", _CHILD, gcs_prefix], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"seen": "parent"}
    assert bucket.blob(f"{prefix}/from-child-beam").download_as_bytes() == b"parent+beam"
    assert bucket.blob(f"{prefix}/from-child-tf").download_as_bytes() == b"parent+tf"
    assert "Unable to find default credentials" not in proc.stderr


def test_prefixes_are_fresh(gcs_prefix, gcs_bucket):
    from google.cloud import storage

    assert gcs_prefix.startswith(f"gs://{gcs_bucket}/")
    _, prefix = _split(gcs_prefix)
    assert list(storage.Client().list_blobs(gcs_bucket, prefix=prefix)) == []


def test_other_https_is_refused(gcs_emulator):
    # Anything honouring https_proxy (TensorFlow's curl, requests, urllib) can
    # only reach the emulated Google storage hosts.
    assert os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] == FAKE_TOKEN
    with pytest.raises(OSError, match="403"):
        urllib.request.urlopen("https://oauth2.googleapis.com/token", timeout=10)


def test_emulator_start_failure_is_reported(tmp_path):
    broken = GcsEmulator(tmp_path / "exits", python="/bin/false")
    with pytest.raises(EmulatorStartError, match="exited with code 1"):
        broken.start(timeout=10)

    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    slow = GcsEmulator(tmp_path / "hangs", python=str(hang))
    with pytest.raises(EmulatorStartError, match="did not report readiness"):
        slow.start(timeout=1)
    assert slow.process is None  # killed, not left behind


def test_private_emulator_stops(tmp_path):
    import socket

    emulator = GcsEmulator(tmp_path).start()
    client = emulator.client()
    bucket = client.bucket(emulator.create_bucket("private"))
    bucket.blob("x").upload_from_string(b"x")
    assert [b.name for b in client.list_blobs("private")] == ["x"]

    proc, port = emulator.process, emulator.emulator_port
    emulator.stop()
    assert proc.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
