import pytest

from vlmux.pool import vram


def test_without_a_gpu_it_says_so(monkeypatch):
    if vram.available():
        pytest.skip("this machine has an NVIDIA GPU")
    assert "GPU" in vram.nvml_status()
    assert vram.gpus() == []



def test_a_cpu_release_says_what_the_host_got_back():
    release = vram.cpu_release(1234, alive=False, host_bytes=300 * vram.MIB)
    assert release.verified is None and release.process_gone
    assert str(release) == "released (CPU worker 1234 exited, its 300 MiB of host memory returned; no GPU memory to verify)"


def test_physical_index_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert vram.physical_index("cpu") is None
    assert vram.physical_index("cuda") == 0
    assert vram.physical_index("cuda:3") == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert vram.physical_index("cuda:1") == 5
    with pytest.raises(ValueError, match="not visible"):
        vram.physical_index("cuda:2")


def test_release_reads_plainly():
    assert str(vram.Release(True, True, 0.0, 0.12)) == "release verified: process gone=True, residue 0 MiB, 0.12 s"
    assert "NOT verified" in str(vram.Release(False, True, 12.0, 10.0))


@pytest.mark.gpu
def test_gpu_inventory_reads_through_nvml():
    gpus = vram.gpus()
    assert gpus and all(gpu.total > gpu.used >= 0 for gpu in gpus)
