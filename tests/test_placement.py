"""Placement is a pure function of the inventory and the estimate: inventories of 1, 2, 4 and 8 GPUs."""
import pytest

from vlmux.config import ModelSpec
from vlmux.estimate import Estimate
from vlmux.backends.transformers import device_map_options
from vlmux.pool.placement import PlacementError, WorkerPlacement, place, select_gpus
from vlmux.pool.vram import GpuMemory

GIB = 2**30
CONTEXT = 620 * 2**20


def gpus(count: int, total_gib: float = 80, used_gib: float = 0.5) -> list[GpuMemory]:
    return [GpuMemory(i, "H100", int(total_gib * GIB), int(used_gib * GIB)) for i in range(count)]


def model(weights_gib: float, runtime_gib: float = 2.0) -> Estimate:
    return Estimate(int(weights_gib * GIB), int(runtime_gib * GIB / 2), int(runtime_gib * GIB / 2), CONTEXT)


SMALL = model(4.4)  # Qwen2-VL-2B in bf16
LARGE = model(144)  # a 72B model in bf16: fits no 80 GB GPU


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_a_small_model_gets_one_replica_per_gpu_each_seeing_only_its_own(count):
    workers = place(SMALL, gpus(count))
    assert [w.gpus for w in workers] == [(i,) for i in range(count)]
    assert [w.cuda_visible_devices for w in workers] == [str(i) for i in range(count)]
    assert all(w.device == "cuda:0" and not w.split and w.max_memory == () for w in workers)
    assert all(w.charges == (SMALL.total,) for w in workers)


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_more_replicas_than_gpus_spread_first_then_stack(count):
    workers = place(SMALL, gpus(count), replicas=2 * count + 1)
    per_gpu = [sum(w.gpus == (i,) for w in workers) for i in range(count)]
    assert sorted(per_gpu, reverse=True) == [3] + [2] * (count - 1)
    assert workers[:count] == tuple(WorkerPlacement((i,), (), (SMALL.total,)) for i in range(count))


def test_replicas_that_do_not_fit_the_budget_fail_saying_how_many_do():
    with pytest.raises(PlacementError, match=r"3 replicas .* only 2 fit .*GPU 0: 16.0 GiB usable"):
        place(SMALL, gpus(1), replicas=3, budget="16GiB")


def test_the_budget_and_what_is_booked_already_shrink_each_gpu():
    # GPU 1 already holds 76 GiB of ours: only GPU 0 and 2 can take another replica.
    workers = place(SMALL, gpus(3), booked={1: 76 * GIB})
    assert [w.gpus for w in workers] == [(0,), (2,)]
    # A fraction of each device: 0.05 of 80 GiB is 4 GiB, below the 2B model's ~7 GiB.
    with pytest.raises(PlacementError, match="no GPU has room"):
        place(SMALL, gpus(1), budget=0.05)


def test_used_memory_of_other_processes_counts():
    busy = [GpuMemory(0, "H100", 80 * GIB, 78 * GIB), GpuMemory(1, "H100", 80 * GIB, 1 * GIB)]
    assert [w.gpus for w in place(SMALL, busy)] == [(1,)]


@pytest.mark.parametrize("count, replicas", [(2, 1), (4, 2), (8, 4)])
def test_a_model_too_large_for_one_gpu_is_split_over_two_in_one_worker(count, replicas):
    workers = place(LARGE, gpus(count))
    assert len(workers) == replicas
    assert [w.gpus for w in workers] == [(2 * r, 2 * r + 1) for r in range(replicas)]
    for worker in workers:
        assert worker.split and worker.device == "cuda:0"
        assert worker.cuda_visible_devices == f"{worker.gpus[0]},{worker.gpus[1]}"
        assert len(worker.max_memory) == 2 and sum(worker.max_memory) >= LARGE.weights
        # Each GPU keeps room for its context and half the KV cache and activations beside its weights.
        usable = 79.5 * GIB
        assert all(limit <= usable - CONTEXT - GIB for limit in worker.max_memory)
        assert all(charge <= usable for charge in worker.charges)


def test_a_split_takes_the_fewest_gpus_that_hold_it():
    huge = model(300)  # needs four 80 GB GPUs
    workers = place(huge, gpus(8))
    assert [len(w.gpus) for w in workers] == [4, 4]
    assert set(workers[0].gpus) | set(workers[1].gpus) == set(range(8))
    assert place(huge, gpus(8), replicas=1)[0].gpus == (0, 1, 2, 3)


def test_split_replicas_beyond_the_disjoint_groups_fail():
    with pytest.raises(PlacementError, match=r"needs 2 GPUs per replica .* 3 replicas wanted, only 2 fit"):
        place(LARGE, gpus(4), replicas=3)


def test_a_split_prefers_the_gpus_with_the_most_room():
    mixed = [GpuMemory(0, "A", 80 * GIB, 70 * GIB), GpuMemory(1, "B", 80 * GIB, 0), GpuMemory(2, "C", 80 * GIB, 0)]
    assert place(LARGE, mixed)[0].gpus == (1, 2)


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_nothing_fits_says_what_was_needed_and_what_there_was(count):
    enormous = model(1000)
    with pytest.raises(PlacementError) as error:
        place(enormous, gpus(count))
    message = str(error.value)
    assert "~1002.6 GiB" in message and "GPU 0: 79.5 GiB usable" in message
    assert ("--gpus all" in message) == (count == 1)


def test_one_gpu_cannot_split_and_points_at_gpus_all():
    with pytest.raises(PlacementError, match="--gpus all to split it"):
        place(LARGE, gpus(1))


def test_no_gpus_means_cpu_workers():
    assert place(SMALL, []) == (WorkerPlacement(),)
    workers = place(SMALL, [], replicas=2)
    assert workers == (WorkerPlacement(), WorkerPlacement())
    assert workers[0].device == "cpu" and workers[0].cuda_visible_devices == ""


def test_replicas_below_one_are_refused():
    with pytest.raises(PlacementError, match="at least 1"):
        place(SMALL, gpus(2), replicas=0)


def test_select_gpus():
    inventory = gpus(8)
    assert select_gpus(inventory, "all") == inventory
    assert [g.index for g in select_gpus(inventory, "3,1")] == [3, 1]
    assert [g.index for g in select_gpus(inventory, [5])] == [5]
    with pytest.raises(PlacementError, match="GPU 9 does not exist; this host has GPUs 0, 1"):
        select_gpus(inventory, "0,9")
    with pytest.raises(PlacementError, match="'all' or GPU indices"):
        select_gpus(inventory, "first")
    with pytest.raises(PlacementError, match="twice"):
        select_gpus(inventory, "1,1")


def test_from_pretrained_gets_one_device_or_a_balanced_map_over_the_visible_gpus():
    assert device_map_options(ModelSpec("m"), "cuda:0") == {"device_map": "cuda:0"}
    split = ModelSpec("m", device="cuda:0", max_memory=(70 * GIB, 71 * GIB))
    assert device_map_options(split, "cuda:0") == {"device_map": "auto", "max_memory": {0: 70 * GIB, 1: 71 * GIB}}
