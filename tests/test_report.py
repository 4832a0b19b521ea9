"""report.html: the feature dashboards against a brute-force reference (every window cut out
and encoded), the cost curves read back from TensorBoard files, the SVG charts, and the whole
report parsed as HTML: balanced tags, N dashboards with a filter and K inputs each, curves with
points, the probe chart, and no external references."""

from __future__ import annotations

import html.parser

import numpy as np
import pytest
import tensorflow as tf

from pipeline import charts, curves, dashboards, pooled, report
from preprocessing import manifest
from tests.helpers import LABELLED_H as H
from tests.helpers import LABELLED_W as W
from tests.test_conv import _naive_maps
from trainer import export, visualize
from trainer.config import apply_overrides, preset
from trainer.model import SparseAutoencoder

K, HIDDEN = 4, 6


@pytest.fixture(scope="module")
def data(labelled) -> str:
    """24 labelled H x W grey images, about a third of them in the eval split."""
    return labelled


def _export(path, shape: tuple[int, int], patch: bool) -> str:
    """An untrained model with random weights, exported; unit 0 is dead (bias -30)."""
    h, w = shape
    sets = [f"input_shape={h},{w},1", f"hidden={HIDDEN}", "rho=0.1"]
    cfg = apply_overrides(preset("tiny"), sets + ([f"patch_size={h}"] if patch else []))
    model = SparseAutoencoder(cfg)
    rng = np.random.default_rng(1)
    model.w1.assign(rng.normal(0, 0.02, model.w1.shape).astype(np.float32))
    model.b1.assign(np.array([-30, -1, 0, 1, -0.5, 0.5], np.float32))
    export.save(model, str(path), {"config": cfg.to_dict(), "image_shape": [h, w, 1]})
    return str(path)


def _encode(export_dir: str):
    sig = tf.saved_model.load(export_dir).signatures["encode"]
    return lambda x: sig(images=tf.constant(x))["activations"].numpy()


@pytest.mark.parametrize("patch, banded", [(True, False), (True, True), (False, False)])
def test_dashboards_equal_a_brute_force_reference(data, tmp_path, monkeypatch, patch, banded):
    if banded:  # 2 map rows per call: every image in bands, whose best windows must combine
        monkeypatch.setattr(dashboards, "MAP_BUDGET", 2 * (W - K + 1) * HIDDEN)
    model = _export(tmp_path / "export", (K, K) if patch else (H, W), patch)
    keys, images = dashboards.eval_images(data, 100)
    n_eval = manifest.load(data).num_examples("eval")
    assert len(keys) == len(images) == n_eval > 4 and images.shape[1:] == (H, W, 1)
    dash = dashboards.compute(model, data, num_units=3, top=4, batch_size=3)
    encode = _encode(model)
    maps = _naive_maps(encode, images, 1) if patch else encode(images)[:, None, None]
    acts = maps.reshape(-1, HIDDEN)
    mean, rate = acts.mean(axis=0), (acts > 0.5).mean(axis=0)
    assert dash.patch is patch and dash.num_inputs == len(acts) and dash.num_dead == 1
    assert [u.index for u in dash.units] == list(np.lexsort((-mean, -rate))[:3])
    assert 0 not in [u.index for u in dash.units]
    per_image_best = maps.max(axis=(1, 2))  # [images, units]
    for u in dash.units:
        assert u.firing_rate == pytest.approx(rate[u.index])
        assert u.mean_activation == pytest.approx(mean[u.index], rel=1e-5)
        want = np.sort(per_image_best[:, u.index])[::-1][:4]
        np.testing.assert_allclose(u.top_activations, want, rtol=1e-5)
        # Each top input is a real window of its image, and encodes to its activation.
        assert u.top_inputs.shape == ((4, K, K, 1) if patch else (4, H, W, 1))
        np.testing.assert_allclose(encode(u.top_inputs)[:, u.index], want, rtol=1e-5)
        assert len(set(u.top_keys)) == 4  # one input per image
        assert u.filter.shape == u.top_inputs.shape[1:]


@pytest.mark.parametrize(
    "fraction, text",
    [(0.0, "0%"), (4e-4, "0.04%"), (0.003, "0.3%"), (0.0312, "3.1%"), (0.0999, "10%"),
     (0.123, "12%"), (1.0, "100%"), (1e-7, "0.00001%")],
)  # fmt: skip
def test_firing_rates_print_two_significant_digits_and_no_exponent(fraction, text):
    assert report.percent(fraction) == text


