"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`: /v1/completions, /v1/chat/completions, /v1/models,
/health. Requests themselves are handled in handlers.py.

Every failure a client can cause is a 4xx with OpenAI's error body ({"error": {"message", "type", "param",
"code"}}), never a 500: malformed or ill-typed JSON, an unknown model, a body above the limit (413), a missing or
wrong API key (401); a full queue is a 429 with Retry-After.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from aigc_jax.serve import schemas as S
from aigc_jax.serve.checks import ApiError
from aigc_jax.serve.handlers import ChatCompletions, Completions
from aigc_jax.serve.server import Server


def error_response(status: int, message: str, kind: str, param=None, code=None, headers=None) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="aigc_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown routes (404), wrong methods (405)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # a bug of ours, still answered in OpenAI's shape
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        stats = server.engine.stats()
        ok = stats["alive"] and not stats["closing"] and not stats["warming"]
        status = "ok" if ok else "warming" if stats["alive"] and stats["warming"] else "unavailable"
        body = {"status": status, "open_requests": server.open_requests, **stats}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(server, request)
        data = [S.Model(id=server.model_name, created=server.created)]
        return S.ModelList(data=data).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(server, request)
        req = await _parse(server, request, S.CompletionRequest)
        return await Completions(server, request, req).respond()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(server, request)
        req = await _parse(server, request, S.ChatRequest)
        return await ChatCompletions(server, request, req).respond()

    return app


# ------------------------------------------------------------------------------------------------ request checks


def _authorize(server: Server, request: Request) -> None:
    if server.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
        raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                       kind="authentication_error")


async def _parse(server: Server, request: Request, schema):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > server.max_body_bytes:
        raise ApiError(413, f"the request body is larger than {server.max_body_bytes} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > server.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {server.max_body_bytes} bytes")
    try:
        req = schema.model_validate_json(bytes(body))
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {first['msg']}") from None
        param = str(first["loc"][0]) if first["loc"] else None  # later entries name union members, list items
        raise ApiError(400, f"{param or 'the body'}: {first['msg']}", param=param) from None
    if req.model is not None and req.model not in server.names:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {server.model_name!r}",
                       param="model", code="model_not_found")
    return req
