"""Throughput and peak memory of `sae preprocess` against hand-written scripts, in two modes.

    .venv/bin/python benchmarks/preprocess_bench.py                     # full: 50k + 200k files
    .venv/bin/python benchmarks/preprocess_bench.py --images 2000           # smoke, ~1.5 min
    .venv/bin/python benchmarks/preprocess_bench.py --workdir /tmp/pb --out pb.json  # reuses files
    .venv/bin/python benchmarks/preprocess_bench.py --mode photo --workdir /tmp/pb  # 20k + 80k

Photo mode (--mode photo): N photo-sized JPEGs (default 20,000), each a random crop (0.5-1 of
each side) of one of the ten bundled photographs, rescaled (bicubic) to a long side uniform in
320-960 px, JPEG quality 90 (median ~60 KB), in ten class folders named after the photos,
resized to 64x64x3 (crop). Contenders, each a whole process, interleaved --repeats times:
  sae_1w, sae_2w   sae preprocess --resize 64x64 --channels 3 with 1 and 2 local workers
  plain_loop       one process: Pillow open + convert('RGB') + ImageOps.fit (bilinear), a
                   tf.train.Example with TensorFlow's proto classes, one TFRecordWriter
  pool_full        multiprocessing.Pool(cores), tasks of 500 files each writing its own shard
  pool_draft       the same with Image.draft('RGB', (64, 64)) before the convert: DCT-domain
                   downscaling, the best a user could hand-write
then sae_2w and pool_draft again at every other size (4x: memory; the 4x collection is four
hard links of each 1x photo under other names, so it costs no generation time and the page
cache holds it whole, while the job lists, decodes and writes 4x the files). Also reported:
`draft_quality`, the PSNR of the job's default (DCT-downscaled) decode against
--exact-decode over 1,000 of the photos. Targets (PHOTO_TARGETS, 2 cores, N = 20,000): sae_2w
>= 2.5x plain_loop, >= 1.4x pool_full, >= 0.9x pool_draft; peak memory 4x/1x <= 1.2.

Tiny mode (the default), what it does, in one run:
1. Writes a collection of N 28x28 grey images (default N = 50,000), half PNG and half JPEG, in
   class folders 0..9, derived from scikit-learn's digits (8x8 upsampled, randomly shifted, with
   noise, so files differ), plus a collection of 4N for the memory comparison (`--sizes 1,4`).
   A collection already in --workdir is reused.
2. Reads every file once (page cache warm, so the order of the contenders does not
   matter), then on the same 1x files times the contenders below, each a subprocess, wall time
   including interpreter and TensorFlow start-up; images/s = files / seconds. Each runs
   --repeats times (default 3), interleaved, and is reported by its median run (`repeats`,
   `seconds_all`): single runs on this shared machine swung by up to 30%.
     sae_1w       sae preprocess --input DIR --resize 28x28 --channels 1 --output OUT --overwrite
                      --direct_running_mode=multi_processing --direct_num_workers=1
     sae_2w       the same with --direct_num_workers=2
     plain_loop   this script's hidden --plain-loop mode: one process, sorted os.walk, Pillow
                  open + convert('L') (+ resize if needed), a tf.train.Example with the job's
                  features built with TensorFlow's proto classes, one tf.io.TFRecordWriter file.
     plain_loop_sae_encoder   (1x only, for comparison) the same loop serializing with the
                  job's TensorFlow-free encoder (preprocessing.records.encode) instead.
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
  speedup_2w_vs_plain_sae_encoder   the same against plain_loop_sae_encoder@1x (no target)
  memory_ratio_4x_vs_1x    peak_rss_mb of sae_2w@4x / sae_2w@1x               (target <= 1.2)
  targets                  the two thresholds with pass booleans (null if not measured)
`all_processed` is true when the job's manifest accounts for every file as an example and
reports no errors. `cpu_seconds` is the whole tree's CPU time; `peak_rss_main_mb` is the `sae`
process alone (the runner, which holds the data between stages). Numbers are one measurement
each: trust them only when `background_cores` (CPU used by other work meanwhile) is near 0.
Beam's DirectRunner first tries the Prism runner, downloading its binary from GitHub; offline
it falls back to the in-process FnApiRunner that --direct_num_workers controls. A "prism"
entry in `process_names` means Prism ran and the worker counts above may not be what ran.

Run time on 2 cores (AMD EPYC), measured 2026-11-27 with the files reused from --workdir: 150 s
for the default run (3 repeats at 1x, then 4x; `total_seconds` in the JSON); writing the 250,000
files adds 1-4 min once. Peak memory stayed under 0.8 GB for the whole tree.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    add_repeats_arg,
    add_workdir_args,
    finish_report,
    log,
    measure,
    measure_sae_job,
    measured_run,
    median_run,
    memory_ratios,
    multipliers,
    open_workdir,
    ratio,
    run_interleaved,
    sae_command,
    start_report,
)

SIDE = 28
GENERATOR_VERSION = 1  # bump when the generated files change, so old collections are rebuilt
TARGET_SPEEDUP = 1.3


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


def write_in_parallel(write, n: int, root: Path, chunk: int) -> int:
    """write(range of file indices, root) over chunks of files 0..n-1, one process per core;
    returns the number of files written."""
    chunks = [range(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        return sum(pool.starmap(write, [(c, str(root)) for c in chunks]))


def finish_collection(
    root: Path, marker: Path, want: dict, written: int, n: int, t0: float
) -> tuple[Path, float]:
    """Checks the count and marks the collection complete; returns (root, seconds taken)."""
    assert written == n, (written, n)
    marker.write_text(json.dumps(want))
    seconds = time.perf_counter() - t0
    log(f"wrote {n} files in {seconds:.1f} s")
    return root, round(seconds, 2)


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
    written = write_in_parallel(_write_images, n, root, chunk=2000)
    return finish_collection(root, marker, want, written, n, t0)


# ----------------------------------------------------------------------------
# The plain loop (hidden --plain-loop mode, run as a subprocess).
# ----------------------------------------------------------------------------
def plain_loop(input_dir: str, output: str, encoder: str = "tf") -> dict:
    """What a user would write: one process, one TFRecord file, the job's Example schema
    built with TensorFlow's own tf.train.Example (encoder "tf"), or, for comparison, with
    the job's own TensorFlow-free encoder preprocessing.records.encode ("sae")."""
    import tensorflow as tf
    from PIL import Image

    from preprocessing import records

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    def tf_example(key: str, arr: np.ndarray, label: int | None) -> bytes:
        h, w, c = arr.shape
        values = {"image": arr.tobytes(), "height": h, "width": w, "channels": c,
                  "key": key.encode("utf-8"), "label": label}  # fmt: skip
        features = {k: feature(v) for k, v in values.items() if v is not None}
        return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()

    serialize = records.encode if encoder == "sae" else tf_example
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
                writer.write(serialize(path, np.asarray(grey)[:, :, None], label))
                n += 1
    return {"examples": n}


