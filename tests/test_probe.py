"""The linear probe's three classifiers on scikit-learn's 8x8 digits: each reads its own
input, and PCA with as many components as pixels is a rotation of the standardized pixels, so
its accuracy equals the raw pixels' (it was whitened once, and fell below them)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from pipeline import probe


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x, y = x[:600] / 16.0, y[:600]
    train = np.arange(len(y)) % 4 != 0
    return x, y, train, ~train


def test_pca_with_every_component_equals_the_raw_pixels(digits):
    x, y, train, ev = digits
    # Blank border pixels (zero variance) are what whitening blew up; 128 feature dims > 64.
    features = np.random.default_rng(0).random((len(y), 128))
    acc, dims = probe.accuracies(features, x, y, train, ev, max_iter=2000)
    assert dims == {"sparse_features": 128, "raw_pixels": 64, "pca": 64}
    assert acc["raw_pixels"] > 0.9
    assert abs(acc["pca"] - acc["raw_pixels"]) <= 1 / ev.sum()
    assert acc["sparse_features"] < 0.3  # random features: near chance, and not the pixels'


def test_each_probe_reads_its_own_input(digits):
    x, y, train, ev = digits
    one_hot = np.eye(10)[y]  # features that are the label: a perfect probe
    acc, dims = probe.accuracies(one_hot, x, y, train, ev, max_iter=2000)
    assert acc["sparse_features"] == 1.0
    assert dims["pca"] == 10  # as many components as the features have dims
    assert 0.5 < acc["pca"] < acc["raw_pixels"]  # 10 of 64 directions lose some digits
