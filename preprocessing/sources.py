"""Image sources: what `--input SRC` can name, and how each becomes Items in Beam.

  DIR or DIR/** or a glob      local or gs:// (a bare directory/prefix is read recursively);
                               label = the first folder under the root (ImageFolder)
  LIST.txt / LIST.csv          one image URI per line, optional ",label"; relative URIs are
                               resolved against the list's folder; a "uri,label" header is skipped
  tfds:NAME[/CONFIG][:SPLIT]   a prepared TFDS dataset (--tfds-data-dir); default split "train"
  builtin:NAME                 see preprocessing.builtin

Every source yields `Item`s; files are read later, in the parallel decode step, so the
listing stays small and Beam can rebalance work (Reshuffle) before the expensive part.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import pickle
import posixpath
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import apache_beam as beam
import numpy as np

from preprocessing import builtin, storage
from preprocessing.errors import UserError
from preprocessing.storage import absolute

LIST_SUFFIXES = (".txt", ".csv", ".lst")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Item:
    """One input: a file to read (pixels is None) or an in-memory image.

    `key` names the input independently of where the collection lives: the path under
    the input root, the list entry as written, the builtin or TFDS id. The train/eval
    split, the patch positions, the shard and the order within it all come from the
    key, so a moved or copied collection gives the same dataset; records and features
    carry it for joins. `uri` is where the bytes are read (and what error entries name).
    """

    key: str
    uri: str
    label: str | None = None
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class Source:
    kind: str  # "files" | "list" | "tfds" | "builtin"
    spec: str  # the glob, list URI, tfds name or builtin name
    root: str = ""  # files: the folder labels are taken relative to
    split: str = ""  # tfds only
    data_dir: str | None = None  # tfds only


def parse(src: str, tfds_data_dir: str | None = None, flag: str = "--input") -> Source:
    """Classifies SRC (given as `flag`); raises UserError if it names nothing that exists."""
    if src.startswith("builtin:"):
        name = src.split(":", 1)[1]
        if name not in builtin.NAMES:
            raise UserError(
                f"unknown built-in dataset {name!r} in {flag} {src}; "
                f"choose one of: {', '.join('builtin:' + n for n in builtin.NAMES)}"
            )
        return Source("builtin", name)
    if src.startswith("tfds:"):
        name, _, split = src[len("tfds:") :].partition(":")
        data_dir = absolute(tfds_data_dir) if tfds_data_dir else None
        return Source("tfds", name, split=split or "train", data_dir=data_dir)
    path = absolute(src)  # workers read it, in their own working directory
    if src.lower().endswith(LIST_SUFFIXES) and not _GLOB_CHARS & set(src):
        if not storage.exists(path):
            raise UserError(f"list file {src} does not exist; check the {flag} path")
        return Source("list", path)
    if _GLOB_CHARS & set(path):
        root = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]
        pattern = path
    else:
        root = path.rstrip("/")
        pattern = root + "/**"
    if not storage.glob(pattern, limit=1):
        raise UserError(_nothing_at(src, path, pattern, flag))
    return Source("files", pattern, root=root)


def _nothing_at(src: str, path: str, pattern: str, flag: str) -> str:
    """Why SRC, which matched no files, is not a collection: said as what it really is."""
    kinds = "a folder, glob, gs:// prefix or list file (.txt/.csv/.lst: uri[,label] per line)"
    if pattern != path:  # a folder or prefix, not a glob
        remote = "://" in path
        if (storage.exists(path) and remote) or (not remote and os.path.isfile(path)):
            return (
                f"{flag} {src} is a single file, not {kinds}; pass the folder it is in, "
                "or a list file naming it"
            )
        if not remote and not os.path.exists(path):
            return f"{flag} {src} does not exist; check the path"
        where = "folder" if not remote else "prefix"
        return f"{flag} {src}: the {where} has no files in it; expected {kinds} of images"
    return f"{flag} {src}: the glob matches no files; expected {kinds} of images"


def _relative(root: str, path: str) -> str:
    return path[len(root) :].lstrip("/") if path.startswith(root) else posixpath.basename(path)


def _file_item(root: str, path: str) -> Item:
    key = _relative(root, path)
    parts = key.split("/")
    return Item(key=key, uri=path, label=parts[0] if len(parts) > 1 else None)


def _file_batches(pattern: str, root: str):
    """Every file matching `pattern`, as lists of at most BATCH["max_batch_size"] Items."""
    if "://" not in pattern and pattern == root + "/**":
        # A local folder: the os.walk that Beam's local match runs, without the two stat
        # calls per file it adds (20x slower on 50,000 small files).
        paths = (os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    else:
        paths = iter(storage.glob(pattern))
    while batch := list(itertools.islice(paths, BATCH["max_batch_size"])):
        yield [_file_item(root, p) for p in batch]


def _parse_list_line(list_uri: str, line: str) -> list[Item]:
    row = next(csv.reader([line]), [])
    if not row or not row[0].strip() or row[0].strip().lower() in ("uri", "path", "filename"):
        return []
    entry = uri = row[0].strip()
    if "://" not in uri and not uri.startswith("/"):
        uri = posixpath.join(posixpath.dirname(list_uri), uri)
    label = row[1].strip() if len(row) > 1 and row[1].strip() else None
    return [Item(key=entry, uri=uri, label=label)]


BATCH = {"min_batch_size": 16, "max_batch_size": 256}


class Listing(NamedTuple):
    batches: beam.PCollection  # list[Item], spread over the workers
    count: beam.PCollection  # singleton: the number of inputs
    labels: beam.PCollection | None  # singleton: the distinct labels seen (derive_labels)


class ReadSource(beam.PTransform):
    """PBegin -> Listing: every input once, in batches, with the input count and labels.

    Batches amortize Beam's per-element cost, which dominates for small images; the
    Reshuffle spreads them (and the expensive reads and decodes) over all workers.
    The count and labels are summed up on the listing side of the Reshuffle: a summary
    of the spread batches would be a second consumer of them, and then the local runner
    materializes every Item between stages instead of streaming them into the decode.
    """

    def __init__(self, source: Source, derive_labels: bool = False):
        super().__init__()
        self.source, self.derive_labels = source, derive_labels

    def expand(self, pbegin):
        batches = pbegin | "List" >> self._list()
        count = batches | "Count" >> (beam.Map(len) | beam.CombineGlobally(sum))
        labels = None
        if self.derive_labels:
            labels = (
                batches
                | "LabelOf" >> beam.FlatMap(lambda b: {it.label for it in b} - {None})
                | "DistinctLabels" >> beam.Distinct()
                | "CollectLabels" >> beam.combiners.ToList()
            )
        # Shuffled as one compressed bytes object per batch (a listing compresses ~7x):
        # the local runner holds a shuffle's whole content, in several copies, so its
        # memory grows with these bytes (measured: 1.29x -> 1.14x from 50,000 to 200,000
        # files with compression).
        spread = (
            batches
            | "Pack" >> beam.Map(lambda b: zlib.compress(pickle.dumps(b), 1))
            | "Spread" >> beam.Reshuffle()
            | "Unpack" >> beam.Map(lambda z: pickle.loads(zlib.decompress(z)))
        )
        return Listing(spread, count, labels)

    def _list(self) -> beam.PTransform:
        """PBegin -> PCollection[list[Item]]."""
        s = self.source
        if s.kind == "builtin":
            images, _ = builtin.load(s.spec)
            items = [Item(im.key, im.key, im.label, im.pixels) for im in images]
            size = BATCH["max_batch_size"]
            return beam.Create([items[i : i + size] for i in range(0, len(items), size)])
        if s.kind == "files":
            # Listed straight into batches: a Beam element per file costs about as much as
            # reading and decoding a small image.
            return beam.Create([s.spec]) | "ListFiles" >> beam.FlatMap(_file_batches, s.root)
        if s.kind == "tfds":
            items = _ReadTfds(s)
        else:
            items = beam.io.ReadFromText(s.spec) | "ParseList" >> beam.FlatMap(
                lambda ln, u=s.spec: _parse_list_line(u, ln)
            )
        return items | "Batch" >> beam.BatchElements(**BATCH)


def tfds_builder(source: Source):
    """The TFDS builder of a tfds: source; raises UserError if it is not prepared."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(source.spec, data_dir=source.data_dir)
    except Exception as e:  # TFDS raises several types for unknown/unprepared names
        raise UserError(
            f"cannot open TFDS dataset {source.spec!r} in data dir "
            f"{source.data_dir or '~/tensorflow_datasets'}: {str(e).splitlines()[0]}; "
            "prepare it first (tfds build) and pass --tfds-data-dir"
        ) from None
    if source.split not in builder.info.splits:
        raise UserError(
            f"TFDS dataset {source.spec!r} has no split {source.split!r}; "
            f"choose one of: {', '.join(builder.info.splits)}"
        )
    return builder