# ----------------------------------------------------------------------------
# The contenders, each measured as a subprocess (common.measure).
# ----------------------------------------------------------------------------
def run_sae(input_dir: Path, n: int, workers: int, workdir: Path, name: str) -> dict:
    log(f"{name}: {n} files ...")
    job = ["preprocess", "--input", str(input_dir), "--resize", f"{SIDE}x{SIDE}", "--channels", "1"]
    m, out = measure_sae_job(job, workers, workdir, name)
    from preprocessing import manifest as manifest_lib

    made = manifest_lib.load(str(out))
    examples = sum(made.num_examples(s) for s in ("train", "eval"))
    shutil.rmtree(out, ignore_errors=True)
    return _result(n, m, examples, made.num_errors, made.num_inputs)


def run_plain(input_dir: Path, n: int, workdir: Path, name: str, encoder: str = "tf") -> dict:
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
        f"--plain-encoder={encoder}",
    ]
    log(f"{name}: {n} files ...")
    m = measure(cmd, workdir / "logs", name)
    examples = json.loads(m["stdout"].strip().splitlines()[-1])["examples"]
    out.unlink(missing_ok=True)
    return _result(n, m, examples, 0, examples)


def _result(n: int, m: dict, examples: int, errors: int, inputs: int) -> dict:
    extra = {
        "examples": examples,
        "errors": errors,
        "all_processed": inputs == n and examples == n and errors == 0,
    }
    return measured_run("images", n, m, extra, f"{examples} examples, {errors} errors")


