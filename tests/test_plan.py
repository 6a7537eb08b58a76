"""Per-model settings, job files, prompt templates and the less common sources, through the CLI."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmux import pipeline
from vlmux.caption.sinks import written


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmux.cli", "caption", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def captions(path: Path) -> dict[tuple[str, str], str]:
    return {(row["file"], row["model"]): row["caption"] for row in map(json.loads, path.read_text().splitlines())}


def expected(model: Path, images: list[Path], prompt_for, max_new_tokens: int) -> dict[tuple[str, str], str]:
    with pipeline(str(model), device="cpu", max_new_tokens=max_new_tokens) as pipe:
        return {(image.name, str(model)): written(pipe(image, prompt=prompt_for(image))) for image in images}


def test_options_after_a_model_apply_to_that_model_only(tmp_path, image_dir, tiny_llava, tiny_qwen):
    out = tmp_path / "out.jsonl"
    result = run(str(image_dir), "--max-new-tokens", "5", "--batch-size", "2", "-m", str(tiny_llava), "--prompt",
                 "Name the colours.", "-m", str(tiny_qwen), "--prompt", "Count the shapes.", "--max-new-tokens", "7",
                 "--batch-size", "auto", "-o", str(out))
    assert result.returncode == 0, result.stderr
    llava, qwen = [line for line in result.stdout.splitlines() if "captioned" in line]
    assert "3 batches of up to 2 images" in llava and "1 batch of up to 5 images" in qwen
    images = sorted(image_dir.iterdir())
    want = expected(tiny_llava, images, lambda _: "Name the colours.", 5)
    want |= expected(tiny_qwen, images, lambda _: "Count the shapes.", 7)
    assert captions(out) == want


def test_a_toml_job_file_lists_models_with_their_settings(tmp_path, image_dir, tiny_llava, tiny_qwen):
    (tmp_path / "prompt.txt").write_text("Say what you see in {folder}/{file}.\n")
    job = tmp_path / "job.toml"
    job.write_text(f"""
[defaults]
max_new_tokens = 4

[[model]]
model = "{tiny_llava}"
prompt_file = "prompt.txt"
batch_size = 2

