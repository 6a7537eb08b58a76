"""Imported first by the two fork servers (workers, preparing processes): their children cannot use CUDA if it
started in the server, yet importing transformers with torchao installed asks torch's `has_triton` and
`get_device_capability`, which start CUDA to read the GPU's compute capability. In the server, until CUDA has
started, both are answered from NVML instead (children ask torch itself); `check_cuda_not_started` turns any other
module that starts it into an error naming the cause."""
from __future__ import annotations

import functools
import os

# torch.cuda.is_available() then asks NVML, not the CUDA runtime (whose start in the server breaks its children).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402
from torch.utils import _triton  # noqa: E402

_SERVER = os.getpid()
_torch_has_triton = _triton.has_triton
_torch_get_device_capability = torch.cuda.get_device_capability


@functools.cache
def _nvml_capabilities() -> tuple[tuple[int, int], ...]:
    """The compute capability of each NVIDIA GPU on the host, in NVML's order (none without NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: there is no NVIDIA GPU to ask about
        return ()
    try:
        return tuple(tuple(pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(i)))
                     for i in range(pynvml.nvmlDeviceGetCount()))
    finally:
        pynvml.nvmlShutdown()


def _from_nvml() -> tuple[tuple[int, int], ...]:
    """NVML's answers while this is the server and CUDA has not started in it; else none (ask torch)."""
    return () if os.getpid() != _SERVER or torch.cuda.is_initialized() else _nvml_capabilities()


def has_triton() -> bool:
    """torch's `has_triton` (triton installed and a GPU it supports), without starting CUDA to ask."""
    capabilities = _from_nvml()
    if not capabilities:
        return _torch_has_triton()
    return _triton.has_triton_package() and min(capabilities)[0] >= 7  # torch's own test: 7.0 or newer


def get_device_capability(device=None) -> tuple[int, int]:
    """torch's `get_device_capability`, without starting CUDA to ask (devices by index, NVML's order)."""
    capabilities = _from_nvml()
    index = device if isinstance(device, int) else getattr(device, "index", None) or 0
    if not capabilities:
        return _torch_get_device_capability(device)
    return capabilities[index if 0 <= index < len(capabilities) else 0]  # mixed GPUs: CUDA's order may differ


_triton.has_triton = has_triton
torch.cuda.get_device_capability = get_device_capability


def check_cuda_not_started(server: str) -> None:
    """Raise if the imports of `server` started CUDA: every process it forks would fail its first CUDA call."""
    if torch.cuda.is_initialized():
        raise RuntimeError(f"importing the {server}'s modules started CUDA, so the processes it forks cannot use the "
                           "GPU; please report this with `pip list` (a package that uses CUDA at import)")
