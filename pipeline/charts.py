"""Inline SVG charts for report.html: a histogram, line charts, a bar chart with intervals.

Pure functions from numbers to SVG text (no plotting library, no external references), so
the report stays one file and the picture math is testable without a browser.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

PALETTE = ("#4a78b0", "#d9822b", "#3a9a5b", "#b04a6f", "#7a5ab0")


def _svg(width: int, height: int, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif">{body}</svg>'
    )


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "start", fill: str = "#222"):
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'fill="{fill}">{html.escape(s)}</text>'
    )


def _line(x1: float, x2: float, y1: float, y2: float, stroke: str = "#222") -> str:
    return f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="{stroke}"/>'


def histogram_svg(
    values: Sequence[float], rho: float, bins: int = 30, width: int = 480, height: int = 180
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
        f'width="{bar_w - 1:.1f}" height="{plot_h * c / top:.1f}" fill="{PALETTE[0]}"/>'
        for i, c in enumerate(counts)
    )
    x_rho = pad + (rho / hi) * (width - 2 * pad)
    return _svg(
        width,
        height,
        bars
        + _line(x_rho, x_rho, 5, 10 + plot_h, "red")
        + _text(x_rho + 3, 18, f"rho = {rho:g}", fill="red")
        + _text(pad, height - 8, "0")
        + _text(width - pad, height - 8, f"{edges[-1]:.3g}", anchor="end")
        + _text(
            width / 2, height - 8, f"rho_hat per unit ({len(v)} units, max {top}/bin)", 11, "middle"
        ),
    )


def nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log10 axis spanning [lo, hi] (in log10 units): the whole decades when there
    are at least two of them, else round values of the linear range (as log10)."""
    decades = [float(k) for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    if len(decades) >= 2:
        return decades
    return [math.log10(t) for t in nice_ticks(10**lo, 10**hi) if t > 0]


def line_chart_svg(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    width: int = 520,
    height: int = 230,
    log_y: bool = False,
) -> str:
    """Inline SVG line chart: series name -> [(step, value)], one colour per series, a legend.

    A series with one point is drawn as a dot. log_y plots log10 of the (positive) values, for
    costs that fall over orders of magnitude; non-positive values are then dropped.
    """
    left, right, top, bottom = 52, 12, 40, 34
    pw, ph = width - left - right, height - top - bottom
    clean = {
        name: [(float(s), float(v)) for s, v in pts if math.isfinite(v) and (v > 0 or not log_y)]
        for name, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    body = _text(width / 2, 15, title, 12, "middle")
    if not clean:
        return _svg(width, height, body + _text(width / 2, height / 2, "no data", 11, "middle"))
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [s for pts in clean.values() for s, _ in pts]
    ys = [ty(v) for pts in clean.values() for _, v in pts]
    x0, x1 = min(0.0, min(xs)), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    px = lambda s: left + pw * (s - x0) / (x1 - x0)  # noqa: E731
    py = lambda v: top + ph * (1 - (ty(v) - y0) / (y1 - y0))  # noqa: E731
    body += f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>'
    for t in log_ticks(y0, y1) if log_y else nice_ticks(y0, y1):
        y = top + ph * (1 - (t - y0) / (y1 - y0))
        label = f"{10**t:.3g}" if log_y else f"{t:.3g}"
        body += _line(left, left + pw, y, y, "#eee")
        body += _text(left - 4, y + 4, label, 10, "end")
    for t in nice_ticks(x0, x1):
        x = left + pw * (t - x0) / (x1 - x0)
        body += _text(x, top + ph + 14, f"{t:g}", 10, "middle")
    body += _text(
        left + pw / 2, height - 4, "step" + ("  (y: log scale)" if log_y else ""), 10, "middle"
    )
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in pts)
        if len(pts) == 1:
            cx, cy = px(pts[0][0]), py(pts[0][1])
            body += f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>'
        else:
            body += (
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}">'
                f"<title>{html.escape(name)}</title></polyline>"
            )
        lx = left + pw * i / len(clean)
        body += f'<rect x="{lx:.1f}" y="{top - 14}" width="10" height="3" fill="{colour}"/>'
        body += _text(lx + 14, top - 9, f"{name} (last {pts[-1][1]:.4g})", 10)
    return _svg(width, height, body)


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion measured on n trials."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bar_chart_svg(
    bars: Sequence[tuple[str, float, tuple[float, float] | None]],
    title: str,
    width: int = 560,
    row_height: int = 30,
) -> str:
    """Horizontal bars: (label, value in [0, 1], optional (lo, hi) interval drawn as a whisker).

    The axis starts at a round value below the smallest interval, so differences of a point
    or two between probes stay visible; the axis range is printed under the bars.
    """
    left, right, top = 170, 70, 26
    pw = width - left - right
    height = top + row_height * len(bars) + 30
    lows = [iv[0] if iv else v for _, v, iv in bars]
    x0 = max(0.0, math.floor((min(lows, default=0.0) - 0.02) * 10) / 10)
    px = lambda v: left + pw * (v - x0) / (1.0 - x0)  # noqa: E731
    body = _text(width / 2, 15, title, 12, "middle")
    for i, (label, value, interval) in enumerate(bars):
        y = top + i * row_height
        colour = PALETTE[i % len(PALETTE)]
        body += _text(left - 6, y + row_height / 2 + 4, label, 11, "end")
        body += (
            f'<rect x="{left}" y="{y + 5}" width="{max(px(value) - left, 0):.1f}" '
            f'height="{row_height - 10}" fill="{colour}"><title>{html.escape(label)}</title></rect>'
        )
        text_x = px(value)
        if interval:
            lo, hi = (px(interval[0]), px(interval[1]))
            mid = y + row_height / 2
            body += (
                _line(lo, hi, mid, mid)
                + _line(lo, lo, mid - 5, mid + 5)
                + _line(hi, hi, mid - 5, mid + 5)
            )
            text_x = hi
        body += _text(text_x + 5, y + row_height / 2 + 4, f"{value:.3f}", 11)
    axis_y = top + row_height * len(bars) + 4
    body += _line(left, left + pw, axis_y, axis_y, "#888")
    for t in nice_ticks(x0, 1.0):
        body += _text(px(t), axis_y + 14, f"{t:g}", 10, "middle")
    return _svg(width, height, body)
