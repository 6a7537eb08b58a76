"""Names in results: image keys unique across inputs, model tags unique across a job's models."""
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from vlmux.caption.identity import model_tags, renamed
from vlmux.caption.sources import collect_images
from vlmux.testing.cli import read_jsonl, run_caption
from vlmux.tiny import draw_sample_images


def two_folders_with_the_same_names(root: Path) -> None:
    for folder, seed in (("A", 1), ("B", 2)):
        draw_sample_images(root / folder, count=2, seed=seed)
    assert sorted(p.name for p in (root / "A").iterdir()) == sorted(p.name for p in (root / "B").iterdir())


def test_keys_are_relative_to_the_common_folder_of_several_inputs_and_to_a_single_input_as_before(tmp_path):
    two_folders_with_the_same_names(tmp_path / "coll")
    names = sorted(p.name for p in (tmp_path / "coll" / "A").iterdir())
    both = collect_images([str(tmp_path / "coll" / "A"), str(tmp_path / "coll" / "B")])
    assert sorted(ref.key for ref in both) == sorted(f"{d}/{n}" for d in "AB" for n in names)
    assert sorted(ref.key for ref in collect_images([str(tmp_path / "coll" / "A")])) == names
    one_file = tmp_path / "coll" / "B" / names[0]
    assert [ref.key for ref in collect_images([str(one_file)])] == [names[0]]
    listed = tmp_path / "coll" / "list.txt"
    listed.write_text(f"A/{names[0]}\n{one_file}\n")  # both under the list's folder: keys relative to it
    assert sorted(ref.key for ref in collect_images([str(listed)])) == sorted([f"A/{names[0]}", f"B/{names[0]}"])


def test_two_inputs_holding_the_same_names_give_a_record_each_in_every_output(tmp_path):
    coll = tmp_path / "coll"
    two_folders_with_the_same_names(coll)
    out, table = tmp_path / "c.jsonl", tmp_path / "c.parquet"
    result = run_caption(str(coll / "A"), str(coll / "B"), "-m", "vlmux/shapes", "-o", str(out), "-o", str(table))
    assert result.returncode == 0, result.stderr
    expected = {f"{d}/{p.name}" for d in "AB" for p in (coll / d).iterdir()}
    assert len(expected) == 4
    assert sorted(row["file"] for row in read_jsonl(out)) == sorted(expected)
    assert sorted(row["file"] for row in pq.read_table(table).to_pylist()) == sorted(expected)
    assert "4 captioned" in result.stdout


def test_model_tags_get_a_suffix_on_a_collision_in_the_models_order():
    tags = model_tags(["mm/x/tiny", "mm/y/tiny", "org/other", "z/tiny"])
    assert tags == {"mm/x/tiny": "tiny", "mm/y/tiny": "tiny-2", "org/other": "other", "z/tiny": "tiny-3"}
    assert model_tags(["a/tiny-2", "b/tiny", "c/tiny"])["c/tiny"] == "tiny-3"  # a suffix never takes a model's own tag
    assert renamed(tags) == ["mm/y/tiny is named tiny-2 in metadata columns and sidecar names (tiny is taken)",
                             "z/tiny is named tiny-3 in metadata columns and sidecar names (tiny is taken)"]


def test_two_models_with_the_same_folder_name_get_a_metadata_column_and_sidecars_each(tmp_path, tiny_llava):
    data = tmp_path / "data"
    draw_sample_images(data, count=3, seed=4)
    x, y = tmp_path / "mm" / "x" / "tiny", tmp_path / "mm" / "y" / "tiny"
    shutil.copytree(tiny_llava, x)
    shutil.copytree(tiny_llava, y)
    args = [str(data), "-m", str(x), "-m", str(y), "-o", str(data / "metadata.jsonl"), "--sidecar", "{model}.txt",
            "--max-new-tokens", "4"]
    first = run_caption(*args)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("is named tiny-2") == 1 and f"{y} is named tiny-2" in first.stderr
    assert first.stdout.count("3 captioned") == 2
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(set(row) == {"file_name", "tiny", "tiny-2"} and row["tiny"] and row["tiny-2"] for row in rows)
    for image in (p for p in data.iterdir() if p.suffix == ".png" or p.suffix == ".jpg"):
        stem = image.name.rsplit(".", 1)[0]
        assert (data / f"{stem}.tiny.txt").is_file() and (data / f"{stem}.tiny-2.txt").is_file()
    again = run_caption(*args)
    assert again.returncode == 0 and again.stdout.count("0 captioned, 0 errors, 3 already done") == 2, again.stdout
