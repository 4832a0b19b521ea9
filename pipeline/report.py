"""A self-contained report.html of a run: feature dashboards, cost curves, the probe, filters,
reconstructions, the rho_hat histogram and the metrics.

Pictures are embedded as base64 PNG and charts as inline SVG (pipeline/charts.py), so the file
can be mailed or opened from a bucket with no other files. Every part is optional: a run
without labels has no probe, a run whose TensorBoard files are gone has no curves.
"""

from __future__ import annotations

import base64
import html

import numpy as np

from pipeline import charts
from pipeline.dashboards import Dashboards


def _img(png: bytes, alt: str, cls: str = "", width: int | None = None, title: str = "") -> str:
    return (
        f'<img alt="{html.escape(alt)}"'
        + (f' class="{cls}"' if cls else "")
        + (f' width="{width}"' if width else "")
        + (f' title="{html.escape(title)}"' if title else "")
        + ' style="image-rendering: pixelated" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    )


def filter_tile(w: np.ndarray) -> np.ndarray:
    """One unit's weights [h, w, c] -> uint8 [h, w, c] as UFLDL's display_network shows them:
    grey is 0, scaled by the tile's own max |value|."""
    w = np.asarray(w, np.float64)
    peak = np.abs(w).max()
    return np.rint(255 * (0.5 + 0.5 * w / (peak if peak > 0 else 1.0))).astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    from trainer import visualize

    return visualize.png_bytes(np.asarray(img, np.uint8))


def percent(fraction: float) -> str:
    """A rate as a percentage to 2 significant digits: 0.3%, 0.043%, 12%; a sparse unit's
    rate of 0.0004 would print as 0.0% at a fixed one decimal."""
    p = 100 * fraction
    if p >= 10:
        return f"{p:.0f}%"
    return np.format_float_positional(p, precision=2, fractional=False, trim="-") + "%"


def dashboards_html(dash: Dashboards, tile_px: int = 56) -> str:
    """One table row per unit: its index, firing rate and mean activation; its filter; its
    top-activating inputs with their activations (a tooltip names the image)."""
    if not dash.units:
        return "<p>No live units to show.</p>"
    what = "windows cut from eval images" if dash.patch else "eval images"
    rows = []
    for u in dash.units:
        tops = zip(u.top_inputs, u.top_activations, u.top_keys, strict=True)
        inputs = "".join(
            _img(_png(x), f"unit {u.index} top input {i + 1}", "top-input", tile_px,
                 f"{key}: a = {a:.3f}")
            for i, (x, a, key) in enumerate(tops)
        )  # fmt: skip
        rows.append(
            f'<tr class="unit"><td><b>unit {u.index}</b><br>fires on {percent(u.firing_rate)}<br>'
            f"mean a {u.mean_activation:.3f}</td>"
            f"<td>{_img(_png(filter_tile(u.filter)), f'unit {u.index} filter', 'filter', tile_px)}"
            f'</td><td class="inputs">{inputs}<br><small>a = '
            + ", ".join(f"{a:.2f}" for a in u.top_activations)
            + "</small></td></tr>"
        )
    return (
        f"<p>The {len(dash.units)} live units that fire most often on {dash.num_inputs:,} "
        f"inputs ({what}, from {dash.num_images:,} eval images; {dash.num_dead} dead units "
        "skipped). Left: the unit's filter (its encoder weights W1[:, j]; grey = 0). Right: "
        f"its top-activating {what}, best first (at most one per image). Fires = a_j > 0.5.</p>"
        '<table class="dashboards"><tr><th>unit</th><th>filter</th>'
        f"<th>top-activating inputs</th></tr>{''.join(rows)}</table>"
    )


def curves_html(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> str:
    """One line chart per cost term (pipeline.curves.cost_curves output)."""
    if not curves:
        return "<p>No TensorBoard scalars found.</p>"
    log_terms = {"loss", "reconstruction", "sparsity"}
    return "".join(
        charts.line_chart_svg(series, term, log_y=term in log_terms)
        for term, series in curves.items()
    )


def probe_html(probe: dict) -> str:
    """probe.json as a bar chart of eval accuracy with 95% Wilson intervals."""
    n = int(probe.get("eval_examples", 0))
    dims = probe.get("dims", {})
    bars = [
        (f"{name.replace('_', ' ')} ({dims.get(name, '?')})", float(acc),
         charts.wilson_interval(float(acc), n) if n else None)
        for name, acc in probe["eval_accuracy"].items()
    ]  # fmt: skip
    return charts.bar_chart_svg(
        bars, f"linear probe: eval accuracy on {n:,} eval examples (dims), 95% interval"
    )


def _table(rows: list[tuple[str, object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render(title: str, sections: list[tuple[str, str]]) -> str:
    """sections: (heading, HTML body) pairs."""
    parts = "".join(f"<h2>{html.escape(h)}</h2>{body}" for h, body in sections)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left;vertical-align:top}th{background:#f4f4f4;font-weight:normal}"
        "img.filter{border:2px solid #4a78b0}img.top-input{margin-right:3px}"
        "svg{margin:4px 8px 4px 0}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{parts}</body></html>"
    )


def run_report(
    summary: dict,
    filters_png: bytes,
    recon_png: bytes,
    rho_hat: list[float],
    rho: float,
    dashboards: Dashboards | None = None,
    curves: dict | None = None,
    probe: dict | None = None,
) -> str:
    """The report of `sae run` from its summary dict, the trainer's pictures, and (when
    given) the dashboards, the cost curves and probe.json."""
    top = [t for t in summary.items() if not isinstance(t[1], dict)]
    sections = [("Summary", _table(top))]
    if dashboards is not None:
        sections.append(("Feature dashboards", dashboards_html(dashboards)))
    if curves is not None:
        sections.append(("Cost terms over training steps", curves_html(curves)))
    if probe is not None:
        sections.append(("Linear probe", probe_html(probe)))
    sections += [
        ("Filters (encoder weights, UFLDL display_network)", _img(filters_png, "filters")),
        ("Reconstructions (input | reconstruction)", _img(recon_png, "reconstructions")),
        ("Mean activation per unit on the eval split", charts.histogram_svg(rho_hat, rho)),
    ]
    for name, value in summary.items():
        if isinstance(value, dict):
            sections.append((name, _table(list(value.items()))))
    return render("sae-pipeline run report", sections)
