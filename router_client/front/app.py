"""The ASGI app of the HTTP front: LoRAX's REST routes, OpenAI's routes, /health, /info, /metrics,
one JSON error shape for every failure (malformed JSON and unknown routes included), an optional
bearer API key and a request body size limit."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router_client.front.errors import FrontError, unhealthy
from router_client.front.lorax_routes import add_lorax_routes
from router_client.front.openai_routes import add_openai_routes
from router_client.front.openai_schemas import ChatCompletionChunk
from router_client.front.schemas import ErrorBody, HealthBody, Info, StreamResponse
from router_client.front.service import Front

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health",)  # answered without the API key (probes)
GENERATION_PATHS = ("/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")
HTTP_ERROR_TYPES = {
    400: "validation",
    401: "authentication",
    404: "not_found",
    405: "method_not_allowed",
    413: "validation",
    415: "validation",
}


class Guard:
    """ASGI middleware: stamps the arrival time, checks the bearer API key, bounds the body size."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["received"] = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers.get("authorization")):
            return await _send_error(
                send,
                401,
                "authentication",
                "missing or wrong API key (Authorization: Bearer)",
                {"www-authenticate": "Bearer"},
            )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_error(send, 413, "validation", f"the body must be at most {self.max_body_bytes} bytes")
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:  # a chunked body without Content-Length
                raise HTTPException(413, f"the body must be at most {self.max_body_bytes} bytes")
            return message

        await self.app(scope, bounded, send)

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        expected = (self.api_key or "").encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


async def _send_error(
    send: Send, status: int, error_type: str, message: str, extra: dict[str, str] | None = None
) -> None:
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        if e.get("type") == "json_invalid":
            error = (e.get("ctx") or {}).get("error", "invalid JSON")
            return f"malformed JSON body: {error} (at character {e['loc'][-1]})"
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(front: Front) -> FastAPI:
    cfg = front.config
    app = FastAPI(
        title="qwen-worker",
        version=cfg.version,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        description="LoRAX REST and OpenAI-compatible API over qwen-worker shards",
    )
    app.add_middleware(Guard, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": what}
        for status, what in (
            (401, "missing or wrong API key"),
            (413, "body too large"),
            (422, "invalid request"),
            (424, "generation failed"),
            (429, "too many requests in progress"),
            (503, "the shards are unhealthy"),
        )
    }

    def failed(request: Request, error_type: str, counted: bool = True) -> None:
        if request.url.path in GENERATION_PATHS:
            if not counted:
                front.metrics.request_received()
            front.metrics.request_failed(error_type)

    @app.exception_handler(FrontError)
    async def on_front_error(request: Request, err: FrontError) -> JSONResponse:
        failed(request, err.error_type)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        failed(request, "validation", counted=False)
        return JSONResponse({"error": _validation_message(err), "error_type": "validation"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 400:  # a body FastAPI could not read: LoRAX answers 422 for every bad request
            failed(request, "validation", counted=False)
            return JSONResponse({"error": f"malformed request body: {err.detail}", "error_type": "validation"}, 422)
        error_type = HTTP_ERROR_TYPES.get(err.status_code, "validation" if err.status_code < 500 else "internal")
        return JSONResponse(
            {"error": str(err.detail), "error_type": error_type},
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        failed(request, "internal")
        return JSONResponse({"error": f"internal error: {err!r}", "error_type": "internal"}, status_code=500)

    add_lorax_routes(app, front, errors)
    add_openai_routes(app, front, errors)

    @app.get("/health", response_model=HealthBody, responses={503: errors[503]})
    async def health() -> Any:
        """200 when a one-token generation goes through every shard, else 503."""
        if not await front.healthy():
            raise unhealthy("the shards failed the generation health check")
        return JSONResponse({"status": "ok"})

    @app.get("/info", response_model=Info, responses={401: errors[401]})
    async def info() -> Any:
        router = front.router
        rc, shard = router.config, router.info
        preloaded = [",".join(a.ids) for a in router.adapters.values()]
        return JSONResponse(
            Info(
                model_id=cfg.model_id,
                model_dtype=shard.dtype if shard else "",
                model_device_type=shard.device_type if shard else "",
                num_shard=router.client.world_size,
                block_size=shard.block_size if shard else 0,
                max_concurrent_requests=cfg.max_concurrent_requests,
                max_best_of=cfg.max_best_of,
                max_stop_sequences=cfg.max_stop_sequences,
                max_client_batch_size=cfg.max_client_batch_size,
                max_input_length=rc.max_input_length,
                max_total_tokens=rc.max_total_tokens,
                max_batch_total_tokens=router.max_supported_total_tokens,
                max_batch_prefill_tokens=rc.max_batch_prefill_tokens,
                max_batch_size=rc.max_batch_size,
                speculate=shard.speculate if shard else 0,
                preloaded_adapters=preloaded,
                adapter_source=cfg.adapter_source,
                version=cfg.version,
            ).model_dump()
        )

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, 401: errors[401]})
    async def metrics() -> Response:
        return Response(front.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the schemas of the stream events (referenced by the SSE answers)."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (StreamResponse, ChatCompletionChunk):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
