"""vlmux: many vision-language models on one GPU, each in a worker process that gives every byte back."""
from vlmux.api import Pipeline, pipeline
from vlmux.config import GenerationSpec, ModelSpec, PoolConfig
from vlmux.images import ImageError
from vlmux.pool import ModelLoadError, ModelPool, PoolFull
from vlmux.vram import Release

__all__ = [
    "GenerationSpec", "ImageError", "ModelLoadError", "ModelPool", "ModelSpec", "Pipeline", "PoolConfig",
    "PoolFull", "Release", "pipeline",
]
__version__ = "0.1.0"
