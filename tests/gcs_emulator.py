"""A local Google Cloud Storage emulator for tests (no network, no credentials).

Two halves live in this file:

* the *server* half (``python tests/gcs_emulator.py serve ...``), run as a child
  process. It runs the ``gcp-storage-emulator`` package's own HTTP server
  (``gcp_storage_emulator.server.create_server``, the code path behind
  ``python -m gcp_storage_emulator start --in-memory``; version 2026.7.19, pinned in
  pyproject.toml), with what the project's clients need and the package lacks:

  1. ``ifGenerationMatch`` on uploads: pipeline/models.py promotes a model by a
     compare-and-swap of its CURRENT pointer (google-cloud-storage,
     ``if_generation_match``); the package ignores the condition.
  2. The generation headers on media downloads: without them google-cloud-storage
     resets ``blob.generation`` after a download, and the swap's token is lost.
  3. Zero-byte ``uploadType=media`` uploads, which crashed the package: TensorFlow's
     directory markers.
  4. An HTTPS proxy for TensorFlow. TensorFlow's built-in ``gs://`` filesystem
     has its endpoints compiled in (``https://www.googleapis.com/storage/v1/``,
     ``https://www.googleapis.com/upload/storage/v1/``,
     ``https://storage.googleapis.com/<bucket>/<object>``) and honours no
     emulator variable. Its libcurl does honour ``https_proxy`` and
     ``CURL_CA_BUNDLE``, so the proxy accepts ``CONNECT`` for those two hosts
     only, terminates TLS with a certificate from a throw-away CA and forwards
     the plain HTTP requests to the emulator. Any other ``CONNECT`` is refused,
     so nothing that honours ``https_proxy`` can reach the internet.

  Beam's gcsio needs nothing beyond the package (it talks to STORAGE_EMULATOR_HOST
  through google-cloud-storage and sends no preconditions by default).

* the *client* half (:class:`GcsEmulator`), used by ``tests/conftest.py``:
  it starts the child, waits until it answers, creates buckets and returns the
  environment variables that point every client (google-cloud-storage, Beam's
  gcsio, ``tf.io.gfile``) at the emulator, in this process and in children.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import http.client
import http.server
import json
import logging
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_BUCKET = "sae-test-bucket"
DEFAULT_PROJECT = "sae-test-project"
# The bearer token every client sends; the emulator ignores it.
FAKE_TOKEN = "gcs-emulator-fake-token"
# Hosts TensorFlow's GCS filesystem talks to; the only CONNECT targets the proxy accepts.
INTERCEPTED_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# Metadata-server address for every client: a closed local port, so a stray
# metadata lookup fails at once instead of reaching 169.254.169.254.
DEAD_METADATA_HOST = f"{HOST}:9"
START_TIMEOUT_S = 20.0
_READY = "GCS-EMULATOR-READY "

log = logging.getLogger("gcs_emulator")


# --------------------------------------------------------------------------- #
# Server half: what the package lacks                                          #
# --------------------------------------------------------------------------- #
# Written against gcp-storage-emulator 2026.7.19, pinned exactly in pyproject.toml: the
# package has no hook for these, so `install_fixes` swaps two functions in its handler
# table (`server.HANDLERS`, a module-level tuple) and sets one private field of its
# request (`_data`). A new version may move either; tests/test_gcs_emulator.py then fails.
# Each fix exists for a client the project uses, named below; nothing else is changed.

_PRECONDITION_FAILED = "At least one of the pre-conditions you specified did not hold."


def _upload_target(request) -> str | None:
    """The object name an upload writes: in the query (media) or in the metadata part
    (multipart, the start of a resumable upload)."""
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta = data["meta"] if "meta" in data and "content" in data else data
        if isinstance(meta, dict):
            return meta.get("name")
    return None


def _generation_mismatch(request, storage) -> bool:
    """Whether an upload's ``ifGenerationMatch`` does not hold (a missing object has
    generation 0, so ``ifGenerationMatch=0`` means "only if absent").

    For pipeline/models.py: its compare-and-swap of CURRENT is google-cloud-storage's
    ``upload_from_string(..., if_generation_match=token)``; the package ignores the
    condition, so two racing promotions both "won". It serves one request at a time, so
    this check and the write that follows are atomic, as on GCS. Beam's gcsio and
    TensorFlow send no preconditions (Beam only with --enable_gcsio_blob_generation)."""
    values = request.query.get("ifGenerationMatch")
    name = _upload_target(request) if values else None
    if name is None:
        return False
    obj = storage.objects.get(request.params["bucket_name"], {}).get(name)
    return int(obj["generation"] if obj else 0) != int(values[0])


def _fixed_insert(insert):
    @functools.wraps(insert)
    def wrapped(request, response, storage, *args, **kwargs):
        # TensorFlow's directory markers (tf.io.gfile.makedirs) are zero-byte
        # uploadType=media uploads; the package reads that body as None and crashes.
        if request.query.get("uploadType") == ["media"] and request.data is None:
            request._data = b""
        if _generation_mismatch(request, storage):
            response.status = HTTPStatus.PRECONDITION_FAILED
            reason = {
                "domain": "global",
                "reason": "conditionNotMet",
                "location": "ifGenerationMatch",
            }
            message = {"code": 412, "message": _PRECONDITION_FAILED, "errors": [reason]}
            response.json({"error": message})  # what google-api-core reads as PreconditionFailed
            return None
        return insert(request, response, storage, *args, **kwargs)

    return wrapped


def _fixed_download(download):
    """Media downloads from GCS carry the object's generation as headers; the package
    omits them, and google-cloud-storage then *clears* ``blob.generation`` after
    ``download_as_bytes()``: pipeline/models.py's read_current takes its compare-and-swap
    token from there."""

    @functools.wraps(download)
    def wrapped(request, response, storage, *args, **kwargs):
        result = download(request, response, storage, *args, **kwargs)
        if response.status in (200, 206):
            bucket, name = request.params["bucket_name"], request.params["object_id"]
            obj = storage.objects.get(bucket, {}).get(name)
            if obj is not None:
                response["X-Goog-Generation"] = str(obj["generation"])
                response["X-Goog-Metageneration"] = str(obj.get("metageneration") or 1)
        return result

    return wrapped


def install_fixes() -> None:
    """The two fixed handlers, in the routing table and as module attributes (the router's
    fallback for uploads posted without the /upload prefix looks up objects.insert)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    replacements = {
        objects.insert: _fixed_insert(objects.insert),
        objects.download: _fixed_download(objects.download),
    }
    for original, fixed in replacements.items():
        setattr(objects, original.__name__, fixed)
    server.HANDLERS = tuple(
        (regex, {method: replacements.get(fn, fn) for method, fn in methods.items()})
        for regex, methods in server.HANDLERS
    )