def tfds_features(builder) -> tuple[str, str | None, list[str]]:
    """(image feature name, label feature name or None, label names) of a TFDS dataset."""
    import tensorflow_datasets as tfds

    image_name = label_name = None
    label_names: list[str] = []
    for name, feature in builder.info.features.items():
        if image_name is None and isinstance(feature, tfds.features.Image):
            image_name = name
        elif label_name is None and isinstance(feature, tfds.features.ClassLabel):
            label_name, label_names = name, list(feature.names)
    if image_name is None:
        raise UserError(f"TFDS dataset {builder.name!r} has no Image feature to preprocess")
    return image_name, label_name, label_names


class _ReadTfds(beam.PTransform):
    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def expand(self, pbegin):
        import tensorflow_datasets as tfds

        s = self.source
        builder = tfds_builder(s)
        image_name, label_name, names = tfds_features(builder)
        prefix = f"tfds:{s.spec}:{s.split}/"

        def to_item(example: dict) -> Item:
            # ReadFromTFDS yields eager tensors; Items carry plain NumPy.
            ex = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in example.items()}
            key = prefix + ex["tfds_id"].decode()
            label = names[int(ex[label_name])] if label_name else None
            return Item(key, key, label, np.asarray(ex[image_name]))

        read_config = tfds.ReadConfig(add_tfds_id=True)
        return (
            pbegin
            | "ReadFromTfds" >> tfds.beam.ReadFromTFDS(builder, s.split, read_config=read_config)
            | "TfdsToItems" >> beam.Map(to_item)
        )


