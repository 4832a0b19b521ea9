"""`sae extract`: sparse features (encoder activations) for every input, written back to storage.

    sae extract --data runs/digits/data --model runs/digits/train/export --output runs/feats
    sae extract --data gs://b/new-images --model gs://b/models --output gs://b/feats \
        --runner DataflowRunner ... --setup_file ./setup.py

--data is a `sae preprocess` output (its manifest and shards) or raw images (folder,
gs://, list file, builtin:...) decoded exactly as preprocessing does, resized to the
model's input. --model is a trainer export or a models root (its CURRENT version).
The SavedModel is loaded once per worker (DoFn.setup) and applied to batches.

FEATURES/ features-SSSSS-of-NNNNN.tfrecord and .parquet (schema: pipeline/feature_records.py),
          errors/errors-00000-of-00001.jsonl, manifest.json (written last).
Exactly once: each input lands in one shard chosen by a hash of its key, shards are
written atomically, and the new set is staged under FEATURES/.staging-<run>/ and
swapped in only when complete, so --overwrite never leaves old and new shards mixed
and a killed run leaves no manifest (rerun with --overwrite).
Exit codes: 0 done; 2 bad flags or input; 3 too many inputs could not be encoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import feature_records as fr
from pipeline import models, pooled
from preprocessing import (
    decode,
    exiting,
    flags,
    images,
    jobkit,
    progress,
    records,
    sharding,
    sources,
    storage,
    tf_noise,
    wire,
)
from preprocessing import manifest as manifest_lib
from preprocessing.decode import Example
from preprocessing.errors import EXIT_BAD_INPUT, EXIT_TOO_MANY_ERRORS, ArgumentParser, UserError
from preprocessing.manifest import ERRORS_FILE, MANIFEST_NAME, absolute, join
from trainer import artifacts
from trainer.config import dead_units

STAGING_PREFIX = ".staging-"
FAILED_NAME = jobkit.FAILED_NAME
FORMATS = ("tfrecord", "parquet")


# ----------------------------------------------------------------------------
# Sparsification: pure NumPy.
# ----------------------------------------------------------------------------
def parse_sparsify(text: str, rho: float) -> tuple[str, float]:
    """'threshold:T' | 'topk:K' | 'none' | 'default' -> (kind, value)."""
    if text == "default":
        # A sparse unit is "on" for about rho of the inputs; keeping activations above rho
        # keeps what is above the target mean and drops the near-zero bulk.
        return "threshold", rho
    kind, _, value = text.partition(":")
    try:
        if kind == "none" and not value:
            return "none", 0.0
        if kind == "threshold" and math.isfinite(float(value)):
            return "threshold", float(value)
        if kind == "topk" and int(value) >= 1:
            return "topk", int(value)
    except ValueError:
        pass
    raise UserError(f"invalid --sparsify {text!r}: use threshold:T, topk:K (K >= 1) or none")


def sparsify(acts: np.ndarray, kind: str, value: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """acts float [b, s] -> per row (indices int32 [k] ascending, values float32 [k])."""
    if kind == "none":
        keep = np.ones_like(acts, dtype=bool)
    elif kind == "threshold":
        keep = acts >= value
    else:
        k = min(int(value), acts.shape[1])
        top = np.argpartition(-acts, k - 1, axis=1)[:, :k]
        keep = np.zeros_like(acts, dtype=bool)
        np.put_along_axis(keep, top, True, axis=1)
    out = []
    for row, mask in zip(acts, keep, strict=True):
        idx = np.flatnonzero(mask).astype(np.int32)
        out.append((idx, row[idx].astype(np.float32)))
    return out


# ----------------------------------------------------------------------------
# Beam pieces.
# ----------------------------------------------------------------------------
class Inputs(NamedTuple):
    """What both input transforms give the encoder, whatever --data is."""

    batches: beam.PCollection  # list[Example], at most batch_size each
    errors: beam.PCollection  # {"uri", "reason"} per input that cannot be encoded
    num_inputs: beam.PCollection  # singleton: inputs read (each ends as a row or an error)
    expected: beam.PCollection  # singleton: inputs known before reading (sizes the shards)
    labels: beam.PCollection  # singleton: the label names (None when unlabelled)
    read_counts: beam.PCollection  # (shard path, records read); empty for raw images


def parse_input_record(element, shape, split_of_file: dict):
    """(shard path, serialized tf.train.Example) -> Example, or an error entry."""
    path, serialized = element
    try:
        r = records.decode(serialized)
    except Exception as e:  # noqa: BLE001 - a corrupt record is an error entry, not a crash
        reason = f"record is not a valid example ({type(e).__name__}); rerun `sae preprocess`"
        yield beam.pvalue.TaggedOutput("errors", {"uri": path, "reason": reason})
        return
    if r.image.shape != tuple(shape):
        reason = decode.shape_mismatch(
            r.image.shape,
            f"the model takes {'x'.join(map(str, shape))}",
            "use a model trained on this dataset",
        )
        yield beam.pvalue.TaggedOutput("errors", {"uri": r.key, "reason": reason})
        return
    yield Example(split_of_file[path], r.key, r.label, r.image)


class ReadDataset(beam.PTransform):
    """PBegin -> Inputs: the records of a `sae preprocess` output's splits, checked
    against the model's input shape."""

    def __init__(
        self, data: manifest_lib.Manifest, splits: list[str], shape: tuple, batch_size: int
    ):
        super().__init__()
        self.data, self.splits, self.shape, self.batch_size = data, splits, shape, batch_size

    def expand(self, pbegin) -> Inputs:
        split_of = {path: s for s in self.splits for path in self.data.shard_paths(s)}
        read = (
            pbegin
            | "ShardPaths" >> beam.Create(sorted(split_of))
            | "ReadRecords" >> beam.io.ReadAllFromTFRecord(with_filename=True)
        )
        # Records per file, to name a shard that holds other than its manifest count; their
        # sum is the input count (every record read ends as a row or an error entry).
        read_counts = (
            read
            | "FileOfRecord" >> beam.Map(lambda element: element[0])
            | "CountPerFile" >> beam.combiners.Count.PerElement()
        )
        num_inputs = (
            read_counts | "Counts" >> beam.Values() | "SumCounts" >> beam.CombineGlobally(sum)
        )
        parsed = read | "Parse" >> beam.FlatMap(
            parse_input_record, self.shape, split_of
        ).with_outputs("errors", main="examples")
        batches = parsed.examples | "Batch" >> beam.BatchElements(
            min_batch_size=min(32, self.batch_size), max_batch_size=self.batch_size
        )
        # Known up front from the manifest, so rows stream into shards as they are
        # encoded (a count computed in the pipeline would make the runner hold them).
        expected = pbegin | "ExpectedInputs" >> beam.Create(
            [sum(self.data.num_examples(s) for s in self.splits)]
        )
        labels = pbegin | "Labels" >> beam.Create([self.data.label_names])
        return Inputs(batches, parsed.errors, num_inputs, expected, labels, read_counts)