def test_unit_selection_skips_dead_units_and_orders_by_firing():
    rate = np.array([0.9, 0.5, 0.7, 0.0, 0.5])
    mean = np.array([0.001, 0.3, 0.2, 0.0, 0.4])  # unit 0 and 3 are dead at rho 0.1
    assert dashboards.select_units(rate, mean, 0.1, 3).tolist() == [2, 4, 1]
    assert dashboards.select_units(rate, mean, 0.1, 10).tolist() == [2, 4, 1]


def test_best_windows_and_top_k_against_loops():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 3, 4, 2))
    best, rows, cols = dashboards.best_windows(maps)
    for i in range(5):
        for j in range(2):
            r, c = np.unravel_index(maps[i, :, :, j].argmax(), (3, 4))
            assert (rows[i, j], cols[i, j], best[i, j]) == (r, c, maps[i, r, c, j])
    idx = dashboards.top_k(best, 3)
    assert idx.shape == (2, 3)
    for j in range(2):
        assert idx[j].tolist() == list(np.argsort(-best[:, j])[:3])
    images = rng.integers(0, 256, (5, 6, 7, 1), dtype=np.uint8)
    got = dashboards.crop(images, np.array([4, 0]), np.array([2, 0]), np.array([3, 1]), (3, 2))
    assert got.shape == (2, 3, 2, 1)
    np.testing.assert_array_equal(got[0], images[4, 2:5, 3:5])
    np.testing.assert_array_equal(got[1], images[0, 0:3, 1:3])


def test_calls_are_bounded_by_map_size_and_cover_every_map_row_once():
    def pieces(n, h, w, hidden, cap):
        return pooled.pieces(n, h, w, hidden, 1 << 23, cap=cap)

    assert pieces(250, 1, 1, 400, cap=100) == [(0, 100, 0, 1), (100, 200, 0, 1),
                                               (200, 250, 0, 1)]  # fmt: skip
    assert len(pieces(100, 21, 21, 400, cap=100)) == 3  # 28x28 digits: 47 a call
    for n, h, w in [(3, 1017, 1017), (2, 300, 9000), (1, 5, 30000)]:  # one map > the budget
        got = pieces(n, h, w, 400, cap=100)
        per_image = {i: [] for i in range(n)}
        for lo, hi, first, stop in got:
            assert hi == lo + 1 and (stop - first) * w * 400 <= max(1 << 23, w * 400)
            per_image[lo] += range(first, stop)
        assert all(rows == list(range(h)) for rows in per_image.values())


def test_filter_grid_gives_each_unit_its_own_bordered_tile():
    # 5 units of 3x4 pixels: a 3-column grid of 2 rows, 1-pixel black borders, the sixth
    # cell empty; each tile is its unit's weights scaled by their own max |w|, grey = 0.
    h, w, units = 3, 4, 5
    w1 = np.random.default_rng(0).normal(size=(h * w, units))
    grid = visualize.filter_grid(w1, (h, w, 1), scale=1)[:, :, 0]
    assert grid.shape == (2 * (h + 1) + 1, 3 * (w + 1) + 1)
    for j in range(6):
        r, q = divmod(j, 3)
        tile = grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w]
        if j == units:
            assert not tile.any()
            continue
        unit = w1[:, j].reshape(h, w)
        np.testing.assert_array_equal(tile, np.rint(255 * (0.5 + 0.5 * unit / abs(unit).max())))
    assert not grid[:: h + 1].any() and not grid[:, :: w + 1].any()  # every border line
    assert visualize.filter_grid(w1, (h, w, 1), scale=2).shape == (
        2 * grid.shape[0],
        2 * grid.shape[1],
        1,
    )


def test_cost_curves_read_back_from_event_files(tmp_path):
    tb = tmp_path / "tensorboard"
    for run, tag, points in [
        ("units", "batch_loss", [(10, 3.0), (20, 2.0), (30, 1.5)]),
        ("train", "epoch_loss", [(0, 2.5), (1, 1.4)]),
        ("validation", "epoch_loss", [(0, 2.6), (1, 1.6)]),
        ("validation", "epoch_sparsity", [(0, 0.2), (1, 0.1)]),
    ]:
        writer = tf.summary.create_file_writer(str(tb / run))
        with writer.as_default():
            for step, value in points:
                tf.summary.scalar(tag, value, step=step)
            tf.summary.histogram("ignored", [1.0, 2.0], step=0)
        writer.close()
    scalars = curves.read_scalars(str(tb))
    assert scalars["units"]["batch_loss"] == [(10, 3.0), (20, 2.0), (30, 1.5)]
    got = curves.cost_curves(scalars, steps_per_epoch=15)
    assert set(got) == {"loss", "sparsity"}
    assert got["loss"]["train epochs"] == [(15, 2.5), (30, pytest.approx(1.4))]
    assert got["loss"]["eval"] == [(15, pytest.approx(2.6)), (30, pytest.approx(1.6))]
    assert list(got["sparsity"]) == ["eval"]
    assert curves.read_scalars(str(tmp_path / "none")) == {}


