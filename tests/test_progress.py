"""Progress lines of the Beam jobs: counts reported by the workers reach the launcher."""

from __future__ import annotations

import multiprocessing
import re

import numpy as np
import pytest

from preprocessing import job, jobkit, progress
from tests.collections import image_bytes

LINE = re.compile(r"^preprocess: (\d+)/(\d+|\?) images( \(\d+%\))?, \d+ images/s(, ETA \d+ s)?$")


def test_line_says_done_total_rate_and_eta():
    assert progress.line("preprocess", "images", 500, 2000, 10.0) == (
        "preprocess: 500/2000 images (25%), 50 images/s, ETA 30 s"
    )
    # Before the listing is counted there is no total, so no share and no ETA.
    assert progress.line("extract", "rows", 0, None, 3.0) == "extract: 0/? rows, 0 rows/s"


def _add_in_child(folder: str, n: int) -> None:
    reporter = progress.Reporter(folder)
    for _ in range(n):
        reporter.add(10)


def test_counts_of_several_processes_add_up(tmp_path):
    reporter = progress.Reporter(str(tmp_path))
    assert reporter.set_total(70) == 70
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_add_in_child, args=(str(tmp_path), k)) for k in (2, 4)]
    for c in children:
        c.start()
    for c in children:
        c.join(timeout=60)
        assert c.exitcode == 0
    reporter.add(1)
    assert progress.read(str(tmp_path)) == (61, 70)


def test_a_reporter_without_a_folder_does_nothing(tmp_path):
    r = progress.Reporter(None)
    r.add(5)
    assert r.set_total(3) == 3


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for i in range(600):
        path = src / f"c{i % 3}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(rng.integers(0, 255, (20, 20, 3), np.uint8), "PNG"))
    return src


@pytest.mark.parametrize("quiet", [False, True])
def test_a_local_job_prints_progress_from_its_workers_unless_quiet(
    photos, tmp_path, monkeypatch, capsys, quiet
):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.2)
    args = ["--input", str(photos), "--output", str(tmp_path / "out"), "--resize", "16x16"]
    # Two worker processes: their counts come through the folder, not this process.
    args += ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    m = job.run(args + ["--quiet"] * quiet)
    assert m["num_inputs"] == 600
    lines = [ln for ln in capsys.readouterr().out.splitlines() if LINE.match(ln)]
    if quiet:
        assert lines == []
        return
    counts = [(int(a), b) for a, b in (LINE.match(ln).group(1, 2) for ln in lines)]
    assert counts, "no progress line in a run of several seconds"
    done = [d for d, _ in counts]
    assert done == sorted(done) and all(d <= 600 for d in done)
    assert {t for _, t in counts} <= {"600", "?"} and counts[-1][1] == "600"
    assert max(done) > 0


def test_a_remote_job_prints_its_id_and_dataflow_its_console_page(capsys):
    class Result:  # what DataflowRunner's result offers (DataflowPipelineResult.job_id)
        def job_id(self):
            return "2026-12-01_07_00_00-123"

    flags = ["--runner=DataflowRunner", "--project=p", "--region=us-central1"]
    jobkit.print_job("preprocess", jobkit.PipelineOptions(flags), Result())
    jobkit.print_job("extract", jobkit.PipelineOptions(["--runner=FlinkRunner"]), Result())
    jobkit.print_job("extract", jobkit.PipelineOptions([]), object())  # no id: nothing
    assert capsys.readouterr().out.splitlines() == [
        "preprocess: submitted job 2026-12-01_07_00_00-123: https://console.cloud.google.com"
        "/dataflow/jobs/us-central1/2026-12-01_07_00_00-123?project=p",
        "extract: submitted job 2026-12-01_07_00_00-123",
    ]
