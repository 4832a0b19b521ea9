"""Where models live: a trainer export, or a models root with a CURRENT pointer.

    EXPORT/saved_model.pb                  a `sae train` export (WORKDIR/export)
    ROOT/versions/<version>/               a `sae retrain` run dir (config, checkpoints, export/,
                                           metrics.json, verdict.json)
    ROOT/CURRENT                           {"version": "<version>"}: the promoted model

A version is complete before anything points at it, so readers (who go through
CURRENT) never see a half-written model. CURRENT changes only by compare-and-swap:
on GCS a write conditioned on the object's generation (through the Cloud Storage client:
Beam's FileSystems, preprocessing/storage.py's backend, has no conditional write), locally
an atomic rename under an exclusive lock. Two concurrent promotions that both read the same CURRENT
cannot both win: the loser gets `False` and must re-evaluate against the winner.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from preprocessing import storage
from preprocessing.errors import ArgumentParser, UserError
from preprocessing.storage import join
from trainer import artifacts

CURRENT = "CURRENT"
VERDICT = "verdict.json"
ROLLED_BACK = "rolled_back.json"


def new_version() -> str:
    """Sortable and unique: UTC time plus random bits."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def resolve(uri: str) -> tuple[str, str | None]:
    """(export dir, version or None) for a model URI; raises UserError if there is none."""
    uri = uri.rstrip("/")
    if storage.exists(join(uri, "saved_model.pb")):
        return uri, None
    version, _ = read_current(uri)
    if version is not None:
        export = join(uri, "versions", version, "export")
        if not storage.exists(join(export, "saved_model.pb")):
            raise UserError(
                f"{join(uri, CURRENT)} names version {version!r} but {export} has no model"
            )
        return export, version
    raise UserError(
        f"no model at {uri}: expected a `sae train` export (WORKDIR/export with "
        "saved_model.pb) or a models root with a CURRENT file (see `sae models list`)"
    )


# ----------------------------------------------------------------------------
# The CURRENT pointer: read with a token, compare-and-swap.
# ----------------------------------------------------------------------------
def _split_gcs(uri: str) -> tuple[str, str]:
    bucket, _, name = uri[len("gs://") :].partition("/")
    return bucket, name


def _gcs_blob(uri: str):
    from google.cloud import storage

    bucket, name = _split_gcs(uri)
    return storage.Client().bucket(bucket).blob(name)


def read_current(root: str) -> tuple[str | None, int | str]:
    """(promoted version or None, token for compare_and_swap)."""
    path = join(root.rstrip("/"), CURRENT)
    if path.startswith("gs://"):
        from google.api_core.exceptions import NotFound

        blob = _gcs_blob(path)
        try:
            data = blob.download_as_bytes()
        except NotFound:
            return None, 0
        return json.loads(data)["version"], blob.generation
    if not os.path.exists(path):
        return None, ""
    with open(path) as f:
        text = f.read()
    return json.loads(text)["version"], text


@contextlib.contextmanager
def _local_lock(root: str) -> Iterator[None]:
    import fcntl

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel even if we die
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compare_and_swap(root: str, token: int | str, version: str) -> bool:
    """Points CURRENT at `version` iff it is unchanged since the read that gave `token`."""
    root = root.rstrip("/")
    path = join(root, CURRENT)
    data = json.dumps({"version": version}) + "\n"
    if path.startswith("gs://"):
        from google.api_core.exceptions import PreconditionFailed

        try:
            _gcs_blob(path).upload_from_string(data, if_generation_match=token)
        except PreconditionFailed:
            return False
        return True
    with _local_lock(root):
        if read_current(root)[1] != token:
            return False
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: readers see the old pointer or the new one
    return True


# ----------------------------------------------------------------------------
# Versions.
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """verdict.json: what `sae retrain`'s gate decided for one version, and why.

    candidate / current: the gate metrics (`retrain.evaluate_export`) of the new model and
    of the model it was compared with (None for the first model); gate: the thresholds."""

    version: str
    promoted: bool
    reasons: tuple[str, ...]
    compared_with: str | None
    candidate: dict[str, float]
    current: dict[str, float] | None
    gate: dict[str, float]
    eval_data: str
    data: str
    decided_at: str  # UTC, ISO 8601

    def to_dict(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: dict, where: str = VERDICT) -> Verdict:
        try:
            return cls(**{**d, "reasons": tuple(d["reasons"])})
        except (KeyError, TypeError) as e:
            raise UserError(
                f"{where} is not a sae-pipeline verdict ({type(e).__name__}: {e}); "
                "rerun `sae retrain`, or delete that version folder"
            ) from None


