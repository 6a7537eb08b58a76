"""Caption jobs end to end through the CLI: several models, every output format, resume after a kill, bad images."""
import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from vlmux.caption.sinks import model_tag
from vlmux.testing.cli import read_jsonl as jsonl
from vlmux.testing.cli import run_caption as run
from vlmux.testing.cli import start_caption as start
from vlmux.testing.processes import children
from vlmux.testing.workers import wait_until
from vlmux.tiny import draw_sample_images


def parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_a_job_killed_in_the_middle_of_model_b_resumes_with_exactly_one_record_per_pair(tmp_path, tiny_llava, tiny_qwen):
    images = tmp_path / "images"
    draw_sample_images(images, count=40, seed=5)
    out_jsonl, out_parquet = tmp_path / "out.jsonl", tmp_path / "out.parquet"
    args = [str(images), "-m", str(tiny_llava), "-m", str(tiny_qwen), "-o", str(out_jsonl), "-o", str(out_parquet),
            "--batch-size", "1", "--max-new-tokens", "24"]
    job = start(*args)
    # the first record of model B, as another process writes it: no event to wait on but the file
    assert wait_until(lambda: out_jsonl.exists() and any(row["model"] == str(tiny_qwen) for row in jsonl(out_jsonl)),
                      within=240)
    job.send_signal(signal.SIGKILL)
    job.wait()
    killed_at = len(jsonl(out_jsonl))
    assert 40 < killed_at < 80, f"the kill should land inside model B, {killed_at} records were written"

    rerun = run(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{killed_at - 40} already done" in rerun.stdout
    expected = {(path.name, str(model)) for path in images.iterdir() for model in (tiny_llava, tiny_qwen)}
    for rows in (jsonl(out_jsonl), parquet(out_parquet)):
        pairs = [(row["file"], row["model"]) for row in rows]
        assert len(pairs) == len(set(pairs)) == 80
        assert set(pairs) == expected
        assert all(row["caption"] and row["error"] is None for row in rows)
    assert not list(tmp_path.glob(".*journal*"))  # the finished job folded its journal into the table


def make_bad_images(folder: Path) -> dict[str, bool]:
    """Every kind of awkward file, and whether it should be captioned (True) or get an error record (False)."""
    folder.mkdir()
    draw_sample_images(folder, count=3, seed=9)
    good = Image.effect_noise((64, 48), 40).convert("RGB")
    kinds = {path.name: True for path in folder.iterdir()}
    (folder / "zero.jpg").write_bytes(b"")
    kinds["zero.jpg"] = False
    good.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    kinds["truncated.jpg"] = False
    (folder / "notes.png").write_text("this is not a picture")
    kinds["notes.png"] = False
    good.save(folder / "png_named.jpg", format="PNG")  # wrong extension: the content decides
    kinds["png_named.jpg"] = True
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    kinds["bomb.png"] = False
    good.convert("CMYK").save(folder / "cmyk.jpg")
    kinds["cmyk.jpg"] = True
    Image.new("I;16", (40, 30), 30000).save(folder / "sixteen.png")
    kinds["sixteen.png"] = True
    palette = good.convert("P")
    palette.save(folder / "palette.png", transparency=0)
    kinds["palette.png"] = True
    frames = [good, Image.new("RGB", (64, 48), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    kinds["animated.gif"] = True
    exif = Image.Exif()
    exif[0x0112] = 6
    good.save(folder / "rotated.jpg", exif=exif)
    kinds["rotated.jpg"] = True
    Image.effect_noise((5000, 3500), 30).convert("RGB").save(folder / "huge.jpg", quality=80)
    kinds["huge.jpg"] = True
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "tiny.png")
    kinds["tiny.png"] = True
    return kinds


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llava"])
def test_bad_images_get_one_line_errors_and_never_stop_the_job(tmp_path, model, request):
    path = request.getfixturevalue(model)
    kinds = make_bad_images(tmp_path / "mixed")
    out = tmp_path / "out.jsonl"
    result = run(str(tmp_path / "mixed"), "-m", str(path), "-o", str(out), "--batch-size", "4", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    rows = {row["file"]: row for row in jsonl(out)}
    assert set(rows) == set(kinds)
    for name, captioned in kinds.items():
        row = rows[name]
        if captioned:
            assert row["caption"] and row["error"] is None, row
        else:
            assert row["caption"] is None and row["error"] and "\n" not in row["error"], row
    errors = sum(not captioned for captioned in kinds.values())
    assert f"{len(kinds) - errors} captioned, {errors} errors" in result.stdout
    assert "bomb.png: image too large" in result.stdout


def test_imagefolder_metadata_loads_with_datasets_and_has_a_column_per_model(tmp_path, tiny_llava, tiny_qwen):
    import datasets

    data = tmp_path / "data"
    draw_sample_images(data / "train", count=4, seed=2)
    metadata = data / "train" / "metadata.jsonl"
    result = run(str(data), "-r", "-m", str(tiny_llava), "-m", str(tiny_qwen), "-o", str(metadata), "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    dataset = datasets.load_dataset("imagefolder", data_dir=str(data), split="train")
    assert len(dataset) == 4
    columns = {model_tag(str(tiny_llava)), model_tag(str(tiny_qwen))}
    assert columns <= set(dataset.column_names) and "image" in dataset.column_names
    assert all(dataset[column][0] for column in columns)
    rerun = run(str(data), "-r", "-m", str(tiny_llava), "-o", str(metadata))
    assert "4 already done" in rerun.stdout


def test_csv_output_holds_one_row_per_pair_and_resumes(tmp_path, tiny_llava, image_dir):
    import csv

    out = tmp_path / "out.csv"
    first = run(str(image_dir), "-m", str(tiny_llava), "-o", str(out), "--max-new-tokens", "4")
    assert first.returncode == 0, first.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and {row["model"] for row in rows} == {str(tiny_llava)}
    again = run(str(image_dir), "-m", str(tiny_llava), "-o", str(out))
    assert "5 already done" in again.stdout
    assert list(csv.DictReader(out.open())) == rows


def test_metadata_outside_the_images_folder_is_a_usage_error(tmp_path, tiny_llava, image_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(str(image_dir), "-m", str(tiny_llava), "-o", str(elsewhere / "metadata.jsonl"))
    assert result.returncode == 2 and "must sit at or above its images" in result.stderr


def test_a_worker_killed_mid_job_is_retried_and_no_image_is_lost(tmp_path, tiny_llava):
    from vlmux.caption.job import CaptionJob, run_job
    from vlmux.caption.sinks import JsonlSink
    from vlmux.caption.sources import collect_images
    from vlmux.config import GenerationSpec, ModelSpec, PoolConfig

    draw_sample_images(tmp_path / "images", count=30, seed=8)
    killed: list[int] = []
    written_at_kill: list[int] = []

    class KillingSink(JsonlSink):
        """Kills the workers as the first results are written: mid-job, whatever the machine's speed."""

        def write(self, pairs) -> None:
            super().write(pairs)
            if not killed:  # workers are children of the fork server, which is a child of this process
                written_at_kill.append(len(self.records()))
                for server in children(os.getpid()):
                    for worker in children(server):
                        os.kill(worker, signal.SIGKILL)
                        killed.append(worker)

    sink = KillingSink(tmp_path / "out.jsonl")
    job = CaptionJob(collect_images([str(tmp_path / "images")]), [ModelSpec(str(tiny_llava), device="cpu")],
                     GenerationSpec(max_new_tokens=24), [sink], batch_size=2)
    [report] = run_job(job, PoolConfig(max_batch_size=2), progress=False)
    sink.close()
    assert killed and written_at_kill[0] < 30, "the kill must land mid-job, or the test tests nothing"
    rows = jsonl(tmp_path / "out.jsonl")
    assert len(rows) == len({row["file"] for row in rows}) == 30
    assert all(row["caption"] and row["error"] is None for row in rows), [row for row in rows if row["error"]]
    assert report.captioned == 30 and report.errors == 0


def test_auto_batch_size_sends_several_batches_per_request_with_the_captions_of_an_explicit_size(tmp_path, tiny_qwen):
    from vlmux.caption.job import BATCHES_PER_REQUEST, CaptionJob, run_job, summary_line
    from vlmux.caption.sinks import JsonlSink
    from vlmux.caption.sources import collect_images
    from vlmux.config import GenerationSpec, ModelSpec, PoolConfig

    draw_sample_images(tmp_path / "images", count=40, seed=6)
    refs = collect_images([str(tmp_path / "images")])
    reports, outputs = {}, {}
    for batch_size in (None, 3):
        out = tmp_path / f"{batch_size}.jsonl"
        sink = JsonlSink(out)
        job = CaptionJob(refs, [ModelSpec(str(tiny_qwen), device="cpu")], GenerationSpec(max_new_tokens=8), [sink],
                         batch_size=batch_size)
        [reports[batch_size]] = run_job(job, PoolConfig(), progress=False)
        sink.close()
        outputs[batch_size] = {row["file"]: row["caption"] for row in jsonl(out)}
    assert len(outputs[None]) == 40 and all(outputs[None].values())
    assert outputs[None] == outputs[3]  # greedy: how the images were batched changes no caption
    auto, fixed = reports[None], reports[3]
    # With auto, every request (the first one too) holds BATCHES_PER_REQUEST batches of the size the worker picked
    # at load, which is its largest batch: 40 images make ceil(40 / size) batches in ceil(40 / (4 * size)) requests.
    picked = auto.largest_batch
    assert BATCHES_PER_REQUEST == 4 and picked == 8  # the README: auto on the CPU is 8
    assert (auto.batches, auto.requests) == (-(-40 // picked), -(-40 // (4 * picked)))
    assert (fixed.largest_batch, fixed.batches, fixed.requests) == (3, 14, 4)  # requests of 12, 12, 12, 4
    assert f"{auto.batches} batches of up to {picked} images in {auto.requests} request" in summary_line(auto)
    # A steady rate needs results from two requests or more (it leaves the first request's start-up out).
    assert auto.steady_images_per_second > 0 and fixed.steady_images_per_second > 0
    one = CaptionJob(refs[:5], [ModelSpec(str(tiny_qwen), device="cpu")], GenerationSpec(max_new_tokens=8),
                     [JsonlSink(tmp_path / "one.jsonl")])
    [single] = run_job(one, PoolConfig(), progress=False)
    assert single.requests == 1 and single.steady_images_per_second is None


def test_two_cpu_replicas_caption_a_folder_side_by_side_with_the_same_output_as_one_worker(tmp_path, tiny_llava, tiny_qwen):
    images = tmp_path / "images"
    draw_sample_images(images, count=12, seed=4)
    common = [str(images), "-m", str(tiny_llava), "-m", str(tiny_qwen), "--batch-size", "2", "--max-new-tokens", "8",
              "--device", "cpu"]
    single = run(*common, "-o", str(tmp_path / "single.jsonl"))
    assert single.returncode == 0, single.stderr
    parallel = run(*common, "--replicas", "2", "-o", str(tmp_path / "parallel.jsonl"))
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.count("2 workers side by side") == 2 and "side by side" not in single.stdout
    one = {(row["file"], row["model"]): row for row in jsonl(tmp_path / "single.jsonl")}
    rows = jsonl(tmp_path / "parallel.jsonl")
    assert len(rows) == len(one) == 24
    assert {(row["file"], row["model"]): row for row in rows} == one
    rerun = run(*common, "--replicas", "2", "-o", str(tmp_path / "parallel.jsonl"))
    assert rerun.stdout.count("12 already done") == 2 and len(jsonl(tmp_path / "parallel.jsonl")) == 24


def test_gpus_without_an_nvidia_gpu_fail_clearly(tmp_path, tiny_llava, image_dir):
    from vlmux.pool import vram

    if vram.available():
        pytest.skip("this machine has a GPU")
    result = run(str(image_dir), "-m", str(tiny_llava), "--gpus", "all", "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 1 and "--gpus all asked for, but" in result.stderr


def test_a_request_holds_four_batches_of_the_plan_s_size_or_else_of_the_size_the_worker_picked():
    from vlmux.caption.job import BATCHES_PER_REQUEST, request_size
    from vlmux.caption.plan import ModelPlan
    from vlmux.config import GenerationSpec, ModelSpec

    class Pool:  # the worker's own batch size, as it reported it at load (Loaded.batch_size)
        def batch_size(self, name: str) -> int:
            return {"a": 5, "a#1": 11}[name]

    auto = ModelPlan(ModelSpec("a", device="cpu"), GenerationSpec())
    assert request_size(auto, Pool(), "a") == BATCHES_PER_REQUEST * 5
    assert request_size(auto, Pool(), "a#1") == BATCHES_PER_REQUEST * 11  # each replica by its own size
    fixed = ModelPlan(ModelSpec("a", device="cpu"), GenerationSpec(), batch_size=3)
    assert request_size(fixed, Pool(), "a") == BATCHES_PER_REQUEST * 3


def test_a_model_that_does_not_load_fails_the_job_with_exit_1_and_says_why(tmp_path, tiny_llava, image_dir):
    """The README's exit 1 for "a model that does not load", on a plain run (not --gpus all)."""
    import shutil

    broken = tmp_path / "broken-llava"
    shutil.copytree(tiny_llava, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2  # readable weights whose shapes the model does not have
    (broken / "config.json").write_text(json.dumps(config))
    result = run(str(image_dir), "-m", str(broken), "--device", "cpu", "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "failed: could not load" in result.stderr and "broken-llava" in result.stderr, result.stderr
