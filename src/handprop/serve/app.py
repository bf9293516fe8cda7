"""The Starlette app of ``handprop serve``: the page, its static files and the JSON API.

``GET /`` the page · ``GET /static/...`` its script and style · ``GET /api/models`` the
models · ``POST /api/predict`` one image (its bytes) or one prepared array (JSON). The
API is documented in docs/api.md. Every refusal is a 4xx whose JSON body is
``{"error": "<one line>"}``, the line the page shows; nothing a client sends stops the
server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from handprop.errors import DataError, ImageTooLargeError
from handprop.predict import prepare_image
from handprop.serve.models import MAX_PIXELS, ServedModel

STATIC = Path(__file__).parent / "static"
#: the largest request body the server reads (a drawn digit's PNG is a few KB)
MAX_UPLOAD_BYTES = 8 * 2**20
#: images prepared at once (a large photo takes a few hundred MB while it is prepared)
PREPARING_AT_ONCE = 2
IMAGE_TYPES = ("application/octet-stream",)
JSON_TYPE = "application/json"


class Refused(HTTPException):
    """A request refused with a status and one line for the page."""


def create_app(
    models: list[ServedModel],
    max_upload: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> Starlette:
    """The app serving ``models`` (the first is the default)."""
    by_id = {m.id: m for m in models}
    preparing = threading.BoundedSemaphore(PREPARING_AT_ONCE)

    def pick(model_id: str | None) -> ServedModel:
        if model_id is None or model_id == "":
            return models[0]
        if model_id not in by_id:
            known = ", ".join(list(by_id)[:10]) + (", ..." if len(by_id) > 10 else "")
            raise Refused(404, f"unknown model {model_id[:80]!r}; known: {known}")
        return by_id[model_id]

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def icon(request: Request) -> FileResponse:  # for clients that ask without the page
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse(
            {"models": [m.info() for m in models], "default": models[0].id},
            headers={"Cache-Control": "no-store"},
        )

    async def predict(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = content_type == JSON_TYPE
        if not (is_json or content_type.startswith("image/") or content_type in IMAGE_TYPES):
            raise Refused(
                415,
                f"unsupported Content-Type {content_type or '(none)'!r:.60}: send an image's "
                "bytes (image/png, image/jpeg, ... or application/octet-stream) or JSON "
                "(application/json)",
            )
        body = await _read_body(request, max_upload)
        name = _upload_name(request.query_params.get("name"))
        if is_json:
            data = _parse_json(body)
            model = pick(request.query_params.get("model") or _json_model(data))
            image = _pixels(data, model)
            return JSONResponse(await run_in_threadpool(model.explain, image))
        model = pick(request.query_params.get("model"))

        def prepare_and_explain() -> dict[str, Any]:
            with preparing:
                image = prepare_image(
                    body, model.image_shape, name=name, max_pixels=max_pixels,
                    prep=model.image_prep,
                )  # fmt: skip
            return model.explain(image)

        try:
            answer = await run_in_threadpool(prepare_and_explain)
        except ImageTooLargeError as exc:
            raise Refused(413, str(exc)) from None
        except DataError as exc:
            raise Refused(422, str(exc)) from None
        return JSONResponse(answer)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        detail = exc.detail if isinstance(exc, Refused) else _http_detail(exc, request)
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    async def failed(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not the client's fault: one line for the page; uvicorn logs the traceback
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return JSONResponse({"error": f"internal error in handprop serve ({line})"}, 500)

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/favicon.ico", icon, methods=["GET"]),
            Route("/api/models", list_models, methods=["GET"]),
            Route("/api/predict", predict, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: refused, Exception: failed},
    )


def _http_detail(exc: HTTPException, request: Request) -> str:
    """Starlette's own refusals (no such page, wrong method) as one line."""
    if exc.status_code == 404:
        return f"no such page: {request.url.path[:100]}"
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path[:100]}"
    return str(exc.detail)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over ``limit`` bytes: a declared
    Content-Length is checked before a byte is read, a chunked body while it streams."""
    too_big = (
        f"the request body is over the {limit:,} bytes handprop serve accepts; send a smaller image"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise Refused(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, too_big)
        chunks.append(chunk)
    if size == 0:
        raise Refused(
            400, 'the request body is empty; send an image\'s bytes or JSON with "pixels"'
        )
    return b"".join(chunks)


def _upload_name(name: str | None) -> str:
    """The name messages start with: the uploaded file's (``?name=``), printable only."""
    if not name:
        return "upload"
    clean = "".join(c for c in name if c.isprintable())[:100]
    return clean or "upload"


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise Refused(
            400,
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, "
            f"column {exc.colno})",
        ) from None
    except UnicodeDecodeError:
        raise Refused(400, "the request body is not valid JSON: not UTF-8 text") from None
    except RecursionError:
        raise Refused(400, "the request body is not valid JSON: nested too deeply") from None