def warm_page_cache(root: Path) -> None:
    """Reads every file once, so no contender pays for cold disk reads that the ones
    timed after it would not (the contenders run one after another)."""
    t = time.perf_counter()
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                f.read()
    log(f"page cache warmed for {root} in {time.perf_counter() - t:.1f} s")


# ----------------------------------------------------------------------------
# Photo mode: N photo-sized JPEGs, resized to 64x64x3.
# ----------------------------------------------------------------------------
PHOTO_SIDE = 64
PHOTO_GENERATOR_VERSION = 1
# Targets on 2 cores at N = 20,000: sae_2w against each hand-written contender.
PHOTO_TARGETS = {"plain_loop": 2.5, "pool_full": 1.4, "pool_draft": 0.9}
_PHOTOS: list | None = None


def _write_photos(indices: range, root: str) -> int:
    """Writes photos `indices`; photo i is a random crop (0.5-1 of each side) of bundled
    photo i % 10, rescaled (bicubic) to a long side uniform in 320-960 px, JPEG quality 90,
    in the folder named after its source photo. It depends only on i."""
    from PIL import Image

    from preprocessing import builtin

    global _PHOTOS
    if _PHOTOS is None:
        names = [*builtin._PHOTOS, "china", "flower"]  # the order of builtin:natural-images
        _PHOTOS = list(zip(names, builtin._natural_images()[0], strict=True))
    for i in indices:
        rng = np.random.default_rng(i)
        name, photo = _PHOTOS[i % len(_PHOTOS)]
        h, w = photo.shape[:2]
        ch, cw = (int(rng.uniform(0.5, 1.0) * d) for d in (h, w))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[y : y + ch, x : x + cw])
        scale = rng.integers(320, 961) / max(ch, cw)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        img = crop.resize(size, Image.Resampling.BICUBIC)
        img.save(os.path.join(root, name, f"{i:07d}.jpg"), format="JPEG", quality=90)
    return len(indices)


