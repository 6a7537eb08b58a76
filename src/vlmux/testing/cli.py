"""Test helpers: `vlmux caption` as a child process, and its JSONL output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


# The `vlmux` command as its console script runs it: the current folder is not on sys.path (`python -m` would put it
# first), so a test can run it from a folder holding a `random.py`, as a user does.
VLMUX = [sys.executable, "-c", "import sys; del sys.path[0]; sys.argv[0] = 'vlmux'; from vlmux.cli import main; "
         "sys.exit(main())"]


def start_caption(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*VLMUX, "caption", *args, "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def run_caption(*args: str, timeout: float = 300, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    process = start_caption(*args, cwd=cwd, env=env)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shapes_job(images: Path, out: Path) -> list[str]:
    """`vlmux caption` arguments for the bundled shapes model with two preparing processes: model batches of 4, four
    to a request (16 images, enough for the preparing processes to take part)."""
    return [str(images), "-m", "vlmux/shapes", "-o", str(out), "--batch-size", "4", "--prep-processes", "2"]