def _json_model(data: Any) -> str | None:
    model = data.get("model") if isinstance(data, dict) else None
    if model is not None and not isinstance(model, str):
        raise Refused(422, f'"model" must be a model id (a string), got {json.dumps(model):.60}')
    return model


def _shape_text(rows: Any) -> str:
    """ "27 rows of 28", "28 rows of 3 to 28 values", "a number": what was sent."""
    if not isinstance(rows, list):
        names = {
            "str": "a string",
            "dict": "a JSON object",
            "NoneType": "null",
            "bool": "a boolean",
        }
        return names.get(type(rows).__name__, "a number")
    lengths = {len(r) for r in rows if isinstance(r, list)}
    if not lengths:
        return f"a list of {len(rows)} numbers" if rows else "an empty list"
    if len(lengths) == 1 and all(isinstance(r, list) for r in rows):
        return f"{len(rows)} rows of {lengths.pop()}"
    return f"{len(rows)} rows of {min(lengths)} to {max(lengths)} values"


def _pixels(data: Any, model: ServedModel) -> np.ndarray:
    """The JSON body's ``pixels``: an H x W array of numbers in [0, 1], used as it is."""
    H, W = model.image_shape
    want = f'"pixels": a {H} x {W} array (a list of {H} rows of {W} numbers in [0, 1])'
    if not isinstance(data, dict) or "pixels" not in data:
        got = "an object without it" if isinstance(data, dict) else type(data).__name__
        raise Refused(422, f"the JSON body must be an object with {want}; got {got}")
    rows = data["pixels"]
    if (
        not isinstance(rows, list)
        or len(rows) != H
        or not all(isinstance(r, list) and len(r) == W for r in rows)
    ):
        raise Refused(422, f"model {model.id!r} needs {want}; got {_shape_text(rows)}")
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for row in rows for v in row
    ):
        raise Refused(422, f"{want}: every value must be a number")
    image = np.array(rows, dtype=np.float64)
    if not np.isfinite(image).all():
        raise Refused(422, f"{want}: got NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        raise Refused(
            422,
            f"{want}: values must lie in [0, 1], got {low:g} to {high:g} "
            "(divide 0-255 pixels by 255)",
        )
    return image


class RequestLog:
    """ASGI wrapper: one line per request, ``HH:MM:SS METHOD PATH STATUS MS``, given to
    ``write`` once the answer is sent (the query string stays out: it may name files)."""

    def __init__(self, app: Any, write: Callable[[str], None]) -> None:
        self.app, self.write = app, write

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            ms = 1000 * (time.perf_counter() - start)
            path = scope["path"][:100]
            self.write(f"{time.strftime('%H:%M:%S')} {scope['method']} {path} {status} {ms:.0f} ms")


def run(
    models: list[ServedModel],
    host: str,
    port: int,
    ready: Any = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Serve ``models`` on host:port until Ctrl-C or SIGTERM; ``log``, if given, is
    handed one line per request (:class:`RequestLog`).

    The socket is bound here, before uvicorn starts, so that a port in use or a host
    that is not this machine's is one ConfigError line, not a logged traceback.
    """
    import uvicorn

    from handprop.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not a host name or address ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "choose another --port or --host"
        ) from None
    bound_port = sock.getsockname()[1]
    if ready is not None:
        ready(bound_port)
    app = create_app(models)
    config = uvicorn.Config(
        app if log is None else RequestLog(app, log),
        log_level="warning",
        access_log=False,  # uvicorn's own: the RequestLog's lines say the same, shorter
        lifespan="off",
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
