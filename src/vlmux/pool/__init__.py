"""The parent's side: models held in worker processes under a VRAM budget. Nothing here imports torch."""
from vlmux.pool.pool import ModelPool

__all__ = ["ModelPool"]
