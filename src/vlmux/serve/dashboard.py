"""The dashboard page at `/`: one self-contained HTML file (no CDN, works offline) that polls /api/dashboard; its
memory chart is drawn by the server with the run report's chart code (vlmux.chart)."""
from __future__ import annotations

from importlib.resources import files

PAGE = files("vlmux.serve").joinpath("static/dashboard.html").read_text(encoding="utf-8")
