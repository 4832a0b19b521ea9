"""Throughput and peak memory of `sae preprocess` against a plain Python loop, on small files.

    .venv/bin/python benchmarks/preprocess_bench.py                     # full: 50k + 200k files
    .venv/bin/python benchmarks/preprocess_bench.py --images 2000           # smoke, ~1.5 min
    .venv/bin/python benchmarks/preprocess_bench.py --workdir /tmp/pb --out pb.json  # reuses files

What it does, in one run:
1. Writes a collection of N 28x28 grey images (default N = 50,000), half PNG and half JPEG, in
   class folders 0..9, derived from scikit-learn's digits (8x8 upsampled, randomly shifted, with
   noise, so files differ), plus a collection of 4N for the memory comparison (`--sizes 1,4`).
   A collection already in --workdir is reused.
2. On the same 1x files, times three contenders, each a subprocess, wall time including
   interpreter and TensorFlow start-up; images/s = files / seconds:
     sae_1w       sae preprocess --input DIR --output OUT --resize 28x28 --channels 1 --overwrite
                      --direct_running_mode=multi_processing --direct_num_workers=1
     sae_2w       the same with --direct_num_workers=2
     plain_loop   this script's hidden --plain-loop mode: one process, sorted os.walk, Pillow
                  open + convert('L') (+ resize if needed), preprocessing.records.encode (the same
                  tf.train.Example as the job), one tf.io.TFRecordWriter file.
   At every other size (4x by default) it runs sae_2w and plain_loop again.
3. Peak memory: every 0.2 s, the sum of RSS over the subprocess and all its descendants (for
   sae that is the runner plus Beam's worker processes); the maximum is `peak_rss_mb`. Summed RSS
   counts shared library pages once per process, so it overstates the tree's real footprint
   by a roughly constant amount; the 4x/1x ratio is what the target is about.

Output: progress on stderr, one JSON object on stdout (and in --out FILE if given):
  runs["sae_2w@1x"] = {images, seconds, images_per_s, cpu_seconds, background_cores,
                       peak_rss_mb, peak_rss_main_mb, peak_processes, process_names,
                       examples, errors, all_processed, command}
  speedup_2w_vs_plain      images/s of sae_2w@1x / images/s of plain_loop@1x   (target >= 1.3)
  memory_ratio_4x_vs_1x    peak_rss_mb of sae_2w@4x / sae_2w@1x               (target <= 1.2)
  targets                  the two thresholds with pass booleans (null if not measured)
`all_processed` is true when the job's manifest accounts for every file as an example and
reports no errors. `cpu_seconds` is the whole tree's CPU time; `peak_rss_main_mb` is the `sae`
process alone (the runner, which holds the data between stages). Numbers are one measurement
each: trust them only when `background_cores` (CPU used by other work meanwhile) is near 0.
Beam's DirectRunner first tries the Prism runner, downloading its binary from GitHub; offline
it falls back to the in-process FnApiRunner that --direct_num_workers controls. A "prism"
entry in `process_names` means Prism ran and the worker counts above may not be what ran.

Run time of the full default run on 2 cores: about 5-10 min (extrapolated, not yet measured at
full size), well inside the issue's 25 min, so its sizes are kept. Smoke runs of 20-16,000 files
on a 2-core machine with ~1 core taken by other work cost, in wall time, about 17 s + 0.6 ms/file
for sae_2w, 10 s + 0.8 ms/file for sae_1w and 5 s + 0.11 ms/file for the plain loop, so: writing
the 250k files 1-4 min (once; reused with --workdir), then at 1x about 0.8 + 0.8 + 0.2 min and at
4x about 2.1 + 0.5 min. The `sae` process grew by 14-20 KB per file in those runs, so expect a
few GB of RSS at 200k files (the machine needs ~8 GB free).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

SIDE = 28
GENERATOR_VERSION = 1  # bump when the generated files change, so old collections are rebuilt
SAMPLE_SECONDS = 0.2
TARGET_SPEEDUP = 1.3
TARGET_MEMORY_RATIO = 1.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# The collection: N small PNG/JPEG files in class folders.
# ----------------------------------------------------------------------------
_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8), d.target


def _write_images(indices: range, root: str) -> int:
    """Writes files `indices` of a collection; file i depends only on i."""
    from PIL import Image

    global _DIGITS
    if _DIGITS is None:
        _DIGITS = _load_digits()
    digits, targets = _DIGITS
    for i in indices:
        rng = np.random.default_rng(i)
        j = i % len(digits)
        small = Image.fromarray(digits[j]).resize((22, 22), Image.Resampling.BILINEAR)
        canvas = np.zeros((SIDE, SIDE), np.float32)
        dy, dx = rng.integers(0, SIDE - 22 + 1, 2)
        canvas[dy : dy + 22, dx : dx + 22] = np.asarray(small)
        canvas += rng.normal(0.0, 8.0, canvas.shape)
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        ext, fmt = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
        img.save(os.path.join(root, str(targets[j]), f"{i:07d}.{ext}"), format=fmt)
    return len(indices)


def make_collection(workdir: Path, n: int) -> tuple[Path, float | None]:
    """workdir/images-N with N files; reused if complete. Returns (dir, seconds or None)."""
    root = workdir / f"images-{n}"
    # The marker lives beside the collection, not in it: the job reads every file under DIR.
    marker = workdir / f"images-{n}.json"
    want = {"count": n, "generator_version": GENERATOR_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        log(f"reusing {n} files in {root}")
        return root, None
    log(f"writing {n} files to {root}")
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
    chunk = 2000
    chunks = [range(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        written = sum(pool.starmap(_write_images, [(c, str(root)) for c in chunks]))
    assert written == n, (written, n)
    marker.write_text(json.dumps(want))
    seconds = time.perf_counter() - t0
    log(f"wrote {n} files in {seconds:.1f} s")
    return root, round(seconds, 2)


# ----------------------------------------------------------------------------
# The plain loop (hidden --plain-loop mode, run as a subprocess).
# ----------------------------------------------------------------------------
def plain_loop(input_dir: str, output: str) -> dict:
    """What a user would write: one process, one TFRecord file, the job's Example schema."""
    import tensorflow as tf
    from PIL import Image

    from preprocessing import records

    n = 0
    with tf.io.TFRecordWriter(output) as writer:
        for dirpath, dirnames, filenames in os.walk(input_dir):
            dirnames.sort()
            rel = os.path.relpath(dirpath, input_dir)
            label = None if rel == "." else int(rel.split(os.sep)[0])
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                with Image.open(path) as img:
                    grey = img.convert("L")
                if grey.size != (SIDE, SIDE):
                    grey = grey.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
                arr = np.asarray(grey)[:, :, None]
                writer.write(records.encode(path, arr, label))
                n += 1
    return {"examples": n}


