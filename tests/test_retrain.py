"""Scheduled retraining: the gate, compare-and-swap promotion (local and GCS), operators."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipeline import models, retrain
from preprocessing.errors import UserError
from tests.helpers import sae
from tests.races import race_many

GOOD = {"reconstruction": 1.0, "mean_rho_hat": 0.1, "dead_fraction": 0.0, "rho": 0.1}


def test_gate_decisions():
    gate = retrain.Gate()
    assert retrain.decide(GOOD, None, gate) == (True, [])
    assert retrain.decide(GOOD, {**GOOD, "reconstruction": 0.96}, gate)[0]  # within 5%
    ok, reasons = retrain.decide(GOOD, {**GOOD, "reconstruction": 0.9}, gate)
    assert not ok and "worse than the current model's" in reasons[0]
    ok, reasons = retrain.decide({**GOOD, "mean_rho_hat": 0.2, "dead_fraction": 0.5}, None, gate)
    assert not ok and len(reasons) == 2  # the first model still needs the absolute checks


_race_many = race_many  # in its own module: the racing children import no TensorFlow


def test_concurrent_promotions_exactly_one_wins_locally(tmp_path):
    root = str(tmp_path / "models")
    assert sorted(_race_many(root)) == [False, False, False, True]
    winner, token = models.read_current(root)
    assert winner.startswith("v-")
    assert not models.compare_and_swap(root, "stale", "other")
    assert models.compare_and_swap(root, token, "next") and models.read_current(root)[0] == "next"


def test_concurrent_promotions_exactly_one_wins_on_gcs(gcs_prefix):
    root = f"{gcs_prefix}/models"
    assert sorted(_race_many(root)) == [False, False, False, True]
    winner, token = models.read_current(root)
    assert winner.startswith("v-") and isinstance(token, int) and token > 0
    assert not models.compare_and_swap(root, token + 1, "other")
    assert models.compare_and_swap(root, token, "next") and models.read_current(root)[0] == "next"


def test_verdict_round_trips_and_a_broken_one_is_one_clear_error(tmp_path):
    v = models.Verdict(
        version="v1", promoted=False, reasons=("worse than the current model",),
        compared_with="v0", candidate=dict(GOOD), current=None, gate={"rho_tolerance": 0.3},
        eval_data="d", data="d", decided_at=models.utc_now(),
    )  # fmt: skip
    (tmp_path / models.VERDICT).write_text(json.dumps(v.to_dict()))
    assert models.read_verdict(str(tmp_path)) == v
    assert models.read_verdict(str(tmp_path / "running")) is None
    broken = {k: val for k, val in v.to_dict().items() if k != "candidate"}
    (tmp_path / models.VERDICT).write_text(json.dumps(broken))
    with pytest.raises(UserError, match="verdict.json is not a sae-pipeline verdict"):
        models.read_verdict(str(tmp_path))


def _sae(*args: str) -> subprocess.CompletedProcess:
    return sae(*args, timeout=600)


def _retrain(data: str, root: str, *sets: str) -> models.Verdict:
    args = ["retrain", "--data", data, "--models-root", root, "--preset", "digits"]
    for s in sets:
        args += ["--set", s]
    r = _sae(*args, *["--set", "checkpoint_every_steps=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    version = next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("retrain: 2"))
    return models.read_verdict(f"{root}/versions/{version}")


def _scenario(digits: str, root: str) -> None:
    """First model promoted; a worse candidate never; extract follows CURRENT."""
    first = _retrain(digits, root, "epochs=3")
    assert first.promoted and first.current is None
    assert models.read_current(root)[0] == first.version
    worse = _retrain(digits, root, "epochs=1", "steps_per_epoch=3")
    assert not worse.promoted and worse.compared_with == first.version
    assert worse.candidate["reconstruction"] > worse.current["reconstruction"]
    assert any("worse than the current model" in r for r in worse.reasons)
    assert models.read_current(root)[0] == first.version  # unchanged
    export, version = models.resolve(root)
    assert version == first.version and export.endswith(f"{version}/export")


@pytest.mark.slow
def test_retrain_local_promotes_good_never_worse_warm_starts_and_operators(digits, tmp_path):
    root = str(tmp_path / "models")
    _scenario(digits, root)
    first = models.read_current(root)[0]
    first_verdict = models.read_verdict(f"{root}/versions/{first}")
    # --warm-start: 3 steps from scratch are far worse (see _scenario); from the current
    # model's weights they are not.
    r = _sae(
        "retrain", "--data", digits, "--models-root", root, "--preset", "digits",
        "--set", "epochs=1", "--set", "steps_per_epoch=3", "--warm-start",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warm start from {root}/versions/{first}/checkpoints/" in r.stdout, r.stdout
    version = next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("retrain: 2"))
    warm = models.read_verdict(f"{root}/versions/{version}")
    assert warm.candidate["reconstruction"] < 1.5 * first_verdict.candidate["reconstruction"]
    listed = _sae("models", "list", "--models-root", root)
    assert listed.returncode == 0 and listed.stdout.count("\n") == 3
    current_line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("*"))
    assert (warm.version if warm.promoted else first) in current_line
    # Operators: promote the rejected one by hand, then roll back.
    rejected = next(v.name for v in models.versions(root) if not v.verdict.promoted)
    assert _sae("models", "promote", "--models-root", root, rejected).returncode == 0
    assert models.read_current(root)[0] == rejected
    r = _sae("models", "rollback", "--models-root", root, "--to", first)
    assert r.returncode == 0 and models.read_current(root)[0] == first
    r = _sae("models", "promote", "--models-root", root, "no-such-version")
    assert r.returncode == 2 and "has no export" in r.stderr


@pytest.mark.slow
def test_retrain_on_gcs(digits, gcs_prefix):
    _scenario(digits, f"{gcs_prefix}/models")


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError, match="no model at"):
        models.resolve(str(tmp_path))
    (tmp_path / models.CURRENT).write_text(json.dumps({"version": "v1"}))
    with pytest.raises(UserError, match="names version 'v1'"):
        models.resolve(str(tmp_path))
    with pytest.raises(UserError, match="no earlier promoted version"):
        models.rollback(str(tmp_path))