def label_names(source: Source) -> list[str] | None:
    """Label names a source declares up front (builtin, TFDS); None = derive from the data."""
    if source.kind == "builtin":
        return builtin.load(source.spec)[1] or None
    if source.kind == "tfds":
        return tfds_features(tfds_builder(source))[2] or None
    return None


def first_image(source: Source) -> tuple[str, bytes | np.ndarray]:
    """A deterministic sample input (its key and bytes or pixels) for shape defaults."""
    if source.kind == "builtin":
        im = builtin.load(source.spec)[0][0]
        return im.key, im.pixels
    if source.kind == "tfds":
        import tensorflow_datasets as tfds

        builder = tfds_builder(source)
        image_name = tfds_features(builder)[0]
        ds = builder.as_dataset(split=source.split).take(1)
        return f"tfds:{source.spec}", next(iter(tfds.as_numpy(ds)))[image_name]
    if source.kind == "list":
        with storage.open_read(source.spec) as f:
            text = io.TextIOWrapper(f, encoding="utf-8")
            listed = (it.uri for ln in text for it in _parse_list_line(source.spec, ln))
            uris = list(itertools.islice(listed, 64))
    else:
        uris = sorted(storage.glob(source.spec, limit=64))
    from preprocessing import images

    for uri in uris:
        data = storage.read_bytes(uri)
        try:
            images.decode(data)
        except images.ImageError:
            continue
        return uri, data
    raise UserError(
        f"none of the first {len(uris)} inputs of {source.spec} is a readable image; "
        "check --input, or pass --resize HxW and --channels to set the shape explicitly"
    )
