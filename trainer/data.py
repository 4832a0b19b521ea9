"""The input pipeline: manifest shards -> batches of uint8 images for `model.fit`.

    files (from the manifest) -> interleave(TFRecordDataset, parallel) -> shuffle
      -> batch(GLOBAL batch, drop_remainder) -> parse_batch (vectorized) -> prefetch

A train split whose pixels fit in IN_MEMORY_BYTES is read and parsed once and kept
in memory as one uint8 tensor; each epoch then permutes the indices and gathers whole
batches, GATHER_BATCHES at a time. Reading and parsing records costs a few microseconds
per example, as much as a training step of a small model, so this keeps small datasets
from being input-bound; larger splits stream from the shards as above.

Batches hold the global batch; tf.distribute splits each across replicas and
shards the data across workers by FILE when every worker gets at least
`MIN_FILES_PER_WORKER` shards, else by DATA (every worker reads all, keeps its part).

Order guarantee: the training stream is a pure function of (manifest, seed):
epoch e is the train split shuffled with seed (seed, e) (a stateless Philox
permutation in memory; file order plus a seeded shuffle buffer when streaming), and
epochs follow one another. A run resumed at global step g skips the first g batches
of that same stream, so an interrupted and resumed run sees exactly the batches an
uninterrupted run would (single worker; with several workers the order within a
step may differ because FILE/DATA sharding assigns data per worker).
"""

from __future__ import annotations

import tensorflow as tf

from preprocessing import records
from preprocessing.errors import UserError
from preprocessing.manifest import Manifest
from trainer import distribute

MIN_FILES_PER_WORKER = 2
SHUFFLE_BUFFER = 10_000
IN_MEMORY_BYTES = 512 * 2**20
GATHER_BATCHES = 32


def _options(num_files: int) -> tf.data.Options:
    opts = tf.data.Options()
    enough = num_files >= MIN_FILES_PER_WORKER * distribute.num_workers()
    opts.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.FILE
        if enough
        else tf.data.experimental.AutoShardPolicy.DATA
    )
    opts.deterministic = True
    return opts


def _records(paths: list[str], compression: str | None, shuffle_files_seed=None) -> tf.data.Dataset:
    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle_files_seed is not None:
        files = files.shuffle(len(paths), seed=shuffle_files_seed)
    return files.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression or ""),
        cycle_length=min(len(paths), 16),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def _parse(manifest: Manifest):
    shape = manifest.image_shape
    return lambda serialized: records.parse_batch(serialized, shape)["image"]


def _paths(manifest: Manifest, split: str) -> list[str]:
    paths = manifest.shard_paths(split)
    if not paths:
        raise UserError(
            f"dataset {manifest.root} has no {split} examples; rerun preprocessing "
            "with more data or a different --eval-fraction"
        )
    return paths


def train_stream(
    manifest: Manifest, global_batch_size: int, seed: int, start_step: int = 0
) -> tf.data.Dataset:
    """Infinite stream of uint8 batches [global_batch, H, W, C], resumable at a step.

    Each epoch is the whole train split shuffled with seed (seed, epoch); a batch never
    spans two epochs (drop_remainder), so every step has exactly the global batch.
    """
    paths = _paths(manifest, "train")
    per_epoch = manifest.num_examples("train") // global_batch_size
    if per_epoch < 1:
        raise UserError(
            f"the train split of {manifest.root} has {manifest.num_examples('train')} examples, "
            f"fewer than one global batch ({global_batch_size}); lower global_batch_size"
        )
    compression = manifest.compression
    h, w, c = manifest.image_shape
    in_memory = manifest.num_examples("train") * h * w * c <= IN_MEMORY_BYTES

    first_epoch, skip = divmod(start_step, per_epoch)
    epochs = tf.data.Dataset.range(first_epoch, 2**62)
    if in_memory:
        images = _read_all(manifest, "train")
        order_seed = tf.constant(seed, tf.int64)

        def batches(e):
            # A permutation per epoch, then whole batches gathered GATHER_BATCHES at a time:
            # per batch only a slice is left to do, which keeps the stream's CPU per step
            # far below a small model's step (it shares the cores with training).
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.shape(images, out_type=tf.int64)[0]),
                seed=tf.stack([order_seed, e]),
                alg="philox",
            )
            idx = tf.reshape(order[: per_epoch * global_batch_size], [per_epoch, -1])
            return (
                tf.data.Dataset.from_tensor_slices(idx)
                .batch(GATHER_BATCHES)
                .flat_map(lambda i: tf.data.Dataset.from_tensor_slices(tf.gather(images, i)))
            )

        ds = epochs.flat_map(batches).skip(skip)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(0))

    def epoch(e):
        ds = _records(paths, compression, shuffle_files_seed=seed * 1_000_003 + e)
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
        return ds.batch(global_batch_size, drop_remainder=True)

    # interleave, not flat_map: the next epoch's files open and its shuffle buffer fills
    # while this epoch is consumed (block_length = one whole epoch keeps the order).
    ds = epochs.interleave(
        epoch, cycle_length=2, block_length=per_epoch, num_parallel_calls=2, deterministic=True
    )
    ds = ds.skip(skip).map(_parse(manifest), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(len(paths)))


