"""Errors as OpenAI's API writes them ({"error": {"message", "type", "param", "code"}}) with their HTTP status, and
the pool's exceptions mapped onto them."""
from __future__ import annotations

from vlmux.errors import (ContextExceeded, ModelLoadError, ModelNotLoaded, PoolClosed, PoolFull, RequestFailed,
                          WorkerDied, WorkerStartError)
from vlmux.hub import ModelNotFound

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}


ECHO_LIMIT = 80  # characters of a client's own text echoed back in an error


def shown(text: str) -> str:
    """A client's text for an error message: quoted, cut to a short prefix when long (a 1 MB name is not echoed)."""
    return repr(text) if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]!r}... ({len(text)} characters)"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def from_pool(error: BaseException, model: str) -> ApiError:
    """What a client is told when the pool raised `error` for `model`."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ContextExceeded):  # the pool's own check, before any worker sees the request
        return ApiError(400, f"{error} (max_tokens)", "context_length_exceeded", "max_tokens")
    if isinstance(error, ModelNotFound):
        return ApiError(404, f"model {shown(model)} not found: {str(error)[:200]}", "model_not_found", "model")
    if isinstance(error, PoolFull):
        return ApiError(503, f"{model} cannot fit now: {error}", "cannot_fit")
    if isinstance(error, PoolClosed):
        return ApiError(503, "the server is shutting down", "shutting_down")
    if isinstance(error, WorkerStartError):
        return ApiError(503, f"{error}; the server's log has the whole error", "worker_start_failed")
    if isinstance(error, ModelLoadError):
        return ApiError(500, str(error), "model_load_failed")
    if isinstance(error, WorkerDied):
        return ApiError(500, f"{error}", "worker_died")
    if isinstance(error, ModelNotLoaded):
        return ApiError(503, f"{error}; try again", "model_unloaded")
    if isinstance(error, RequestFailed):
        if error.kind == "oom":
            return ApiError(503, f"{model} ran out of device memory: {error}", "out_of_memory")
        if error.kind == "input":
            return ApiError(400, str(error), "invalid_request")
        if error.kind == "context":
            return ApiError(400, str(error), "context_length_exceeded", "messages")
        return ApiError(500, f"{model} failed: {error}", "request_failed")
    return ApiError(500, f"{type(error).__name__}: {error}", "internal_error")
