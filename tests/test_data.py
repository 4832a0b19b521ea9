"""The training input stream: epochs are permutations, resuming continues the same stream,
for both the in-memory path (small splits) and the streaming path (large splits)."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import manifest
from trainer import data


@pytest.fixture(scope="module")
def dataset(digits):
    return manifest.load(digits)  # 3 shards: the streaming path interleaves files


@pytest.fixture(params=["in_memory", "streaming"])
def path(request, monkeypatch):
    if request.param == "streaming":
        monkeypatch.setattr(data, "IN_MEMORY_BYTES", 0)
    else:  # several gathers per epoch, one ending mid-epoch
        monkeypatch.setattr(data, "GATHER_BATCHES", 7)
    return request.param


def _train_images(m) -> dict[bytes, int]:
    """pixels -> multiplicity, over the whole train split (digits has a few duplicates)."""
    counts: dict[bytes, int] = {}
    for batch in data.eval_dataset(m, 512, split="train"):
        for im in batch.numpy():
            counts[im.tobytes()] = counts.get(im.tobytes(), 0) + 1
    return counts


def test_each_epoch_is_a_permutation_and_epochs_differ(dataset, path):
    bs = 100
    per_epoch = dataset.num_examples("train") // bs
    batches = [b.numpy() for b in data.train_stream(dataset, bs, seed=3).take(2 * per_epoch)]
    assert all(b.shape == (bs, 8, 8, 1) and b.dtype == np.uint8 for b in batches)
    universe = _train_images(dataset)
    for e in range(2):
        seen: dict[bytes, int] = {}
        for b in batches[e * per_epoch : (e + 1) * per_epoch]:
            for im in b:
                seen[im.tobytes()] = seen.get(im.tobytes(), 0) + 1
        assert all(seen[k] <= universe.get(k, 0) for k in seen)  # nothing twice, nothing new
        assert sum(seen.values()) == per_epoch * bs
    assert not np.array_equal(batches[0], batches[per_epoch])


def test_resuming_at_a_step_continues_the_same_stream(dataset, path):
    full = [b.numpy() for b in data.train_stream(dataset, 64, seed=1).take(60)]
    resumed = [b.numpy() for b in data.train_stream(dataset, 64, seed=1, start_step=37).take(23)]
    for a, b in zip(full[37:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = next(iter(data.train_stream(dataset, 64, seed=2))).numpy()
    assert not np.array_equal(full[0], other_seed)


def _is_window_of(patch: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    k = patch.shape[0]
    for r in range(image.shape[0] - k + 1):
        for c in range(image.shape[1] - k + 1):
            if np.array_equal(image[r : r + k, c : c + k], patch):
                return r, c
    return None


def test_patch_stream_takes_one_window_per_image_and_resumes_exactly(dataset, path):
    whole = [b.numpy() for b in data.train_stream(dataset, 64, seed=1).take(12)]
    full = [b.numpy() for b in data.train_stream(dataset, 64, seed=1, patch_size=5).take(12)]
    corners = set()
    for images, patches in zip(whole, full, strict=True):
        assert patches.shape == (64, 5, 5, 1) and patches.dtype == np.uint8
        for im, p in zip(images[:8], patches[:8], strict=True):
            corner = _is_window_of(p, im)
            assert corner is not None  # the window of the same step's same image
            corners.add(corner)
    assert len(corners) > 4  # the corners are spread over the 4 x 4 valid positions
    resumed = data.train_stream(dataset, 64, seed=1, start_step=7, patch_size=5).take(5)
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    other = next(iter(data.train_stream(dataset, 64, seed=2, patch_size=5))).numpy()
    assert not np.array_equal(other, full[0])


def test_several_windows_per_image_come_from_that_image_and_resume_exactly(dataset, path):
    per_image, batch = 4, 64
    whole = [b.numpy() for b in data.train_stream(dataset, batch // per_image, seed=1).take(9)]
    stream = data.train_stream(dataset, batch, seed=1, patch_size=5, patches_per_image=per_image)
    full = [b.numpy() for b in stream.take(9)]
    spread = set()
    for images, patches in zip(whole, full, strict=True):  # a step reads batch / 4 images
        assert patches.shape == (batch, 5, 5, 1) and patches.dtype == np.uint8
        for i in range(0, batch // per_image, 5):
            corners = {_is_window_of(p, images[i]) for p in patches[i * 4 : i * 4 + 4]}
            assert None not in corners  # all 4 are windows of the step's i-th image
            spread.add(len(corners))
    assert max(spread) > 1  # an image's windows are drawn independently
    resumed = data.train_stream(
        dataset, batch, seed=1, start_step=5, patch_size=5, patches_per_image=per_image
    )
    for a, b in zip(full[5:], resumed.take(4), strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_eval_windows_are_the_same_on_every_pass(dataset):
    def windows():
        return np.concatenate([b.numpy() for b in data.eval_dataset(dataset, 50, patch_size=3)])

    first, images = windows(), np.concatenate([b.numpy() for b in data.eval_dataset(dataset, 50)])
    np.testing.assert_array_equal(first, windows())
    assert first.shape == (dataset.num_examples("eval"), 3, 3, 1)
    assert all(_is_window_of(p, im) is not None for p, im in zip(first, images, strict=True))


def test_eval_cuts_several_windows_of_each_image(dataset):
    images = np.concatenate([b.numpy() for b in data.eval_dataset(dataset, 50)])
    cut = data.eval_dataset(dataset, 50, patch_size=3, patches_per_image=5)
    windows = np.concatenate([b.numpy() for b in cut])
    assert windows.shape == (5 * len(images), 3, 3, 1)
    assert all(_is_window_of(w, images[i // 5]) is not None for i, w in enumerate(windows))
    again = np.concatenate([b.numpy() for b in cut])
    np.testing.assert_array_equal(windows, again)
