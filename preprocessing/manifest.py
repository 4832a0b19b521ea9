"""The dataset manifest: `OUT/manifest.json`, written last by `sae preprocess`.

Its presence means the dataset is complete. Shard paths are relative to the
dataset directory, so a dataset can be copied or moved (local <-> gs://).

{
  "format_version": 1, "kind": "sae-pipeline/records",
  "image_shape": [H, W, C], "compression": "GZIP" | null,
  "splits": {"train": {"num_examples": N, "shards": [{"path": "train-00000-of-00010.tfrecord.gz",
                                                       "num_examples": n}, ...]},
             "eval": {...}},
  "num_inputs": files or items seen, "num_errors": rejected inputs, "error_files": [...],
  "label_names": [...], "pixel_mean": [per channel, 0..255], "pixel_std": [...],
  "source": "...", "options": {...}, "created": ISO-8601, "package_version": "..."
}
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

from preprocessing.errors import UserError
from preprocessing.records import FORMAT_VERSION

MANIFEST_NAME = "manifest.json"
# Every job's error report, one JSON object per rejected input (empty when none).
ERRORS_FILE = "errors/errors-00000-of-00001.jsonl"
KIND = "sae-pipeline/records"


def join(base: str, *parts: str) -> str:
    """Joins URI parts with '/', for local paths and gs:// alike."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


def absolute(uri: str) -> str:
    """A local path made absolute; URIs (gs://...) unchanged. Paths that reach Beam workers
    must be absolute: a remote runner's workers (Flink, Spark, a worker pool) do not run in
    the launcher's working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


@dataclass(frozen=True)
class Manifest:
    root: str
    data: dict

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.data["image_shape"]
        return int(h), int(w), int(c)

    @property
    def compression(self) -> str | None:
        return self.data.get("compression")

    @property
    def label_names(self) -> list[str]:
        return list(self.data.get("label_names", []))

    def num_examples(self, split: str) -> int:
        return int(self.data["splits"].get(split, {}).get("num_examples", 0))

    def shards(self, split: str) -> list[tuple[str, int]]:
        """(absolute URI, example count) of a split's non-empty shards."""
        shards = self.data["splits"].get(split, {}).get("shards", [])
        return [
            (join(self.root, s["path"]), s["num_examples"]) for s in shards if s["num_examples"]
        ]

    def shard_paths(self, split: str) -> list[str]:
        """Absolute URIs of a split's non-empty shards."""
        return [path for path, _ in self.shards(split)]

    def check_shards(self, splits: tuple[str, ...] = ("train", "eval")) -> None:
        """Cheap checks of every shard the manifest counts examples in, before a job reads
        them: present, not empty, and starting like a TFRecord (or a gzip stream). One
        small read per shard; a shard that lies about its count later is caught by the
        reader."""
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        from preprocessing import wire

        gzip = self.compression == "GZIP"
        for split in splits:
            for path, count in self.shards(split):
                what = f"shard {path} of dataset {self.root} (manifest: {count} {split} examples)"
                if not FileSystems.exists(path):
                    raise UserError(f"{what} is missing; rerun `sae preprocess`")
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                    head = f.read(wire.TFRECORD_HEADER_BYTES)
                if not head:
                    raise UserError(f"{what} is empty (0 bytes); rerun `sae preprocess`")
                if not (head[:2] == b"\x1f\x8b" if gzip else wire.tfrecord_header_ok(head)):
                    kind = "a gzip file" if gzip else "a TFRecord file"
                    raise UserError(f"{what} is not {kind}; rerun `sae preprocess`")


def load(root: str) -> Manifest:
    """Reads and checks ROOT/manifest.json (local path or gs://)."""
    from apache_beam.io.filesystems import FileSystems

    path = join(root, MANIFEST_NAME)
    if not FileSystems.exists(path):
        raise UserError(
            f"no dataset at {root}: {path} is missing (the preprocessing job writes it "
            f"last; run `sae preprocess --output {root}` or wait for it to finish)"
        )
    try:
        with FileSystems.open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun `sae preprocess`") from None
    if data.get("kind") != KIND or data.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} is not a sae-pipeline dataset manifest of format {FORMAT_VERSION} "
            f"(kind={data.get('kind')!r}, format_version={data.get('format_version')!r})"
        )
    return Manifest(root.rstrip("/"), data)
