"""Caption jobs on a local Ray cluster (CPU only, two CPUs, loopback): the same output as one process, and a
driver killed midway leaves a rerun only what was missing."""
import os
import signal
import subprocess
import time

import pytest

# Before Ray is imported: bind the cluster to loopback only, and send no usage report.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import ray  # noqa: E402

from vlmux.config import GenerationSpec  # noqa: E402
from vlmux.testing.cli import read_jsonl as jsonl  # noqa: E402
from vlmux.testing.cli import run_caption, start_caption as start  # noqa: E402
from vlmux.tiny import draw_sample_images  # noqa: E402

IMAGES = 32  # enough that the first model is still running when the driver is killed, even on fast cores


@pytest.fixture(scope="module")
def ray_address():
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = context.address_info["gcs_address"]
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llava, tiny_qwen):
    """A folder, the arguments of a two-model job, and that job's records from one process (no Ray)."""
    root = tmp_path_factory.mktemp("distributed")
    draw_sample_images(root / "images", count=IMAGES, seed=6)
    args = [str(root / "images"), "--batch-size", "2", "--max-new-tokens", "10", "-m", str(tiny_llava),
            "-m", str(tiny_qwen), "--device", "cpu"]
    single = run(*args, "-o", str(root / "single.jsonl"))
    assert single.returncode == 0, single.stderr
    return root, args, by_pair(jsonl(root / "single.jsonl"))


def run(*args: str) -> subprocess.CompletedProcess:
    return run_caption(*args, timeout=400)  # a Ray cluster on two cores starts slowly


def by_pair(rows: list[dict]) -> dict[tuple[str, str], dict]:
    pairs = {(row["file"], row["model"]): row for row in rows}
    assert len(pairs) == len(rows), "a pair was written twice"
    return pairs


def test_two_models_through_ray_equal_one_process_and_a_killed_driver_resumes_what_was_missing(job, ray_address, tiny_llava, tiny_qwen):
    root, args, single = job
    out = root / "ray.jsonl"
    driver = start(*args, "-o", str(out), "--ray", ray_address, "--replicas", "2")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:  # kill once the first results are on disk
            break
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = jsonl(out)
    done_a = sum(row["model"] == str(tiny_llava) for row in written)
    assert 2 <= len(written) < IMAGES and done_a == len(written), "the kill must land inside the first model"

    rerun = run(*args, "-o", str(out), "--ray", ray_address, "--replicas", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{tiny_llava}: {IMAGES - done_a} captioned, 0 errors, {done_a} already done" in rerun.stdout
    assert f"{tiny_qwen}: {IMAGES} captioned, 0 errors, 0 already done" in rerun.stdout
    assert rerun.stdout.count("2 workers side by side") == 2
    rows = by_pair(jsonl(out))
    assert rows == single  # greedy: the cluster's captions are the single process's, one record per pair
    # Each model's actors reported their workers gone before the next model started.
    assert rerun.stdout.count("released (2 workers") == 2, rerun.stdout

    again = run(*args, "-o", str(out), "--ray", ray_address)
    assert again.returncode == 0 and again.stdout.count(f"{IMAGES} already done") == 2
    assert by_pair(jsonl(out)) == single


def test_caption_dataset_adds_a_caption_column_per_model(job, ray_address, tiny_llava, tiny_qwen):
    from vlmux.distributed import caption_dataset

    root, _, single = job
    paths = sorted((root / "images").iterdir())[:6]
    ds = ray.data.from_items([{"image": str(path), "name": path.name} for path in paths])
    captioned = caption_dataset(ds, models=[str(tiny_llava), str(tiny_qwen)], device="cpu", batch_size=2,
                                generation=GenerationSpec(max_new_tokens=10), replicas=1)
    rows = {row["name"]: row for row in captioned.take_all()}
    assert set(rows) == {path.name for path in paths}
    for name, row in rows.items():
        assert row["caption_llava"] == single[(name, str(tiny_llava))]["caption"]
        assert row["caption_qwen2_vl"] == single[(name, str(tiny_qwen))]["caption"]
        assert row["error_llava"] is None and row["error_qwen2_vl"] is None
