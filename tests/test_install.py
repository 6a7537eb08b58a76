"""./install.sh says each step, what it installs and why, before it runs it (pip and apt-get are stand-ins here
that record their arguments: the test checks the script's words and order, not the package managers)."""
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stand_in(folder: Path, name: str, body: str = "") -> None:
    script = folder / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "$CALLS"\n{body}\n')
    script.chmod(0o755)


def test_install_sh_says_each_step_with_what_and_why_before_running_it(tmp_path):
    stand_in(tmp_path, "python3")
    stand_in(tmp_path, "apt-get")
    (tmp_path / "id").write_text("#!/bin/sh\necho 0\n")  # root, so apt-get is used
    (tmp_path / "id").chmod(0o755)
    os.symlink(shutil.which("dirname"), tmp_path / "dirname")
    calls = tmp_path / "calls"
    run = subprocess.run([shutil.which("bash"), str(ROOT / "install.sh")], capture_output=True, text=True, timeout=60,
                         env={"PATH": str(tmp_path), "CALLS": str(calls), "HOME": str(tmp_path)})  # no chromium on it
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(":", 2)[1].strip().split()[0] for line in lines] == ["1/2", "1/2", "2/2", "2/2", "finished"]
    assert "pip" in lines[0] and "test dependencies" in lines[0]
    assert "apt-get" in lines[2] and "chromium" in lines[2] and "tests" in lines[2]
    assert calls.read_text().splitlines() == ["python3 -m pip install -q -e .[test]", "apt-get update -qq",
                                              "apt-get install -y -qq chromium"]
