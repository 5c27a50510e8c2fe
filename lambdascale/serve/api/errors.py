"""Every failure as OpenAI's error envelope: :class:`ApiError`, the app's exception handlers, the body limit.

``serve.app.create_app`` registers the handlers; each returns ``{"error": {message, type, param,
code}}`` (``schemas.error_body``), so no input produces anything else (a fuzz test checks).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lambdascale.serve.metrics import Outcome
from lambdascale.serve.schemas import LoneSurrogate, error_body

log = logging.getLogger("lambdascale.serve")


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body; ``outcome`` is its label in the requests metric."""

    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None,
        param: str | None = None, headers: dict[str, str] | None = None, outcome: Outcome | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}
        self.outcome = outcome


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a failed body parse as (message, the field's dotted path or None)."""
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    cause = e.get("ctx", {}).get("error")
    if isinstance(cause, LoneSurrogate):  # raised for a whole model: its path says which field
        where = ".".join([*loc, cause.path])
        return f"invalid value for '{where}': {cause.args[0]}", where
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if param is None and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return f"request body must be a JSON object: {msg}", None
    more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    return f"invalid value for '{param}': {msg}{more}", param


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), exc.status, headers=exc.headers)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the field (strict parsing: ``"5"`` is not an int)."""
    msg, param = validation_message(exc)
    if param is None and "json" not in request.headers.get("content-type", ""):
        msg = "request body must be a JSON object sent with Content-Type: application/json"
    return JSONResponse(error_body(msg, "invalid_request_error", None, param), 400)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) in the envelope too."""
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), type_), exc.status_code, headers=getattr(exc, "headers", None))


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered without one."""
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error", "server_error"), 500)


class BodyLimit:
    """Pure ASGI middleware: 413 for a declared Content-Length over the limit (cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for k, v in scope["headers"]:
                if k == b"content-length":
                    if not v.isdigit() or int(v) > self.limit:
                        resp = JSONResponse(error_body(
                            f"request body exceeds the {self.limit}-byte limit (serve.max_request_bytes)",
                            "invalid_request_error", "request_too_large"), 413)
                        await resp(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)