# --------------------------------------------------------------------------- #
# Server half: the HTTPS proxy that TensorFlow's libcurl uses                  #
# --------------------------------------------------------------------------- #

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}


class _ForwardHandler(http.server.BaseHTTPRequestHandler):
    """Serves HTTP requests arriving inside a terminated TLS tunnel by forwarding
    them to the emulator. HTTP/1.1 so keep-alive and ``Expect: 100-continue`` work."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def __init__(self, *args, tunnel_host: str, emulator: tuple[str, int], **kwargs):
        self.tunnel_host = tunnel_host
        self.emulator = emulator
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        log.info("tls %s %s", self.tunnel_host, format % args)

    def _read_body(self) -> bytes | None:
        # Chunked wins over Content-Length (RFC 9112 6.3). TensorFlow's uploads send
        # both: its own "Content-Length" header and curl's chunked encoding.
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        return None

    def _forward(self):
        body = self._read_body()
        log.debug("forward %s %s %s", self.command, self.path, dict(self.headers.items()))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        # The emulator builds the links it stores with objects (mediaLink) from Host: its
        # own address, so clients that talk to it directly can follow them too.
        base = "http://{}:{}".format(*self.emulator)
        headers["Host"] = base[len("http://") :]
        if body is not None or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body or b""))
        conn = http.client.HTTPConnection(*self.emulator, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
        except (OSError, http.client.HTTPException) as err:
            # The emulator dropped the connection (a handler crashed): answer
            # instead of leaving the client with an empty reply.
            log.error("emulator failed on %s %s: %r", self.command, self.path, err)
            message = f"gcs_emulator: the emulator failed on this request ({err!r})"
            payload = json.dumps({"error": {"code": 502, "message": message}}).encode()
            status, reason = 502, "Bad Gateway"
            resp_headers = [("Content-Type", "application/json")]
        finally:
            conn.close()
        self.send_response(status, reason)
        for key, value in resp_headers:
            if key.lower() in _HOP_BY_HOP:
                continue
            if key.lower() == "location":
                # Resumable-session URLs: TensorFlow must come back through the proxy.
                value = value.replace(base, f"https://{self.tunnel_host}")
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        log.info("proxy %s", format % args)

    def do_CONNECT(self):
        host, _, port = self.path.rpartition(":")
        if host not in INTERCEPTED_HOSTS or port != "443":
            log.warning("refused CONNECT %s (only %s are emulated)", self.path, INTERCEPTED_HOSTS)
            self.send_error(403, f"gcs_emulator proxy: no network access to {self.path}")
            self.close_connection = True
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        try:
            tls = self.server.tls_context.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as err:
            log.warning("TLS handshake for %s failed: %s", host, err)
            return
        try:
            _ForwardHandler(
                tls,
                self.client_address,
                self.server,
                tunnel_host=host,
                emulator=self.server.emulator,
            )
        except (ssl.SSLError, OSError) as err:
            log.info("tunnel to %s closed: %s", host, err)
        finally:
            tls.close()

    def _refuse(self):
        log.warning("refused plain proxy request %s %s", self.command, self.path)
        self.send_error(403, "gcs_emulator proxy: only CONNECT to Google storage hosts")
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _refuse


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, tls_context: ssl.SSLContext, emulator: tuple[str, int]):
        self.tls_context = tls_context
        self.emulator = emulator
        super().__init__(address, _ProxyHandler)


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gcs_emulator.py serve")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True, help="the emulator's (free) port")
    parser.add_argument("--cert", required=True, help="PEM: server certificate chain")
    parser.add_argument("--key", required=True, help="PEM: server private key")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # "[RESPONSE] Content handled as string" on every batch response: noise.
    logging.getLogger("gcp_storage_emulator.server").setLevel(
        logging.INFO if args.verbose else logging.ERROR
    )

    from gcp_storage_emulator.server import create_server

    install_fixes()
    # What `python -m gcp_storage_emulator start --in-memory` runs, on the given port.
    emulator = create_server(args.host, args.port, in_memory=True)
    emulator.start()
    emulator_port = args.port

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    proxy = _ProxyServer((args.host, 0), tls, (args.host, emulator_port))
    threading.Thread(target=proxy.serve_forever, name="proxy", daemon=True).start()

    ready = {"emulator_port": emulator_port, "proxy_port": proxy.server_address[1]}
    sys.stdout.write(_READY + json.dumps(ready) + "\n")
    sys.stdout.flush()
    # Live as long as the parent: it holds our stdin open and never writes to it.
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.buffer.read()
    proxy.shutdown()
    emulator.stop()
    return 0


# --------------------------------------------------------------------------- #
# Client half                                                                 #
# --------------------------------------------------------------------------- #


class EmulatorStartError(RuntimeError):
    pass


def write_tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """Writes a throw-away CA and a server certificate for INTERCEPTED_HOSTS.

    Returns (ca_pem, server_chain_pem, server_key_pem).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sae-pipeline test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, INTERCEPTED_HOSTS[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in INTERCEPTED_HOSTS]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_path, chain_path, key_path = (
        directory / "ca.pem",
        directory / "server-chain.pem",
        directory / "server-key.pem",
    )
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    chain_path.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, chain_path, key_path


