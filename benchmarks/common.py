"""What the benchmark scripts share: logging, the `sae` command, datasets made by `sae
preprocess`, measuring a subprocess (wall time, CPU, peak RSS of its process tree), the
--workdir/--keep/--out options, and the report's common fields and memory target.

The scripts run as `.venv/bin/python benchmarks/NAME_bench.py`, which puts this folder first on
sys.path, so they `import common` (no package, no `python -m`).

A report starts with {benchmark, command, machine, load_avg_start} (`start_report`) and ends
with {load_avg_end, total_seconds} (`finish_report`, which also prints it and writes --out).
`measure` returns, for one subprocess: seconds, cpu_seconds, background_cores, steal_cores,
peak_rss_mb, peak_rss_main_mb, peak_processes, process_names, stdout and command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SAMPLE_SECONDS = 0.2
# Peak RSS of `sae` with 2 workers at the largest data size over the 1x size, at most.
TARGET_MEMORY_RATIO = 1.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet_env() -> dict:
    """This process's environment, with TensorFlow's C++ logging down to errors unless set."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))


def sae_command() -> str:
    """The `sae` executable beside this interpreter, else the one on PATH."""
    sae = shutil.which("sae", path=os.path.dirname(sys.executable)) or shutil.which("sae")
    if sae is None:
        raise SystemExit("cannot find the `sae` command; install the package (make setup)")
    return sae


# ----------------------------------------------------------------------------
# Data made by the real preprocessing job.
# ----------------------------------------------------------------------------
def make_patch_dataset(
    out: Path, side: int, patches: int, num_shards: int, eval_fraction: float
) -> tuple[dict, float | None]:
    """`sae preprocess` of `patches` random side x side grey patches of each bundled photo
    (builtin:natural-images, seed 0) into `out`, reused if its manifest has these options.
    Returns (its manifest, seconds or None when reused)."""
    from preprocessing import manifest as manifest_lib

    want = {
        "patches": patches,
        "patch_size": side,
        "channels": 1,
        "num_shards": num_shards,
        "eval_fraction": eval_fraction,
        "seed": 0,
    }
    if manifest_lib.is_dataset(str(out)):
        made = manifest_lib.load(str(out))
        if all(made.options.get(k) == v for k, v in want.items()):
            log(f"reusing {out}")
            return made, None
    cmd = [
        sae_command(),
        "preprocess",
        "--input",
        "builtin:natural-images",
        "--output",
        str(out),
        "--patches",
        str(patches),
        "--patch-size",
        str(side),
        "--channels",
        "1",
        "--num-shards",
        str(num_shards),
        "--eval-fraction",
        str(eval_fraction),
        "--seed",
        "0",
        "--overwrite",
    ]
    log(f"making {out}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    # Its stdout goes to our stderr: only the JSON report may reach our stdout.
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=quiet_env())
    seconds = time.perf_counter() - t0
    log(f"made {out} in {seconds:.0f} s")
    return manifest_lib.load(str(out)), round(seconds, 2)


