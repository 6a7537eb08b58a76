"""The FastAPI app: the bearer key on every route but /health (constant-time compare; browsers may give it as the
password of HTTP basic auth, so the dashboard works behind a key), the body limit, OpenAI-style error bodies, the
management API (/api/ps, load, unload, sleep), /metrics, /v1/models and the dashboard."""
from __future__ import annotations

import base64
import binascii
import functools
import io
import hmac
import json
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from vlmux.serve.chat import chat_routes
from vlmux.serve.dashboard import PAGE
from vlmux.serve.errors import ApiError
from vlmux.serve.fetch import FetchPolicy
from vlmux.serve.images import ImagePolicy
from vlmux.serve.schema import UNSET, model_list
from vlmux.serve.service import Service
from vlmux.serve.settings import parse_duration

OPEN_PATHS = ("/health", "/favicon.ico")  # the icon is no secret; browsers ask for it without the key


def create_app(service: Service) -> FastAPI:
    config = service.config

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        yield
        service.close()

    # The OpenAPI document (behind the key) lets fuzzers walk every route; the docs pages would load a CDN: off.
    app = FastAPI(title="vlmux", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key is not None and request.url.path not in OPEN_PATHS and not _authorised(request, config.api_key):
            challenge = 'Basic realm="vlmux"' if request.url.path == "/" else "Bearer"
            error = ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", "invalid_api_key")
            return JSONResponse(error.body(), 401, headers={"WWW-Authenticate": challenge})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return _error(ApiError(413, f"the body is over the server's limit of {config.max_body_bytes // 2**20} MiB",
                                   "body_too_large"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return _error(error)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        return _error(ApiError(error.status_code, str(error.detail), "not_found" if error.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        return _error(ApiError(400, str(error), "invalid_request"))

    async def read_json(request: Request):
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"the body is over the server's limit of {config.max_body_bytes // 2**20} MiB",
                               "body_too_large")
        try:
            return json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than json can parse
            raise ApiError(400, "the body is not valid JSON", "invalid_json") from None

    policy = ImagePolicy(config.allow_remote_images,
                         FetchPolicy(config.allow_private_images, config.image_timeout, config.max_image_bytes),
                         config.allow_local_images, config.max_image_bytes, config.max_pixels)
    app.include_router(chat_routes(service, policy, read_json))
    app.include_router(_management(service, read_json))
    return app


def _management(service: Service, read_json) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/v1/models")
    async def models():
        return model_list([(name, "vlmux") for name in service.listed()])

    @router.get("/api/ps")
    async def ps():
        return service.ps()

    @router.post("/api/load")
    async def load(request: Request):
        body = await read_json(request)
        entry = service.entry(_model(body))
        keep_alive = UNSET if body.get("keep_alive") is None else _duration(body["keep_alive"])
        seconds = await service.load(entry)
        service.retain(entry, keep_alive)
        return {"model": entry.name, "seconds": round(seconds, 3), **service.ps()}

    @router.post("/api/unload")
    async def unload(request: Request):
        body = await read_json(request)
        name = _model(body) if not isinstance(body, dict) or body.get("model") is not None else None
        return await service.unload(name)

    @router.post("/api/sleep")
    async def sleep(request: Request):
        entry = service.entry(_model(await read_json(request)))
        await service.sleep(entry)
        return service.ps()

    @router.get("/metrics")
    async def metrics():
        service.look()
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(PAGE)

    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(_icon(), media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})

    @router.get("/api/dashboard")
    async def dashboard_data():
        return {**service.ps(), "served": service.listed(), "chart": service.history.chart(),
                "requests": service.history.requests()[:50], "events": service.history.events()[-50:]}

    return router


def _model(body) -> str:
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise ApiError(400, 'the body needs {"model": NAME}', "invalid_request", "model")
    return model


def _duration(value) -> float | None:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ApiError(400, str(e), "invalid_request", "keep_alive") from None


def _authorised(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            credential = base64.b64decode(credential, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credential.strip().encode(), key.encode())


def _error(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), error.status, headers=headers)


@functools.cache
def _icon() -> bytes:
    """The dashboard's icon: the chart's blue, a white bar of memory; drawn once with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (32, 32), "#15c")
    ImageDraw.Draw(image).rectangle((6, 14, 25, 24), fill="white")
    buffer = io.BytesIO()
    image.save(buffer, "ICO", sizes=[(16, 16), (32, 32)])
    return buffer.getvalue()
