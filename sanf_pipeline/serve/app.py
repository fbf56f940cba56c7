"""The HTTP API of `sanf serve` (``create_app``): routes, the bearer token, the JSON errors, the request log and the
Prometheus metrics. What a route does with images is ``upload`` (reading a request within the limits), ``batching``
(one model call per batch of concurrent images) and ``scoring`` (the scorer).

Routes: ``POST /v1/score`` (multipart field ``files``, repeatable), ``GET /v1/model``, ``GET /healthz``,
``GET /readyz``, ``GET /metrics``, ``GET /`` (the page ``static/index.html``). Every error is JSON
``{"error": "<one line>"}``: 400 (no or empty files field, malformed body), 401 (``token`` set and the request's
``Authorization: Bearer`` missing or wrong; ``/``, ``/healthz`` and ``/readyz`` stay open), 413 (over a limit), 415
(not multipart), 422 (a file that is not a whole image, named), 503 (shutting down), 500 (a bug: one line here, one
line in the log, never a traceback to the client).
"""

# no `from __future__ import annotations`: FastAPI reads the route's parameter types (Request, local to create_app)
import asyncio
import hmac
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from ..errors import BadImageError
from .batching import Batcher, BatcherClosed
from .scoring import json_safe
from .upload import DRAIN_BYTES, Limits, UploadError, check_pixels, drain_wanted, read_files

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
PLACEHOLDER = ("<!doctype html><html><head><meta charset='utf-8'><title>sanf serve</title></head><body>"
               "<h1>sanf serve</h1><p>The web page is not installed. POST images (multipart field <code>files</code>)"
               " to <code>/v1/score</code>; <code>/v1/model</code> describes the model.</p></body></html>")
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})  # reachable without the token
ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/score")  # metric labels; others are "other"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process never share counts)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("sanf_requests", "HTTP requests by route and status", ["path", "status"],
                                registry=self.registry)
        self.seconds = Histogram("sanf_request_seconds", "HTTP request time by route (s)", ["path"],
                                 registry=self.registry)
        self.batch = Histogram("sanf_batch_size", "images per model call", buckets=BATCH_BUCKETS,
                               registry=self.registry)
        self.images = Counter("sanf_images", "images scored", registry=self.registry)


def _error(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class _Outer:
    """Pure ASGI middleware around every request: the token, the timing, the metrics, the log line, and a one-line
    500 for any exception that got this far."""

    def __init__(self, app, *, token: str | None, metrics: _Metrics, log, debug: bool = False):
        self.app, self.token, self.metrics, self.log, self.debug = app, token, metrics, log, debug

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "")
        shown = "".join(c if c.isprintable() and c != " " else "?" for c in path[:200])  # one log line, always
        scope["sanf"] = {"images": 0}  # the route says how many images the request held
        status, recorded = [0], [False]

        def record():
            # counted and logged before the response's last bytes go out: a client that has its answer finds it in
            # /metrics and in the log
            if recorded[0]:
                return
            recorded[0] = True
            ms = (time.perf_counter() - t0) * 1000.0
            label = path if path in ROUTES else "other"
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.seconds.labels(label).observe(ms / 1000.0)
            n = scope["sanf"]["images"]
            self.log(f"{method} {shown} {status[0]} {n} image{'' if n == 1 else 's'} {ms:.1f} ms")

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            await send(message)

        try:
            if self.token is not None and path not in OPEN_PATHS and not self._authorised(scope):
                await _drain_receive(scope, receive)
                await _error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                             {"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        except Exception as exc:
            self.log(f"error: {method} {shown}: {type(exc).__name__}: {' '.join(str(exc).split())}")
            if self.debug:
                import traceback

                self.log(traceback.format_exc().rstrip())
            if not status[0]:
                await _error(500, f"internal error ({type(exc).__name__}); the server log has the details")(
                    scope, receive, send_status)
        record()

    def _authorised(self, scope) -> bool:
        got = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                got = v
        kind, _, value = got.partition(b" ")
        return kind.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token.encode("utf-8"))


async def _drain_receive(scope, receive) -> None:
    """Read and drop a refused request's body (as ``upload`` does), so that a client still sending gets the answer."""
    from starlette.datastructures import Headers

    if not drain_wanted(Headers(scope=scope)):
        return
    left = DRAIN_BYTES
    while left >= 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        left -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


def _prepare_all(scorer, uploads, limits: Limits) -> list:
    """Decode, check and preprocess each upload in turn (one decoded image in memory at a time)."""
    from ..data.images import decode_image

    out = []
    for up in uploads:
        check_pixels(up.data, up.filename, limits.max_pixels)
        try:
            image = decode_image(bytes(up.data), name=up.filename)
        except BadImageError as exc:
            raise UploadError(422, f"{up.filename}: {exc.reason}") from None
        up.data = bytearray()  # the bytes are not needed again
        h, w = image.shape[:2]
        if h * w > limits.max_pixels:  # a header that understated the size (EXIF rotation keeps the count)
            raise UploadError(413, f"{up.filename} is {w}x{h} = {w * h:,} pixels, over the limit of "
                                   f"{limits.max_pixels:,} (--max-pixels); send a smaller image")
        out.append(scorer.prepare(image))
    return out


def create_app(scorer, *, limits: Limits | None = None, token: str | None = None, max_batch: int = 16,
               batch_window_ms: float = 5.0, log=None, debug: bool = False):
    """The FastAPI app serving ``scorer`` (``scoring.DetectorScorer``/``OnnxScorer``, or anything with their
    ``prepare``, ``score_prepared``, ``finish``, ``render`` and ``info``). Its batcher starts and stops with the app's
    lifespan; ``log(line)`` gets one line per request (default: stderr) and one per unexpected error (``debug``:
    and its traceback)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    log = log or _stderr
    metrics = _Metrics()
    batcher = Batcher(scorer.score_prepared, max_batch=max_batch, window_ms=batch_window_ms,
                      on_batch=metrics.batch.observe, start=False)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await run_in_threadpool(batcher.close, 30.0)

    app = FastAPI(title="sanf serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.ready, app.state.batcher, app.state.metrics, app.state.scorer = False, batcher, metrics, scorer

    @app.exception_handler(UploadError)
    async def upload_error(request, exc: UploadError):
        return _error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return _error(400, f"bad request: {exc.errors()[0].get('msg') if exc.errors() else exc}")

    @app.exception_handler(BatcherClosed)
    async def closed(request, exc: BatcherClosed):
        return _error(503, str(exc))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        try:
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))
        except OSError:
            return HTMLResponse(PLACEHOLDER)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready = bool(app.state.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    model_info = json_safe({**scorer.info(), "limits": limits.describe(),
                            "batch": {"window_ms": float(batch_window_ms), "max_batch": int(max_batch)}})

    @app.get("/v1/model")
    async def model():
        return model_info

    @app.post("/v1/score")
    async def score(request: Request):
        uploads = await read_files(request, limits)
        request.scope["sanf"]["images"] = len(uploads)
        prepared = await run_in_threadpool(_prepare_all, scorer, uploads, limits)
        raw = await asyncio.wrap_future(batcher.submit(prepared))
        results = await run_in_threadpool(
            lambda: [scorer.render(scorer.finish(r), up.filename) for r, up in zip(raw, uploads, strict=True)])
        metrics.images.inc(len(results))
        return JSONResponse({"results": results, "score": model_info["score"], "threshold": model_info["threshold"],
                             "pixel_threshold": model_info["pixel_threshold"]})

    app.add_middleware(_Outer, token=token, metrics=metrics, log=log, debug=debug)
    return app


__all__ = ["create_app"]
