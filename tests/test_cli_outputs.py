"""Where `vlmux caption` writes (issue 16)."""
import shutil

from vlmux.testing.cli import run_caption
from vlmux.tiny import draw_sample_images


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
