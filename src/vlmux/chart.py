"""One line chart as inline SVG, for the caption job's run report and the server's dashboard: memory over time with
load and unload marks, round-numbered ticks on both axes, and a value axis that never goes below zero."""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

COLOURS = ("#15c", "#e80", "#2a7", "#c33", "#85c", "#0aa", "#a70", "#777")
MARK_COLOURS = {"load_start": "#2a7", "loaded": "#2a7", "load": "#2a7", "unload_start": "#c33", "unloaded": "#c33",
                "unload": "#c33", "worker exit": "#90c"}


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]  # (x, y)


@dataclass(frozen=True)
class Mark:
    x: float
    label: str
    kind: str = ""  # load | unload | loaded | ... : picks the colour


def ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) from the first at or above `low` to `high`."""
    if high <= low:
        return [low]
    raw = (high - low) / max(1, most - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def time_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round times in seconds (1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10, 15, 30 min, 1 h ...) from `low` to `high`."""
    if high <= low:
        return [low]
    raw = (high - low) / max(1, most - 1)
    step = next((s for s in TIME_STEPS if s >= raw), TIME_STEPS[-1] * math.ceil(raw / TIME_STEPS[-1]))
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def label_rows(xs: Sequence[float], widths: Sequence[float], rows: int = 4) -> list[int | None]:
    """A row for each label at pixel x (its width in pixels) so that no two in a row overlap; None where every row
    is taken there (that label is left to its line's tooltip)."""
    ends: list[float] = [-math.inf] * rows
    placed: list[int | None] = []
    for x, width in zip(xs, widths):
        row = next((r for r in range(rows) if ends[r] + 4 <= x), None)
        if row is not None:
            ends[row] = x + width
        placed.append(row)
    return placed


def value_range(values: Sequence[float], floor: float = 0.0) -> tuple[float, float]:
    """The value axis: the data with a little room around it, on round numbers, never below `floor`."""
    low, high = min(values), max(values)
    span = max(high - low, abs(high) * 0.01, 1.0)
    low, high = max(floor, low - 0.08 * span), high + 0.08 * span
    marks = ticks(low, high)
    step = marks[1] - marks[0] if len(marks) > 1 else span
    return max(floor, math.floor(low / step) * step), math.ceil(high / step) * step


def line_chart(series: Sequence[Series], marks: Sequence[Mark] = (), *, x_range: tuple[float, float] | None = None,
               x_label: Callable[[float], str] = lambda x: f"{x:g} s", y_unit: str = "MiB",
               x_ticks: Callable[[float, float, int], list[float]] = ticks,
               reference: float | None = None, width: int = 900, height: int = 320, title: str = "memory over time") -> str:
    """An SVG line chart; `reference` draws a grey level (memory before the first load)."""
    values = [y for s in series for _, y in s.points] + ([reference] if reference is not None else [])
    xs = [x for s in series for x, _ in s.points]
    if len(xs) < 2:
        return '<p class="chart-empty">not enough samples to plot yet</p>'
    left, right, top, bottom = 70, 20, 20, 40
    x0, x1 = x_range or (min(xs), max(xs))
    x1 = x1 if x1 > x0 else x0 + 1e-3
    y0, y1 = value_range(values)

    def px(x: float) -> float:
        return left + (width - left - right) * (x - x0) / (x1 - x0)

    def py(y: float) -> float:
        return height - bottom - (height - top - bottom) * (y - y0) / (y1 - y0)

    parts = [f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>']
    for y in ticks(y0, y1):
        parts.append(f'<line class="y-tick" x1="{left}" y1="{py(y):.1f}" x2="{width - right}" y2="{py(y):.1f}" '
                     f'stroke="#eee"/><text x="{left - 6}" y="{py(y) + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{y:g} {html.escape(y_unit)}</text>')
    for x in x_ticks(x0, x1, 8):
        parts.append(f'<line class="x-tick" x1="{px(x):.1f}" y1="{height - bottom}" x2="{px(x):.1f}" '
                     f'y2="{height - bottom + 5}" stroke="#888"/><text x="{px(x):.1f}" y="{height - bottom + 18}" '
                     f'font-size="11" text-anchor="middle">{html.escape(x_label(x))}</text>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>')
    if reference is not None:
        parts.append(f'<line class="reference" x1="{left}" y1="{py(reference):.1f}" x2="{width - right}" '
                     f'y2="{py(reference):.1f}" stroke="#bbb"/>')
    shown = sorted((m for m in marks if x0 <= m.x <= x1), key=lambda m: m.x)
    spans = [(px(m.x) + 3, 6.0 * len(m.label)) if px(m.x) < width - 150 else (px(m.x) - 3 - 6.0 * len(m.label),
                                                                             6.0 * len(m.label)) for m in shown]
    rows = label_rows([start for start, _ in spans], [span for _, span in spans])
    for mark, row in zip(shown, rows):
        x = px(mark.x)
        colour = MARK_COLOURS.get(mark.kind, "#888")
        parts.append(f'<line class="mark" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" stroke="{colour}" '
                     f'stroke-dasharray="4 3"><title>{html.escape(mark.label)}</title></line>')
        if row is not None:  # a label that would overlap another stays in the line's tooltip
            parts.append(f'<text class="mark-label" x="{x + 3 if x < width - 150 else x - 3:.1f}" y="{top + 12 + 12 * row}" '
                         f'font-size="10" text-anchor="{"start" if x < width - 150 else "end"}">'
                         f'{html.escape(mark.label)}</text>')
    for index, line in enumerate(series):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line.points)
        colour = COLOURS[index % len(COLOURS)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}">'
                     f'<title>{html.escape(line.label)}</title></polyline>')
        if len(series) > 1:
            parts.append(f'<text x="{left + 8 + 150 * index}" y="{height - 4}" font-size="11" fill="{colour}">'
                         f'{html.escape(line.label)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{html.escape(title)}">{"".join(parts)}</svg>')
