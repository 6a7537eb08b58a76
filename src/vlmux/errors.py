"""What the pool raises to its callers; all of it is exported from `vlmux`."""


class ModelLoadError(RuntimeError):
    """The worker could not load the model; the message carries the worker's reason."""


class WorkerStartError(ModelLoadError):
    """No worker process could start (vlmux's fork server failed as it started, or could not fork); the message
    quotes the fork server's own error."""


class PoolFull(RuntimeError):
    """The model does not fit the VRAM budget even after evicting every idle model."""


class ModelNotLoaded(LookupError):
    """The name is not loaded in this pool (never loaded, unloaded, evicted or expired): load() it again."""


class WorkerDied(RuntimeError):
    """The worker process ended, or stopped answering and was killed, while a request was with it. The request
    failed; the model is loaded again for the next one."""


class PoolClosed(RuntimeError):
    """The pool was closed; nothing more can be loaded or asked of it."""


class RequestFailed(RuntimeError):
    """The worker answered a request with a failure; `kind`: input (the request's fault), context (its prompt
    and max_tokens over the model's context length), oom (device memory), request."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ContextExceeded(ValueError):
    """A request's max_new_tokens leaves no room in the model's context; raised before any worker sees it."""
