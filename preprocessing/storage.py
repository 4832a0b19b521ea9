"""Storage: every read, write and listing of a URI (local path or gs://), in one place.

    storage.join("gs://b/run", "train", "metrics.json")    # "gs://b/run/train/metrics.json"
    storage.exists(uri); storage.files_under(folder); storage.glob(pattern)
    storage.read_bytes(uri); storage.read_json(uri, missing="what to do")
    storage.publish(uri, data)            # atomic: readers see the old file or the new one
    storage.publish_json(uri, {...})
    storage.check_access(reads=[("--input", uri)], writes=[("--output", uri)])

One backend: Apache Beam's `FileSystems`. Both Beam jobs need it anyway (their workers
read and write through it, on Dataflow too); it reaches gs:// through the
google-cloud-storage client, so the tests' GCS emulator (STORAGE_EMULATOR_HOST) serves it
in this process and in worker processes alike; and it does not import TensorFlow, whose
import costs seconds (measured 2026-12-01 on this machine, load 4: 7.3 s for Beam's
FileSystems, 21 to 30 s for TensorFlow), so `sae models list` or a manifest check starts
without it. TensorFlow's own gs:// filesystem stays only where TensorFlow does the I/O
itself: checkpoints, SavedModels, TensorBoard events, TFRecordDataset reads. Local paths
skip Beam where Python's own calls do the same (exists, reads, plain atomic writes), so a
command on local files (`sae train`) never imports Beam: 1.6 s less start-up (median of 3
interleaved `sae train --preset tiny` runs, 13.6 s against 15.2 s, 2026-12-02).

Atomic publish: locally a file is written under a temporary name in its folder and
renamed (a rename within a filesystem is atomic). On object stores (gs://) a single
object write is already atomic: the object appears whole when its upload completes, or
not at all, so the data is written in place, in one write (a rename there is a copy plus
a delete, which would only double the traffic).

Access check (issue #12): Beam's gcsio and TensorFlow retry a failed gs:// request for
minutes, with a traceback per retry. `check_access` makes one request per URI to read
(list at most one object under it) and a write-and-delete of a tiny probe object under
each URI to write, with a short timeout and no retry, and turns a failure into one
UserError line (what went wrong, which URI, what to do). Each URI is checked once per
process, so a command that runs other jobs (`sae run`, `sae retrain`) checks it once.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterable
from typing import Any

from preprocessing.errors import UserError

TIMEOUT = (5.0, 10.0)  # seconds: connect, read; the check fails well within 20 s
PROBE_PREFIX = ".sae-access-probe-"


# ----------------------------------------------------------------------------
# URIs.
# ----------------------------------------------------------------------------
def join(base: str, *parts: str) -> str:
    """Joins URI parts with '/', for local paths and gs:// alike."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


