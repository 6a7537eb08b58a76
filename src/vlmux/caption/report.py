"""The run report: per-model rates and timings, and device memory over the whole job with each model's load and
unload marked, as an HTML page (inline SVG, no plotting library needed for one line chart) and as JSON."""
from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

from vlmux.pool import vram
from vlmux.caption.job import ModelReport
from vlmux.hostmem import available_host_bytes, host_ram

SAMPLE_SECONDS = 0.1


class Recorder:
    """Samples memory in a background thread from construction until stop(); collects the job's events."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.gpu = vram.available()
        self.source = "GPU memory used (NVML, all GPUs)" if self.gpu else "host memory in use (no NVIDIA GPU here)"
        self.samples: list[tuple[float, float]] = []
        self.events: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="vlmux-report", daemon=True)
        self._thread.start()

    def event(self, model: str, what: str) -> None:
        self._take()  # a sample at each event, so short phases still show
        self.events.append((time.monotonic() - self.start, model, what))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def write(self, path: Path, reports: list[ModelReport]) -> Path:
        data = {
            "memory_source": self.source,
            "samples": [{"seconds": round(t, 3), "mib": round(m, 1)} for t, m in self.samples],
            "events": [{"seconds": round(t, 3), "model": model, "event": what} for t, model, what in self.events],
            "models": [_model_json(report) for report in reports],
        }
        path.with_suffix(".json").write_text(json.dumps(data, indent=2))
        path.write_text(_page(data))
        return path

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._take()

    def _take(self) -> None:
        if self.gpu:
            used = sum(gpu.used for gpu in vram.gpus())
        else:
            used = host_ram() - available_host_bytes()
        self.samples.append((time.monotonic() - self.start, used / vram.MIB))


def _model_json(report: ModelReport) -> dict:
    data = {key: value for key, value in asdict(report).items() if key not in ("release", "batch_share")}
    data.update(batches=report.batches,
                images_per_second=round(report.images_per_second, 2), tokens_per_second=round(report.tokens_per_second, 1),
                release=str(report.release) if report.release else None,
                residue_mib=report.release.residue_mib if report.release else None)
    return data


def _page(data: dict) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(value))}</td>" for value in (
            m["model"], m["captioned"], m["errors"], m["skipped"], m["images_per_second"], m["tokens_per_second"],
            f'{m["load_seconds"]:.2f}', f'{m["unload_seconds"]:.2f}', m["release"] or "")) + "</tr>"
        for m in data["models"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vlmux run report</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} th{{background:#f3f3f3}}</style></head>
<body><h1>vlmux run report</h1>
<h2>Models</h2>
<table><tr><th>model</th><th>captioned</th><th>errors</th><th>already done</th><th>images/s</th><th>tokens/s</th>
<th>load s</th><th>unload s</th><th>memory given back</th></tr>{rows}</table>
<h2>Memory over the job</h2><p>{html.escape(data["memory_source"])}; dashed lines mark loads and unloads, the grey line the
level before the first model loaded.</p>
{_chart(data)}
</body></html>
"""


def _chart(data: dict, width: int = 900, height: int = 320, margin: int = 50) -> str:
    samples = data["samples"]
    if len(samples) < 2:
        return "<p>too short a job to plot</p>"
    end = max(samples[-1]["seconds"], 1e-3)
    low = min(s["mib"] for s in samples)
    high = max(s["mib"] for s in samples)
    span = max(high - low, 1.0)
    low, high = low - 0.05 * span, high + 0.05 * span

    def x(seconds: float) -> float:
        return margin + (width - 2 * margin) * seconds / end

    def y(mib: float) -> float:
        return height - margin - (height - 2 * margin) * (mib - low) / (high - low)

    points = " ".join(f"{x(s['seconds']):.1f},{y(s['mib']):.1f}" for s in samples)
    baseline = y(samples[0]["mib"])
    marks = []
    colours = {"load_start": "#2a7", "loaded": "#2a7", "unload_start": "#c33", "unloaded": "#c33"}
    for index, event in enumerate(data["events"]):
        position = x(event["seconds"])
        label = html.escape(f'{Path(event["model"]).name} {event["event"].replace("_", " ")}')
        marks.append(f'<line x1="{position:.1f}" y1="{margin}" x2="{position:.1f}" y2="{height - margin}" '
                     f'stroke="{colours.get(event["event"], "#888")}" stroke-dasharray="4 3"/>'
                     f'<text x="{position + 3:.1f}" y="{margin + 12 + 12 * (index % 4)}" font-size="10">{label}</text>')
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="memory over time">
<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>
<line x1="{margin}" y1="{baseline:.1f}" x2="{width - margin}" y2="{baseline:.1f}" stroke="#bbb"/>
<polyline fill="none" stroke="#15c" stroke-width="2" points="{points}"/>
{''.join(marks)}
<text x="{margin}" y="{height - 15}" font-size="12">0 s</text>
<text x="{width - margin - 40}" y="{height - 15}" font-size="12">{end:.1f} s</text>
<text x="5" y="{y(high) + 4:.1f}" font-size="11">{high:.0f} MiB</text>
<text x="5" y="{y(low) + 4:.1f}" font-size="11">{low:.0f} MiB</text>
</svg>"""
