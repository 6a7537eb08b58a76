"""vlmux: many vision-language models on one GPU, each in a worker process that gives every byte back."""
from vlmux.api import Pipeline, pipeline
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.errors import ModelLoadError, ModelNotLoaded, PoolClosed, PoolFull, RequestFailed, WorkerDied, WorkerStartError
from vlmux.images import ImageError
from vlmux.pool import ModelPool
from vlmux.pool.vram import Release

__all__ = [
    "GenerationSpec", "ImageError", "ModelLoadError", "ModelNotLoaded", "ModelPool", "ModelSpec", "Pipeline",
    "PoolClosed", "PoolConfig", "PoolFull", "Release", "RequestFailed", "WorkerDied", "WorkerStartError", "pipeline",
]
__version__ = "0.1.0"