def _chunks(batch: list[Example], size: int) -> list[list[Example]]:
    """A decoded batch as encode batches of at most `size`; raw images belong to no split
    (their features record split "")."""
    batch = [ex._replace(split="") for ex in batch]
    return [batch[i : i + size] for i in range(0, len(batch), size)]


class ReadImages(beam.PTransform):
    """PBegin -> Inputs: raw images decoded as preprocessing decodes them (no pixel
    statistics: nothing here uses them)."""

    def __init__(self, source: sources.Source, decoding: decode.DecodeOptions, batch_size: int):
        super().__init__()
        self.source, self.batch_size = source, batch_size
        self.decoding = dataclasses.replace(decoding, pixel_stats=False)

    def expand(self, pbegin) -> Inputs:
        decoded = pbegin | "ReadAndDecode" >> decode.ReadAndDecode(
            self.source, self.decoding, sources.label_names(self.source)
        )
        batches = decoded.examples | "EncodeBatches" >> beam.FlatMap(_chunks, self.batch_size)
        no_shards = pbegin | "NoShards" >> beam.Create([])
        num = decoded.num_inputs
        return Inputs(batches, decoded.errors, num, num, decoded.labels, no_shards)


class Encode(beam.DoFn):
    """A batch of Examples -> one list of ("features", key, serialized feature record),
    plus partial statistics to 'stats'."""

    def __init__(
        self,
        export_dir: str,
        kind: str,
        value: float,
        reporter: progress.Reporter,
        pooling: pooled.Pooling | None = None,
    ):
        self.export_dir, self.kind, self.value = export_dir, kind, value
        self.reporter, self.pooling = reporter, pooling

    def setup(self):
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") != "0":  # the CLI's choice
            tf_noise.quiet_import()  # a worker process: its stderr is the user's
        import tensorflow as tf

        self._tf = tf
        # Kept: a tf.function over a signature does not keep the model's variables alive.
        self._model = tf.saved_model.load(self.export_dir)
        self._encode = self._model.signatures["encode"]
        if self.pooling:  # whole images -> pooled activation maps (pipeline/pooled.py)
            self._encode = pooled.pooled_encoder(self._model.signatures["encode_map"], self.pooling)
        exiting.skip_teardown_at_worker_exit()

    def process(self, batch):
        images = np.stack([ex.pixels for ex in batch])
        acts = self._encode(images=self._tf.constant(images))["activations"].numpy()
        rows = sparsify(acts, self.kind, self.value)
        yield [
            (
                "features",
                ex.key,
                fr.encode_row(
                    fr.FeatureRecord(ex.key, idx, vals, acts.shape[1], ex.split, ex.label)
                ),
            )
            for ex, (idx, vals) in zip(batch, rows, strict=True)
        ]
        nnz = np.array([len(idx) for idx, _ in rows])
        kept = np.zeros_like(acts, dtype=np.int64)
        for i, (idx, _) in enumerate(rows):
            kept[i, idx] = 1
        stats = (
            len(batch),
            np.bincount(nnz, minlength=acts.shape[1] + 1),
            kept.sum(0),
            acts.astype(np.float64).sum(0),
        )
        yield beam.pvalue.TaggedOutput("stats", stats)
        self.reporter.add(len(batch))


