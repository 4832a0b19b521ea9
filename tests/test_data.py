"""The training input stream: epochs are permutations, resuming continues the same stream,
for both the in-memory path (small splits) and the streaming path (large splits)."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import job, manifest
from trainer import data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("d") / "data")
    job.run(
        [
            "--input",
            "builtin:digits",
            "--output",
            out,
            "--num-shards",
            "3",
            "--direct_running_mode=in_memory",
            "--direct_num_workers=1",
        ]
    )
    return manifest.load(out)


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
