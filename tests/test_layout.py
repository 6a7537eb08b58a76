"""The package's layout: no import circles, a parent that never imports torch, and files small enough to read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "vlmux"
MAX_LINES = 400


def test_no_import_circles_among_vlmux_modules():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_cycles.py"), str(ROOT / "src")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"import circles:\n{result.stdout}{result.stderr}"


def test_the_parent_never_imports_torch():
    code = ("import sys, vlmux, vlmux.cli, vlmux.caption.job, vlmux.pool, vlmux.serve.app, vlmux.serve.cli, "
            "vlmux.review.app, vlmux.review.export; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the parent's modules import torch: {result.stdout.strip()}"


def test_no_source_file_exceeds_the_line_limit():
    lengths = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
               for path in sorted(PACKAGE.rglob("*.py"))}
    too_long = {path: lines for path, lines in lengths.items() if lines > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines: " + ", ".join(f"{path} ({lines})" for path, lines in too_long.items())
