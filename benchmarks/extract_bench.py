"""Throughput and peak memory of `sae extract` against calling `encode` directly in one process.

    .venv/bin/python benchmarks/extract_bench.py                         # full: 50k + 200k rows
    .venv/bin/python benchmarks/extract_bench.py --rows 5000             # smoke, ~1.5 min
    .venv/bin/python benchmarks/extract_bench.py --workdir /tmp/xb --out xb.json   # reuses data

What it does, in one run:
1. Data: makes a dataset of 28x28x1 images with the real preprocessing job, as a subprocess:
     sae preprocess --input builtin:natural-images --output D --patches P --patch-size 28
         --channels 1 --eval-fraction 0.2 --num-shards 8 --seed 0 --overwrite
   i.e. P random patches of each of the ten bundled photos, so rows = 10 * P = --rows rounded up
   to a multiple of 10 (default 50,000), in 8 train and 8 eval shards (0.2 sends one photo to
   eval). At every other size (`--sizes`, default 1,4) it makes a k-times larger dataset the same
   way. Model: `sae train --data D@1x --workdir W --preset mnist --set input_shape=28,28,1
   --set hidden=256 --set epochs=1 --set steps_per_epoch=20 --verbose 0`, a 784->256 model
   whose quality does not matter here. Datasets and the model already in --workdir are reused.
2. On the same 1x shards, times each contender as a subprocess, wall time including interpreter
   and TensorFlow start-up and model loading; rows/s = rows / seconds:
     sae_1w   sae extract --data D --model W/export --output OUT --overwrite
                  --direct_running_mode=multi_processing --direct_num_workers=1
     sae_2w   the same with --direct_num_workers=2
     direct   this script's hidden --direct-loop mode, the loop a user would write: one
              process; per split, tf.data.TFRecordDataset(the split's shards).batch(256)
              .map(preprocessing.records.parse_batch).prefetch(AUTOTUNE); per batch the
              SavedModel's signatures["encode"], pipeline.extract.sparsify with the job's
              default (threshold at the model's rho), pipeline.feature_records.encode +
              preprocessing.wire.tfrecord_frame into one .tfrecord file, and the same rows
              (pipeline.feature_records.parquet_schema) into one .parquet file through a
              pyarrow ParquetWriter, a row group per 64 batches.
   Both sides write TFRecord and Parquet because that is `sae extract`'s default; with
   `--format tfrecord` both write TFRecord only (sae gets `--format=tfrecord`).
   At every other size (4x by default) it runs sae_2w and direct again.
3. Peak memory: every 0.2 s, the sum of RSS over the subprocess and all its descendants (for
   sae that is the runner plus Beam's worker processes); the maximum is `peak_rss_mb`. Summed
   RSS counts shared library pages once per process, so it overstates the tree's real footprint
   by a roughly constant amount; the 4x/1x ratio is what the target is about.
4. Checks that both did the same work: the job's manifest must say num_written == num_inputs ==
   rows with no errors and the direct loop must write `rows` rows (`all_written`); the mean
   number of kept units per row (`l0_mean`) must agree to 1e-3; and, untimed, the TFRecord
   payloads of each sae run are compared as a multiset with the direct loop's on the same data
   (`rows_identical_to_direct`, the byte-identical fraction; 1.0 in the smoke runs).

Output: progress on stderr, one JSON object on stdout (and in --out FILE if given):
  runs["sae_2w@1x"] = {rows, seconds, rows_per_s, cpu_seconds, background_cores, peak_rss_mb,
                       peak_rss_main_mb, peak_processes, process_names, written, errors,
                       l0_mean, all_written, command, rows_identical_to_direct}
  runs["direct@1x"]    the same, minus rows_identical_to_direct, plus, measured inside it,
                       startup_seconds (importing TensorFlow and the project, loading the
                       manifest and the model) and loop_seconds (the rest: reading, encoding,
                       writing).
  ratio_2w_vs_direct      rows/s of sae_2w@1x / rows/s of direct@1x        (target >= 0.8)
  memory_ratio_4x_vs_1x   peak_rss_mb of sae_2w@4x / sae_2w@1x              (target <= 1.2)
  marginal_rows_per_s     sae_2w and direct: (rows@4x - rows@1x) / (seconds@4x - seconds@1x),
                          the rate once start-up is paid (derived from the runs above, not
                          measured on its own; noisy when the two runs differ by a few
                          seconds); direct_in_loop: the same from the direct loop's
                          loop_seconds, free of its start-up's jitter
  targets                 the two thresholds with pass booleans (null if not measured), and
                          all_written, l0_agrees, min_rows_identical_to_direct over all runs
`cpu_seconds` is the whole tree's CPU time; `peak_rss_main_mb` is the `sae` process alone (the
runner, which holds the data between stages). Numbers are one measurement each: trust them only
when `background_cores` (CPU used by other work meanwhile) is near 0.

Run time of the full default run on 2 cores: about 3-5 min (extrapolated, not yet measured at
full size). In smoke runs of 1.2k-40k rows on an otherwise idle 2-core machine, `sae extract`
took about 13 s (1 worker) or 14 s (2 workers) at 1.2k rows, almost all of it start-up, and each
further row cost about 0.1 ms with 2 workers (7-11k rows/s). The direct loop took 6-8 s in all
at 1.2k-20k rows, ~4.5 s of it start-up; its loop ran at ~16k rows/s between 5k and 20k rows.
`sae preprocess` took ~10 s per dataset up to 40k rows and the model ~8 s. So: about 1 min of
set-up (once; reused with --workdir), then ~0.2 + 0.4 + 0.3 min at 1x and ~0.6 + 0.3 min at 4x.
The --rows 5000 smoke run takes ~1.5 min (1 min with its data reused).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SIDE = 28
HIDDEN = 256
PHOTOS = 10  # builtin:natural-images: one dataset row per patch, PHOTOS * patches rows
NUM_SHARDS = 8
EVAL_FRACTION = 0.2  # sends exactly one photo's patches to the eval split
BATCH = 256  # `sae extract --batch-size` default
PARQUET_ROW_GROUP_BATCHES = 64
MIN_ROWS = 1200  # 9/10 of it, the train split, must hold one batch of the mnist preset (1024)
MODEL_SETS = ["input_shape=28,28,1", f"hidden={HIDDEN}", "epochs=1", "steps_per_epoch=20"]
FORMATS_DEFAULT = "tfrecord,parquet"
SAMPLE_SECONDS = 0.2
TARGET_RATIO = 0.8
TARGET_MEMORY_RATIO = 1.2
L0_TOLERANCE = 1e-3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _quiet_env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))


def _sae() -> str:
    sae = shutil.which("sae", path=os.path.dirname(sys.executable)) or shutil.which("sae")
    if sae is None:
        raise SystemExit("cannot find the `sae` command; install the package (make setup)")
    return sae


# ----------------------------------------------------------------------------
# Data and model: the real preprocessing and training jobs, cached in the workdir.
# ----------------------------------------------------------------------------
def make_dataset(workdir: Path, rows: int) -> tuple[Path, float | None]:
    """workdir/data-28x28-ROWS (rows a multiple of PHOTOS); reused if complete.
    Returns (dir, seconds or None when reused)."""
    out = workdir / f"data-{SIDE}x{SIDE}-{rows}"
    patches = rows // PHOTOS
    want = {
        "patches": patches,
        "patch_size": SIDE,
        "channels": 1,
        "num_shards": NUM_SHARDS,
        "eval_fraction": EVAL_FRACTION,
        "seed": 0,
    }
    manifest = out / "manifest.json"
    if manifest.exists():
        opts = json.loads(manifest.read_text())["options"]
        if all(opts.get(k) == v for k, v in want.items()):
            log(f"reusing {out}")
            return out, None
    cmd = [
        _sae(),
        "preprocess",
        "--input",
        "builtin:natural-images",
        "--output",
        str(out),
        "--patches",
        str(patches),
        "--patch-size",
        str(SIDE),
        "--channels",
        "1",
        "--eval-fraction",
        str(EVAL_FRACTION),
        "--num-shards",
        str(NUM_SHARDS),
        "--seed",
        "0",
        "--overwrite",
    ]
    log(f"making {out}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    # Its stdout goes to our stderr: only the JSON report may reach our stdout.
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=_quiet_env())
    splits = json.loads(manifest.read_text())["splits"]
    total = sum(s["num_examples"] for s in splits.values())
    if total != rows or splits["eval"]["num_examples"] == 0:
        raise SystemExit(f"{out}: expected {rows} rows in train + eval, got {splits}")
    seconds = time.perf_counter() - t0
    log(f"made {out} in {seconds:.0f} s")
    return out, round(seconds, 2)


def make_model(workdir: Path, data: Path) -> tuple[Path, float | None]:
    """workdir/model-784x256/export, trained briefly on `data`; reused if there."""
    run_dir = workdir / f"model-{SIDE * SIDE}x{HIDDEN}"
    export = run_dir / "export"
    marker = workdir / f"model-{SIDE * SIDE}x{HIDDEN}.json"
    want = {"data": data.name, "sets": MODEL_SETS}
    if (
        (export / "saved_model.pb").exists()
        and marker.exists()
        and json.loads(marker.read_text()) == want
    ):
        log(f"reusing {export}")
        return export, None
    shutil.rmtree(run_dir, ignore_errors=True)  # `sae train` would resume a stale run
    cmd = [_sae(), "train", "--data", str(data), "--workdir", str(run_dir), "--preset", "mnist"]
    for s in MODEL_SETS:
        cmd += ["--set", s]
    cmd += ["--verbose", "0"]
    log(f"training {run_dir}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=_quiet_env())
    marker.write_text(json.dumps(want))
    seconds = time.perf_counter() - t0
    log(f"trained {run_dir} in {seconds:.0f} s")
    return export, round(seconds, 2)


# ----------------------------------------------------------------------------
# The direct loop (hidden --direct-loop mode, run as a subprocess).
# ----------------------------------------------------------------------------
def _parquet_table(recs: list):
    """FeatureRecords -> a pyarrow Table of the feature schema (as feature_records does)."""
    import pyarrow as pa

    from pipeline import feature_records as fr

    return pa.table(
        {
            "key": [r.key for r in recs],
            "indices": [r.indices for r in recs],
            "values": [r.values for r in recs],
            "split": [r.split for r in recs],
            "label": [r.label for r in recs],
        },
        schema=fr.parquet_schema(),
    )


def direct_loop(data_dir: str, export_dir: str, output: str, formats: list[str]) -> dict:
    """What a user would write: one process, the model loaded once, batches of 256 read with
    tf.data from the dataset's shards, the job's sparsifier and feature schema."""
    t_start = time.perf_counter()
    import tensorflow as tf

    from pipeline import extract, models
    from pipeline import feature_records as fr
    from preprocessing import manifest as manifest_lib
    from preprocessing import records, wire

    data = manifest_lib.load(data_dir)
    shape = data.image_shape
    info = models.export_info(export_dir)
    rho, dim = float(info["config"]["rho"]), int(info["config"]["hidden"])
    encode = tf.saved_model.load(export_dir).signatures["encode"]
    startup = time.perf_counter() - t_start

    rows = nnz = 0
    tf_file = open(output + ".tfrecord", "wb") if "tfrecord" in formats else None  # noqa: SIM115
    pq_writer, pending = None, []
    if "parquet" in formats:
        import pyarrow.parquet as pq

        pq_writer = pq.ParquetWriter(output + ".parquet", fr.parquet_schema())
    try:
        for split in ("train", "eval"):
            ds = (
                tf.data.TFRecordDataset(data.shard_paths(split))
                .batch(BATCH)
                .map(lambda s: records.parse_batch(s, shape))
                .prefetch(tf.data.AUTOTUNE)
            )
            for batch in ds:
                acts = encode(images=batch["image"])["activations"].numpy()
                kept = extract.sparsify(acts, "threshold", rho)
                keys, labels = batch["key"].numpy(), batch["label"].numpy()
                for key, label, (idx, vals) in zip(keys, labels, kept, strict=True):
                    lab = None if label == records.NO_LABEL else int(label)
                    rec = fr.FeatureRecord(key.decode("utf-8"), idx, vals, dim, split, lab)
                    if tf_file is not None:
                        tf_file.write(wire.tfrecord_frame(fr.encode(rec)))
                    if pq_writer is not None:
                        pending.append(rec)
                    nnz += len(idx)
                rows += len(kept)
                if pq_writer is not None and len(pending) >= PARQUET_ROW_GROUP_BATCHES * BATCH:
                    pq_writer.write_table(_parquet_table(pending))
                    pending = []
        if pq_writer is not None and pending:
            pq_writer.write_table(_parquet_table(pending))
    finally:
        if tf_file is not None:
            tf_file.close()
        if pq_writer is not None:
            pq_writer.close()
    return {
        "rows": rows,
        "l0_mean": nnz / max(rows, 1),
        "startup_seconds": round(startup, 2),
        "loop_seconds": round(time.perf_counter() - t_start - startup, 2),
    }


# ----------------------------------------------------------------------------
# Measuring one subprocess: wall time and peak RSS of its process tree.
# (The same measurement as benchmarks/preprocess_bench.py.)
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
    cpu0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_cpu_seconds()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_quiet_env())
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
        # User + system CPU of every process in the tree that was waited for.
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


# ----------------------------------------------------------------------------
# The contenders. Each returns (result, digests of the TFRecord rows it wrote, or None).
# ----------------------------------------------------------------------------
def tfrecord_digests(paths: list[Path]) -> Counter:
    """The multiset of the records' payload digests, read from the TFRecord framing (8-byte
    length, 4-byte CRC, payload, 4-byte CRC): two outputs hold the same rows, in any order and
    sharding, when these are equal."""
    digests: Counter = Counter()
    for path in paths:
        buf, pos = path.read_bytes(), 0
        while pos < len(buf):
            (n,) = struct.unpack_from("<Q", buf, pos)
            digests[hashlib.blake2b(buf[pos + 12 : pos + 12 + n], digest_size=16).digest()] += 1
            pos += 12 + n + 4
    return digests


def run_sae(
    data: Path, model: Path, rows: int, workers: int, formats: str, workdir: Path, name: str
) -> tuple[dict, Counter | None]:
    out = workdir / "out" / name
    # Emptied here, untimed: otherwise --overwrite's deletion would count against the job.
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        _sae(),
        "extract",
        "--data",
        str(data),
        "--model",
        str(model),
        "--output",
        str(out),
        "--overwrite",
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={workers}",
    ]
    if formats != FORMATS_DEFAULT:
        cmd.append(f"--format={formats}")
    log(f"{name}: {rows} rows ...")
    m = measure(cmd, workdir / "logs", name)
    manifest = json.loads((out / "manifest.json").read_text())
    digests = tfrecord_digests(sorted(out.glob("*.tfrecord"))) if "tfrecord" in formats else None
    shutil.rmtree(out, ignore_errors=True)
    written, errors = manifest["num_written"], manifest["num_errors"]
    ok = written == rows and errors == 0 and manifest["num_inputs"] == rows
    return _result(rows, m, cmd, written, errors, manifest["l0"]["mean"], ok), digests


def run_direct(
    data: Path, model: Path, rows: int, formats: str, workdir: Path, name: str
) -> tuple[dict, Counter | None]:
    out = workdir / "out" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--direct-loop",
        "--direct-data",
        str(data),
        "--direct-model",
        str(model),
        "--direct-output",
        str(out),
        f"--format={formats}",
    ]
    log(f"{name}: {rows} rows ...")
    m = measure(cmd, workdir / "logs", name)
    got = json.loads(m["stdout"].strip().splitlines()[-1])
    tfrecord = Path(f"{out}.tfrecord")
    digests = tfrecord_digests([tfrecord]) if "tfrecord" in formats else None
    for suffix in (".tfrecord", ".parquet"):
        Path(str(out) + suffix).unlink(missing_ok=True)
    r = _result(rows, m, cmd, got["rows"], 0, got["l0_mean"], got["rows"] == rows)
    r["startup_seconds"], r["loop_seconds"] = got["startup_seconds"], got["loop_seconds"]
    return r, digests


def _result(
    rows: int, m: dict, cmd: list[str], written: int, errors: int, l0: float, ok: bool
) -> dict:
    r = {
        "rows": rows,
        "seconds": m["seconds"],
        "rows_per_s": round(rows / m["seconds"], 1),
        "cpu_seconds": m["cpu_seconds"],
        "background_cores": m["background_cores"],
        "peak_rss_mb": m["peak_rss_mb"],
        "peak_rss_main_mb": m["peak_rss_main_mb"],
        "peak_processes": m["peak_processes"],
        "process_names": m["process_names"],
        "written": written,
        "errors": errors,
        "l0_mean": round(l0, 4),
        "all_written": ok,
        "command": " ".join(cmd),
    }
    log(
        f"  {r['seconds']} s ({r['cpu_seconds']} CPU-s), {r['rows_per_s']} rows/s, peak "
        f"{r['peak_rss_mb']} MB over {r['peak_processes']} processes (main "
        f"{r['peak_rss_main_mb']} MB), {written} written, l0 {r['l0_mean']}; other work on "
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
        "pyarrow": _version("pyarrow"),
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


def _formats(text: str) -> str:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    if not formats or set(formats) - {"tfrecord", "parquet"}:
        raise argparse.ArgumentTypeError(f"use tfrecord, parquet or both, got {text!r}")
    return ",".join(f for f in ("tfrecord", "parquet") if f in formats)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Rows/s and peak memory of `sae extract` (DirectRunner, 1 and 2 workers) "
        "vs calling the model's encode signature in one process, on the same TFRecord shards "
        "of 28x28x1 images and a 784->256 model. JSON on stdout.",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=50_000,
        help=f"dataset rows at size 1x, rounded up to a multiple of {PHOTOS}, at least "
        f"{MIN_ROWS} (default: 50000)",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=[1, 4],
        help="dataset size multipliers for the memory comparison (default: 1,4)",
    )
    p.add_argument(
        "--format",
        type=_formats,
        default=FORMATS_DEFAULT,
        help="what both sides write: tfrecord, parquet or both (default: both, as `sae "
        "extract` does by default)",
    )
    p.add_argument(
        "--workdir",
        help="where datasets, the model, outputs and logs go; datasets and the model there are "
        "reused (default: a temporary folder, deleted afterwards unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--out", help="also write the JSON to this file")
    # Hidden: the direct contender, run by this script as a subprocess.
    p.add_argument("--direct-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--direct-data", help=argparse.SUPPRESS)
    p.add_argument("--direct-model", help=argparse.SUPPRESS)
    p.add_argument("--direct-output", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.direct_loop:
        formats = args.format.split(",")
        got = direct_loop(args.direct_data, args.direct_model, args.direct_output, formats)
        print(json.dumps(got), flush=True)
        return 0
    if args.rows < MIN_ROWS:
        # The model trains on the 1x train split (9 of the 10 photos), in batches of 1024.
        raise SystemExit(f"--rows must be >= {MIN_ROWS} (the model trains on the 1x data)")
    rows_1x = PHOTOS * math.ceil(args.rows / PHOTOS)
    sizes = args.sizes

    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="extract_bench-")).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}")
    t_start = time.perf_counter()
    report: dict = {
        "benchmark": "extract",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine_info(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "rows_1x": rows_1x,
        "sizes": sizes,
        "data": f"{SIDE}x{SIDE}x1 uint8 patches of builtin:natural-images, {NUM_SHARDS} train "
        f"+ {NUM_SHARDS} eval TFRecord shards",
        "model": f"{SIDE * SIDE}->{HIDDEN} (sae train --preset mnist, 20 steps)",
        "format": args.format,
        "batch_size": BATCH,
        "setup_seconds": {},
        "runs": {},
    }
    runs = report["runs"]
    digests: dict[str, Counter | None] = {}

    def record(name: str, outcome: tuple[dict, Counter | None]) -> None:
        runs[name], digests[name] = outcome

    try:
        datasets = {}
        for k in sizes:
            datasets[k], secs = make_dataset(workdir, k * rows_1x)
            report["setup_seconds"][f"data@{k}x"] = secs  # null: reused from --workdir
        model, secs = make_model(workdir, datasets[1])
        report["setup_seconds"]["model"] = secs
        one, fmt = datasets[1], args.format
        record("direct@1x", run_direct(one, model, rows_1x, fmt, workdir, "direct@1x"))
        record("sae_1w@1x", run_sae(one, model, rows_1x, 1, fmt, workdir, "sae_1w@1x"))
        record("sae_2w@1x", run_sae(one, model, rows_1x, 2, fmt, workdir, "sae_2w@1x"))
        for k in sizes[1:]:
            n, d = k * rows_1x, datasets[k]
            record(f"sae_2w@{k}x", run_sae(d, model, n, 2, fmt, workdir, f"sae_2w@{k}x"))
            record(f"direct@{k}x", run_direct(d, model, n, fmt, workdir, f"direct@{k}x"))
    finally:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif temporary:
            log(f"kept {workdir}")

    # Rows byte-identical to the direct loop's on the same data (null without TFRecord output).
    for name, r in runs.items():
        if name.startswith("sae_"):
            mine, theirs = digests[name], digests[f"direct@{name.split('@')[1]}"]
            same = None if mine is None or theirs is None else sum((mine & theirs).values())
            r["rows_identical_to_direct"] = None if same is None else round(same / r["rows"], 6)

    def rps(name: str) -> float | None:
        return runs[name]["rows_per_s"] if name in runs else None

    def rss(name: str) -> float | None:
        return runs[name]["peak_rss_mb"] if name in runs else None

    top = sizes[-1]
    ratio = _ratio(rps("sae_2w@1x"), rps("direct@1x"))
    mem_ratio = _ratio(rss(f"sae_2w@{top}x"), rss("sae_2w@1x")) if top > 1 else None
    report["ratio_2w_vs_direct"] = ratio
    report["ratio_1w_vs_direct"] = _ratio(rps("sae_1w@1x"), rps("direct@1x"))
    report["scaling_2w_vs_1w"] = _ratio(rps("sae_2w@1x"), rps("sae_1w@1x"))
    report[f"memory_ratio_{top if top > 1 else 4}x_vs_1x"] = mem_ratio
    if top > 1:
        report[f"direct_memory_ratio_{top}x_vs_1x"] = _ratio(
            rss(f"direct@{top}x"), rss("direct@1x")
        )
        marginal = {}
        for name, c, t in (
            ("sae_2w", "sae_2w", "seconds"),
            ("direct", "direct", "seconds"),
            ("direct_in_loop", "direct", "loop_seconds"),
        ):
            a, b = runs[f"{c}@1x"], runs[f"{c}@{top}x"]
            dt = b[t] - a[t]
            marginal[name] = round((b["rows"] - a["rows"]) / dt, 1) if dt > 0 else None
        report["marginal_rows_per_s"] = marginal
    report["targets"] = {
        "ratio_2w_vs_direct_min": TARGET_RATIO,
        "ratio_pass": None if ratio is None else ratio >= TARGET_RATIO,
        "memory_ratio_max": TARGET_MEMORY_RATIO,
        "memory_sizes": f"{top}x vs 1x" if top > 1 else None,
        "memory_pass": None if mem_ratio is None else mem_ratio <= TARGET_MEMORY_RATIO,
        "all_written": all(r["all_written"] for r in runs.values()),
        # Same data, same activations: every sae run keeps as many units per row as the
        # direct loop on the same dataset (across sizes the means need not agree).
        "l0_agrees": all(
            abs(r["l0_mean"] - runs[f"direct@{name.split('@')[1]}"]["l0_mean"]) <= L0_TOLERANCE
            for name, r in runs.items()
        ),
        "min_rows_identical_to_direct": min(
            (
                r["rows_identical_to_direct"]
                for r in runs.values()
                if r.get("rows_identical_to_direct") is not None
            ),
            default=None,
        ),
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