def make_photo_collection(workdir: Path, n: int, copies: int = 1) -> tuple[Path, float | None]:
    """workdir/photos-N*COPIES: N JPEGs, and with copies > 1 that many hard links of each
    under other names (`C-` prefix), so a 4x collection lists, decodes and writes 4x the
    files, from one page-cached copy of the bytes. Reused if complete; returns (dir,
    seconds or None)."""
    from preprocessing import builtin

    root = workdir / f"photos-{n * copies}"
    marker = workdir / f"photos-{n * copies}.json"
    want = {"count": n, "copies": copies, "generator_version": PHOTO_GENERATOR_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        log(f"reusing {n * copies} photos in {root}")
        return root, None
    base = make_photo_collection(workdir, n)[0] if copies > 1 else None
    log(f"writing {n * copies} photos to {root}")
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    for name in [*builtin._PHOTOS, "china", "flower"]:
        (root / name).mkdir(parents=True)
    if base is not None:
        written = 0
        for path, _ in _photo_files(str(base)):
            folder, name = os.path.split(path)
            for c in range(copies):
                os.link(path, root / os.path.basename(folder) / f"{c}-{name}")
                written += 1
        n *= copies
    else:
        written = write_in_parallel(_write_photos, n, root, chunk=500)
    return finish_collection(root, marker, want, written, n, t0)


def _photo_files(input_dir: str) -> list[tuple[str, int]]:
    """(path, label index) of every file, sorted; labels = sorted folder names."""
    labels = sorted(os.listdir(input_dir))
    return [
        (os.path.join(input_dir, lab, f), i)
        for i, lab in enumerate(labels)
        for f in sorted(os.listdir(os.path.join(input_dir, lab)))
    ]


def _photo_example(path: str, label: int, draft: bool) -> bytes:
    """What a user writes: open, (draft,) RGB, centre-crop + resize, tf.train.Example."""
    import tensorflow as tf
    from PIL import Image, ImageOps

    side = PHOTO_SIDE
    with Image.open(path) as img:
        if draft:
            img.draft("RGB", (side, side))  # DCT scaling, never below the requested size
        rgb = ImageOps.fit(img.convert("RGB"), (side, side), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb)

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    values = {"image": arr.tobytes(), "height": side, "width": side, "channels": 3,
              "key": path.encode(), "label": label}  # fmt: skip
    features = tf.train.Features(feature={k: feature(v) for k, v in values.items()})
    return tf.train.Example(features=features).SerializeToString()


def _photo_shard(task: tuple[list[tuple[str, int]], str, bool]) -> int:
    """One Pool task: a chunk of files -> its own TFRecord file."""
    import tensorflow as tf

    files, output, draft = task
    with tf.io.TFRecordWriter(output) as writer:
        for path, label in files:
            writer.write(_photo_example(path, label, draft))
    return len(files)


def photo_script(input_dir: str, output: str, kind: str) -> dict:
    """The hand-written contenders: 'plain' (one process, one TFRecord file, full decode),
    'pool_full' / 'pool_draft' (multiprocessing.Pool(cores), tasks of 500 files, each
    writing its own shard OUTPUT-KKKKK, full or draft decode)."""
    import tensorflow as tf  # imported before the fork, as a script would at its top

    files = _photo_files(input_dir)
    if kind == "plain":
        with tf.io.TFRecordWriter(output) as writer:
            for path, label in files:
                writer.write(_photo_example(path, label, draft=False))
        return {"examples": len(files)}
    draft = kind == "pool_draft"
    tasks = [
        (files[s : s + 500], f"{output}-{s // 500:05d}", draft) for s in range(0, len(files), 500)
    ]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        return {"examples": sum(pool.imap_unordered(_photo_shard, tasks))}


def run_photo_script(input_dir: Path, n: int, workdir: Path, name: str, kind: str) -> dict:
    out = workdir / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--photo-script", kind,
           "--plain-input", str(input_dir), "--plain-output", str(out / "data")]  # fmt: skip
    log(f"{name}: {n} photos ...")
    m = measure(cmd, workdir / "logs", name)
    examples = json.loads(m["stdout"].strip().splitlines()[-1])["examples"]
    shutil.rmtree(out, ignore_errors=True)
    return _result(n, m, examples, 0, examples)


def run_sae_photos(input_dir: Path, n: int, workers: int, workdir: Path, name: str) -> dict:
    log(f"{name}: {n} photos ...")
    side = f"{PHOTO_SIDE}x{PHOTO_SIDE}"
    job = ["preprocess", "--input", str(input_dir), "--resize", side, "--channels", "3"]
    m, out = measure_sae_job(job, workers, workdir, name)
    from preprocessing import manifest as manifest_lib

    made = manifest_lib.load(str(out))
    examples = sum(made.num_examples(s) for s in ("train", "eval"))
    shutil.rmtree(out, ignore_errors=True)
    return _result(n, m, examples, made.num_errors, made.num_inputs)


