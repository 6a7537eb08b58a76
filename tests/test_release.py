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


class PausableWarmUp:
    """A warm-up that adds memory booked to no process step by step and, once paused, takes no step until resumed
    (as a spare's process makes no driver call once a release check has it stopped)."""

    def __init__(self, gpus: BookedGpus, steps: int) -> None:
        self.gpus, self.steps, self.done = gpus, steps, 0
        self._turn = threading.Condition()
        self._paused = self._resting = self._finished = False
        self.pauses: list[int] = []  # the unbooked bytes at each pause

    def pause_warm(self) -> None:
        with self._turn:
            self._paused = True
            self._turn.wait_for(lambda: self._resting or self._finished)
            self.pauses.append(self.gpus.unbooked)

    def resume_warm(self) -> None:
        with self._turn:
            self._paused = False
            self._turn.notify_all()

    def run(self, lock: UnattributedLock, started: threading.Event) -> None:
        with lock.held([0], pausable=self):
            self.gpus.hold(0, SPARE, GIB)  # its context exists: the check's reference is then the level before the exit
            started.set()
            while self.done < self.steps:
                with self._turn:
                    while self._paused:
                        self._resting = True
                        self._turn.notify_all()
                        self._turn.wait()
                    self._resting = False
                    self.gpus.unbooked += MIB  # a page pinned, a part of a context made
                    self.done += 1
                threading.Event().wait(0.01)
            with self._turn:
                self._finished = True
                self._turn.notify_all()


def test_a_release_check_pauses_a_warm_up_instead_of_waiting_for_its_end():
    # an unload right after a model's first answer waited out the whole warm-up: 2.3-3.0 s a cycle on the H200
    gpus, lock = BookedGpus(), UnattributedLock()
    gpus.hold(0, EXITING, 4 * GIB)
    warm_up, started = PausableWarmUp(gpus, steps=400), threading.Event()
    warming = threading.Thread(target=warm_up.run, args=(lock, started))
    warming.start()
    started.wait(5)
    check = VerifiedRelease(gpus, [0], {0: 0}, 2.0, lock)
    check.before_exit(EXITING)
    assert len(warm_up.pauses) == 1 and warm_up.done < warm_up.steps, "the check waited for the warm-up to end"
    gpus.drop(EXITING)
    release = check.after_exit(EXITING, False, None)
    assert release.verified and release.residue_mib == 0, release
    assert gpus.unbooked == warm_up.pauses[0], "the warm-up changed the books while the check read them"
    warming.join(20)
    assert not warming.is_alive() and warm_up.done == warm_up.steps  # resumed, and finished
    with lock.held([0]):  # and nothing holds the GPU now
        pass


def test_a_second_check_waits_for_the_first_that_paused_the_warm_up():
    gpus, lock = BookedGpus(), UnattributedLock()
    warm_up, started = PausableWarmUp(gpus, steps=400), threading.Event()
    warming = threading.Thread(target=warm_up.run, args=(lock, started))
    warming.start()
    started.wait(5)
    first = lock.acquire([0], preempt=True)
    steps_while_held = []

    def second_check() -> None:
        turn = lock.acquire([0], preempt=True)
        done = warm_up.done
        threading.Event().wait(0.2)
        steps_while_held.append(warm_up.done - done)
        lock.release(turn)

    second = threading.Thread(target=second_check)
    second.start()
    second.join(0.3)
    assert second.is_alive(), "two release checks read one GPU's books at once"
    lock.release(first)
    second.join(5)
    warming.join(20)
    assert not second.is_alive() and not warming.is_alive() and len(warm_up.pauses) == 2
    assert steps_while_held == [0], "the first check's resume let the warm-up run under the second check"


class BlockingWarmUp:
    """A warm-up holding GPU 0 whose step never ends by itself; `pause_warm` is what a load may do to it."""

    def __init__(self) -> None:
        self.paused, self.resumed = threading.Event(), threading.Event()

    def pause_warm(self) -> None:
        self.paused.set()

    def resume_warm(self) -> None:
        self.resumed.set()


def test_a_load_into_a_cold_worker_pauses_a_warm_up_instead_of_waiting_for_it():
    lock, warm_up, step, holding = UnattributedLock(), BlockingWarmUp(), threading.Event(), threading.Event()

    def warming() -> None:
        with lock.held([0], pausable=warm_up):
            holding.set()
            step.wait()  # the step that blocks

    thread = threading.Thread(target=warming)
    thread.start()
    try:
        assert holding.wait(5)  # the warm-up has the GPU before the load asks
        loaded = threading.Event()

        def load() -> None:
            with lock.held([0], preempt=True):  # what the scheduler's load into a cold worker takes
                loaded.set()

        loader = threading.Thread(target=load)
        loader.start()
        assert loaded.wait(1.0), "the load waited for the warm-up's step"
        loader.join(1.0)
        assert warm_up.paused.is_set() and warm_up.resumed.is_set()  # frozen for the load, resumed after it
    finally:
        step.set()
        thread.join(5)
