"""`sae extract --pool GRID`: whole images -> pooled convolutional features.

    sae extract --data runs/mnist/data --model runs/mnist-conv/train/export --output F \
        --pool 2x2 --pool-op mean --stride 1

The model's `encode_map` signature encodes every KxK window of each image at stride S into
a map [H', W', s] (trainer/conv.py); the map is split into a G x G grid of regions and each
region is reduced per unit (mean, max or sum), giving one vector of G*G*s values per image,
ordered (grid row, grid column, unit). It is then sparsified and written like `encode`'s
activations, but the default with --pool is `--sparsify none`: a mean-pooled value is a unit's
average rate over a region, and thresholding it at rho keeps about half of the values and
loses what tells the regions apart (builtin:mnist, the untuned mnist-conv model: linear probe
0.79 on the dense pooled features, 0.47 after `threshold:rho`). Pass --sparsify to choose.

Memory: a map is pooled inside the batch that made it, and a batch goes to `encode_map` in
chunks of at most MAX_MAP_VALUES map values, so the peak stays bounded whatever the image
size and the number of images. An image whose map alone is larger goes in bands of whole map
rows (the image rows their windows cover, so consecutive bands overlap by K - S rows): each
band is reduced into the regions of the whole map by sum or max, the bands are added up or
maxed, and sums become means by the regions' sizes at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from preprocessing.errors import UserError

MAX_MAP_VALUES = 2**24  # floats of activation maps per encode_map call (64 MB)
POOL_OPS = ("mean", "max", "sum")  # as trainer.conv.POOL_OPS, without importing TensorFlow


@dataclass(frozen=True)
class Pooling:
    grid: int  # G: a G x G grid of regions
    op: str  # mean | max | sum
    stride: int  # S, between 1 and K
    window: int  # K, the model's input height and width
    hidden: int  # s, units per map position

    @property
    def dim(self) -> int:
        """Values per pooled image: G*G*s."""
        return self.grid * self.grid * self.hidden


def parse_grid(text: str) -> int:
    """'2x2' or '2' -> 2. A grid of regions is square (Coates' quadrants: 2x2)."""
    sides = text.lower().split("x")
    try:
        grid = int(sides[0])
        if len(sides) <= 2 and int(sides[-1]) == grid and grid >= 1:
            return grid
    except ValueError:
        pass
    raise UserError(f"invalid --pool {text!r}: expected a square grid GxG, e.g. 2x2 or 3x3")


def map_size(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(H', W'): window positions down and across at `stride` (trainer/conv.py's map size);
    0 when the image is smaller than the window."""

    def positions(n: int) -> int:
        return (n - patch_size) // stride + 1 if n >= patch_size else 0

    return positions(height), positions(width)


def pieces(
    n: int, map_rows: int, map_cols: int, hidden: int, budget: int, cap: int | None = None
) -> list[tuple[int, int, int, int]]:
    """(first image, image stop, first map row, map row stop) of each encode_map call over n
    images with maps [map_rows, map_cols, hidden], each at most `budget` values (or one map
    row, if that is more): batches of at most `cap` whole images, or, when one image's map is
    larger, that image in bands of map rows. A batch of large images must not blow up memory."""
    per_image = map_rows * map_cols * hidden
    if per_image <= budget:
        step = max(1, min(cap or n, budget // per_image))
        return [(i, min(n, i + step), 0, map_rows) for i in range(0, n, step)]
    rows = max(1, budget // (map_cols * hidden))
    return [
        (i, i + 1, r, min(map_rows, r + rows)) for i in range(n) for r in range(0, map_rows, rows)
    ]


def image_rows(first: int, stop: int, window: int, stride: int) -> slice:
    """The image rows that map rows first..stop-1 read (their windows; bands overlap by K - S)."""
    return slice(first * stride, (stop - 1) * stride + window)


def pooling_of(grid: str, op: str, stride: int, model_shape: tuple[int, int, int], hidden: int):
    """The Pooling of the --pool/--pool-op/--stride flags for a model of input (K, K, C)."""
    if model_shape[0] != model_shape[1]:
        shape = "x".join(map(str, model_shape))
        raise UserError(f"--pool needs a model of square windows; this one takes {shape}")
    if not 1 <= stride <= model_shape[0]:
        raise UserError(f"invalid --stride {stride}: expected 1..{model_shape[0]} (the window)")
    return Pooling(parse_grid(grid), op, stride, model_shape[0], hidden)


def check_fits(
    pooling: Pooling, image_shape: tuple[int, int, int], model_shape: tuple[int, int, int]
) -> tuple[int, int]:
    """Returns the map size (H', W') of images `image_shape` under a model of input
    `model_shape` (K, K, C); one clear UserError when the sizes do not fit."""
    h, w, c = image_shape
    k = pooling.window
    if c != model_shape[2]:
        raise UserError(f"--pool: the images have {c} channel(s), the model takes {model_shape[2]}")
    if min(h, w) < k:
        raise UserError(f"--pool: {h}x{w} images are smaller than the model's {k}x{k} windows")
    hp, wp = map_size(h, w, k, pooling.stride)
    if min(hp, wp) < pooling.grid:
        raise UserError(
            f"--pool {pooling.grid}x{pooling.grid} does not fit a {hp}x{wp} map ({h}x{w} images, "
            f"{k}x{k} windows, stride {pooling.stride}); use a smaller grid or stride"
        )
    return hp, wp


def pooled_encoder(encode_map, pooling: Pooling):
    """An `encode`-like callable over the SavedModel's `encode_map` signature:
    f(images=uint8 [b, H, W, C]) -> {"activations": float32 [b, G*G*s]}, each `encode_map`
    call given at most MAX_MAP_VALUES map values (or one map row, if that is more): chunks of
    images, or bands of one image."""
    import numpy as np
    import tensorflow as tf

    from trainer import conv

    stride = tf.constant(pooling.stride, tf.int32)
    k, s, grid = pooling.window, pooling.stride, pooling.grid

    @tf.function(reduce_retracing=True, autograph=False)
    def pooled(images):
        maps = encode_map(images=images, stride=stride)["maps"]
        return conv.pool_grid(maps, grid, pooling.op)

    band_op = "max" if pooling.op == "max" else "sum"

    @tf.function(reduce_retracing=True, autograph=False)
    def pooled_band(images, first_row, map_rows):
        maps = encode_map(images=images, stride=stride)["maps"]
        return conv.pool_grid(maps, grid, band_op, first_row, map_rows)

    def in_bands(images, calls, hp: int, wp: int):
        """Images [b, H, W, C] -> [b, G*G*s], each image band by band (`calls`, from pieces)."""
        combine = np.maximum if band_op == "max" else np.add
        totals = {}  # image -> its bands so far, in float64: a region has 10^5 positions or more
        for i, _, first, stop in calls:
            band = images[i : i + 1, image_rows(first, stop, k, s)]
            part = pooled_band(band, tf.constant(first), tf.constant(hp)).numpy()
            totals[i] = combine(totals[i], part) if i in totals else part.astype(np.float64)
        out = np.concatenate([totals[i] for i in range(len(images))])
        if pooling.op == "mean":
            out = out / np.repeat(conv.region_sizes(hp, wp, grid), pooling.hidden)
        return tf.constant(out, tf.float32)

    def encode(images):
        hp, wp = map_size(images.shape[1], images.shape[2], k, s)
        calls = pieces(len(images), hp, wp, pooling.hidden, MAX_MAP_VALUES)
        if hp * wp * pooling.hidden > MAX_MAP_VALUES:
            return {"activations": in_bands(images, calls, hp, wp)}
        return {"activations": tf.concat([pooled(images[lo:hi]) for lo, hi, _, _ in calls], 0)}

    return encode
