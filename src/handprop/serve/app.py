"""The Starlette app of ``handprop serve``: the page, its static files and the JSON API.

``GET /`` the page · ``GET /static/...`` its script and style · ``GET /api/models`` the
models · ``POST /api/predict`` one image (its bytes) or one prepared array (JSON). The
API is documented in docs/api.md. Every refusal is a 4xx whose JSON body is
``{"error": "<one line>"}``, the line the page shows; nothing a client sends stops the
server. A bug is a 500 with one line too, and its traceback is logged once.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from handprop.errors import DataError, ImageTooLargeError
from handprop.images import prepare_image
from handprop.serve.models import MAX_PIXELS, ServedModel

STATIC = Path(__file__).parent / "static"
#: the largest request body the server reads (a drawn digit's PNG is a few KB)
MAX_UPLOAD_BYTES = 8 * 2**20
#: images prepared at once (a large photo takes a few hundred MB while it is prepared)
PREPARING_AT_ONCE = 2
IMAGE_TYPES = ("application/octet-stream",)
JSON_TYPE = "application/json"
#: where a bug's traceback goes (stderr, unless the caller configures logging)
logger = logging.getLogger("handprop.serve")


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
        # a bug, not the client's fault: one line for the page; _Served logs the traceback
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return JSONResponse({"error": f"internal error in handprop serve ({line})"}, 500)

    return _Served(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/favicon.ico", icon, methods=["GET"]),
            Route("/api/models", list_models, methods=["GET"]),
            Route("/api/predict", predict, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: refused, Exception: failed},
    )


class _Served(Starlette):
    """Starlette, whose bugs are logged once. Its ServerErrorMiddleware answers an
    exception with the ``failed`` handler's 500 line, then raises it again for the
    server to log: it is logged here, naming the request, and goes no further (uvicorn
    would log it a second time, as "Exception in ASGI application")."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:
            if scope["type"] != "http":
                raise
            where = f"{scope['method']} {scope['path'][:100]}"
            logger.error("handprop serve: internal error in %s (a bug):", where, exc_info=exc)


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
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, too_big)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; the request's line says 400
        raise Refused(400, "the client went away before sending the whole body") from None
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


def _json_number(text: str) -> float:
    """A JSON number as a float; a 422 for one beyond a float's range (1e400, or a
    400-digit integer), which Python would read as inf or as an int numpy cannot take."""
    value = float(text)  # float() reads any length of digits; int() stops at 4,300
    if math.isinf(value):
        shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text):,} characters)"
        raise Refused(422, f"the JSON body holds a number too large for a float: {shown}")
    return value


def _json_int(text: str) -> int:
    _json_number(text)
    return int(text)  # at most 309 digits, a float's range


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_int=_json_int, parse_float=_json_number)
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
    except ValueError as exc:  # any other limit of Python's reader
        line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise Refused(400, f"the request body is not valid JSON: {line}") from None


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
        return f"a list of {len(rows):,} numbers" if rows else "an empty list"
    if len(lengths) == 1 and all(isinstance(r, list) for r in rows):
        return f"{len(rows):,} rows of {lengths.pop():,}"
    return f"{len(rows):,} rows of {min(lengths):,} to {max(lengths):,} values"


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


def exposure(host: str, address: str) -> str | None:
    """The warning for a server listening beyond this machine, on ``address`` (the IP
    ``--host host`` was bound to): None for a loopback address (127.0.0.0/8, ::1)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 scope: fe80::1%eth0
    except ValueError:
        return None  # not an IP address (no socket family handprop binds gives one)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    shown = host if host == address else f"{host} ({address})"
    where = (
        "on every network interface"
        if ip.is_unspecified
        else "on an address other machines can reach"
    )
    return (
        f"handprop: warning: --host {shown} serves {where}: anyone who can reach it can use "
        "the page and its API, which have no authentication (--host 127.0.0.1 keeps them "
        "to this machine)"
    )


def run(
    models: list[ServedModel],
    host: str,
    port: int,
    ready: Any = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Serve ``models`` on host:port until Ctrl-C or SIGTERM; ``log``, if given, is
    handed one line per request (:class:`RequestLog`). ``ready``, if given, is called
    once the socket listens, with the port and the address it is bound to (the
    caller warns with :func:`exposure`).

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
    bound = sock.getsockname()
    if ready is not None:
        ready(bound[1], bound[0])
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