def _read_all(manifest: Manifest, split: str) -> tf.Tensor:
    """Every record of a split, parsed: uint8 [N, H, W, C], in file order. Read shard by
    shard, so a shard holding other than the manifest's count is named."""
    parts = []
    for path, count in manifest.shards(split):
        ds = _records([path], manifest.compression).batch(65_536).map(_parse(manifest))
        images = list(ds)
        got = sum(int(b.shape[0]) for b in images)
        if got != count:
            raise UserError(
                f"shard {path} of dataset {manifest.root} holds {got} records but the "
                f"manifest counts {count}; rerun `sae preprocess`"
            )
        parts.extend(images)
    return tf.concat(parts, axis=0)


def eval_dataset(
    manifest: Manifest, global_batch_size: int, split: str = "eval", drop_remainder: bool = False
) -> tf.data.Dataset:
    """One pass over a split in file order, batched and parsed."""
    paths = _paths(manifest, split)
    n = manifest.num_examples(split)
    batches = n // global_batch_size if drop_remainder else -(-n // global_batch_size)
    ds = _records(paths, manifest.compression).batch(global_batch_size, drop_remainder)
    # Known length: Keras shows progress and does not warn about running out of data.
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    ds = ds.map(_parse(manifest), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(len(paths)))


def steps_per_epoch(manifest: Manifest, global_batch_size: int, configured: int) -> int:
    return configured or max(1, manifest.num_examples("train") // global_batch_size)


def error_reason(e: tf.errors.OpError) -> str:
    """The cause line of a TensorFlow op error, e.g. "corrupted record at 1234".

    Drops what graph execution wraps around it ("Graph execution error:", "Detected at
    node ...", stack lines, {{function_node ...}} and [Op:...] tags).
    """
    import re

    text = re.sub(r"\{\{[^}]*\}\}|\[\[[^\]]*\]\]|\[Op:[^\]]*\]|\s*name: $", "", e.message)
    skip = ("Graph execution error", "Detected at node", "File ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(skip)]
    return lines[-1] if lines else type(e).__name__


def check_readable(manifest: Manifest, whole: bool = False) -> None:
    """Reads the first record (or with `whole`, every record) of every shard.

    A missing or corrupt shard becomes a clear error naming it, up front (a missing or
    empty one is caught before, by `Manifest.check_shards`).
    """
    for split in ("train", "eval"):
        for path in manifest.shard_paths(split):
            ds = tf.data.TFRecordDataset(path, compression_type=manifest.compression or "")
            try:
                for _ in ds if whole else ds.take(1):
                    pass
            except (
                tf.errors.DataLossError,
                tf.errors.NotFoundError,
                tf.errors.InvalidArgumentError,
            ) as e:
                raise UserError(
                    f"shard {path} of dataset {manifest.root} is unreadable "
                    f"({type(e).__name__}: {error_reason(e)}); rerun `sae preprocess`"
                ) from None
