"""Test helpers: `vlmux caption` as a child process, and its JSONL output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def start_caption(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlmux.cli", "caption", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_caption(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    process = start_caption(*args)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shapes_job(images: Path, out: Path) -> list[str]:
    """`vlmux caption` arguments for the bundled shapes model with two preparing processes: model batches of 4, four
    to a request (16 images, enough for the preparing processes to take part)."""
    return [str(images), "-m", "vlmux/shapes", "-o", str(out), "--batch-size", "4", "--prep-processes", "2"]
