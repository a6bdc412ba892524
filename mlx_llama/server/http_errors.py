"""Errors as OpenAI's clients expect them: `{"error": {"message", "type", "param", "code"}}`
with the matching status, one line each, whatever failed (validation, a handler, a bug)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MlxLlamaError
from . import schemas as S

log = logging.getLogger("mlx_llama.server")


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


def error_json(status: int, message: str, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


VALIDATION_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
}


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """The first problem pydantic found, as one line naming the field."""
    errors = exc.errors() or [{"type": "invalid", "loc": (), "msg": "invalid request"}]
    # A value that fits no branch of a union fails once per branch; the deepest failure
    # (e.g. `messages.0.content.0.type` rather than "not a string") is the informative one.
    field = tuple(errors[0].get("loc", ()))[:2]
    first = max((e for e in errors if tuple(e.get("loc", ()))[:2] == field),
                key=lambda e: len(e.get("loc", ())))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Drop union-branch labels pydantic adds ("str", "list[str]", "function-after[...]").
    param = ".".join(p for p in loc if not any(c in p for c in "[](") and p not in
                     ("str", "int", "float", "bool", "list", "dict")) or None
    kind = first.get("type", "")
    code = VALIDATION_CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        message = f"the request body is not valid JSON ({detail}): send a JSON object"
        param = None
    elif kind == "extra_forbidden":
        message = (f"unknown parameter '{param}': this server does not support it; "
                   "remove it from the request")
    elif kind == "missing" and param is None:  # no body at all
        message = "the request body is empty: send a JSON object"
        code = "missing_body"
    elif kind == "missing":
        message = f"missing required parameter '{param}'"
    elif kind == "model_attributes_type" or (not loc and kind.endswith("_type")):
        message = ("the request body must be a JSON object, sent with "
                   "'Content-Type: application/json'")
    elif param is None:  # e.g. a key that is not valid text: there is no field to name
        message = f"invalid request: {first.get('msg', 'invalid value')}"
    else:
        message = f"invalid '{param}': {first.get('msg', 'invalid value')}"
    return error_json(400, message, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        response = validation_error(exc)
        log.info("- %s %s status=400 %s", request.method, request.url.path,
                 json.loads(response.body)["error"]["message"])
        return response

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        log.info("- %s %s status=%d %s", request.method, request.url.path, exc.status,
                 exc.message)
        return error_json(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(MlxLlamaError)
    async def on_user_error(request: Request, exc: MlxLlamaError):
        log.info("- %s %s status=400 %s", request.method, request.url.path, exc)
        return error_json(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}: this server offers "
                       "/v1/models, /v1/chat/completions, /v1/completions and /health")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        log.info("- %s %s status=%d", request.method, request.url.path, exc.status_code)
        return error_json(exc.status_code, message, code=None, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_json(500, f"internal error: {type(exc).__name__}: {exc}",
                          type="server_error", code="internal_error")
