import os

# No test may reach a hub: models are built here, and hub code paths run against a loopback server.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vlmux.pool import vram  # noqa: E402
from vlmux.testing.exit_watch import watch_interpreter_exit  # noqa: E402
from vlmux.tiny import ARCHITECTURES, FAMILIES, build_tiny, draw_sample_images  # noqa: E402

EXIT_WATCH = 180  # seconds Python may take to exit after the session before the suite says what holds it
_STATUS = pytest.StashKey[int]()  # the session's exit status, for the exit watch


def pytest_collection_modifyitems(config, items):
    if vram.available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {vram.nvml_status()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_STATUS] = int(exitstatus)


def pytest_unconfigure(config):
    """What a test left behind must not keep CI waiting after every test passed (see vlmux.testing.exit_watch)."""
    watch_interpreter_exit(config.stash.get(_STATUS, 1), EXIT_WATCH)


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
