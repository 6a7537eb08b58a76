"""What the pool raises to its callers (re-exported by `vlmux.pool`)."""


class ModelLoadError(RuntimeError):
    """The worker could not load the model; the message carries the worker's reason."""


class PoolFull(RuntimeError):
    """The model does not fit the VRAM budget even after evicting every idle model."""


class ModelNotLoaded(KeyError):
    pass
