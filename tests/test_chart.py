"""The shared chart (chart.py) as the dashboard draws it (serve/history.py): time ticks on round minutes, and mark
labels that never overlap (one that would stays in its line's tooltip)."""
import re

from vlmux.chart import time_ticks
from vlmux.serve import history as history_module
from vlmux.serve.history import History


def test_time_ticks_fall_on_round_seconds_and_minutes():
    assert time_ticks(-400, 0, 8) == [-360, -300, -240, -180, -120, -60, 0]
    assert time_ticks(-600, 0, 8) == [-600, -480, -360, -240, -120, 0]
    assert time_ticks(-20, 0, 8) == [-20, -15, -10, -5, 0]


def chart_at(monkeypatch, samples: list[float], events: list[tuple[float, str, str]]) -> str:
    clock = {"now": 1_000_000.0}
    monkeypatch.setattr(history_module.time, "time", lambda: clock["now"])
    history = History(600, 10)
    for at in sorted(set(samples) | {at for at, _, _ in events}):
        clock["now"] = 1_000_000.0 + at
        if at in samples:
            history.sample({"workers (host memory)": 100 * 2**20})
        for when, model, kind in events:
            if when == at:
                history.event(model, kind)
    return history.chart()


def test_the_dashboards_time_axis_reads_in_whole_minutes(monkeypatch):
    svg = chart_at(monkeypatch, [0.0, 100.0, 200.0, 400.0], [])
    labels = re.findall(r'class="x-tick"[^>]*/><text[^>]*>([^<]+)</text>', svg)
    assert labels and all(re.fullmatch(r"now|\d+ min ago|\d+ s ago", label) for label in labels), labels
    assert "6 min ago" in labels and "1 min ago" in labels


def test_mark_labels_never_overlap_and_each_keeps_a_tooltip(monkeypatch):
    events = [(300.0, f"model{i}", kind) for i in range(3) for kind in ("load", "unload")]
    svg = chart_at(monkeypatch, [0.0, 100.0, 200.0, 301.0, 400.0], events)
    assert len(re.findall(r'<line class="mark"[^>]*><title>model\d (load|unload)</title>', svg)) == 6
    placed = [(float(x), float(y), text) for x, y, text in
              re.findall(r'<text class="mark-label" x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]+)</text>', svg)]
    assert placed
    for i, (x, y, text) in enumerate(placed):
        for x2, y2, _ in placed[i + 1:]:
            assert y != y2 or abs(x2 - x) >= 6 * len(text), placed
