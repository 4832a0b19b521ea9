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

Patches (config patch_size K > 0): every batch of images becomes P = patches_per_image random
KxK windows of each image (`random_patches`), at offsets drawn by a stateless RNG from (seed,
global step), after the batch is formed and before tf.distribute splits it, so the windows
depend neither on the replica count nor on where a run was resumed. A step uses
global_batch / P images. In memory the windows are cut straight from the split (only their
pixels are copied); streamed, every image a step uses is read and parsed whole, so for
photos P in the hundreds keeps the bytes read per step near the windows' own (one window
per 512x512x3 photo reads 786 KB to train on 192 bytes). Eval batches take windows the same
way from (seed, -1 - batch index): the same windows in every evaluation.

Order guarantee: the training stream is a pure function of (manifest, seed):
epoch e is the train split shuffled with seed (seed, e) (a stateless Philox
permutation in memory; file order plus a seeded shuffle buffer when streaming), and
epochs follow one another. A run resumed at global step g skips the first g batches
of that same stream, so an interrupted and resumed run sees exactly the batches an
uninterrupted run would (single worker; with several workers the order within a
step may differ because FILE/DATA sharding assigns data per worker).
"""

from __future__ import annotations

import math

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


def check_shape(manifest: Manifest, input_shape: tuple[int, int, int], patch_size: int = 0) -> None:
    """The dataset's images must be the model's input, or hold its windows (patch_size)."""
    if patch_size:
        h, w, c = manifest.image_shape
        if min(h, w) < patch_size or c != input_shape[2]:
            raise UserError(
                f"dataset {manifest.root} holds {h}x{w}x{c} images: too small for "
                f"{patch_size}x{patch_size} patches or not {input_shape[2]} channel(s); "
                "lower patch_size or use another --data"
            )
        return
    if tuple(manifest.image_shape) != tuple(input_shape):
        raise UserError(
            f"dataset {manifest.root} holds {'x'.join(map(str, manifest.image_shape))} images "
            f"but the model expects {'x'.join(map(str, input_shape))}; pass "
            f"--set input_shape={','.join(map(str, manifest.image_shape))} or use another --data"
        )


def _paths(manifest: Manifest, split: str) -> list[str]:
    paths = manifest.shard_paths(split)
    if not paths:
        raise UserError(
            f"dataset {manifest.root} has no {split} examples; rerun preprocessing "
            "with more data or a different --eval-fraction"
        )
    return paths


def random_patches(
    images: tf.Tensor,
    patch_size: int,
    key: tf.Tensor,
    per_image: int = 1,
    which: tf.Tensor | None = None,
) -> tf.Tensor:
    """per_image windows of each of b images: uint8 [N, H, W, C] -> [b * per_image, K, K, C],
    K = patch_size <= H, W; the j-th image's windows are rows j * per_image ... of the output.

    which: int [b], the images to cut from (default: all N, in order). Cutting from the
    whole in-memory split this way copies only the windows' pixels, never a whole image.
    key: int64 [2], the stateless RNG seed; the top-left corners are uniform over the
    (H - K + 1) x (W - K + 1) valid positions, independent, and a pure function of key, b
    and per_image (per_image 1 draws what [b, 2] uniforms draw: the same windows as before
    the option existed).
    """
    shape = tf.shape(images, out_type=tf.int64)
    n = images.shape[0] if which is None else which.shape[0]  # static when known: tf.distribute
    which = tf.range(shape[0]) if which is None else tf.cast(which, tf.int64)
    b = tf.shape(which, out_type=tf.int64)[0]
    span = tf.cast(shape[1:3] - patch_size + 1, tf.float64)  # valid corners per axis
    u = tf.random.stateless_uniform([b, per_image, 2], key, dtype=tf.float64)  # in [0, 1)
    corner = tf.cast(tf.floor(u * span), tf.int64)  # [b, P, 2]
    offsets = tf.range(patch_size, dtype=tf.int64)
    rows = which[:, None, None] * shape[1] + corner[..., :1] + offsets  # [b, P, K]: of N * H
    cols = corner[..., 1:] + offsets  # [b, P, K]
    pixel = rows[..., :, None] * shape[2] + cols[..., None, :]  # [b, P, K, K]: of N * H * W
    windows = tf.gather(tf.reshape(images, [-1, shape[3]]), tf.reshape(pixel, [-1]))
    size = n * per_image if n is not None else -1  # (tf.distribute splits batches by it)
    return tf.reshape(windows, [size, patch_size, patch_size, images.shape[3]])


def _patches_of(
    ds: tf.data.Dataset,
    patch_size: int,
    per_image: int,
    seed: int,
    first: int,
    evaluation: bool,
    source: tf.Tensor | None = None,
):
    """Batches of images -> batches of windows (identity when patch_size is 0). Batch i,
    counted from `first`, draws with the key (seed, i) in training (i = the global step) and
    (seed, -1 - i) in evaluation, so eval windows never reuse a training step's key. With
    `source` (the split in memory), the batches are rows of its image indices instead."""
    if not patch_size:
        return ds
    base = tf.constant(seed, tf.int64)

    def windows(i, batch):
        key = tf.stack([base, -1 - i if evaluation else i])
        if source is None:
            return random_patches(batch, patch_size, key, per_image)
        return random_patches(source, patch_size, key, per_image, which=batch)

    return ds.enumerate(first).map(windows, num_parallel_calls=tf.data.AUTOTUNE)


def train_stream(
    manifest: Manifest,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    patch_size: int = 0,
    patches_per_image: int = 1,
) -> tf.data.Dataset:
    """Infinite stream of uint8 batches [global_batch, H, W, C], resumable at a step.

    Each epoch is the whole train split shuffled with seed (seed, epoch); a batch never
    spans two epochs (drop_remainder), so every step has exactly the global batch. With
    patch_size K, a step's batch is global_batch / patches_per_image images, each cut into
    patches_per_image random KxK windows ([global_batch, K, K, C]).
    """
    paths = _paths(manifest, "train")
    if patch_size and global_batch_size % patches_per_image:
        raise ValueError(f"{patches_per_image=} does not divide {global_batch_size=}")
    images_per_step = global_batch_size // patches_per_image if patch_size else global_batch_size
    per_epoch = manifest.num_examples("train") // images_per_step
    if per_epoch < 1:
        hint = (
            "raise patches_per_image or lower global_batch_size"
            if patch_size
            else "lower global_batch_size"
        )
        raise UserError(
            f"the train split of {manifest.root} has {manifest.num_examples('train')} images, "
            f"fewer than one step takes ({images_per_step}); {hint}"
        )
    compression = manifest.compression
    in_memory = fits_in_memory(manifest, "train")

    first_epoch, skip = divmod(start_step, per_epoch)
    epochs = tf.data.Dataset.range(first_epoch, 2**62)
    if in_memory:
        images = _read_all(manifest, "train")
        order_seed = tf.constant(seed, tf.int64)

        def steps(e):  # the epoch's permutation, as one row of image indices per step
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.shape(images, out_type=tf.int64)[0]),
                seed=tf.stack([order_seed, e]),
                alg="philox",
            )
            idx = tf.reshape(order[: per_epoch * images_per_step], [per_epoch, images_per_step])
            return tf.data.Dataset.from_tensor_slices(idx)

        if patch_size:  # windows cut straight from the split: no whole image is copied
            ds = epochs.flat_map(steps).skip(skip)
            ds = _patches_of(ds, patch_size, patches_per_image, seed, start_step, False, images)
        else:
            # Whole batches gathered GATHER_BATCHES at a time: per batch only a slice is
            # left to do, which keeps the stream's CPU per step far below a small model's
            # step (it shares the cores with training).
            ds = epochs.flat_map(steps).skip(skip).batch(GATHER_BATCHES)
            ds = ds.flat_map(lambda i: tf.data.Dataset.from_tensor_slices(tf.gather(images, i)))
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(0))

    def epoch(e):
        ds = _records(paths, compression, shuffle_files_seed=seed * 1_000_003 + e)
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
        return ds.batch(images_per_step, drop_remainder=True)

    # interleave, not flat_map: the next epoch's files open and its shuffle buffer fills
    # while this epoch is consumed (block_length = one whole epoch keeps the order).
    ds = epochs.interleave(
        epoch, cycle_length=2, block_length=per_epoch, num_parallel_calls=2, deterministic=True
    )
    ds = ds.skip(skip).map(_parse(manifest), num_parallel_calls=tf.data.AUTOTUNE)
    ds = _patches_of(ds, patch_size, patches_per_image, seed, start_step, False)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(len(paths)))


def fits_in_memory(manifest: Manifest, split: str) -> bool:
    """Whether the split's uint8 pixels fit in IN_MEMORY_BYTES (then it is read once and kept)."""
    return manifest.num_examples(split) * math.prod(manifest.image_shape) <= IN_MEMORY_BYTES


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
    manifest: Manifest,
    global_batch_size: int,
    split: str = "eval",
    drop_remainder: bool = False,
    patch_size: int = 0,
    seed: int = 0,
    patches_per_image: int = 1,
) -> tf.data.Dataset:
    """One pass over a split in file order, batched and parsed; with patch_size, batches of
    max(1, global_batch_size // patches_per_image) images, each cut into patches_per_image
    windows, the same on every pass (see the module docstring)."""
    paths = _paths(manifest, split)
    n = manifest.num_examples(split)
    size = max(1, global_batch_size // patches_per_image) if patch_size else global_batch_size
    batches = n // size if drop_remainder else -(-n // size)
    ds = _records(paths, manifest.compression).batch(size, drop_remainder)
    # Known length: Keras shows progress and does not warn about running out of data.
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    ds = ds.map(_parse(manifest), num_parallel_calls=tf.data.AUTOTUNE)
    ds = _patches_of(ds, patch_size, patches_per_image, seed, 0, True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(len(paths)))


def steps_per_epoch(manifest: Manifest, cfg) -> int:
    """cfg.steps_per_epoch, or (0) the steps of one pass over the train split's images at
    the config's images per step (one step for a full-batch lbfgs)."""
    n = manifest.num_examples("train")
    return cfg.steps_per_epoch or max(1, n // cfg.images_per_step(n))


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
