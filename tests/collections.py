"""Builders of small image collections on disk, shared by the end-to-end tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_keys(expect: dict[str, str | None], root: Path) -> set[str]:
    """The keys the jobs give the good images of `messy_collection(root)`: their paths
    under the input root."""
    return {Path(p).relative_to(root).as_posix() for p, bad in expect.items() if bad is None}


def messy_collection(root: Path, rng: np.random.Generator) -> dict[str, str | None]:
    """Nested class folders, mixed formats/modes/sizes and bad files.

    Returns {path: None for a good image, or a word the rejection reason must contain}.
    """
    expect: dict[str, str | None] = {}

    def put(rel: str, data: bytes, bad: str | None = None) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[str(path)] = bad

    def rand(h: int, w: int, c: int | None = 3) -> np.ndarray:
        shape = (h, w) if c is None else (h, w, c)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    put("cat/a.png", image_bytes(rand(20, 30), "PNG"))
    put("cat/b.jpg", image_bytes(rand(40, 40), "JPEG"))
    put("cat/deep/nested/c.gif", image_bytes(rand(16, 16, None), "GIF"))
    put("cat/d.bmp", image_bytes(rand(12, 18), "BMP"))
    put("dog/e.tiff", image_bytes(rand(25, 25), "TIFF"))
    put("dog/f.webp", image_bytes(rand(30, 20), "WEBP"))
    put("dog/g.png", image_bytes(rand(10, 10, 4), "PNG"))  # RGBA
    put("dog/h.jpg", image_bytes(rand(32, 32), "JPEG", mode="CMYK"))
    put("dog/i16.png", image_bytes(rng.integers(0, 65535, (9, 9), dtype=np.uint16), "PNG"))
    put("top-level.png", image_bytes(rand(8, 8, None), "PNG"))  # no class folder: no label
    put("cat/empty.png", b"", bad="empty")
    put("dog/notes.txt", b"not an image at all\n", bad="not an image")
    put("dog/truncated.png", image_bytes(rand(64, 64), "PNG")[:150], bad="truncated")
    put("cat/garbage.jpg", bytes(rng.integers(0, 256, 500, dtype=np.uint8)), bad="not an image")
    return expect