def absolute(uri: str) -> str:
    """A local path made absolute; URIs (gs://...) unchanged. Paths that reach Beam workers
    must be absolute: a remote runner's workers (Flink, Spark, a worker pool) do not run in
    the launcher's working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


def is_remote(uri: str) -> bool:
    """An object store (gs://...), where folders do not exist and renames are copies."""
    return "://" in uri


def _fs():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _raw():
    from apache_beam.io.filesystem import CompressionTypes

    return CompressionTypes.UNCOMPRESSED


# ----------------------------------------------------------------------------
# Reading and listing.
# ----------------------------------------------------------------------------
def exists(uri: str) -> bool:
    # Local paths directly: a command on local files (`sae train`, `sae models`) then never
    # imports Beam (see the module docstring).
    return os.path.exists(uri) if not is_remote(uri) else _fs().exists(uri)


def glob(pattern: str, limit: int | None = None) -> list[str]:
    """The files matching a glob (`*`, `**`, `?`), at most `limit` of them."""
    limits = [limit] if limit is not None else None
    return [m.path for m in _fs().match([pattern], limits=limits)[0].metadata_list]


def files_under(folder: str) -> list[str]:
    """Every file under `folder`, at any depth (empty if there is none)."""
    return glob(join(folder, "**"))


def open_read(uri: str):
    """A binary file object of the stored bytes (never decompressed by suffix)."""
    return open(uri, "rb") if not is_remote(uri) else _fs().open(uri, compression_type=_raw())


def read_bytes(uri: str) -> bytes:
    """The file's bytes. Local paths are read directly: Beam's FileSystems looks up the
    filesystem plugin on every call, which costs as much as reading a small image."""
    if not is_remote(uri):
        with open(uri, "rb") as f:
            return f.read()
    with open_read(uri) as f:
        return f.read()


def read_json(
    uri: str, missing: str | None = None, fix: str = "rerun the command that writes it"
) -> Any:
    """The parsed JSON at `uri`. A missing file raises UserError(`missing`) (by default
    '<uri> does not exist'); invalid JSON raises UserError naming the file and `fix`."""
    if not exists(uri):
        raise UserError(missing or f"{uri} does not exist")
    try:
        return json.loads(read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{uri} is not valid JSON ({e}); {fix}") from None


def read_json_if_exists(uri: str) -> Any | None:
    """The parsed JSON at `uri`, or None if there is no such file."""
    return read_json(uri) if exists(uri) else None


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------
def open_write(uri: str):
    """A binary file object that streams to `uri` (not atomic: for scratch files such as
    shard parts; use `publish` for what readers look at)."""
    return _fs().create(uri, compression_type=_raw())


def publish_chunks(uri: str, chunks: Iterable[bytes], gzip: bool = False) -> None:
    """Writes `uri` atomically (see the module docstring): a reader never sees a partial
    file. A file already there (a retried bundle's, with the same content) is replaced."""

    def create(path: str):
        if not (gzip or is_remote(path)):  # a plain local file: no Beam import
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # as Beam's create does
            return open(path, "wb")
        from apache_beam.io.filesystem import CompressionTypes

        ctype = CompressionTypes.GZIP if gzip else CompressionTypes.UNCOMPRESSED
        return _fs().create(path, compression_type=ctype)

    if is_remote(uri):
        # Joined first: an upload is committed when its writer closes, which a `with`
        # block also does when the chunks fail midway (a partial object). Memory: one
        # file, which a shard merge from object-store parts holds anyway.
        data = b"".join(chunks)
        with create(uri) as f:
            f.write(data)
        return
    tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
    try:
        with create(tmp) as f:
            for chunk in chunks:
                f.write(chunk)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, uri)  # atomic, and replaces a file already there


def publish(uri: str, data: bytes | str) -> None:
    publish_chunks(uri, [data.encode() if isinstance(data, str) else data])


def publish_json(uri: str, data: Any) -> None:
    publish(uri, json.dumps(data, indent=2))


def delete(uris: list[str]) -> None:
    """Deletes files (and local folders, with what is in them)."""
    if uris:
        _fs().delete(uris)


def delete_if_exists(uri: str) -> None:
    with contextlib.suppress(OSError):
        if exists(uri):
            delete([uri])


def move(sources: list[str], destinations: list[str]) -> None:
    """Renames files, creating destination folders where the filesystem has them (local)."""
    fs = _fs()
    for parent in sorted({posixpath.dirname(d) for d in destinations if not is_remote(d)}):
        os.makedirs(parent, exist_ok=True)  # a racing creator is fine too
    if sources:
        fs.rename(sources, destinations)


def makedirs(folder: str) -> None:
    """A local folder (and its parents); nothing on object stores, which have none."""
    if not is_remote(folder):
        os.makedirs(folder, exist_ok=True)


# ----------------------------------------------------------------------------
# The fast access check (issue #12).
# ----------------------------------------------------------------------------
_checked: set[tuple[str, str, str]] = set()  # (endpoint, mode, bucket/prefix) done already


def _login_hint() -> str:
    return (
        "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
        "to a service-account key file"
    )


def _client(what: str):
    import google.auth.exceptions
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client()  # anonymous, at the emulator
    try:
        return storage.Client()
    except google.auth.exceptions.DefaultCredentialsError:
        raise UserError(f"{what}: no Google Cloud credentials found; {_login_hint()}") from None
    except OSError as e:  # no project: storage needs none to read and write
        raise UserError(
            f"{what}: cannot set up a Cloud Storage client ({e}); {_login_hint()}"
        ) from None


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    return bucket, prefix


@contextlib.contextmanager
def _one_line(what: str, bucket: str, doing: str):
    """Turns a Cloud Storage client failure into one UserError line."""
    import google.api_core.exceptions as gexc
    import google.auth.exceptions
    import requests

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    endpoint = emulator or "storage.googleapis.com"
    grant = "grant them storage access to it (roles/storage.objectAdmin), or check the bucket name"
    try:
        yield
    except gexc.NotFound:
        raise UserError(
            f"{what}: bucket {bucket!r} does not exist; check the bucket name"
        ) from None
    except gexc.Forbidden:
        if doing == "list":
            raise UserError(
                f"{what}: access to bucket {bucket!r} is forbidden for these credentials; {grant}"
            ) from None
        raise UserError(
            f"{what}: these credentials may read bucket {bucket!r} but not {doing} objects in "
            f"it (the command writes there); {grant}"
        ) from None
    except gexc.Unauthorized:
        raise UserError(
            f"{what}: the credentials were rejected (expired or revoked?); " + _login_hint()
        ) from None
    except google.auth.exceptions.GoogleAuthError as e:
        raise UserError(
            f"{what}: cannot get an access token ({type(e).__name__}); " + _login_hint()
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        kind = "timed out" if isinstance(e, requests.exceptions.Timeout) else "failed"
        raise UserError(
            f"{what}: cannot reach Cloud Storage at {endpoint} (connection {kind}); "
            "check the network connection and proxy settings"
            + (" (it is STORAGE_EMULATOR_HOST)" if emulator else "")
        ) from None
    except gexc.GoogleAPICallError as e:
        raise UserError(
            f"{what}: Cloud Storage refused the request ({e.code} {e.message}); "
            "check the URI and the credentials' permissions"
        ) from None


def check_access(
    reads: Iterable[tuple[str, str]] = (), writes: Iterable[tuple[str, str]] = ()
) -> None:
    """For each (what, URI), e.g. ("--input", "gs://b/photos"), or ("", URI) for a
    positional: `reads` are listed (at most one object), `writes` are listed and get a
    probe object written and deleted under them. Local paths are skipped (their errors are
    immediate and name the path already).

    Raises UserError naming the first URI that is unreachable, forbidden (for what the
    command does with it) or whose bucket does not exist. Each check runs once per process.
    """
    todo = [(what, uri, "list") for what, uri in reads if uri and uri.startswith("gs://")]
    todo += [(w, uri, m) for w, uri in writes if uri and uri.startswith("gs://")
             for m in ("list", "write")]  # fmt: skip
    if not todo:
        return
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST", "")
    client = None
    for flag, uri, mode in todo:
        what = f"{flag} {uri}".strip()  # as the messages name it
        bucket, prefix = _split(uri.rstrip("/"))
        if not bucket:
            raise UserError(f"{what}: no bucket name; expected gs://BUCKET/PATH")
        done = (endpoint, mode, f"{bucket}/{prefix}")
        if done in _checked:
            continue
        client = client or _client(what)
        if mode == "list":
            with _one_line(what, bucket, "list"):
                blobs = client.list_blobs(
                    bucket, prefix=prefix or None, max_results=1, timeout=TIMEOUT, retry=None
                )
                list(blobs)
        else:
            name = (
                join(prefix, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
                if prefix
                else (f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
            )
            blob = client.bucket(bucket).blob(name)
            with _one_line(what, bucket, "create"):
                blob.upload_from_string(b"", if_generation_match=0, timeout=TIMEOUT, retry=None)
            with _one_line(what, bucket, "delete"):
                blob.delete(timeout=TIMEOUT, retry=None)
        _checked.add(done)


def uris_in_argv(argv: list[str]) -> list[tuple[str, str]]:
    """(flag, URI) for every gs:// value in a command line (`--flag gs://..`,
    `--flag=gs://..` or a positional)."""
    found = []
    for i, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        if sep and flag.startswith("--") and value.startswith("gs://"):
            found.append((flag, value))
        elif arg.startswith("gs://"):
            prev = argv[i - 1] if i else ""
            found.append((prev if prev.startswith("--") else "", arg))
    return found
