"""A self-contained report.html of a run: filters, reconstructions, rho_hat histogram, metrics.

Pictures are embedded as base64 PNG and the histogram as inline SVG, so the file can be
mailed or opened from a bucket with no other files.
"""

from __future__ import annotations

import base64
import html

import numpy as np


def _img(png: bytes, alt: str) -> str:
    return (
        f'<img alt="{html.escape(alt)}" style="image-rendering: pixelated" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    )


def histogram_svg(
    values: list[float], rho: float, bins: int = 30, width: int = 480, height: int = 180
) -> str:
    """Inline SVG histogram of per-unit rho_hat, with the target rho marked in red."""
    v = np.asarray(values, np.float64)
    hi = max(float(v.max()) if len(v) else 0.0, 2 * rho) * 1.05
    counts, edges = np.histogram(v, bins=bins, range=(0.0, hi))
    top = max(int(counts.max()) if len(counts) else 1, 1)
    pad, plot_h = 24, height - 40
    bar_w = (width - 2 * pad) / bins
    bars = "".join(
        f'<rect x="{pad + i * bar_w:.1f}" y="{10 + plot_h * (1 - c / top):.1f}" '
        f'width="{bar_w - 1:.1f}" height="{plot_h * c / top:.1f}" fill="#4a78b0"/>'
        for i, c in enumerate(counts)
    )
    x_rho = pad + (rho / hi) * (width - 2 * pad)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{bars}'
        f'<line x1="{x_rho:.1f}" x2="{x_rho:.1f}" y1="5" y2="{10 + plot_h}" stroke="red"/>'
        f'<text x="{x_rho + 3:.1f}" y="18" font-size="11" fill="red">rho = {rho:g}</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">0</text>'
        f'<text x="{width - pad - 40}" y="{height - 8}" font-size="11">{edges[-1]:.3g}</text>'
        f'<text x="{width / 2 - 60:.0f}" y="{height - 8}" font-size="11">'
        f"rho_hat per unit ({len(v)} units, max {top}/bin)</text></svg>"
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
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left}th{background:#f4f4f4;font-weight:normal}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{parts}</body></html>"
    )


def run_report(
    summary: dict, filters_png: bytes, recon_png: bytes, rho_hat: list[float], rho: float
) -> str:
    """The report of `sae run` from its summary dict and the trainer's pictures."""
    sections = [
        ("Summary", _table([(k, v) for k, v in summary.items() if not isinstance(v, dict)])),
        ("Filters (encoder weights, UFLDL display_network)", _img(filters_png, "filters")),
        ("Reconstructions (input | reconstruction)", _img(recon_png, "reconstructions")),
        ("Mean activation per unit on the eval split", histogram_svg(rho_hat, rho)),
    ]
    for name, value in summary.items():
        if isinstance(value, dict):
            sections.append((name, _table(list(value.items()))))
    return render("sae-pipeline run report", sections)
