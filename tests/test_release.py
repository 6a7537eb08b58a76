"""Verified release against books that a GPU's other users change meanwhile (fake GPUs; no worker needed)."""
from __future__ import annotations

import threading

from vlmux.pool import vram
from vlmux.pool.release import UnattributedLock, VerifiedRelease
from vlmux.testing.fakes import GIB, FakeGpus

MIB = 2**20
EXITING, SPARE = 111, 222


class BookedGpus(FakeGpus):
    """Fake GPUs where some memory is booked to no process, as NVML books a context's share and pinned pages."""

    def __init__(self) -> None:
        super().__init__()
        self.unbooked = 0

    def memory(self, index: int) -> vram.GpuMemory:
        used = super().memory(index)
        return vram.GpuMemory(index, used.name, used.total, used.used + self.unbooked)


def spare_warming(gpus: BookedGpus, lock: UnattributedLock) -> threading.Thread:
    def warm() -> None:
        with lock.held([0]):
            gpus.unbooked += 46 * MIB
            gpus.hold(0, SPARE, GIB)

    thread = threading.Thread(target=warm)
    thread.start()
    return thread


def test_a_spare_warming_during_a_release_check_is_not_its_residue():
    gpus, lock = BookedGpus(), UnattributedLock()
    gpus.hold(0, EXITING, 4 * GIB)
    check = VerifiedRelease(gpus, [0], {0: 0}, 2.0, lock)
    check.before_exit(EXITING)
    warming = spare_warming(gpus, lock)
    warming.join(0.2)
    assert warming.is_alive(), "the spare got its context while the exiting worker's release was being checked"
    gpus.drop(EXITING)
    release = check.after_exit(EXITING, False, None)
    assert release.verified and release.residue_mib == 0, release
    warming.join(5)
    assert not warming.is_alive() and gpus.unbooked == 46 * MIB


def test_memory_the_worker_leaves_behind_is_still_found():
    gpus, lock = BookedGpus(), UnattributedLock()
    gpus.hold(0, EXITING, 4 * GIB)
    check = VerifiedRelease(gpus, [0], {0: 0}, 0.2, lock)
    check.before_exit(EXITING)
    gpus.drop(EXITING)
    gpus.unbooked = 12 * MIB
    release = check.after_exit(EXITING, False, None)
    assert not release.verified and release.residue_mib == 12, release
    warming = spare_warming(gpus, lock)
    warming.join(5)
    assert not warming.is_alive(), "the check kept the GPU's lock after it ended"


def test_holders_of_several_gpus_take_them_in_one_order():
    lock, done = UnattributedLock(), []

    def hold(gpus: list[int]) -> None:
        for _ in range(200):
            with lock.held(gpus):
                pass
        done.append(gpus)

    threads = [threading.Thread(target=hold, args=(gpus,)) for gpus in ([0, 1], [1, 0], [1], [0])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(done) == 4
