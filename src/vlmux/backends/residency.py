"""Where a loaded model's weights live, shared by the backends: moved to pinned host memory for sleep and back for
wake, the device memory a batch may still use, and the cleanup after the model is dropped."""
from __future__ import annotations

import gc

import torch


def model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    # named_* drop duplicates, so a tied embedding moves once and stays tied.
    return [*model.named_parameters(), *model.named_buffers()]


def weights_to_host(model: torch.nn.Module, device: str) -> dict[str, torch.Tensor]:
    """Copy every weight to pinned host memory and free its device memory; the copies, by name, for the wake."""
    host_state = {}
    for name, tensor in model_tensors(model):
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor.data, non_blocking=True)
        host_state[name] = host
    torch.cuda.synchronize()
    for _, tensor in model_tensors(model):
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=device)
    torch.cuda.empty_cache()
    return host_state


def weights_to_device(model: torch.nn.Module, host_state: dict[str, torch.Tensor], device: str) -> None:
    for name, tensor in model_tensors(model):
        tensor.data = host_state[name].to(device, non_blocking=True)
    torch.cuda.synchronize()


def free_for_batches(device: str) -> int:
    """Free device memory, counting the allocator's cached blocks from earlier batches, which this worker reuses."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def drop_cached_memory() -> None:
    """After the model's last reference is gone: collect it, and give its cached device blocks back."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Resident:
    """Sleep and wake for a backend whose `model` lives on `device`: the weights go to pinned host memory and back;
    on the CPU there is nothing to free."""

    model: torch.nn.Module | None
    device: str
    _host_state: dict[str, torch.Tensor] | None = None

    def sleep(self) -> None:
        if self._host_state is None and self.device.startswith("cuda"):
            self._host_state = weights_to_host(self.model, self.device)

    def wake(self) -> None:
        if self._host_state is not None:
            weights_to_device(self.model, self._host_state, self.device)
            self._host_state = None
