"""`sae run`: the whole pipeline, its report, and resuming a finished or interrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_report import parse


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_whole_pipeline_report_and_resume(tmp_path):
    workdir = tmp_path / "run"
    r = _run(
        "--workdir",
        str(workdir),
        "--set",
        "epochs=2",
        "--set",
        "steps_per_epoch=50",
        "--direct_running_mode=in_memory",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((workdir / "data" / "manifest.json").read_text())
    feats = json.loads((workdir / "features" / "manifest.json").read_text())
    metrics = json.loads((workdir / "train" / "metrics.json").read_text())
    probe = json.loads((workdir / "features" / "probe.json").read_text())
    n = data["splits"]["train"]["num_examples"] + data["splits"]["eval"]["num_examples"]
    assert data["num_inputs"] == n == feats["num_written"] == 1797
    assert metrics["step"] == 100
    assert set(probe["eval_accuracy"]) == {"sparse_features", "raw_pixels", "pca"}
    html = (workdir / "report.html").read_text()
    # Valid and self-contained: pictures inline, no external references.
    doc = parse(html)
    assert all(a["src"].startswith("data:image/png;base64,") for _, a, _ in doc.tags if "src" in a)
    assert 'src="http' not in html and "href=" not in html
    # Dashboards: 16 units, each with its filter and its 8 top eval images.
    cls = [a.get("class") for t, a, _ in doc.tags if t in ("tr", "img")]
    assert (cls.count("unit"), cls.count("filter"), cls.count("top-input")) == (16, 16, 16 * 8)
    # Curves of the four cost terms (train batches, train epochs, eval), the probe's 3 bars.
    assert sum(t == "polyline" for t, _, _ in doc.tags) == 4 * 3
    assert "linear probe: eval accuracy" in html and "raw pixels (64)" in html
    assert f"{metrics['mean_rho_hat']:.4g}" in html
    assert "run: wrote" in r.stdout and "eval accuracy" in r.stdout
    # Rerun: every stage is skipped, the report is rewritten.
    (workdir / "report.html").unlink()
    r = _run("--workdir", str(workdir), "--set", "epochs=2", "--set", "steps_per_epoch=50")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done already") == 4 and (workdir / "report.html").exists()


def test_interrupted_stage_is_redone(tmp_path):
    """A stage folder without its manifest (a killed run) is redone, not refused."""
    workdir = tmp_path / "run"
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "train-00000-of-00001.tfrecord").write_bytes(b"partial")
    r = _run(
        "--workdir",
        str(workdir),
        "--input",
        "builtin:faces",
        "--set",
        "input_shape=25,25,1",
        "--set",
        "epochs=1",
        "--set",
        "steps_per_epoch=5",
        "--set",
        "global_batch_size=32",
        "--direct_running_mode=in_memory",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((workdir / "data" / "manifest.json").read_text())["num_inputs"] == 200
    assert (workdir / "report.html").exists()
    # The Beam option reached both Beam stages (extract's default is multi_processing).
    for job in ("preprocess", "extract"):
        (first,) = [
            ln for ln in r.stdout.splitlines() if ln.startswith(f"{job}: ") and "runner" in ln
        ]
        assert "runner FnApiRunner (in_memory)" in first, first


@pytest.mark.slow
def test_a_patch_model_is_extracted_pooled(tmp_path):
    workdir = tmp_path / "run"
    sets = ["input_shape=4,4,1", "patch_size=4", "hidden=6", "epochs=1", "steps_per_epoch=5"]
    sets.append("patches_per_image=4")  # the tiny preset's 32 windows: 8 digits per step
    r = _run(
        "--workdir", str(workdir), "--pool", "2x2", "--direct_running_mode=in_memory",
        *[x for s in sets for x in ("--set", s)],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((workdir / "train" / "metrics.json").read_text())
    eval_images = json.loads((workdir / "data" / "manifest.json").read_text())["splits"]["eval"]
    assert metrics["eval_examples"] == 4 * eval_images["num_examples"]  # 4 windows of each
    feats = json.loads((workdir / "features" / "manifest.json").read_text())
    assert feats["pooling"] == {"grid": 2, "op": "mean", "stride": 1} and feats["dim"] == 24
    assert feats["num_written"] == 1797 and feats["sparsify"] == "none"
    assert (workdir / "features" / "probe.json").exists() and (workdir / "report.html").exists()
