"""Folder inputs: symlinked subfolders under -r are followed only when asked, each real folder once."""
import os

import pytest

from vlmux.caption.sources import UsageError, collect_images
from vlmux.tiny import draw_sample_images


@pytest.fixture()
def tree(tmp_path):
    """photos/ with 2 images of its own and a symlink `linked` to outside/, which holds 3 images."""
    photos, outside = tmp_path / "photos", tmp_path / "outside"
    draw_sample_images(photos, count=2, seed=1)
    draw_sample_images(outside, count=3, seed=2)
    os.symlink(outside, photos / "linked")
    return photos


def test_a_symlinked_folder_is_skipped_with_a_warning_naming_it_and_the_flag(tree):
    warnings = []
    refs = collect_images([str(tree)], recursive=True, warn=warnings.append)
    assert len(refs) == 2
    assert len(warnings) == 1 and str(tree / "linked") in warnings[0] and "--follow-symlinks" in warnings[0]


def test_follow_symlinks_searches_the_linked_folder(tree):
    warnings = []
    refs = collect_images([str(tree)], recursive=True, follow_symlinks=True, warn=warnings.append)
    assert sorted(ref.key for ref in refs) == ["linked/sample_0.png", "linked/sample_1.jpg", "linked/sample_2.png",
                                               "sample_0.png", "sample_1.jpg"]
    assert warnings == []


def test_a_link_loop_and_a_second_link_to_one_folder_are_walked_once(tree):
    os.symlink(tree, tree / "linked" / "back_up")  # a loop: outside/back_up -> photos
    os.symlink(tree / "linked", tree / "again")  # a second way into outside/
    refs = collect_images([str(tree)], recursive=True, follow_symlinks=True, warn=lambda message: None)
    assert len(refs) == 5
    assert len({os.path.realpath(ref.path) for ref in refs}) == 5


def test_without_recursion_nothing_is_warned(tree):
    warnings = []
    assert len(collect_images([str(tree)], warn=warnings.append)) == 2
    assert warnings == []


def test_a_csv_with_only_a_header_says_it_has_no_rows(tmp_path):
    table = tmp_path / "list.csv"
    table.write_text("image,caption\n")
    with pytest.raises(UsageError, match="has no rows, only a header row \\(image, caption\\)"):
        collect_images([str(table)])
