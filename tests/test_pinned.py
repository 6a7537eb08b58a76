"""Copies out of a pinned checkpoint are cut where its registered slices meet (the GPU path is in test_gpu.py)."""
import pytest

from vlmux.backends import pinned


@pytest.mark.parametrize("offset,length", [(0, 10), (5, 3), (6, 10), (8, 8), (3, 30), (16, 1)])
def test_ranges_cover_the_piece_and_stay_inside_one_slice(monkeypatch, offset, length):
    monkeypatch.setattr(pinned, "SLICE_BYTES", 8)
    ranges = pinned.registered_ranges(offset, length)
    assert ranges[0][0] == offset and ranges[-1][1] == offset + length
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, nothing twice
    assert all(start // 8 == (stop - 1) // 8 for start, stop in ranges)  # never across a slice boundary
    assert len(ranges) == (offset + length - 1) // 8 - offset // 8 + 1  # and cut only there


def test_a_checkpoint_too_large_for_half_the_available_memory_is_not_pinned(tiny_qwen, monkeypatch):
    monkeypatch.setattr(pinned, "available_host_bytes", lambda: 1000)
    assert pinned.pin_checkpoint(tiny_qwen) == 0
    assert pinned.pinned_views(tiny_qwen) is None
