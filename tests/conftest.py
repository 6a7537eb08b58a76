import os

# No test may reach a hub: models are built here, and hub code paths run against a loopback server.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faulthandler  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vlmux.pool import vram  # noqa: E402
from vlmux.testing.processes import descendants  # noqa: E402
from vlmux.tiny import ARCHITECTURES, FAMILIES, build_tiny, draw_sample_images  # noqa: E402

EXIT_WATCH = 180  # seconds Python may take to exit after the session before the suite says what holds it


def pytest_collection_modifyitems(config, items):
    if vram.available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {vram.nvml_status()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_STATUS] = int(exitstatus)


_STATUS = pytest.StashKey[int]()


def pytest_unconfigure(config):
    """A thread or pool left by a test can hold the interpreter's exit (thread joins, atexit) after every test
    passed: then print every thread's stack and the processes still under this one, and exit with the session's
    status, instead of leaving CI to its time limit with nothing to show."""
    status = config.stash.get(_STATUS, 1)

    def watch() -> None:
        time.sleep(EXIT_WATCH)
        out = sys.__stderr__
        print(f"\ntests: Python has not exited {EXIT_WATCH} s after the session; its threads:", file=out, flush=True)
        faulthandler.dump_traceback(file=out, all_threads=True)
        for pid in descendants(os.getpid()):
            try:
                print("still running:", pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(),
                      file=out, flush=True)
            except OSError:
                pass
        os._exit(status)

    threading.Thread(target=watch, name="tests-exit-watch", daemon=True).start()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny(root / arch, arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def family_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Every family `vlmux make-tiny` builds: the suite's three and the others (tests/test_families.py)."""
    root = tmp_path_factory.mktemp("families")
    return {arch: tiny_models.get(arch) or build_tiny(root / arch, arch, seed=0) for arch in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llava(tiny_models) -> Path:
    return tiny_models["llava"]


@pytest.fixture(scope="session")
def tiny_qwen(tiny_models) -> Path:
    return tiny_models["qwen2_vl"]


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    draw_sample_images(folder, count=5, seed=1)
    return folder