[[model]]
model = "{tiny_qwen}"
prompt = "Describe {{file}}."
dtype = "float32"
batch_size = "auto"
""")
    out = tmp_path / "out.jsonl"
    result = run(str(image_dir), "--job", str(job), "-o", str(out))
    assert result.returncode == 0, result.stderr
    images = sorted(image_dir.iterdir())
    want = expected(tiny_llava, images, lambda image: f"Say what you see in images/{image.name}.", 4)
    want |= expected(tiny_qwen, images, lambda image: f"Describe {image.name}.", 4)
    assert captions(out) == want
    llava, qwen = [line for line in result.stdout.splitlines() if "captioned" in line]
    assert "3 batches of up to 2 images" in llava and "1 batch of up to 5 images" in qwen


def test_existing_sidecar_captions_fill_the_existing_placeholder(tmp_path, image_dir, tiny_llava):
    """{existing} from IMAGE.txt, .caption and .tags, the template read with --prompt-file, and --prefix / --suffix
    around every caption."""
    images = sorted(image_dir.iterdir())
    existing = {images[0]: "red, circle, small", images[1]: "a blue square", images[2]: "green, triangle"}
    for image, extension in zip(images, (".txt", ".caption", ".tags")):
        image.with_suffix(extension).write_text(existing[image] + "\n")
    (tmp_path / "prompt.txt").write_text("Tags: {existing}. Caption it.\n")
    out = tmp_path / "out.jsonl"
    result = run(str(image_dir), "-m", str(tiny_llava), "--prompt-file", str(tmp_path / "prompt.txt"),
                 "--prefix", "photo: ", "--suffix", " [end]", "--max-new-tokens", "6", "-o", str(out))
    assert result.returncode == 0, result.stderr
    want = expected(tiny_llava, images, lambda image: f"Tags: {existing.get(image, '')}. Caption it.", 6)
    assert captions(out) == {key: f"photo: {caption} [end]" for key, caption in want.items()}


def test_a_bad_job_file_is_a_usage_error(tmp_path, image_dir):
    job = tmp_path / "job.toml"
    job.write_text("[[model]]\nprompt = 'no model here'\n")
    result = run(str(image_dir), "--job", str(job))
    assert result.returncode == 2 and "[[model]]" in result.stderr
    job.write_text("[[model]]\nmodel = 'vlmux/shapes'\nbatch_size = 'big'\n")
    result = run(str(image_dir), "--job", str(job))
    assert result.returncode == 2 and "batch_size must be a number or auto" in result.stderr


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_list_files_and_tables_name_the_images(tmp_path, image_dir, tiny_llava, kind):
    images = sorted(image_dir.iterdir())[:3]
    entries = [f"images/{image.name}" for image in images] + ["images/missing.png"]
    listing = tmp_path / f"list.{kind}"
    if kind == "txt":
        listing.write_text("# a comment\n" + "\n".join(entries) + "\n")
    elif kind == "csv":
        with listing.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "image_path", "picture"])  # --image-column picks the second
            writer.writerows([[i, "images/not-this.png", entry] for i, entry in enumerate(entries)])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"file_name": entries}), listing)
    out = tmp_path / "out.jsonl"
    column = ["--image-column", "picture"] if kind == "csv" else []
    result = run(str(listing), *column, "-m", str(tiny_llava), "--max-new-tokens", "4", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = {row["file"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(entries)
    assert rows["images/missing.png"]["error"].startswith("file not found")
    assert all(rows[entry]["caption"] for entry in entries[:3])


def test_a_saved_dataset_with_an_image_column_is_a_source(tmp_path, image_dir, tiny_llava):
    import datasets

    images = sorted(image_dir.iterdir())
    data = datasets.Dataset.from_dict({"picture": [str(p) for p in images], "label": list(range(len(images)))})
    data.cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out.jsonl"
    result = run(str(tmp_path / "saved"), "-m", str(tiny_llava), "--max-new-tokens", "5", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = {row["file"]: row["caption"] for row in map(json.loads, out.read_text().splitlines())}
    want = expected(tiny_llava, images, lambda _: "Describe this image in one sentence.", 5)
    assert rows == {f"{index:06d}": want[(image.name, str(tiny_llava))] for index, image in enumerate(images)}
    sidecar = run(str(tmp_path / "saved"), "-m", str(tiny_llava), "--sidecar", "txt")
    assert sidecar.returncode == 2 and "use -o" not in sidecar.stderr and "-o" in sidecar.stderr


def test_a_long_job_on_a_gpu_compiles_its_decode_unless_the_user_chose(tiny_llava):
    from vlmux.caption.plan import COMPILE_MIN_IMAGES, job_decode
    from vlmux.config import ModelSpec

    auto = ModelSpec("m")
    assert job_decode(auto, COMPILE_MIN_IMAGES, gpu_present=True).decode == "compiled"
    assert job_decode(auto, COMPILE_MIN_IMAGES, gpu_present=True, folder=tiny_llava).decode == "compiled"  # no engine
    assert job_decode(auto, COMPILE_MIN_IMAGES - 1, gpu_present=True).decode == "auto"  # the compile would not pay
    assert job_decode(auto, COMPILE_MIN_IMAGES, gpu_present=False).decode == "auto"
    assert job_decode(ModelSpec("m", device="cpu"), COMPILE_MIN_IMAGES, gpu_present=True).decode == "auto"
    assert job_decode(ModelSpec("m", decode="dynamic"), 10**6, gpu_present=True).decode == "dynamic"


def test_a_job_on_a_gpu_runs_the_engine_where_it_runs_the_model(tmp_path, tiny_qwen):
    from vlmux.caption.plan import COMPILE_MIN_IMAGES, ENGINE_MIN_IMAGES, job_decode
    from vlmux.config import ModelSpec

    auto = ModelSpec(str(tiny_qwen))
    assert job_decode(auto, ENGINE_MIN_IMAGES, gpu_present=True, folder=tiny_qwen).decode == "engine"
    assert job_decode(auto, ENGINE_MIN_IMAGES - 1, gpu_present=True, folder=tiny_qwen).decode == "auto"
    assert job_decode(auto, ENGINE_MIN_IMAGES, gpu_present=False, folder=tiny_qwen).decode == "auto"
    quantised = ModelSpec(str(tiny_qwen), quantize="4bit")
    assert job_decode(quantised, COMPILE_MIN_IMAGES, gpu_present=True, folder=tiny_qwen).decode == "compiled"
    beams = tmp_path / "beams"
    beams.mkdir()
    for file in tiny_qwen.iterdir():
        (beams / file.name).symlink_to(file)
    (beams / "generation_config.json").unlink()
    (beams / "generation_config.json").write_text(json.dumps({"num_beams": 4, "no_repeat_ngram_size": 3}))
    assert job_decode(ModelSpec(str(beams)), ENGINE_MIN_IMAGES, gpu_present=True, folder=beams).decode == "auto"


def test_decode_is_a_per_model_option_and_a_bad_one_is_a_usage_error(image_dir, tiny_llava):
    done = run(str(image_dir), "-m", str(tiny_llava), "--decode", "fastest", "--device", "cpu")
    assert done.returncode == 2 and "--decode" in done.stderr
    from vlmux.caption.plan import plans_from_options

    [plan] = plans_from_options([{"model": str(tiny_llava), "decode": "static"}], {}, "cpu")
    assert plan.spec.decode == "static"


def test_prep_processes_apply_to_every_model_and_a_negative_count_is_a_usage_error(tiny_llava, tiny_qwen):
    from vlmux.caption.plan import plans_from_options
    from vlmux.caption.sources import UsageError

    plans = plans_from_options([{"model": str(tiny_llava)}, {"model": str(tiny_qwen)}], {"prep_processes": 3}, "cpu")
    assert [plan.spec.prep_processes for plan in plans] == [3, 3]
    with pytest.raises(UsageError, match="prep_processes"):
        plans_from_options([{"model": str(tiny_llava)}], {"prep_processes": -1}, "cpu")


def test_a_job_on_a_gpu_counts_its_preparing_processes_unless_the_user_chose():
    from vlmux.caption.plan import job_prep
    from vlmux.config import ModelSpec

    from vlmux.worker.prep import auto_processes

    auto = ModelSpec("m")
    assert job_prep(auto, 1000, gpu_present=True).prep_processes == auto_processes("cuda")
    assert job_prep(auto, 1000, gpu_present=False).prep_processes is None
    assert job_prep(ModelSpec("m", device="cpu"), 1000, gpu_present=True).prep_processes is None
    assert job_prep(auto, 3, gpu_present=True).prep_processes is None  # a few images: prepared in the worker
    assert job_prep(ModelSpec("m", prep_processes=0), 1000, gpu_present=True).prep_processes == 0


def test_sampling_with_a_seed_repeats_its_captions_from_the_command_line_and_the_api(tmp_path, image_dir, tiny_llava):
    """--sample --temperature --seed end to end: the CLI's captions equal the pipeline's under the same seed; the
    same seed gives them again, another seed others."""
    images = sorted(image_dir.iterdir())
    out = tmp_path / "out.jsonl"
    result = run(str(image_dir), "-m", str(tiny_llava), "--sample", "--temperature", "1.5", "--seed", "1",
                 "--max-new-tokens", "6", "-o", str(out))
    assert result.returncode == 0, result.stderr
    sampling = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 6}
    with pipeline(str(tiny_llava), device="cpu") as pipe:
        first, again, other = (pipe(images, seed=seed, **sampling) for seed in (1, 1, 2))
        greedy = pipe(images, max_new_tokens=6)
    assert captions(out) == {(image.name, str(tiny_llava)): written(caption) for image, caption in zip(images, first)}
    assert first == again and other != first and greedy != first