def draft_psnr(input_dir: Path, sample: int) -> dict:
    """PSNR of the job's default decode (DCT-downscaled) against --exact-decode, over every
    pixel of `sample` photos spread over the collection, and of the worst photo."""
    from preprocessing import images

    files = _photo_files(str(input_dir))
    files = files[:: max(1, len(files) // sample)][:sample]
    sq_err, worst = [], float("inf")
    for path, _ in files:
        data = Path(path).read_bytes()
        fast = images.decode_resized(data, 3, PHOTO_SIDE, PHOTO_SIDE, "crop", exact=False)
        exact = images.decode_resized(data, 3, PHOTO_SIDE, PHOTO_SIDE, "crop", exact=True)
        mse = float(np.mean((fast.astype(np.float64) - exact) ** 2))
        sq_err.append(mse)
        worst = min(worst, 10 * np.log10(255.0**2 / max(mse, 1e-12)))
    overall = 10 * np.log10(255.0**2 / max(float(np.mean(sq_err)), 1e-12))
    return {"photos": len(files), "psnr_db": round(overall, 2), "worst_psnr_db": round(worst, 2)}


def report_head(benchmark: str, images: int, sizes: list[int], image: str) -> dict:
    """The report's first fields, with empty `generate_seconds` and `runs` to fill."""
    return {
        **start_report(benchmark, ["tensorflow", "apache-beam", "pillow"]),
        "images_1x": images,
        "sizes": sizes,
        "image": image,
        "generate_seconds": {},
        "runs": {},
    }


def main_photo(args) -> dict:
    """Photo mode: contenders interleaved at 1x, sae_2w again at each other size."""
    sizes = [1] if args.skip_4x else args.sizes
    with open_workdir(args, "preprocess_bench-", scratch="out") as workdir:
        image = f"JPEG photos 320-960 px (q90) -> {PHOTO_SIDE}x{PHOTO_SIDE}x3, crop"
        report = report_head("preprocess-photos", args.images, sizes, image)
        collections = {}
        for k in sizes:
            collections[k], secs = make_photo_collection(workdir, args.images, copies=k)
            report["generate_seconds"][f"{k}x"] = secs
        one, n1 = collections[1], args.images
        sizes_kb = [os.path.getsize(p) / 1e3 for p, _ in _photo_files(str(one))]
        report["file_kb_median"] = round(float(np.median(sizes_kb)), 1)
        report["draft_quality"] = draft_psnr(one, min(n1, 1000))
        warm_page_cache(one)
        contenders = {
            "plain_loop@1x": lambda name: run_photo_script(one, n1, workdir, name, "plain"),
            "pool_full@1x": lambda name: run_photo_script(one, n1, workdir, name, "pool_full"),
            "pool_draft@1x": lambda name: run_photo_script(one, n1, workdir, name, "pool_draft"),
            "sae_1w@1x": lambda name: run_sae_photos(one, n1, 1, workdir, name),
            "sae_2w@1x": lambda name: run_sae_photos(one, n1, 2, workdir, name),
        }
        runs = report["runs"]
        repeated = run_interleaved(contenders, args.repeats)
        runs.update({name: median_run(rs) for name, rs in repeated.items()})
        for k in sizes[1:]:
            warm_page_cache(collections[k])
            n = k * args.images
            runs[f"sae_2w@{k}x"] = run_sae_photos(collections[k], n, 2, workdir, f"sae_2w@{k}x")
            runs[f"pool_draft@{k}x"] = run_photo_script(
                collections[k], n, workdir, f"pool_draft@{k}x", "pool_draft"
            )
    sae = runs["sae_2w@1x"]["images_per_s"]
    targets: dict = {}
    for other, want in PHOTO_TARGETS.items():
        got = ratio(sae, runs[f"{other}@1x"]["images_per_s"])
        report[f"speedup_2w_vs_{other}"] = got
        targets[f"speedup_2w_vs_{other}_min"] = want
        targets[f"speedup_2w_vs_{other}_pass"] = got >= want
    report["scaling_2w_vs_1w"] = ratio(sae, runs["sae_1w@1x"]["images_per_s"])
    memory, memory_targets = memory_ratios(runs, sizes[-1], "pool_draft")
    report.update(memory)
    report["targets"] = {
        **targets,
        **memory_targets,
        "all_processed": all(r["all_processed"] for r in runs.values()),
    }
    return report


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Images/s and peak memory of `sae preprocess` (DirectRunner, 1 and 2 "
        "workers) vs a plain single-process loop, on small PNG/JPEG files. JSON on stdout.",
    )
    p.add_argument(
        "--mode",
        choices=("tiny", "photo"),
        default="tiny",
        help="tiny: 28x28 PNG/JPEG files; photo: 320-960 px JPEG photos resized to 64x64x3 "
        "against hand-written Pool scripts (default: tiny)",
    )
    p.add_argument(
        "--images",
        type=int,
        help="files at size 1x (default: 50000 tiny, 20000 photo)",
    )
    p.add_argument(
        "--sizes",
        type=multipliers,
        default=[1, 4],
        help="collection size multipliers for the memory comparison (default: 1,4)",
    )
    p.add_argument("--skip-4x", action="store_true", help="quick run: same as --sizes 1")
    add_workdir_args(p, "where collections, outputs and logs go; collections there are reused")
    add_repeats_arg(p)
    # Hidden: the plain-loop contender, run by this script as a subprocess.
    p.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain-input", help=argparse.SUPPRESS)
    p.add_argument("--plain-output", help=argparse.SUPPRESS)
    p.add_argument("--plain-encoder", default="tf", choices=("tf", "sae"), help=argparse.SUPPRESS)
    p.add_argument(
        "--photo-script", choices=("plain", "pool_full", "pool_draft"), help=argparse.SUPPRESS
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.plain_loop:
        out = plain_loop(args.plain_input, args.plain_output, args.plain_encoder)
        print(json.dumps(out), flush=True)
        return 0
    if args.photo_script:
        out = photo_script(args.plain_input, args.plain_output, args.photo_script)
        print(json.dumps(out), flush=True)
        return 0
    if args.images is None:
        args.images = 20_000 if args.mode == "photo" else 50_000
    if args.images < 1:
        raise SystemExit("--images must be >= 1")
    sae_command()  # fail before any work when it is missing
    if args.mode == "photo":
        t_start = time.perf_counter()
        finish_report(main_photo(args), t_start, args.out)
        return 0
    sizes = [1] if args.skip_4x else args.sizes

    with open_workdir(args, "preprocess_bench-", scratch="out") as workdir:
        t_start = time.perf_counter()
        image = f"{SIDE}x{SIDE} grey, half PNG half JPEG, 10 class folders"
        report = report_head("preprocess", args.images, sizes, image)
        collections = {}
        for k in sizes:
            n = k * args.images
            collections[k], secs = make_collection(workdir, n)
            report["generate_seconds"][f"{k}x"] = secs  # null: reused from --workdir
        runs = report["runs"]
        one = collections[1]
        warm_page_cache(one)
        n1 = args.images
        contenders = {
            "plain_loop@1x": lambda name: run_plain(one, n1, workdir, name),
            "plain_loop_sae_encoder@1x": lambda name: run_plain(
                one, n1, workdir, name, encoder="sae"
            ),
            "sae_1w@1x": lambda name: run_sae(one, n1, 1, workdir, name),
            "sae_2w@1x": lambda name: run_sae(one, n1, 2, workdir, name),
        }
        repeated = run_interleaved(contenders, args.repeats)
        runs.update({name: median_run(rs) for name, rs in repeated.items()})
        for k in sizes[1:]:
            n = k * args.images
            warm_page_cache(collections[k])
            runs[f"sae_2w@{k}x"] = run_sae(collections[k], n, 2, workdir, f"sae_2w@{k}x")
            runs[f"plain_loop@{k}x"] = run_plain(collections[k], n, workdir, f"plain_loop@{k}x")

    def ips(name: str) -> float | None:
        return runs[name]["images_per_s"] if name in runs else None

    speedup = ratio(ips("sae_2w@1x"), ips("plain_loop@1x"))
    # On a --skip-4x run the memory ratio is null, under its default key.
    memory, memory_targets = memory_ratios(runs, sizes[-1], "plain_loop")
    report["speedup_2w_vs_plain"] = speedup
    report["speedup_1w_vs_plain"] = ratio(ips("sae_1w@1x"), ips("plain_loop@1x"))
    report["speedup_2w_vs_plain_sae_encoder"] = ratio(
        ips("sae_2w@1x"), ips("plain_loop_sae_encoder@1x")
    )
    report["scaling_2w_vs_1w"] = ratio(ips("sae_2w@1x"), ips("sae_1w@1x"))
    report.update(memory)
    report["targets"] = {
        "speedup_2w_vs_plain_min": TARGET_SPEEDUP,
        "speedup_pass": None if speedup is None else speedup >= TARGET_SPEEDUP,
        **memory_targets,
        "all_processed": all(r["all_processed"] for r in runs.values()),
    }
    finish_report(report, t_start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
