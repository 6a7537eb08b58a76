import pytest

from vlmux.pool import vram
from vlmux.testing import nvml


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


# The real NVML-reading code over a fake pynvml (vlmux.testing.nvml): books the test writes, read as on a GPU host.
WORKER, OTHER = 4242, 5151


def test_the_inventory_reads_nvmls_books(monkeypatch):
    fake = nvml.install(monkeypatch, gpus=2)
    fake.hold(WORKER, 1, 3 * nvml.GIB)
    inventory = vram.NvmlInventory()
    assert inventory.status() is None and vram.available()
    assert [(g.index, g.name, g.total, g.used) for g in inventory.gpus()] == [
        (0, "Fake GPU", 80 * nvml.GIB, 500 * nvml.MIB), (1, "Fake GPU", 80 * nvml.GIB, 3 * nvml.GIB + 500 * nvml.MIB)]
    assert inventory.process_memory(1) == {WORKER: 3 * nvml.GIB} and inventory.process_memory(0) == {}
    assert vram.unattributed(1, inventory) == 500 * nvml.MIB  # the driver's share, not the worker's
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-0001,GPU-fake-0000")
    assert inventory.physical_index("cuda:0") == 1 and inventory.physical_index("cuda:1") == 0


def test_a_release_is_verified_once_the_context_and_a_passing_residue_are_gone(monkeypatch):
    fake = nvml.install(monkeypatch)
    fake.hold(WORKER, 0, 2 * nvml.GIB)
    baseline = vram.unattributed(0)
    fake.exit(WORKER, residue=64 * nvml.MIB, clears_after=3)  # the driver frees it a few reads later
    release = vram.wait_for_release(0, WORKER, baseline, timeout=30, poll=0.001)
    assert (release.verified, release.process_gone, release.residue_mib) == (True, True, 0)


def test_a_residue_that_never_clears_is_not_verified_and_says_how_much(monkeypatch):
    fake = nvml.install(monkeypatch)
    fake.hold(WORKER, 0, 2 * nvml.GIB)
    fake.hold(OTHER, 0, nvml.GIB)  # another tenant: its memory is no residue
    baseline = vram.unattributed(0)
    fake.exit(WORKER, residue=64 * nvml.MIB, clears_after=None)
    release = vram.wait_for_release(0, WORKER, baseline, timeout=0.2, poll=0.01)
    assert (release.verified, release.process_gone, release.residue_mib) == (False, True, 64)
    assert release.note == "64 MiB booked to no process after 0.2 s"


def test_a_worker_that_keeps_its_context_is_not_verified(monkeypatch):
    fake = nvml.install(monkeypatch)
    fake.hold(WORKER, 0, 2 * nvml.GIB)
    release = vram.wait_for_release(0, WORKER, vram.unattributed(0), timeout=0.2, poll=0.01)
    assert (release.verified, release.process_gone, release.residue_mib) == (False, False, None)
    assert release.note == f"pid {WORKER} still holds a context after 0.2 s"


def test_a_split_model_is_verified_only_if_every_gpu_is(monkeypatch):
    fake = nvml.install(monkeypatch, gpus=2)
    fake.hold(WORKER, 0, 2 * nvml.GIB)
    fake.hold(WORKER, 1, 2 * nvml.GIB)
    baselines = {gpu: vram.unattributed(gpu) for gpu in (0, 1)}
    fake.exit(WORKER)
    fake.devices[1].residues.append(nvml.Residue(32 * nvml.MIB, None))  # left on the second GPU only
    release = vram.combined([vram.wait_for_release(gpu, WORKER, baselines[gpu], 0.2, 0.01) for gpu in (0, 1)])
    assert (release.verified, release.process_gone, release.residue_mib) == (False, True, 32)
    assert release.note == "2 parts: 32 MiB booked to no process after 0.2 s"


def test_replicas_are_verified_when_each_gave_everything_back(monkeypatch):
    fake = nvml.install(monkeypatch, gpus=2)
    fake.hold(WORKER, 0, 2 * nvml.GIB)
    fake.hold(OTHER, 1, 2 * nvml.GIB)
    baselines = {gpu: vram.unattributed(gpu) for gpu in (0, 1)}
    fake.exit(WORKER, residue=8 * nvml.MIB, clears_after=2)
    fake.exit(OTHER)
    release = vram.combined([vram.wait_for_release(0, WORKER, baselines[0], 30, 0.001),
                             vram.wait_for_release(1, OTHER, baselines[1], 30, 0.001)])
    assert (release.verified, release.process_gone, release.residue_mib) == (True, True, 0)


def test_the_pools_release_check_reads_nvml_around_a_workers_exit(monkeypatch):
    """VerifiedRelease with the NVML inventory: with another tenant on the GPU, the reference is read before the
    exit (not the pool's baseline), so the other's memory is neither residue nor hidden."""
    from vlmux.pool.release import UnattributedLock, VerifiedRelease

    fake = nvml.install(monkeypatch)
    fake.hold(WORKER, 0, 2 * nvml.GIB)
    fake.hold(OTHER, 0, nvml.GIB)
    fake.devices[0].residues.append(nvml.Residue(16 * nvml.MIB, None))  # an earlier tenant's, before this load
    check = VerifiedRelease(vram.NvmlInventory(), [0], {0: 500 * nvml.MIB}, timeout=0.2, lock=UnattributedLock())
    check.before_exit(WORKER)
    fake.exit(WORKER, residue=48 * nvml.MIB, clears_after=None)
    release = check.after_exit(WORKER, alive=False, host_bytes=None)
    assert (release.verified, release.process_gone, release.residue_mib) == (False, True, 48)
