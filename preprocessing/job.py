"""`sae preprocess`: images -> sharded TFRecords + errors/ + manifest.json (Apache Beam).

    sae preprocess --input builtin:digits --output /tmp/digits
    sae preprocess --input gs://bucket/photos --output gs://bucket/ds --resize 64x64 \
        --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp \
        --setup_file ./setup.py

Flags this job does not know are passed to Beam's PipelineOptions, so the same
`run(argv)` runs on the DirectRunner (default: multi-processing, one worker per
core), Dataflow, Flink or Spark.

Every input ends as examples or as exactly one error entry with a reason; the
final step checks inputs == accepted + rejected before it writes the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from preprocessing import (
    decode,
    flags,
    images,
    jobkit,
    progress,
    records,
    sharding,
    sources,
    storage,
    wire,
)
from preprocessing.decode import SPLITS
from preprocessing.errors import EXIT_TOO_MANY_ERRORS, ArgumentParser
from preprocessing.manifest import ERRORS_FILE, KIND, MANIFEST_NAME, Manifest, absolute, join

FAILED_NAME = jobkit.FAILED_NAME


# ----------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 28x28, got {text!r}") from None
    return h, w


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="sae preprocess",
        description="Turn an image collection into sharded TFRecords, an error report "
        "and a manifest. Unknown flags go to Apache Beam (e.g. --runner DataflowRunner).",
        epilog="Exit codes: 0 done; 2 bad flags or input; 3 too many bad images (see OUT/errors/).",
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="SRC",
        help="folder, glob, gs:// prefix, list file (.txt/.csv: uri[,label] per "
        "line), tfds:NAME[/CONFIG][:SPLIT] or builtin:NAME (see `sae datasets list`)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="OUT",
        help="output folder (local or gs://); must be empty unless --overwrite",
    )
    p.add_argument(
        "--resize",
        type=_size,
        metavar="HxW",
        help="resize every image to HxW (default: keep the size; images whose "
        "size differs from the first image's become errors)",
    )
    p.add_argument(
        "--aspect",
        choices=images.RESIZE_MODES,
        default="crop",
        help="how --resize handles aspect ratio: stretch, centre-crop, or pad "
        "with zeros (default: crop)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="1 (grey) or 3 (RGB); default: from the first image's mode",
    )
    p.add_argument(
        "--patches",
        type=flags.positive_int,
        metavar="N",
        help="instead of whole images, sample N random patches per image "
        "(UFLDL natural-image mode)",
    )
    p.add_argument(
        "--patch-size",
        type=flags.positive_int,
        default=8,
        metavar="K",
        help="patch side in pixels with --patches (default: 8)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for patch sampling (default: 0)")
    p.add_argument(
        "--eval-fraction",
        type=flags.fraction,
        default=0.1,
        help="share of inputs that go to the eval split, by a hash of the "
        "input's key, so reruns split identically (default: 0.1)",
    )
    sharding.add_arguments(p, "per-split")
    p.add_argument(
        "--compression",
        choices=("none", "gzip"),
        default="none",
        help="TFRecord compression (default: none)",
    )
    p.add_argument(
        "--max-error-fraction",
        type=flags.fraction,
        default=0.1,
        help="fail (exit 3, after writing the error report) if more than this "
        "share of inputs is rejected (default: 0.1)",
    )
    p.add_argument(
        "--max-pixels",
        type=flags.positive_int,
        default=images.MAX_PIXELS,
        help=f"reject images with more pixels (decompression bombs) (default: {images.MAX_PIXELS})",
    )
    p.add_argument(
        "--exact-decode",
        action="store_true",
        help="with --resize, decode JPEGs at full size (default: when the target is at "
        "least 2x smaller, the decoder downscales by 1/2, 1/4 or 1/8 first, never below "
        "the target; much faster, measured >= 30 dB PSNR against the exact decode)",
    )
    p.add_argument("--tfds-data-dir", help="TFDS data dir for tfds: sources")
    p.add_argument("--overwrite", action="store_true", help="delete what is in OUT before writing")
    p.add_argument("--verbose", action="store_true", help="show Beam's INFO logs")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines (default: every 10 s on local runners: images done / "
        "total, images/s, ETA)",
    )
    return p


# ----------------------------------------------------------------------------
# Output: shards, the error report, the manifest.
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputOptions:
    """How the examples are written (the decode options say what they are)."""

    num_shards: int | None = None
    target_shard_mb: float = 100.0
    compression: str = "none"  # "none" | "gzip"
    max_error_fraction: float = 0.1


def serialize(batch: list[decode.Example]) -> list[tuple[str, str, bytes]]:
    """Examples -> (split, key, serialized tf.train.Example), what WriteShards takes."""
    return [(ex.split, ex.key, records.encode(ex.key, ex.pixels, ex.label)) for ex in batch]


def shard_counts(
    num_inputs: int, decoding: decode.DecodeOptions, output: OutputOptions
) -> dict[str, int]:
    """Shards per split from the expected example count and size (every example has the
    same shape, so its size is known before decoding)."""
    examples = num_inputs * (decoding.patches or 1)
    nbytes = int(np.prod(decoding.shape)) + 200  # pixels + key and framing, roughly
    share = {"train": 1.0 - decoding.eval_fraction, "eval": decoding.eval_fraction}
    return {
        split: sharding.num_shards_for(
            round(examples * f),
            round(examples * f) * nbytes,
            output.target_shard_mb,
            output.num_shards,
        )
        for split, f in share.items()
    }


def write_tfrecord_shard(
    out: str, split: str, index: int, total: int, recs: list, compression: str
) -> dict:
    """A ShardWriter: sorted [(key, serialized Example)] -> one TFRecord shard."""
    suffix = ".tfrecord.gz" if compression == "gzip" else ".tfrecord"
    path = sharding.shard_path(out, split, index, total, suffix)
    frames = (wire.tfrecord_frame(r) for _, r in recs)
    storage.publish_chunks(path, frames, gzip=compression == "gzip")
    name = path.rsplit("/", 1)[1]
    return {"group": split, "index": index, "path": name, "num_examples": len(recs)}


class Finalize(beam.DoFn):
    """Runs once, after every shard and the error report are written.

    Checks the accounting, then writes manifest.json last, or fails (`jobkit.fail`) when
    too many inputs were rejected or none was accepted.
    """

    def __init__(
        self, out: str, decoding: decode.DecodeOptions, output: OutputOptions, source: str
    ):
        self.out, self.decoding, self.output, self.source = out, decoding, output, source

    def process(self, _, shards, counts, stats, label_names, num_inputs, num_accepted, num_errors):
        splits = {}
        for split in SPLITS:
            mine = sorted((s for s in shards if s["group"] == split), key=lambda s: s["index"])
            shard_list = [{"path": s["path"], "num_examples": s["num_examples"]} for s in mine]
            total = sum(s["num_examples"] for s in shard_list)
            if total != counts.get(split, (0, 0))[0]:
                raise RuntimeError(f"{split}: wrote {total} examples, expected {counts[split][0]}")
            splits[split] = {"num_examples": total, "shards": shard_list}
        if num_accepted + num_errors != num_inputs:
            raise RuntimeError(
                f"accounting bug: {num_inputs} inputs != "
                f"{num_accepted} accepted + {num_errors} errors"
            )
        summary = {
            "num_inputs": num_inputs,
            "num_inputs_accepted": num_accepted,
            "num_errors": num_errors,
            "error_files": [ERRORS_FILE],
        }
        fraction = num_errors / num_inputs if num_inputs else 1.0
        limit = self.output.max_error_fraction
        if fraction > limit or num_accepted == 0:
            why = (
                "all of them: nothing to write"
                if num_errors == num_inputs
                else f"{fraction:.1%} > --max-error-fraction {limit:.1%}"
            )
            return jobkit.fail(
                self.out,
                f"{num_errors} of {num_inputs} inputs were rejected ({why}); "
                f"reasons in {join(self.out, ERRORS_FILE)}",
                EXIT_TOO_MANY_ERRORS,
                **summary,
                error_fraction=fraction,
                max_error_fraction=limit,
            )
        manifest = {
            "format_version": records.FORMAT_VERSION,
            "kind": KIND,
            "image_shape": list(self.decoding.shape),
            "compression": "GZIP" if self.output.compression == "gzip" else None,
            "splits": splits,
            **summary,
            "label_names": label_names,
            "pixel_mean": stats["mean"],
            "pixel_std": stats["std"],
            "source": self.source,
            "options": {**self.decoding.describe(), **dataclasses.asdict(self.output)},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "package_version": jobkit.package_version(),
        }
        storage.publish_json(join(self.out, MANIFEST_NAME), manifest)
        return [manifest]


# ----------------------------------------------------------------------------
# The pipeline.
# ----------------------------------------------------------------------------
def build(
    p: beam.Pipeline,
    source: sources.Source,
    out: str,
    decoding: decode.DecodeOptions,
    output: OutputOptions,
    declared_labels: list[str] | None,
    src_text: str,
    reporter: progress.Reporter | None = None,
) -> None:
    decoded = p | "ReadAndDecode" >> decode.ReadAndDecode(
        source, decoding, declared_labels, reporter
    )
    stats = decoded.stats | "PixelStats" >> beam.CombineGlobally(decode.PixelStats())
    num_inputs = decoded.num_inputs
    # Decided from the input count, before decoding, so shards are written as examples come.
    num_shards = num_inputs | "NumShards" >> beam.Map(shard_counts, decoding, output)
    writer = functools.partial(write_tfrecord_shard, compression=output.compression)
    sharded = (
        decoded.examples
        | "Serialize" >> beam.Map(serialize)
        | "WriteShards" >> sharding.WriteShards(out, writer, num_shards)
    )
    num_errors = decoded.errors | "WriteErrors" >> sharding.WriteErrors(join(out, ERRORS_FILE))
    num_accepted = decoded.accepted | "CountAccepted" >> beam.CombineGlobally(sum)
    si = beam.pvalue.AsSingleton
    _ = (
        p
        | "Once" >> beam.Create([None])
        | "Finalize"
        >> beam.ParDo(
            Finalize(out, decoding, output, src_text),
            beam.pvalue.AsList(sharded.shards),
            si(sharded.counts),
            si(stats),
            si(decoded.labels),
            si(num_inputs),
            si(num_accepted),
            si(num_errors),
        )
    )


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the job; returns the manifest. Raises UserError for bad flags or input."""
    args, beam_args = make_parser().parse_known_args(argv)
    jobkit.configure_logging(args.verbose)
    out = absolute(args.output.rstrip("/"))
    storage.check_access(
        reads=[("--input", args.input), ("--tfds-data-dir", args.tfds_data_dir)],
        writes=[("--output", out)],
    )
    source = sources.parse(args.input, args.tfds_data_dir)
    declared = sources.label_names(source)
    size = (args.patch_size, args.patch_size) if args.patches else args.resize
    decoding = decode.DecodeOptions(
        shape=decode.infer_shape(source, size, args.channels),
        resize=bool(args.resize) and not args.patches,
        aspect=args.aspect,
        patches=args.patches,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        max_pixels=args.max_pixels,
        exact_decode=args.exact_decode,
    )
    output = OutputOptions(
        num_shards=args.num_shards,
        target_shard_mb=args.target_shard_mb,
        compression=args.compression,
        max_error_fraction=args.max_error_fraction,
    )
    shape = decoding.shape
    existing = jobkit.refuse_non_empty(out, args.overwrite)
    storage.delete(existing)  # manifest first
    options = PipelineOptions(jobkit.default_beam_args(beam_args))
    print(
        f"preprocess: {args.input} -> {out}  (image {shape[0]}x{shape[1]}x{shape[2]}, "
        f"runner {jobkit.describe_runner(options)})",
        flush=True,
    )
    with jobkit.running(options, "preprocess", "images", args.quiet) as (p, reporter):
        build(p, source, out, decoding, output, declared, args.input, reporter)
    return _report(out)


def _report(out: str) -> dict:
    manifest = jobkit.outcome(out, join(out, MANIFEST_NAME))
    m = Manifest(out, manifest)
    print(
        f"preprocess: {m.num_inputs} inputs -> "
        f"train {m.num_examples('train')} examples in {m.num_shards('train')} shards, "
        f"eval {m.num_examples('eval')} in {m.num_shards('eval')}; "
        f"{m.num_errors} rejected" + (f" (see {join(out, ERRORS_FILE)})" if m.num_errors else ""),
        flush=True,
    )
    print(f"preprocess: wrote {m.path}", flush=True)
    return manifest
