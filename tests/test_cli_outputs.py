"""Where `vlmux caption` writes: long names, unwritable destinations, output checks before any file is made, and
the command's own help (issue 16)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vlmux.caption.destinations import why_unwritable
from vlmux.caption.job import ModelReport, summary_line
from vlmux.testing.cli import read_jsonl, run_caption
from vlmux.tiny import draw_sample_images

from test_cli import assert_usage_error, vlmux


def immutable(folder: Path) -> None:
    """Make `folder` refuse new files even to root (chattr +i), or skip where the file system cannot."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")


def mutable(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_long_image_names_get_sidecars_and_a_name_over_the_limit_fails_alone(tmp_path, tiny_llava):
    folder = tmp_path / "images"
    first = draw_sample_images(folder, count=2, seed=1)[0]
    fits = first.rename(folder / ("a" * 236 + ".png"))  # sidecar: 248 bytes; a temporary built from it: over 255
    too_long = folder / ("b" * 247 + ".png")  # sidecar: 259 bytes, over the limit itself
    shutil.copy(fits, too_long)
    run = run_caption(str(folder), "-m", str(tiny_llava), "--sidecar", "caption.txt", "--max-new-tokens", "4")
    assert run.returncode == 0, run.stderr
    assert (folder / ("a" * 236 + ".caption.txt")).read_text().strip()
    assert (folder / "sample_1.caption.txt").exists()
    assert "2 captioned, 1 errors" in run.stdout
    assert "its name is 259 bytes and the file system allows 255" in run.stdout
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]  # no temporary left behind


def test_sidecars_into_an_unwritable_folder_fail_before_any_work(tmp_path, tiny_llava):
    folder = tmp_path / "images"
    draw_sample_images(folder, count=2, seed=1)
    immutable(folder)  # stands in for a read-only mount: root is refused too
    try:
        run = vlmux("caption", str(folder), "-m", str(tiny_llava), "--no-progress")
    finally:
        mutable(folder)
    assert_usage_error(run, str(folder), "cannot write sidecar files there", "-o")
    assert "captioned" not in run.stdout


def test_the_probe_finds_a_folder_that_access_calls_writable(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    immutable(folder)
    monkeypatch.setattr(os, "access", lambda path, mode: True)  # as on read-only network mounts
    try:
        assert "creating a file there fails" in why_unwritable(folder)
    finally:
        mutable(folder)
    assert why_unwritable(folder) is None and list(folder.iterdir()) == []


def test_an_output_whose_folder_is_a_file_is_a_usage_error_before_work(tmp_path, image_dir, tiny_llava):
    not_a_folder = tmp_path / "notes"
    not_a_folder.write_text("a file")
    run = vlmux("caption", str(image_dir), "-m", str(tiny_llava), "-o", str(not_a_folder / "out.jsonl"))
    assert_usage_error(run, str(not_a_folder), "not a folder", "writable folder")


def test_an_unsupported_output_lists_every_format(tmp_path, image_dir, tiny_llava):
    run = vlmux("caption", str(image_dir), "-m", str(tiny_llava), "-o", str(tmp_path / "x.txt"))
    assert_usage_error(run, ".jsonl", ".csv", ".parquet", "metadata.jsonl", "metadata.csv")


def test_a_metadata_file_away_from_its_images_leaves_no_output_behind(tmp_path, image_dir, tiny_llava):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = tmp_path / "first.jsonl"
    run = vlmux("caption", str(image_dir), "-m", str(tiny_llava), "-o", str(first), "-o", str(elsewhere / "metadata.jsonl"))
    assert_usage_error(run, "is not inside")
    assert not first.exists() and list(elsewhere.iterdir()) == []


def test_a_setting_after_the_last_of_several_models_is_warned(tmp_path, image_dir, tiny_llava):
    run = vlmux("caption", str(image_dir), "-m", str(tiny_llava), "-m", str(tmp_path / "second"), "--prompt", "Tags.")
    assert "--prompt follows the last -m" in run.stderr and "before the first -m" in run.stderr
    both = vlmux("caption", str(image_dir), "-m", str(tiny_llava), "--prompt", "A.", "-m", str(tmp_path / "second"),
                 "--prompt", "B.")
    assert "follows the last -m" not in both.stderr


def test_version_and_help():
    assert vlmux("--version").stdout.strip() == "vlmux 0.1.0"
    text = " ".join(vlmux("caption", "--help").stdout.split())
    for option in ("--max-new-tokens N longest", "--temperature TEMPERATURE with --sample", "--top-p TOP_P with",
                   "--seed SEED with", "--dtype {auto,bfloat16,float16,float32} weight", "--no-progress no progress",
                   "With no -o, sidecar files are written", "Exit codes: 0", "2 a usage error", "130 interrupted"):
        assert option in text, option


def test_a_summary_without_captions_gives_no_rate():
    line = summary_line(ModelReport("m", captioned=0, errors=40, caption_seconds=0.5))
    assert "0 captioned, 40 errors" in line and "images/s" not in line
    assert "4.0 images/s" in summary_line(ModelReport("m", captioned=2, errors=40, caption_seconds=0.5))


def test_max_pixels_reaches_the_worker(tmp_path, image_dir, tiny_llava):
    out = tmp_path / "out.jsonl"
    run = run_caption(str(image_dir), "-m", str(tiny_llava), "-o", str(out), "--max-pixels", "100")
    assert run.returncode == 0, run.stderr
    assert all("--max-pixels" in row["error"] for row in read_jsonl(out))
    assert "0 captioned, 5 errors" in run.stdout and "images/s" not in run.stdout