# ----------------------------------------------------------------------------
# CPU time and measuring one subprocess: wall time and peak RSS of its process tree.
# ----------------------------------------------------------------------------
def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of resource.RUSAGE_SELF or RUSAGE_CHILDREN (waited-for)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU seconds since boot, summed over cores (steal included)."""
    import psutil

    t = psutil.cpu_times()
    return (
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "guest", 0.0)
        - getattr(t, "guest_nice", 0.0)
    )


def steal_seconds() -> float:
    """CPU seconds since boot, summed over cores, that the hypervisor ran other guests while
    this machine's cores wanted to run: a benchmark's slow runs here went with 0.2-0.5 cores
    of it, which no process on this machine shows."""
    import psutil

    return getattr(psutil.cpu_times(), "steal", 0.0)


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


def measure(cmd: list[str], logdir: Path, name: str) -> dict:
    """Runs cmd, its stdout and stderr to logdir/NAME.stdout and .stderr; returns wall seconds
    (start-up included), CPU, peak tree RSS (sampled every SAMPLE_SECONDS), its stdout and the
    command. Raises if it fails, with the end of its stderr."""
    import psutil

    logdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logdir / f"{name}.stdout", logdir / f"{name}.stderr"
    cpu0, busy0, steal0 = cpu_seconds(resource.RUSAGE_CHILDREN), busy_cpu_seconds(), steal_seconds()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=quiet_env())
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
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0
    busy, steal = busy_cpu_seconds() - busy0, steal_seconds() - steal0
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
        "background_cores": round(max(0.0, busy - cpu) / seconds, 2),
        "steal_cores": round(steal / seconds, 2),  # the part of background_cores that is steal
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_rss_main_mb": round(peak_main / 2**20, 1),
        "peak_processes": peak_procs,
        "process_names": sorted(names),
        "stdout": out_path.read_text(),
        "command": " ".join(cmd),
    }


def measure_sae_job(job: list[str], workers: int, workdir: Path, name: str) -> tuple[dict, Path]:
    """Measures `sae JOB --output OUT --overwrite` on the DirectRunner with `workers` worker
    processes, OUT = workdir/out/NAME. Returns (`measure`'s result, OUT); the caller reads OUT
    and deletes it."""
    out = workdir / "out" / name
    # Emptied here, untimed: otherwise --overwrite's deletion would count against the job.
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sae_command(),
        *job,
        "--output",
        str(out),
        "--overwrite",
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={workers}",
    ]
    return measure(cmd, workdir / "logs", name), out


def measured_run(unit: str, n: int, m: dict, extra: dict, done: str) -> dict:
    """A report's entry for one run over n `unit`s (images, rows) measured as m (from `measure`):
    {UNIT, seconds, UNIT_per_s, measure's numbers, **extra, command}. Logs it, with `done`
    saying what the run produced."""
    r = {
        unit: n,
        "seconds": m["seconds"],
        f"{unit}_per_s": round(n / m["seconds"], 1),
        "cpu_seconds": m["cpu_seconds"],
        "background_cores": m["background_cores"],
        "steal_cores": m["steal_cores"],
        "peak_rss_mb": m["peak_rss_mb"],
        "peak_rss_main_mb": m["peak_rss_main_mb"],
        "peak_processes": m["peak_processes"],
        "process_names": m["process_names"],
        **extra,
        "command": m["command"],
    }
    log(
        f"  {r['seconds']} s ({r['cpu_seconds']} CPU-s), {r[f'{unit}_per_s']} {unit}/s, peak "
        f"{r['peak_rss_mb']} MB over {r['peak_processes']} processes (main "
        f"{r['peak_rss_main_mb']} MB), {done}; other work on the machine kept "
        f"{r['background_cores']} cores busy ({r['steal_cores']} of them stolen by the host)"
    )
    return r


def load_train_images(data_dir: Path):
    """(manifest, uint8 [N, H, W, C]): the whole train split of a `sae preprocess` output,
    read once (untimed)."""
    import numpy as np
    import tensorflow as tf

    from preprocessing import manifest as manifest_lib
    from preprocessing import records

    manifest = manifest_lib.load(str(data_dir))
    shape = manifest.image_shape
    ds = tf.data.TFRecordDataset(manifest.shard_paths("train")).batch(4096)
    parts = [records.parse_batch(b, shape)["image"].numpy() for b in ds]
    return manifest, np.concatenate(parts)


# ----------------------------------------------------------------------------
# Command line, workdir and report.
# ----------------------------------------------------------------------------
def run_interleaved(contenders: dict[str, Callable[[str], Any]], repeats: int) -> dict[str, list]:
    """Runs each contender (called with its name) `repeats` times, round by round, so a slow
    spell of the machine hits every contender alike. {name: its results, in order}."""
    results: dict[str, list] = {name: [] for name in contenders}
    for i in range(repeats):
        log(f"round {i + 1}/{repeats}")
        for name, run in contenders.items():
            results[name].append(run(name))
    return results


def median_run(runs: list[dict], key: str = "seconds") -> dict:
    """Of repeated runs of one contender, the one with the median `key`, plus every run's
    value (`KEY_all`): on this shared 2-core machine single runs of the same command were
    seen to differ by 30%."""
    middle = sorted(runs, key=lambda r: r[key])[len(runs) // 2]
    return {**middle, "repeats": len(runs), f"{key}_all": [r[key] for r in runs]}


def add_repeats_arg(
    p: argparse.ArgumentParser, what: str = "each contender at 1x", default: int = 3
) -> None:
    p.add_argument(
        "--repeats",
        type=int,
        default=default,
        help=f"runs of {what}, interleaved; the median is reported (default: {default})",
    )


def multipliers(text: str) -> list[int]:
    """argparse type of --sizes as data size multipliers: "1,4" -> [1, 4]; 1 must be there."""
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected multipliers like 1,4, got {text!r}") from None
    if not sizes or sizes[0] != 1:
        raise argparse.ArgumentTypeError(f"multipliers must include 1 and be >= 1, got {text!r}")
    return sizes


def add_workdir_args(p: argparse.ArgumentParser, workdir_help: str) -> None:
    """--workdir (what it holds and reuses: `workdir_help`), --keep and --out."""
    p.add_argument(
        "--workdir",
        help=f"{workdir_help} (default: a temporary folder, deleted afterwards unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--out", help="also write the JSON to this file")


@contextlib.contextmanager
def open_workdir(
    args: argparse.Namespace, prefix: str, scratch: str | None = None
) -> Iterator[Path]:
    """args.workdir, or a temporary folder deleted on exit unless args.keep. On exit the
    `scratch` subfolder (outputs of the timed runs) is deleted either way."""
    temporary = args.workdir is None
    path = Path(args.workdir or tempfile.mkdtemp(prefix=prefix)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    log(f"workdir {path}")
    try:
        yield path
    finally:
        if scratch is not None:
            shutil.rmtree(path / scratch, ignore_errors=True)
        if temporary and not args.keep:
            shutil.rmtree(path, ignore_errors=True)
        elif temporary:
            log(f"kept {path}")


def package_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(packages: list[str]) -> dict:
    """CPU, memory, platform, Python, and the installed version (or None) of each package."""
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
        **{dist.replace("-", "_"): package_version(dist) for dist in packages},
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def memory_ratios(runs: dict, top: int, baseline: str) -> tuple[dict, dict]:
    """Peak RSS at size TOPx over 1x, of sae_2w (the target) and of `baseline`, from runs
    named CONTENDER@Kx. With top == 1 nothing is measured: the target's ratio is null, under
    its default key memory_ratio_4x_vs_1x. Returns (the report's fields, the targets' fields)."""

    def rss(name: str) -> float | None:
        return runs[name]["peak_rss_mb"] if name in runs else None

    mem_ratio = ratio(rss(f"sae_2w@{top}x"), rss("sae_2w@1x")) if top > 1 else None
    fields = {f"memory_ratio_{top if top > 1 else 4}x_vs_1x": mem_ratio}
    if top > 1:
        base = ratio(rss(f"{baseline}@{top}x"), rss(f"{baseline}@1x"))
        fields[f"{baseline}_memory_ratio_{top}x_vs_1x"] = base
    targets = {
        "memory_ratio_max": TARGET_MEMORY_RATIO,
        "memory_sizes": f"{top}x vs 1x" if top > 1 else None,
        "memory_pass": None if mem_ratio is None else mem_ratio <= TARGET_MEMORY_RATIO,
    }
    return fields, targets


def start_report(benchmark: str, packages: list[str]) -> dict:
    """The report's first fields; `packages` are the versions worth recording."""
    return {
        "benchmark": benchmark,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine_info(packages),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
    }


def finish_report(report: dict, t_start: float, out: str | None) -> None:
    """Adds the last fields, prints the report as JSON and writes it to `out` if given."""
    report["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
