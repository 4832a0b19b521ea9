"""Pieces of the decode path (preprocessing/decode.py), without a pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import decode


def test_pixel_stats_are_exact_in_any_order_of_combination():
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 5, 4, 3), np.uint8) for n in (1, 7, 30)]
    stats = decode.PixelStats()
    histograms = [decode.PixelStats.histogram(b) for b in batches]
    one = stats.extract_output(stats.add_input(stats.create_accumulator(), histograms[0]))
    nested = stats.merge_accumulators(
        [stats.merge_accumulators([None, histograms[2]]), histograms[1], None, histograms[0]]
    )
    got = stats.extract_output(nested)
    pixels = np.concatenate([b.reshape(-1, 3) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(got["mean"], pixels.mean(0), atol=1e-4)
    np.testing.assert_allclose(got["std"], pixels.std(0), atol=1e-4)
    np.testing.assert_allclose(one["mean"], batches[0].reshape(-1, 3).mean(0), atol=1e-4)
    # Merging does not change its inputs (Beam may reuse them): 1 image of 5x4 per channel.
    assert histograms[0].shape == (3, 256) and (histograms[0].sum(axis=1) == 20).all()
    assert stats.extract_output(None) == {"mean": [], "std": []}


def test_decode_options_describe_what_the_manifest_records():
    resized = decode.DecodeOptions((64, 48, 3), resize=True, aspect="pad", exact_decode=True)
    assert resized.describe() == {
        "resize": [64, 48], "aspect": "pad", "channels": 3, "patches": None,
        "patch_size": None, "seed": 0, "eval_fraction": 0.1,
        "max_pixels": resized.max_pixels, "exact_decode": True,
    }  # fmt: skip
    patches = decode.DecodeOptions((8, 8, 1), patches=100, seed=3).describe()
    assert patches["patch_size"] == 8 and patches["resize"] is None and patches["seed"] == 3
    with pytest.raises(ValueError, match="aspect"):
        decode.DecodeOptions((8, 8, 1), aspect="stretch")


def test_split_of_is_stable_and_near_the_fraction():
    keys = [f"c{i % 3}/{i}.jpg" for i in range(4000)]
    splits = [decode.split_of(k, 0.25) for k in keys]
    assert splits == [decode.split_of(k, 0.25) for k in keys]
    assert abs(splits.count("eval") / len(keys) - 0.25) < 0.03
    assert {decode.split_of(k, 0.0) for k in keys} == {"train"}


@pytest.mark.parametrize("pixel_stats", [True, False])
def test_pixel_histograms_only_when_asked(pixel_stats):
    """`sae extract` decodes raw images without the histograms preprocessing needs."""
    import apache_beam as beam

    from preprocessing import progress, sources

    rng = np.random.default_rng(0)
    items = [sources.Item(f"k{i}", f"k{i}", None, rng.integers(0, 255, (4, 4), np.uint8))
             for i in range(6)]  # fmt: skip
    options = decode.DecodeOptions((4, 4, 1), eval_fraction=0.0, pixel_stats=pixel_stats)
    fn = decode.DecodeBatch(options, progress.Reporter(None))
    out = list(fn.process(items, []))
    tags = [o.tag for o in out if isinstance(o, beam.pvalue.TaggedOutput)]
    assert tags.count("stats") == int(pixel_stats) and tags.count("accepted") == 1
    (examples,) = [o for o in out if not isinstance(o, beam.pvalue.TaggedOutput)]
    assert [ex.key for ex in examples] == [it.key for it in items]
    if pixel_stats:
        (hist,) = [o.value for o in out if getattr(o, "tag", None) == "stats"]
        assert hist.sum() == 6 * 16
    assert "pixel_stats" not in options.describe()  # how it ran, not what the data is
