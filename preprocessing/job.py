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
import datetime
import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from preprocessing import exiting, images, records, sharding, sources, wire
from preprocessing.errors import ArgumentParser, UserError
from preprocessing.manifest import KIND, MANIFEST_NAME, absolute, join

SPLITS = ("train", "eval")
FAILED_NAME = "_FAILED.json"
ERRORS_FILE = "errors/errors-00000-of-00001.jsonl"
EXIT_TOO_MANY_ERRORS = 3


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


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


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
        choices=("squash", "crop", "pad"),
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
        type=_positive,
        metavar="N",
        help="instead of whole images, sample N random patches per image "
        "(UFLDL natural-image mode)",
    )
    p.add_argument(
        "--patch-size",
        type=_positive,
        default=8,
        metavar="K",
        help="patch side in pixels with --patches (default: 8)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for patch sampling (default: 0)")
    p.add_argument(
        "--eval-fraction",
        type=_fraction,
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
        type=_fraction,
        default=0.1,
        help="fail (exit 3, after writing the error report) if more than this "
        "share of inputs is rejected (default: 0.1)",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive,
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
    return p


# ----------------------------------------------------------------------------
# Per-input work: decode, convert, resize or cut patches, encode.
# ----------------------------------------------------------------------------
def split_of(key: str, eval_fraction: float) -> str:
    """'eval' or 'train' from a stable hash of the key (same on every run and runner)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return "eval" if h / 2.0**64 < eval_fraction else "train"


def _to_pil(pixels: np.ndarray):
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def _read_bytes(uri: str) -> bytes:
    """The file's bytes; local paths are read directly (Beam's FileSystems looks up the
    filesystem plugin on every call, which costs as much as reading a small file)."""
    if "://" not in uri:
        with open(uri, "rb") as f:
            return f.read()
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


class DecodeBatch(beam.DoFn):
    """list[Item] -> list[(split, key, serialized Example, pixels)]; rejects -> 'errors'.

    Also emits, per batch, the number of inputs that produced examples ('accepted', so
    the final step can check that every input was accounted for) and the train pixels'
    partial sums ('stats').
    """

    def __init__(self, shape: tuple[int, int, int], opts: dict):
        self.shape = shape
        self.opts = opts

    def setup(self):
        exiting.skip_teardown_at_worker_exit()

    def process(self, batch: list[sources.Item], label_names: list[str]):
        examples, accepted = [], 0
        for item in batch:
            try:
                produced = list(self._examples(item, label_names))
            except images.ImageError as e:
                yield beam.pvalue.TaggedOutput("errors", {"uri": item.uri, "reason": str(e)})
                continue
            except Exception as e:  # noqa: BLE001 - one odd file must not kill the job
                reason = f"internal error ({type(e).__name__}: {e}); please report this file"
                yield beam.pvalue.TaggedOutput("errors", {"uri": item.uri, "reason": reason})
                continue
            accepted += 1
            examples += produced
        yield beam.pvalue.TaggedOutput("accepted", accepted)
        train = [ex[3] for ex in examples if ex[0] == "train"]
        if train:  # one partial sum per batch
            yield beam.pvalue.TaggedOutput("stats", PixelStats.sums(np.stack(train)))
        if examples:
            yield examples

    def _examples(self, item: sources.Item, label_names: list[str]):
        o = self.opts
        h, w, c = self.shape
        if item.pixels is None:
            try:
                data = _read_bytes(item.uri)
            except OSError as e:
                raise images.ImageError(f"cannot read the file ({e}); check permissions") from None
            if o["resize"] and not o["patches"]:
                # Decoded and resized in one step: a JPEG larger than the target is
                # decoded at reduced scale unless --exact-decode.
                arr = images.decode_resized(
                    data, c, h, w, o["aspect"], o["max_pixels"], o["exact_decode"]
                )
            else:
                arr = images.to_array(images.decode(data, max_pixels=o["max_pixels"]), c)
        else:
            arr = images.to_array(_to_pil(item.pixels), c)
        label = None
        if item.label is not None:
            label = label_names.index(item.label)
        split = split_of(item.rel, o["eval_fraction"])
        if o["patches"]:
            rng = images.patch_rng(item.rel, o["seed"])
            for i, patch in enumerate(images.sample_patches(arr, o["patches"], h, rng)):
                key = f"{item.key}#patch={i}"
                yield split, key, records.encode(key, patch, label), patch
            return
        if o["resize"]:
            arr = images.resize(arr, h, w, o["aspect"])
        elif arr.shape[:2] != (h, w):
            raise images.ImageError(
                f"image is {arr.shape[0]}x{arr.shape[1]} but the dataset is {h}x{w} "
                "(the first image's size); pass --resize HxW to resize all images"
            )
        yield split, item.key, records.encode(item.key, arr, label), arr


class PixelStats(beam.CombineFn):
    """Per-channel mean and std of pixel values (0..255) in float64.

    Inputs and accumulators are partial sums (sum [C], sum of squares [C], pixel count),
    one per batch (see `sums`), or None.
    """

    @staticmethod
    def sums(pixels: np.ndarray) -> tuple:
        """uint8 [..., C] -> (sum [C], sum of squares [C], pixel count), exact in float64."""
        p = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64)
        return p.sum(0), (p * p).sum(0), p.shape[0]

    def create_accumulator(self):
        return None

    def add_input(self, acc, partial):
        return self.merge_accumulators([acc, partial])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        return (sum(a[0] for a in accs), sum(a[1] for a in accs), sum(a[2] for a in accs))

    def extract_output(self, acc):
        if acc is None:
            return {"mean": [], "std": []}
        mean = acc[0] / acc[2]
        std = np.sqrt(np.maximum(acc[1] / acc[2] - mean * mean, 0.0))
        return {
            "mean": [round(float(v), 4) for v in mean],
            "std": [round(float(v), 4) for v in std],
        }


def shard_counts(num_inputs: int, shape, opts: dict) -> dict[str, int]:
    """Shards per split from the expected example count and size (every example has the
    same shape, so its size is known before decoding)."""
    examples = num_inputs * (opts["patches"] or 1)
    nbytes = int(np.prod(shape)) + 200  # pixels + key and framing, roughly
    share = {"train": 1.0 - opts["eval_fraction"], "eval": opts["eval_fraction"]}
    return {
        split: sharding.num_shards_for(
            round(examples * f),
            round(examples * f) * nbytes,
            opts["target_shard_mb"],
            opts["num_shards"],
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
    sharding.write_atomically(path, frames, gzip=compression == "gzip")
    name = path.rsplit("/", 1)[1]
    return {"group": split, "index": index, "path": name, "num_examples": len(recs)}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-pipeline")
    except PackageNotFoundError:
        return "unknown"


class Finalize(beam.DoFn):
    """Runs once, after every shard and the error report are written.

    Checks the accounting, then writes manifest.json last (or _FAILED.json when too
    many inputs were rejected).
    """

    def __init__(self, out: str, shape, opts: dict, source: str):
        self.out, self.shape, self.opts, self.source = out, shape, opts, source

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
        if fraction > self.opts["max_error_fraction"] or num_accepted == 0:
            failed = dict(
                summary, error_fraction=fraction, max_error_fraction=self.opts["max_error_fraction"]
            )
            sharding.write_atomically(
                join(self.out, FAILED_NAME), [json.dumps(failed, indent=2).encode()]
            )
            return []
        manifest = {
            "format_version": records.FORMAT_VERSION,
            "kind": KIND,
            "image_shape": list(self.shape),
            "compression": "GZIP" if self.opts["compression"] == "gzip" else None,
            "splits": splits,
            **summary,
            "label_names": label_names,
            "pixel_mean": stats["mean"],
            "pixel_std": stats["std"],
            "source": self.source,
            "options": self.opts,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "package_version": package_version(),
        }
        sharding.write_atomically(
            join(self.out, MANIFEST_NAME), [json.dumps(manifest, indent=2).encode()]
        )
        return [manifest]


# ----------------------------------------------------------------------------
# The pipeline.
# ----------------------------------------------------------------------------
def _sorted_labels(labels: list[str]) -> list[str]:
    """Numeric labels sort as numbers ("2" before "10"), others alphabetically."""
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


class Decoded(NamedTuple):
    num_inputs: beam.PCollection  # singleton: the number of inputs
    labels: beam.PCollection  # singleton: the label names, in index order
    examples: beam.PCollection  # batches: list[(split, key, serialized Example, pixels)]
    errors: beam.PCollection  # {"uri", "reason"} per rejected input
    accepted: beam.PCollection  # per batch, the number of inputs that produced examples
    stats: beam.PCollection  # per batch, PixelStats partial sums of the train pixels


def read_and_decode(
    p: beam.Pipeline, source: sources.Source, shape, opts: dict, declared_labels: list[str] | None
) -> Decoded:
    """The decode path every image source goes through (also used by `sae extract`)."""
    listing = p | "ReadSource" >> sources.ReadSource(source, derive_labels=declared_labels is None)
    if declared_labels is not None:
        labels = p | "DeclaredLabels" >> beam.Create([declared_labels])
    else:
        labels = listing.labels | "SortLabels" >> beam.Map(_sorted_labels)
    decoded = listing.batches | "Decode" >> beam.ParDo(
        DecodeBatch(shape, opts), beam.pvalue.AsSingleton(labels)
    ).with_outputs("errors", "accepted", "stats", main="examples")
    return Decoded(
        listing.count, labels, decoded.examples, decoded.errors, decoded.accepted, decoded.stats
    )


def build(
    p: beam.Pipeline,
    source: sources.Source,
    out: str,
    shape,
    opts: dict,
    declared_labels: list[str] | None,
    src_text: str,
) -> None:
    decoded = read_and_decode(p, source, shape, opts, declared_labels)
    labels_si = beam.pvalue.AsSingleton(decoded.labels)
    stats = decoded.stats | "PixelStats" >> beam.CombineGlobally(PixelStats())
    num_inputs = decoded.num_inputs
    # Decided from the input count, before decoding, so shards are written as examples come.
    num_shards = num_inputs | "NumShards" >> beam.Map(shard_counts, shape, opts)
    writer = functools.partial(write_tfrecord_shard, compression=opts["compression"])
    sharded = (
        decoded.examples
        | "DropPixels" >> beam.Map(lambda batch: [e[:3] for e in batch])
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
            Finalize(out, shape, opts, src_text),
            beam.pvalue.AsList(sharded.shards),
            si(sharded.counts),
            si(stats),
            labels_si,
            si(num_inputs),
            si(num_accepted),
            si(num_errors),
        )
    )


def _infer_shape(source: sources.Source, args) -> tuple[int, int, int]:
    """(H, W, C) of the output examples, from the flags or the first input."""
    if args.patches:
        if args.channels:
            return args.patch_size, args.patch_size, args.channels
    elif args.resize and args.channels:
        return (*args.resize, args.channels)
    uri, sample = sources.first_image(source)
    pil = _to_pil(sample) if isinstance(sample, np.ndarray) else images.decode(sample)
    channels = args.channels or images.default_channels(pil)
    if args.patches:
        return args.patch_size, args.patch_size, channels
    if args.resize:
        return (*args.resize, channels)
    logging.info("image size %dx%d taken from %s", pil.height, pil.width, uri)
    return pil.height, pil.width, channels


def _prepare_output(out: str, overwrite: bool) -> None:
    existing = FileSystems.match([join(out, "**")])[0].metadata_list
    if not existing:
        return
    if not overwrite:
        raise UserError(
            f"output {out} is not empty ({len(existing)} files); choose another --output "
            "or pass --overwrite to replace it"
        )
    # Manifest first: a reader must never see a manifest over a half-deleted dataset.
    paths = sorted((m.path for m in existing), key=lambda p: not p.endswith(MANIFEST_NAME))
    FileSystems.delete(paths)


def configure_logging(verbose: bool) -> None:
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    # The DirectRunner relays every worker's start-up warnings; they are noise to users.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
        logging.INFO if verbose else logging.ERROR
    )


def default_beam_args(beam_args: list[str]) -> list[str]:
    """The local runner, multi-processing with one worker per core, unless told otherwise.

    FnApiRunner is the engine of Beam's DirectRunner. Naming it pins that engine: since
    Beam 2.6x the DirectRunner first tries to download and start the Prism runner, which
    needs internet access and handles these worker options differently. Its workers, and
    only they, may skip the interpreter's teardown (preprocessing/exiting.py).
    """
    joined = " ".join(beam_args)
    args = list(beam_args)
    if "--runner" not in joined:
        exiting.mark_local_workers()
        args.append("--runner=FnApiRunner")
        if "--direct_running_mode" not in joined:
            args.append("--direct_running_mode=multi_processing")
        if "--direct_num_workers" not in joined:
            args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the job; returns the manifest. Raises UserError for bad flags or input."""
    args, beam_args = make_parser().parse_known_args(argv)
    configure_logging(args.verbose)
    out = absolute(args.output.rstrip("/"))
    source = sources.parse(args.input, args.tfds_data_dir)
    declared = sources.label_names(source)
    shape = _infer_shape(source, args)
    opts = {
        "resize": list(args.resize) if args.resize else None,
        "aspect": args.aspect,
        "channels": shape[2],
        "patches": args.patches,
        "patch_size": args.patch_size if args.patches else None,
        "seed": args.seed,
        "eval_fraction": args.eval_fraction,
        "num_shards": args.num_shards,
        "target_shard_mb": args.target_shard_mb,
        "compression": args.compression,
        "max_error_fraction": args.max_error_fraction,
        "max_pixels": args.max_pixels,
        "exact_decode": args.exact_decode,
    }
    _prepare_output(out, args.overwrite)
    options = PipelineOptions(default_beam_args(beam_args))
    runner = options.get_all_options().get("runner")
    print(
        f"preprocess: {args.input} -> {out}  (image {shape[0]}x{shape[1]}x{shape[2]}, "
        f"runner {runner})",
        flush=True,
    )
    with beam.Pipeline(options=options) as p:
        build(p, source, out, shape, opts, declared, args.input)
    return _report(out)


def _report(out: str) -> dict:
    failed = join(out, FAILED_NAME)
    if FileSystems.exists(failed):
        with FileSystems.open(failed) as f:
            info = json.load(f)
        raise UserError(
            f"{info['num_errors']} of {info['num_inputs']} inputs were rejected "
            f"({info['error_fraction']:.1%} > --max-error-fraction "
            f"{info['max_error_fraction']:.1%}); reasons in {join(out, ERRORS_FILE)}; "
            "no manifest was written",
            exit_code=EXIT_TOO_MANY_ERRORS,
        )
    with FileSystems.open(join(out, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    s = manifest["splits"]
    print(
        f"preprocess: {manifest['num_inputs']} inputs -> "
        f"train {s['train']['num_examples']} examples in {len(s['train']['shards'])} shards, "
        f"eval {s['eval']['num_examples']} in {len(s['eval']['shards'])}; "
        f"{manifest['num_errors']} rejected"
        + (f" (see {join(out, ERRORS_FILE)})" if manifest["num_errors"] else ""),
        flush=True,
    )
    print(f"preprocess: wrote {join(out, MANIFEST_NAME)}", flush=True)
    return manifest