class GcsEmulator:
    """Handle on a running emulator child process (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        project: str = DEFAULT_PROJECT,
        verbose: bool = False,
        python: str = sys.executable,
    ):
        self.workdir = Path(workdir)
        self.project = project
        self.verbose = verbose  # log every request to emulator.log
        self.python = python  # interpreter for the child (tests override it)
        self.process: subprocess.Popen | None = None
        self.emulator_port: int | None = None
        self.proxy_port: int | None = None
        self.log_path = self.workdir / "emulator.log"
        self._log_file = None
        self._client = None
        self._timeout = START_TIMEOUT_S

    # -- lifecycle ---------------------------------------------------------- #

    def start(self, timeout: float = START_TIMEOUT_S) -> GcsEmulator:
        """Starts the child and waits until both the emulator and the proxy answer."""
        from tests.helpers import free_port  # the client half only (the child runs as a script)

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca_path, chain, key = write_tls_material(self.workdir)
        self._write_credentials()
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [
            self.python,
            str(Path(__file__).resolve()),
            "serve",
            "--host",
            HOST,
            "--port",
            str(free_port(HOST)),
            "--cert",
            str(chain),
            "--key",
            str(key),
        ] + (["--verbose"] if self.verbose else [])
        # The child must not inherit proxy settings pointing at itself.
        env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in ("https_proxy", "http_proxy", "all_proxy")
        }
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            cwd=self.workdir,
        )
        self._timeout = timeout
        deadline = time.monotonic() + timeout
        try:
            ready = self._read_ready_line(deadline)
            self.emulator_port, self.proxy_port = ready["emulator_port"], ready["proxy_port"]
            self._wait_until_answering(deadline)
        except BaseException:
            self.stop(graceful=False)
            raise
        return self

    def _read_ready_line(self, deadline: float) -> dict:
        assert self.process is not None and self.process.stdout is not None
        buffered = b""
        fd = self.process.stdout.fileno()
        while b"\n" not in buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail("did not report readiness")
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self._fail(f"exited with code {self.process.wait(timeout=5)}")
                buffered += chunk
            elif self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode}")
        line = buffered.split(b"\n", 1)[0].decode("utf-8", "replace")
        if not line.startswith(_READY):
            self._fail(f"printed an unexpected line: {line!r}")
        return json.loads(line[len(_READY) :])

    def _wait_until_answering(self, deadline: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with opener.open(f"{self.endpoint}/", timeout=2) as resp:
                    if resp.read() == b"OK":
                        with socket.create_connection((HOST, self.proxy_port), timeout=2):
                            return
            except OSError as err:
                last_error = err
            time.sleep(0.1)
        self._fail(f"did not answer on {self.endpoint}/ ({last_error})")

    def _fail(self, what: str):
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.log_path.read_text(errors="replace")[-3000:]
        raise EmulatorStartError(
            f"GCS emulator (gcp-storage-emulator, started by {__file__}) {what} "
            f"(timeout {self._timeout:g} s). Is the test extra installed "
            f"(pip install -e '.[test]')?\n--- {self.log_path} (tail) ---\n{tail}"
        )

    def stop(self, graceful: bool = True) -> None:
        """Stops the child: closes its stdin (it exits on EOF), then terminates, then kills."""
        proc, self.process = self.process, None
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin:
                    proc.stdin.close()
            try:
                proc.wait(timeout=3 if graceful else 0.01)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=3)
            if proc.stdout:
                proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- configuration ------------------------------------------------------ #

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.emulator_port}"

    def _write_credentials(self) -> None:
        # Application Default Credentials that google.auth.default() accepts
        # without any network call: an authorized_user whose access token is
        # already present and valid for centuries. It is never refreshed.
        self.gcloud_dir = self.workdir / "gcloud"
        self.gcloud_dir.mkdir(exist_ok=True)
        self.credentials_path = self.workdir / "adc.json"
        self.credentials_path.write_text(
            json.dumps(
                {
                    "type": "authorized_user",
                    "client_id": "gcs-emulator.apps.invalid",
                    "client_secret": "unused",
                    "refresh_token": "unused",
                    "token": FAKE_TOKEN,
                    "expiry": "2999-01-01T00:00:00Z",
                }
            )
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point every client at this emulator."""
        if self.emulator_port is None:
            raise RuntimeError("emulator not started")
        no_proxy = ",".join(
            filter(
                None, [os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), HOST, "localhost"]
            )
        )
        proxy = f"http://{HOST}:{self.proxy_port}"
        return {
            # google-cloud-storage (and so Beam's gcsio): endpoint; anonymous
            # credentials when none are passed in.
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GOOGLE_CLOUD_PROJECT": self.project,
            # google.auth.default() (Beam's auth module calls it, with retries
            # and back-off when it fails): a valid, never-refreshed token.
            "GOOGLE_APPLICATION_CREDENTIALS": str(self.credentials_path),
            "CLOUDSDK_CONFIG": str(self.gcloud_dir),
            # Never probe the GCE metadata server (google-auth, TensorFlow).
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": DEAD_METADATA_HOST,
            "GCE_METADATA_IP": DEAD_METADATA_HOST,
            # TensorFlow's GCS filesystem: fixed token, HTTPS via our proxy.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": FAKE_TOKEN,
            "https_proxy": proxy,
            "HTTPS_PROXY": proxy,
            "no_proxy": no_proxy,
            "NO_PROXY": no_proxy,
            "CURL_CA_BUNDLE": str(self.ca_path),
            # Fail fast instead of TensorFlow's default 10 retries up to 32 s apart.
            "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
            "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
            "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "1000000",
        }

    # -- storage helpers ---------------------------------------------------- #

    def client(self):
        """A google-cloud-storage client bound to this emulator (independent of env)."""
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(
                project=self.project,
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.endpoint},
            )
        return self._client

    def create_bucket(self, name: str) -> str:
        """Creates ``name`` (idempotent) with soft delete off, so deletes free memory."""
        from google.api_core.exceptions import Conflict

        client = self.client()
        try:
            bucket = client.create_bucket(name)
        except Conflict:
            bucket = client.get_bucket(name)
        bucket.soft_delete_policy.retention_duration_seconds = 0
        bucket.patch()
        return name

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Deletes every object under ``prefix`` in ``bucket``; returns how many."""
        client = self.client()
        names = [b.name for b in client.list_blobs(bucket, prefix=prefix)]
        b = client.bucket(bucket)
        for name in names:
            with contextlib.suppress(Exception):
                b.delete_blob(name)
        return len(names)


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Sets ``values`` in os.environ (inherited by child processes), restores on exit."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "serve":
        sys.exit(f"usage: {sys.argv[0]} serve --cert PEM --key PEM [--host H] [-v]")
    sys.exit(_serve(sys.argv[2:]))