class SumStats(beam.CombineFn):
    """Sums (count, nnz histogram [s+1], per-unit kept counts [s], activation sums [s])."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, x):
        return x if acc is None else tuple(a + b for a, b in zip(acc, x, strict=True))

    def merge_accumulators(self, accs):
        acc = None
        for a in accs:
            if a is not None:
                acc = self.add_input(acc, a)
        return acc

    def extract_output(self, acc):
        return acc


def write_feature_shard(
    out: str, group: str, index: int, total: int, recs: list, formats: tuple[str, ...]
) -> dict:
    """A ShardWriter: sorted [(key, `fr.encode_row` payload)] -> .tfrecord and/or .parquet."""
    info = {"group": group, "index": index, "num_examples": len(recs)}
    if "tfrecord" in formats:
        path = sharding.shard_path(out, group, index, total, ".tfrecord")
        frames = (wire.tfrecord_frame(fr.row_example(bytes(r))) for _, r in recs)
        storage.publish_chunks(path, frames)
        info["tfrecord"] = path.rsplit("/", 1)[1]
    if "parquet" in formats:
        path = sharding.shard_path(out, group, index, total, ".parquet")
        storage.publish(path, fr.parquet_bytes([fr.row_record(k, bytes(r)) for k, r in recs]))
        info["parquet"] = path.rsplit("/", 1)[1]
    return info


class Finalize(beam.DoFn):
    """Once, after everything is staged: check counts, swap the staged set in, write the
    manifest (the header element plus what was measured) last."""

    def __init__(self, out: str, staging: str, max_error_fraction: float, shard_counts: dict):
        self.out, self.staging = out, staging
        self.max_error_fraction = max_error_fraction
        self.shard_counts = shard_counts  # dataset input: {shard path: manifest count}

    def _fail(self, reason: str, exit_code: int) -> list:
        # No manifest, and the staged set is left for inspection (beside its error report).
        return jobkit.fail(self.staging, reason, exit_code)

    def process(self, header, shards, stats, num_inputs, num_errors, read_counts):
        written = sum(s["num_examples"] for s in shards)
        if written + num_errors != num_inputs:
            raise RuntimeError(f"accounting bug: {num_inputs} inputs != {written} + {num_errors}")
        # Fewer records than counted is lost data; extra ones are inputs like any other
        # (encoded or error entries), so they are accounted for already.
        for path, count in sorted(self.shard_counts.items()):
            if read_counts.get(path, 0) < count:
                return self._fail(
                    f"shard {path} holds {read_counts.get(path, 0)} records but its "
                    f"manifest counts {count}; rerun `sae preprocess` for this dataset",
                    EXIT_BAD_INPUT,
                )
        if num_inputs and (written == 0 or num_errors / num_inputs > self.max_error_fraction):
            reason = f"{num_errors} of {num_inputs} inputs could not be encoded " + (
                "(all of them)" if written == 0 else "(over --max-error-fraction)"
            )
            errors = join(self.staging, ERRORS_FILE)
            return self._fail(f"{reason}; reasons in {errors}", EXIT_TOO_MANY_ERRORS)
        dim = header["dim"]
        count, hist, kept, act_sum = stats or (0, np.zeros(dim + 1), np.zeros(dim), np.zeros(dim))
        rates = kept / max(count, 1)
        mean_act = act_sum / max(count, 1)
        dead = np.flatnonzero(dead_units(mean_act, header["model_rho"])).tolist()
        _swap_in(self.staging, self.out)
        files = [k for k in ("tfrecord", "parquet") if k in header["formats"]]
        shard_list = [
            {**{k: s[k] for k in files}, "num_examples": s["num_examples"]}
            for s in sorted(shards, key=lambda s: s["index"])
        ]
        manifest = {
            **header,
            "num_inputs": num_inputs,
            "num_written": written,
            "num_errors": num_errors,
            "error_files": [ERRORS_FILE],
            "l0": {
                "mean": float((hist * np.arange(dim + 1)).sum() / max(count, 1)),
                "histogram": [int(v) for v in hist],
            },
            "unit_firing_rate": [round(float(v), 6) for v in rates],
            "unit_mean_activation": [round(float(v), 6) for v in mean_act],
            "dead_units": dead,
            "dead_fraction": len(dead) / dim,
            "shards": shard_list,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "package_version": jobkit.package_version(),
        }
        storage.publish_json(join(self.out, MANIFEST_NAME), manifest)
        return [manifest]


def _swap_in(staging: str, out: str) -> None:
    """Replaces what is in `out` (old set, stale staging dirs) by the staged files."""
    old = [p for p in jobkit.existing_files(out) if not p.startswith(staging + "/")]
    storage.delete(old)  # manifest first
    # Folders of killed runs' staging areas (local filesystems keep empty folders).
    for stale in {p[len(out) + 1 :].split("/")[0] for p in old}:
        if stale.startswith(STAGING_PREFIX):
            with contextlib.suppress(OSError):
                storage.delete([join(out, stale)])
    staged = storage.files_under(staging)
    storage.move(staged, [join(out, p[len(staging) + 1 :]) for p in staged])
    with contextlib.suppress(OSError):  # local: the now empty folders; object stores: nothing
        storage.delete([staging])


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------
def make_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="sae extract",
        description="Encode every input with a trained model and write sparse features "
        "(TFRecord + Parquet). Unknown flags go to Apache Beam.",
        epilog="Exit codes: 0 done; 2 bad flags or input; 3 too many inputs failed.",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="SRC",
        help="a `sae preprocess` output, or raw images (folder, gs://, list file, "
        "builtin:NAME) decoded as preprocessing does and resized to the model",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a `sae train` export dir, or a models root (uses its CURRENT version)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="FEATURES",
        help="output folder (local or gs://); must be empty unless --overwrite",
    )
    p.add_argument(
        "--format",
        default="tfrecord,parquet",
        help="comma-separated: tfrecord, parquet (default: both)",
    )
    p.add_argument(
        "--sparsify",
        default="default",
        help="threshold:T keeps activations >= T; topk:K keeps the K largest; none "
        "keeps all (default: threshold at the model's rho; none with --pool)",
    )
    p.add_argument(
        "--batch-size",
        type=flags.positive_int,
        default=256,
        help="max examples per encode call (default: 256)",
    )
    p.add_argument(
        "--split",
        default="train,eval",
        help="splits of a preprocessed dataset to encode (default: train,eval)",
    )
    p.add_argument(
        "--aspect",
        choices=images.RESIZE_MODES,
        default="crop",
        help="raw images: how resizing to the model's input handles aspect ratio",
    )
    p.add_argument(
        "--pool",
        metavar="GRID",
        help="convolutional features: encode every window of each whole image with a patch "
        "model and pool the maps over a GRID of regions, e.g. 2x2 (G*G*hidden values per "
        "image; needs a `sae preprocess` output as --data)",
    )
    p.add_argument(
        "--pool-op",
        choices=pooled.POOL_OPS,
        default="mean",
        help="with --pool: how each region is reduced (default: mean)",
    )
    p.add_argument(
        "--stride",
        type=flags.positive_int,
        default=1,
        help="with --pool: window step in pixels, up to the window (default: 1)",
    )
    sharding.add_arguments(p, "feature")
    p.add_argument(
        "--max-error-fraction",
        type=flags.fraction,
        default=0.1,
        help="fail (exit 3) if more than this share of inputs fails (default: 0.1)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing feature set (swapped in only when complete)",
    )
    p.add_argument("--verbose", action="store_true", help="show Beam's INFO logs")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines (default: every 10 s on local runners: rows done / total, "
        "rows/s, ETA)",
    )
    return p


def _dataset_input(
    root: str, split_flag: str, shape: tuple, export_dir: str, pooling
) -> tuple[manifest_lib.Manifest, list[str], tuple]:
    """A preprocessed --data, checked up front: its manifest, the --split names (known,
    with examples), cheap checks of their shards, and the shape of its records."""
    data = manifest_lib.load(absolute(root))
    if pooling:  # any image size the windows and the grid fit; records must be it
        pooled.check_fits(pooling, data.image_shape, shape)
        shape = data.image_shape
    elif data.image_shape != shape:
        raise UserError(
            f"dataset {root}: "
            + decode.shape_mismatch(
                data.image_shape,
                f"the model at {export_dir} takes {'x'.join(map(str, shape))}",
                "use a model trained on this dataset, or raw images (they are resized)",
            )
        )
    splits = [s.strip() for s in split_flag.split(",") if s.strip()]
    unknown = [s for s in splits if s not in decode.SPLITS]
    if unknown or not splits:
        raise UserError(
            f"invalid --split {split_flag!r}: use a comma-separated list of "
            f"{', '.join(decode.SPLITS)}"
        )
    if not sum(data.num_examples(s) for s in splits):
        raise UserError(
            f"dataset {root} has no examples in split(s) {', '.join(splits)}; choose "
            "--split " + ",".join(s for s in decode.SPLITS if data.num_examples(s))
        )
    data.check_shards(tuple(splits))
    return data, splits, shape


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the job; returns the features manifest."""
    args, beam_args = make_parser().parse_known_args(argv)
    jobkit.configure_logging(args.verbose)
    out = absolute(args.output.rstrip("/"))
    storage.check_access(
        reads=[("--data", args.data), ("--model", args.model)], writes=[("--output", out)]
    )
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    if not formats or set(formats) - set(FORMATS):
        raise UserError(f"invalid --format {args.format!r}: use tfrecord, parquet or both")
    export_dir, version = models.resolve(absolute(args.model))
    info = artifacts.read_export_info(export_dir)
    shape, rho, hidden = info.image_shape, info.config.rho, info.config.hidden
    # A pooled value is a unit's mean rate over a region, not one activation: a threshold at
    # rho keeps about half of them and drops what tells the regions apart (pipeline/pooled.py).
    pooled_default = args.pool and args.sparsify == "default"
    kind, value = parse_sparsify("none" if pooled_default else args.sparsify, rho)
    pooling = None
    if args.pool:
        pooling = pooled.pooling_of(args.pool, args.pool_op, args.stride, shape, hidden)
    # Nothing is deleted here: the new set replaces the old one only when complete.
    jobkit.refuse_non_empty(out, args.overwrite)
    staging = join(out, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")

    is_dataset = manifest_lib.is_dataset(args.data)
    if pooling and not is_dataset:
        raise UserError(
            f"--pool reads whole images of a `sae preprocess` output; {args.data} has no "
            f"manifest: run `sae preprocess --input {args.data}` first"
        )
    if is_dataset:
        data, splits, shape = _dataset_input(args.data, args.split, shape, export_dir, pooling)
        inputs = ReadDataset(data, splits, shape, args.batch_size)
        shard_counts = dict(sum((data.shards(s) for s in splits), []))
    else:
        source = sources.parse(args.data, flag="--data")
        decoding = decode.DecodeOptions(shape, resize=True, aspect=args.aspect)
        inputs = ReadImages(source, decoding, args.batch_size)
        shard_counts = {}
    header = {
        "format_version": fr.FORMAT_VERSION,
        "kind": fr.KIND,
        "model": args.model,
        "model_export": export_dir,
        "model_version": version,
        "model_rho": rho,
        "dim": pooling.dim if pooling else hidden,
        "sparsify": "none" if kind == "none" else f"{kind}:{value:g}",
        "formats": list(formats),
        "source": args.data,
    }
    if pooling:
        header["pooling"] = {"grid": pooling.grid, "op": pooling.op, "stride": pooling.stride}
    options = PipelineOptions(jobkit.default_beam_args(beam_args))
    print(
        f"extract: {args.data} -> {out} with {export_dir} ({header['sparsify']}, "
        f"runner {jobkit.describe_runner(options)})",
        flush=True,
    )
    with jobkit.running(options, "extract", "rows", args.quiet) as (p, reporter):
        read = p | "Read" >> inputs
        _ = read.expected | "ReportTotal" >> beam.Map(reporter.set_total)
        encoded = read.batches | "Encode" >> beam.ParDo(
            Encode(export_dir, kind, value, reporter, pooling)
        ).with_outputs("stats", main="features")
        # Sized for the dense worst case (every unit kept): ~6 bytes per unit plus the key.
        row_bytes = 6 * header["dim"] + 100
        num_shards = read.expected | "NumShards" >> beam.Map(
            lambda n: {
                "features": sharding.num_shards_for(
                    n, n * row_bytes, args.target_shard_mb, args.num_shards
                )
            }
        )
        writer = functools.partial(write_feature_shard, formats=formats)
        sharded = encoded.features | "WriteShards" >> sharding.WriteShards(
            staging, writer, num_shards
        )
        num_errors = read.errors | "WriteErrors" >> sharding.WriteErrors(join(staging, ERRORS_FILE))
        stats = encoded.stats | "Stats" >> beam.CombineGlobally(SumStats())
        header_pc = read.labels | "Header" >> beam.Map(
            lambda names: {**header, "label_names": names}
        )
        si = beam.pvalue.AsSingleton
        _ = header_pc | "Finalize" >> beam.ParDo(
            Finalize(out, staging, args.max_error_fraction, shard_counts),
            beam.pvalue.AsList(sharded.shards),
            si(stats),
            si(read.num_inputs),
            si(num_errors),
            beam.pvalue.AsDict(read.read_counts),
        )
    return _report(out, staging)


def _report(out: str, staging: str) -> dict:
    from pipeline import features

    manifest = jobkit.outcome(staging, join(out, MANIFEST_NAME))
    m = features.FeatureSet(out, manifest)
    print(
        f"extract: {m.num_inputs} inputs -> {m.num_written} feature rows in "
        f"{m.num_shards} shards, {m.num_errors} errors; mean nonzeros "
        f"{m.l0_mean:.2f} of {m.dim}, {len(m.dead_units)} dead units",
        flush=True,
    )
    print(f"extract: wrote {m.root}/{MANIFEST_NAME}", flush=True)
    return manifest