def read_verdict(version_dir: str) -> Verdict | None:
    """A version's verdict, or None while its retrain runs (or if it died before deciding)."""
    path = join(version_dir, VERDICT)
    d = storage.read_json_if_exists(path)
    return None if d is None else Verdict.from_dict(d, path)


@dataclass(frozen=True)
class Version:
    name: str
    verdict: Verdict | None  # None while its retrain is running (or if it died)
    rolled_back: bool


def versions(root: str) -> list[Version]:
    """All versions under ROOT/versions (each starts with its config.json), oldest first."""
    base = join(root.rstrip("/"), "versions")
    configs = storage.glob(join(base, "*", artifacts.CONFIG))
    names = sorted(path[len(base) + 1 :].split("/")[0] for path in configs)
    return [
        Version(
            n,
            read_verdict(join(base, n)),
            storage.exists(join(base, n, ROLLED_BACK)),
        )
        for n in names
    ]


def has_export(root: str, version: str) -> bool:
    return storage.exists(join(root.rstrip("/"), "versions", version, "export", "saved_model.pb"))


def promote(root: str, version: str, reason: str) -> None:
    """Operator promotion of an existing version (no gate), by compare-and-swap."""
    if not has_export(root, version):
        raise UserError(
            f"version {version!r} has no export under {root}/versions; see `sae models list`"
        )
    current, token = read_current(root)
    if not compare_and_swap(root, token, version):
        raise UserError(
            f"CURRENT of {root} changed while promoting; check `sae models list` and retry",
            exit_code=1,
        )
    print(f"models: CURRENT {current} -> {version} ({reason})")


def rollback(root: str, to: str | None = None) -> str:
    """Points CURRENT back to `to`, or to the latest promoted version before the current one."""
    current, token = read_current(root)
    if current is None:
        raise UserError(f"{root} has no CURRENT model to roll back")
    if to is None:
        earlier = [
            v.name for v in versions(root)
            if v.name < current and not v.rolled_back and v.verdict
            and v.verdict.promoted and has_export(root, v.name)
        ]  # fmt: skip
        if not earlier:
            raise UserError(
                f"no earlier promoted version than {current} to roll back to; name one with --to"
            )
        to = earlier[-1]
    if not has_export(root, to):
        raise UserError(f"version {to!r} has no export under {root}/versions")
    if not compare_and_swap(root, token, to):
        raise UserError(f"CURRENT of {root} changed during the rollback; retry", exit_code=1)
    storage.publish_json(
        join(root.rstrip("/"), "versions", current, ROLLED_BACK),
        {"rolled_back_to": to, "at": utc_now()},
    )
    print(f"models: rolled back CURRENT {current} -> {to}")
    return to


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------
# `sae models list|promote|rollback`.
# ----------------------------------------------------------------------------
def make_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="sae models", description="Operate a models root: list versions, promote, roll back."
    )
    sub = p.add_subparsers(dest="action", required=True)
    for name, help_ in (
        ("list", "versions with their verdicts; * marks CURRENT"),
        ("promote", "point CURRENT at VERSION (no gate)"),
        ("rollback", "point CURRENT back at the previous promoted version"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--models-root", required=True, help="local path or gs:// URI")
        if name == "promote":
            s.add_argument("version", help="a version name from `sae models list`")
        if name == "rollback":
            s.add_argument("--to", help="roll back to this version instead")
    return p


def run(argv: Sequence[str] | None = None) -> list[Version] | str | None:
    args = make_parser().parse_args(argv)
    root = args.models_root
    changes = args.action in ("promote", "rollback")
    storage.check_access(**{"writes" if changes else "reads": [("--models-root", root)]})
    if args.action == "promote":
        promote(root, args.version, "operator")
        return args.version
    if args.action == "rollback":
        return rollback(root, args.to)
    current, _ = read_current(root)
    listed = versions(root)
    for v in listed:
        verdict = v.verdict
        state = (
            "rolled back"
            if v.rolled_back
            else "incomplete"
            if verdict is None
            else "promoted"
            if verdict.promoted
            else "rejected"
        )
        reasons = "; ".join(verdict.reasons) if verdict else ""
        recon = verdict.candidate.get("reconstruction") if verdict else None
        print(
            f"{'*' if v.name == current else ' '} {v.name}  {state:<11}"
            + (f"  reconstruction {recon:.4g}" if recon is not None else "")
            + (f"  {reasons}" if reasons else "")
        )
    if not listed:
        print(f"models: no versions under {root}")
    return listed
