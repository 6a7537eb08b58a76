"""Running vlmux over a Ray cluster (pip install 'vlmux[ray]')."""
from vlmux.distributed.ray import caption_dataset

__all__ = ["caption_dataset"]
