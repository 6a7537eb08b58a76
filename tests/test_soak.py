"""Soak (issue 22): load / unload cycles in one process leave nothing growing: threads, file descriptors, /dev/shm
segments, workers. The long run is bench/soak.py (200 cycles of two models); its fast part is here."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from vlmux import GenerationSpec, ModelPool, ModelSpec, PoolConfig
from vlmux.testing.load import host_figures
from vlmux.testing.processes import process_gone

BENCH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def settled_threads(at_most: int, within: float = 3.0) -> int:
    """The thread count once it is at most `at_most` (a cancelled timer takes a moment to end), or after `within`."""
    deadline = time.monotonic() + within
    while threading.active_count() > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


def test_load_unload_cycles_leave_no_thread_descriptor_or_worker_behind(tiny_llava, tiny_qwen):
    image = Image.new("RGB", (48, 40), "orange")
    pids, after_first = set(), None
    with ModelPool(PoolConfig(spare_worker=False)) as pool:
        for cycle in range(4):
            for path in (tiny_llava, tiny_qwen):
                name = pool.load(ModelSpec(str(path), device="cpu"))
                pids.add(pool.status()[0].pid)
                assert pool.caption(name, [image], ["Describe."], GenerationSpec(max_new_tokens=2))[0].caption
                pool.unload(name)
            if cycle == 0:
                after_first = host_figures()
        end = host_figures()
        # each release used to start a 10 s timer thread of its own: 4 more threads per cycle here
        assert settled_threads(after_first["threads"]) <= after_first["threads"]
        assert (end["fds"], end["shm_segments"]) == (after_first["fds"], after_first["shm_segments"])
    assert all(process_gone(pid) for pid in pids)


@pytest.mark.stress
def test_200_cycles_of_two_models_in_one_process(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(BENCH), "--tiny", "--cycles", "200", "--out", str(out)],
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    first, end = result["samples"][1], result["end"]  # samples[1]: after cycle 1, once lazy threads exist
    assert result["unloads"] == 400 and result["unverified"] == 0 and result["workers_left"] == []
    assert result["processes_left"] == [] and result["fork_servers"] <= 1
    assert all(r["process_gone"] for r in result["releases"])
    assert end["threads"] <= first["threads"] + 1 and end["fds"] == first["fds"]
    assert end["shm_segments"] == first["shm_segments"]
