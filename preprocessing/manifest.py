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

from dataclasses import dataclass

from preprocessing import storage
from preprocessing.errors import UserError
from preprocessing.records import FORMAT_VERSION
from preprocessing.storage import absolute, join  # noqa: F401 - where jobs import them from

MANIFEST_NAME = "manifest.json"
# Every job's error report, one JSON object per rejected input (empty when none).
ERRORS_FILE = "errors/errors-00000-of-00001.jsonl"
KIND = "sae-pipeline/records"


@dataclass(frozen=True)
class Manifest:
    """A dataset manifest, read with `load`: the typed view every stage reads it through."""

    root: str
    data: dict  # the JSON as written; read it through the properties below

    @property
    def path(self) -> str:
        return join(self.root, MANIFEST_NAME)

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

    @property
    def num_inputs(self) -> int:
        return int(self.data["num_inputs"])

    @property
    def num_errors(self) -> int:
        return int(self.data["num_errors"])

    @property
    def error_files(self) -> list[str]:
        """Absolute URIs of the error reports."""
        return [join(self.root, f) for f in self.data.get("error_files", [ERRORS_FILE])]

    @property
    def pixel_mean(self) -> list[float]:
        return [float(v) for v in self.data.get("pixel_mean", [])]

    @property
    def pixel_std(self) -> list[float]:
        return [float(v) for v in self.data.get("pixel_std", [])]

    @property
    def options(self) -> dict:
        """The options the dataset was made with (decode and output options)."""
        return dict(self.data.get("options", {}))

    @property
    def source(self) -> str:
        return str(self.data.get("source", ""))

    def num_examples(self, split: str) -> int:
        return int(self.data["splits"].get(split, {}).get("num_examples", 0))

    def num_shards(self, split: str) -> int:
        """How many shards the split was written in (empty ones included)."""
        return len(self.data["splits"].get(split, {}).get("shards", []))

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
        from preprocessing import wire

        gzip = self.compression == "GZIP"
        for split in splits:
            for path, count in self.shards(split):
                what = f"shard {path} of dataset {self.root} (manifest: {count} {split} examples)"
                if not storage.exists(path):
                    raise UserError(f"{what} is missing; rerun `sae preprocess`")
                with storage.open_read(path) as f:
                    head = f.read(wire.TFRECORD_HEADER_BYTES)
                if not head:
                    raise UserError(f"{what} is empty (0 bytes); rerun `sae preprocess`")
                if not (head[:2] == b"\x1f\x8b" if gzip else wire.tfrecord_header_ok(head)):
                    kind = "a gzip file" if gzip else "a TFRecord file"
                    raise UserError(f"{what} is not {kind}; rerun `sae preprocess`")


def load(root: str) -> Manifest:
    """Reads and checks ROOT/manifest.json (local path or gs://)."""
    path = join(root, MANIFEST_NAME)
    data = storage.read_json(
        path,
        missing=f"no dataset at {root}: {path} is missing (the preprocessing job writes it "
        f"last; run `sae preprocess --output {root}` or wait for it to finish)",
        fix="rerun `sae preprocess`",
    )
    if (
        not isinstance(data, dict)
        or data.get("kind") != KIND
        or data.get("format_version") != FORMAT_VERSION
    ):
        raise UserError(
            f"{path} is not a sae-pipeline dataset manifest of format {FORMAT_VERSION} "
            f"(kind={_get(data, 'kind')!r}, format_version={_get(data, 'format_version')!r})"
        )
    return Manifest(root.rstrip("/"), data)


def is_dataset(root: str) -> bool:
    """Whether ROOT holds a complete dataset (its manifest, written last)."""
    return storage.exists(join(root, MANIFEST_NAME))


def _get(data, key: str):
    return data.get(key) if isinstance(data, dict) else None
