"""The review app (FastAPI, the stack of `vlmux serve`): the page at `/`, one page of a view at a time from
/api/view, decisions and undo written to the journal before the answer, thumbnails and full pictures by the item's
index (never by a path from the request). Errors have OpenAI's body, as `vlmux serve`'s do."""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from vlmux.review.ask import ASKED_PREFIX, AskError, Asker
from vlmux.review.records import Candidate
from vlmux.review.session import ReviewSession
from vlmux.review.thumbs import Thumbnails
from vlmux.serve.errors import ApiError

PAGE = files("vlmux.review").joinpath("static/review.html").read_text(encoding="utf-8")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")
MAX_BODY = 1 << 20  # a decision is a caption and a few names


def create_app(session: ReviewSession, thumbnails: Thumbnails | None = None, asker: Asker | None = None,
               hosts: tuple[str, ...] = LOOPBACK) -> FastAPI:
    """`asker`: the served models' client for "ask another model" (--server), or None. `hosts`: the Host headers
    answered (a web page elsewhere cannot reach the review through a DNS name rebound to loopback); ("*",): any."""
    thumbnails = thumbnails or Thumbnails()
    app = FastAPI(title="vlmux review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return JSONResponse(error.body(), error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        return JSONResponse(ApiError(400, str(error), "invalid_request").body(), 400)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE)

    @app.get("/api/view")
    def view(filter: str = "all", order: str = "file", q: str = "", offset: int = 0, limit: int = 50,
             fresh: bool = False):
        try:
            return {**session.view(filter, order, q, offset, limit, fresh), "models": session.models,
                    "output": str(session.output), "ask": asker is not None}
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from None

    @app.post("/api/decide")
    def decide(body: dict):
        if not isinstance(body.get("key"), str):
            raise ApiError(400, 'the body needs {"key": IMAGE, "action": "choose" | "edit" | "reject"}', "invalid_request", "key")
        try:
            return session.decide(body["key"], body.get("action"), body.get("model"), body.get("text"))
        except KeyError as e:
            raise ApiError(404, e.args[0], "not_found", "key") from None
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from None

    @app.post("/api/undo")
    def undo():
        return session.undo()

    @app.get("/api/progress")
    def progress():
        return session.progress()

    @app.get("/api/ask")
    def served_models():
        try:
            return {"models": _asking(asker).models()}
        except AskError as e:
            raise ApiError(502, str(e), "server_unreachable") from None

    @app.post("/api/ask")
    def ask(body: dict):
        key, model = body.get("key"), body.get("model")
        if not isinstance(key, str) or not isinstance(model, str) or not model:
            raise ApiError(400, 'the body needs {"key": IMAGE, "model": SERVED_MODEL}', "invalid_request")
        served = _asking(asker)
        try:
            path = _picture(session, session.index_of(key))
        except KeyError as e:
            raise ApiError(404, e.args[0], "not_found", "key") from None
        try:
            caption = served.caption(path, model)
        except AskError as e:  # the served model's refusal is the user's to read: passed on with its status
            raise ApiError(e.status if 400 <= e.status < 600 else 502, str(e), "ask_failed") from None
        return session.add_candidate(key, Candidate(ASKED_PREFIX + model, caption or None, None if caption else "an empty answer"))

    @app.get("/thumb/{index}")
    def thumb(index: int):
        path = _picture(session, index)
        try:
            data = thumbnails.get(path)
        except (OSError, ValueError) as e:
            raise ApiError(422, f"{path.name}: cannot read the picture: {e}", "bad_image") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/image/{index}")
    def image(index: int):
        return FileResponse(_picture(session, index))

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse(ApiError(413, "the body is over 1 MiB", "body_too_large").body(), 413)
        return await call_next(request)

    return app


def _asking(asker: Asker | None) -> Asker:
    if asker is None:
        raise ApiError(404, "no server to ask: start `vlmux review` with --server URL of a running `vlmux serve`", "not_found")
    return asker


def _picture(session: ReviewSession, index: int):
    path = session.image_path(index)
    if path is None:
        raise ApiError(404, f"no picture for item {index}: start `vlmux review` with --images ROOT, the folder the "
                            f"output's file names are relative to", "not_found")
    return path