def test_wilson_interval_and_ticks():
    lo, hi = charts.wilson_interval(0.9, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.8256, 0.9448)
    assert charts.wilson_interval(1.0, 10)[1] == 1.0 and charts.wilson_interval(0.5, 0) == (0, 1)
    assert charts.nice_ticks(0.0, 1.0, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(0.0, 1.0, 4) == [0.0, 0.5, 1.0]
    assert charts.nice_ticks(13, 2987, 6) == [500, 1000, 1500, 2000, 2500]
    assert charts.nice_ticks(1.0, 1.0) == [1.0]
    assert charts.log_ticks(-2.0, 2.3) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert [round(10**t, 6) for t in charts.log_ticks(0.0, 0.4)] == [1.0, 1.5, 2.0, 2.5]


class _Checker(html.parser.HTMLParser):
    """Collects start tags with their attributes and fails on unbalanced or misnested tags."""

    VOID = {"meta", "img", "br", "hr", "input", "link"}  # HTML void elements; SVG ones use />

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict, list[str]]] = []  # (tag, attrs, open ancestors)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), list(self.stack)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), list(self.stack)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == [], f"unclosed: {checker.stack}"
    return checker


def test_the_report_is_valid_self_contained_html(data, tmp_path):
    model = _export(tmp_path / "export", (K, K), patch=True)
    dash = dashboards.compute(model, data, num_units=4, top=3)
    curve = {"loss": {"train batches": [(10, 3.0), (20, 2.0), (30, 1.0)], "eval": [(30, 1.2)]}}
    probe = {
        "eval_accuracy": {"sparse_features": 0.97, "raw_pixels": 0.9, "pca": 0.91},
        "dims": {"sparse_features": 24, "raw_pixels": 99, "pca": 24},
        "eval_examples": 8,
    }
    png = report._png(np.zeros((4, 4, 1), np.uint8))
    text = report.run_report(
        {"steps": 30, "metrics": {"loss": 1.0}}, png, png, [0.1] * HIDDEN, 0.1,
        dashboards=dash, curves=curve, probe=probe,
    )  # fmt: skip
    doc = parse(text)
    units = [t for t in doc.tags if t[0] == "tr" and t[1].get("class") == "unit"]
    assert len(units) == 4
    filters = [t for t in doc.tags if t[0] == "img" and t[1].get("class") == "filter"]
    inputs = [t for t in doc.tags if t[0] == "img" and t[1].get("class") == "top-input"]
    assert len(filters) == 4 and len(inputs) == 4 * 3
    for u in dash.units:
        assert f"unit {u.index}" in text and f"fires on {report.percent(u.firing_rate)}" in text
    lines = [t[1]["points"].split() for t in doc.tags if t[0] == "polyline"]
    assert [len(p) for p in lines] == [3]
    assert any(t[0] == "circle" for t in doc.tags)  # the one-point eval series
    # The probe: one titled bar per input, with its interval's whisker (3 lines each).
    bars = [t for t in doc.tags if t[0] == "title" and t[2][-1:] == ["rect"]]
    assert len(bars) == 3 and all("svg" in t[2] for t in bars)
    assert "sparse features (24)" in text and "0.970" in text and "0.900" in text
    whiskers = [t for t in doc.tags if t[0] == "line" and t[1].get("stroke") == "#222"]
    assert len(whiskers) == 3 * 3
    # Self-contained: every src is inline data, nothing links out.
    for tag, attrs, _ in doc.tags:
        assert "href" not in attrs and not any(k.endswith(":href") for k in attrs)
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/png;base64,"), tag
    assert "url(" not in text and "@import" not in text


def test_a_report_without_dashboards_curves_or_probe_still_renders():
    png = report._png(np.zeros((4, 4, 1), np.uint8))
    doc = parse(report.run_report({"steps": 1}, png, png, [0.1], 0.1))
    assert sum(1 for t in doc.tags if t[0] == "img") == 2
