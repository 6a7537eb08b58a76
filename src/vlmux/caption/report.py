"""The run report: per-model rates and timings, and device memory over the whole job with each model's load and
unload marked, as an HTML page (inline SVG, no plotting library needed for one line chart) and as JSON."""
from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

from vlmux.caption.job import ModelReport
from vlmux.chart import Mark, Series, line_chart
from vlmux.pool import vram
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


def _chart(data: dict) -> str:
    samples = data["samples"]
    memory = Series(data["memory_source"], [(s["seconds"], s["mib"]) for s in samples])
    marks = [Mark(e["seconds"], f'{Path(e["model"]).name} {e["event"].replace("_", " ")}', e["event"])
             for e in data["events"]]
    end = max(samples[-1]["seconds"], 1e-3) if samples else 1.0
    return line_chart([memory], marks, x_range=(0.0, end), reference=samples[0]["mib"] if samples else None)