# ----------------------------------------------------------------------------
# Measuring one subprocess: wall time and peak RSS of its process tree.
# ----------------------------------------------------------------------------
def _tree_rss(proc) -> list[tuple[int, str, int]]:
    """[(pid, name, RSS in bytes)] of proc and all its descendants that are still alive."""
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out.append((p.pid, p.name(), p.memory_info().rss))
    return out


def _busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU seconds since boot, summed over cores."""
    import psutil

    t = psutil.cpu_times()
    return (
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "guest", 0.0)
        - getattr(t, "guest_nice", 0.0)
    )


def measure(cmd: list[str], logdir: Path, name: str) -> dict:
    """Runs cmd; returns wall seconds (start-up included), peak tree RSS and its stdout."""
    import psutil

    out_path, err_path = logdir / f"{name}.stdout", logdir / f"{name}.stderr"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    cpu0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_cpu_seconds()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        ps = psutil.Process(proc.pid)
        peak = peak_main = peak_procs = 0
        names: set[str] = set()
        while True:
            tree = _tree_rss(ps)
            peak = max(peak, sum(rss for _, _, rss in tree))
            peak_main = max([peak_main] + [rss for pid, _, rss in tree if pid == proc.pid])
            peak_procs = max(peak_procs, len(tree))
            names.update(name for _, name, _ in tree)
            try:
                proc.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
        seconds = time.perf_counter() - t0
    cpu1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_cpu_seconds()
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    if proc.returncode != 0:
        tail = err_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return {
        "seconds": round(seconds, 2),
        # User + system CPU of every process in the tree that was waited for (all of them,
        # when the job shuts its workers down properly).
        "cpu_seconds": round(cpu, 2),
        # Cores kept busy by everything else on the machine meanwhile (steal time included):
        # near 0 for a clean measurement; on a shared machine it explains slow runs.
        "background_cores": round(max(0.0, busy1 - busy0 - cpu) / seconds, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_rss_main_mb": round(peak_main / 2**20, 1),
        "peak_processes": peak_procs,
        "process_names": sorted(names),
        "stdout": out_path.read_text(),
    }


def run_sae(sae: str, input_dir: Path, n: int, workers: int, workdir: Path, name: str) -> dict:
    out = workdir / "out" / name
    # Emptied here, untimed: otherwise --overwrite's deletion would count against the job.
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sae,
        "preprocess",
        "--input",
        str(input_dir),
        "--output",
        str(out),
        "--resize",
        f"{SIDE}x{SIDE}",
        "--channels",
        "1",
        "--overwrite",
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={workers}",
    ]
    log(f"{name}: {n} files ...")
    m = measure(cmd, workdir / "logs", name)
    manifest = json.loads((out / "manifest.json").read_text())
    examples = sum(s["num_examples"] for s in manifest["splits"].values())
    shutil.rmtree(out, ignore_errors=True)
    return _result(n, m, cmd, examples, manifest["num_errors"], manifest["num_inputs"])


def run_plain(input_dir: Path, n: int, workdir: Path, name: str) -> dict:
    out = workdir / "out" / f"{name}.tfrecord"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--plain-loop",
        "--plain-input",
        str(input_dir),
        "--plain-output",
        str(out),
    ]
    log(f"{name}: {n} files ...")
    m = measure(cmd, workdir / "logs", name)
    examples = json.loads(m["stdout"].strip().splitlines()[-1])["examples"]
    out.unlink(missing_ok=True)
    return _result(n, m, cmd, examples, 0, examples)


def _result(n: int, m: dict, cmd: list[str], examples: int, errors: int, inputs: int) -> dict:
    r = {
        "images": n,
        "seconds": m["seconds"],
        "images_per_s": round(n / m["seconds"], 1),
        "cpu_seconds": m["cpu_seconds"],
        "background_cores": m["background_cores"],
        "peak_rss_mb": m["peak_rss_mb"],
        "peak_rss_main_mb": m["peak_rss_main_mb"],
        "peak_processes": m["peak_processes"],
        "process_names": m["process_names"],
        "examples": examples,
        "errors": errors,
        "all_processed": inputs == n and examples == n and errors == 0,
        "command": " ".join(cmd),
    }
    log(
        f"  {r['seconds']} s ({r['cpu_seconds']} CPU-s), {r['images_per_s']} images/s, peak "
        f"{r['peak_rss_mb']} MB over {r['peak_processes']} processes (main "
        f"{r['peak_rss_main_mb']} MB), {examples} examples, {errors} errors; other work on "
        f"the machine kept {r['background_cores']} cores busy"
    )
    return r


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    import psutil

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "apache_beam": _version("apache-beam"),
        "pillow": _version("pillow"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected multipliers like 1,4, got {text!r}") from None
    if not sizes or sizes[0] != 1:
        raise argparse.ArgumentTypeError(f"multipliers must include 1 and be >= 1, got {text!r}")
    return sizes


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Images/s and peak memory of `sae preprocess` (DirectRunner, 1 and 2 "
        "workers) vs a plain single-process loop, on small PNG/JPEG files. JSON on stdout.",
    )
    p.add_argument("--images", type=int, default=50_000, help="files at size 1x (default: 50000)")
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=[1, 4],
        help="collection size multipliers for the memory comparison (default: 1,4)",
    )
    p.add_argument("--skip-4x", action="store_true", help="quick run: same as --sizes 1")
    p.add_argument(
        "--workdir",
        help="where collections, outputs and logs go; collections there are reused "
        "(default: a temporary folder, deleted afterwards unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--out", help="also write the JSON to this file")
    # Hidden: the plain-loop contender, run by this script as a subprocess.
    p.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain-input", help=argparse.SUPPRESS)
    p.add_argument("--plain-output", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.plain_loop:
        print(json.dumps(plain_loop(args.plain_input, args.plain_output)), flush=True)
        return 0
    if args.images < 1:
        raise SystemExit("--images must be >= 1")
    sizes = [1] if args.skip_4x else args.sizes
    sae = shutil.which("sae", path=os.path.dirname(sys.executable)) or shutil.which("sae")
    if sae is None:
        raise SystemExit("cannot find the `sae` command; install the package (make setup)")

    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="preprocess_bench-")).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}")
    t_start = time.perf_counter()
    report: dict = {
        "benchmark": "preprocess",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine_info(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "images_1x": args.images,
        "sizes": sizes,
        "image": f"{SIDE}x{SIDE} grey, half PNG half JPEG, 10 class folders",
        "generate_seconds": {},
        "runs": {},
    }
    try:
        collections = {}
        for k in sizes:
            n = k * args.images
            collections[k], secs = make_collection(workdir, n)
            report["generate_seconds"][f"{k}x"] = secs  # null: reused from --workdir
        runs = report["runs"]
        one = collections[1]
        runs["plain_loop@1x"] = run_plain(one, args.images, workdir, "plain_loop@1x")
        runs["sae_1w@1x"] = run_sae(sae, one, args.images, 1, workdir, "sae_1w@1x")
        runs["sae_2w@1x"] = run_sae(sae, one, args.images, 2, workdir, "sae_2w@1x")
        for k in sizes[1:]:
            n = k * args.images
            runs[f"sae_2w@{k}x"] = run_sae(sae, collections[k], n, 2, workdir, f"sae_2w@{k}x")
            runs[f"plain_loop@{k}x"] = run_plain(collections[k], n, workdir, f"plain_loop@{k}x")
    finally:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif temporary:
            log(f"kept {workdir}")

    def ips(name: str) -> float | None:
        return runs[name]["images_per_s"] if name in runs else None

    def rss(name: str) -> float | None:
        return runs[name]["peak_rss_mb"] if name in runs else None

    top = sizes[-1]
    mem_key = f"{top if top > 1 else 4}x"  # the default key, null, on a --skip-4x run
    speedup = _ratio(ips("sae_2w@1x"), ips("plain_loop@1x"))
    mem_ratio = _ratio(rss(f"sae_2w@{top}x"), rss("sae_2w@1x")) if top > 1 else None
    report["speedup_2w_vs_plain"] = speedup
    report["speedup_1w_vs_plain"] = _ratio(ips("sae_1w@1x"), ips("plain_loop@1x"))
    report["scaling_2w_vs_1w"] = _ratio(ips("sae_2w@1x"), ips("sae_1w@1x"))
    report[f"memory_ratio_{mem_key}_vs_1x"] = mem_ratio
    if top > 1:
        report[f"plain_loop_memory_ratio_{top}x_vs_1x"] = _ratio(
            rss(f"plain_loop@{top}x"), rss("plain_loop@1x")
        )
    report["targets"] = {
        "speedup_2w_vs_plain_min": TARGET_SPEEDUP,
        "speedup_pass": None if speedup is None else speedup >= TARGET_SPEEDUP,
        "memory_ratio_max": TARGET_MEMORY_RATIO,
        "memory_sizes": f"{top}x vs 1x" if top > 1 else None,
        "memory_pass": None if mem_ratio is None else mem_ratio <= TARGET_MEMORY_RATIO,
        "all_processed": all(r["all_processed"] for r in runs.values()),
    }
    report["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
