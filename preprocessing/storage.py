"""Fail fast when Cloud Storage is unreachable or forbidden, before any job starts.

Beam's gcsio and TensorFlow's GCS filesystem retry a failed request for minutes, with a
traceback per retry. `check_access` makes one request per gs:// URI (list at most one
object under it), with a short timeout and no retry, and turns a failure into one
UserError line: what went wrong, which URI, what to do. Listing is what every job does
first with its inputs and outputs, so a URI that passes this check is reachable with
these credentials (a write that is still refused fails later, as the job writes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from preprocessing.errors import UserError

TIMEOUT = (5.0, 10.0)  # seconds: connect, read


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


def check_access(uris: Iterable[tuple[str, str]]) -> None:
    """For each (what, gs:// URI), e.g. ("--input", "gs://b/photos"), or ("", URI) for a
    positional: one list request.

    Raises UserError naming the first URI that is unreachable, forbidden or whose bucket
    does not exist; other URIs are ignored.
    """
    todo = [(what, uri) for what, uri in uris if uri.startswith("gs://")]
    if not todo:
        return
    import google.api_core.exceptions as gexc
    import google.auth.exceptions
    import requests

    client = None
    seen: set[tuple[str, str]] = set()
    for flag, uri in todo:
        what = f"{flag} {uri}".strip()  # as the messages name it
        bucket, prefix = _split(uri.rstrip("/"))
        if not bucket:
            raise UserError(f"{what}: no bucket name; expected gs://BUCKET/PATH")
        if (bucket, prefix) in seen:
            continue
        seen.add((bucket, prefix))
        client = client or _client(what)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        endpoint = emulator or "storage.googleapis.com"
        try:
            blobs = client.list_blobs(
                bucket, prefix=prefix or None, max_results=1, timeout=TIMEOUT, retry=None
            )
            list(blobs)
        except gexc.NotFound:
            raise UserError(
                f"{what}: bucket {bucket!r} does not exist; check the bucket name"
            ) from None
        except gexc.Forbidden:
            raise UserError(
                f"{what}: access to bucket {bucket!r} is forbidden for these credentials; "
                "grant them storage access to it (roles/storage.objectAdmin), or check the "
                "bucket name"
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
