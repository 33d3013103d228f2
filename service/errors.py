"""Every error the service sends is JSON `{"error": <kind>, "detail": <one line>}` and is counted by kind.

Clients branch on `error` (a stable machine-readable kind) and show `detail`. FastAPI's own errors (422
validation, 404, 405) and anything unexpected (500) are rewritten into the same shape by the handlers
installed here, so no route ever answers in another format.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

# Kinds of the errors FastAPI and Starlette raise themselves, by status (ours carry their kind).
_STATUS_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 422: "invalid_request"}

# Every kind the service sends (the README's table, and uploads.IMAGE_ERROR_STATUS): capeen_errors_total has
# a series for each from the start
ERROR_KINDS = ("bad_request", "unauthorized", "forbidden", "not_found", "method_not_allowed", "upload_timeout",
               "upload_too_large", "too_large", "not_image", "unsupported", "not_multipart", "truncated", "empty",
               "unreadable", "invalid_request", "queue_full", "not_ready", "shutting_down", "timeout",
               "client_closed", "engine_failed", "internal", "http_error")

_MAX_PROBLEMS = 5  # validation problems named in one detail

# What each error status means, with its kinds, for the OpenAPI schema.
_DESCRIPTIONS = {
    400: "a multipart body that cannot be parsed, that ends before its closing boundary, or that has more than "
         "1000 parts (bad_request)",
    401: "no admin bearer token (unauthorized)",
    403: "a wrong admin token (forbidden)",
    408: "the upload did not arrive within CAPEEN_REQUEST_TIMEOUT_S (upload_timeout)",
    413: "an upload over CAPEEN_MAX_UPLOAD_BYTES (upload_too_large) or an image over CAPEEN_MAX_PIXELS (too_large)",
    415: "not an image, or an image kind that cannot be decoded (not_image, unsupported), or a body that is not "
         "multipart/form-data (not_multipart)",
    422: "a missing field or bad option (invalid_request), or a truncated or empty image (truncated, empty)",
    503: "not ready yet, or the queue is full (not_ready, queue_full, shutting_down); retry after Retry-After seconds",
    500: "the model failed on the batch the request was in (engine_failed), or a bug (internal); the server log "
         "has the traceback",
    504: "no caption within CAPEEN_REQUEST_TIMEOUT_S (timeout)",
}


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable kind, e.g. not_image, queue_full, invalid_request")
    detail: str = Field(description="what went wrong, in one line")


class ServiceError(HTTPException):
    """An HTTP error with its kind. A Starlette HTTPException, so FastAPI lets it through while parsing a body."""

    def __init__(self, status_code: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.error = error


def error_responses(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict]:
    """OpenAPI entries for error statuses of a route, all with the ErrorBody schema; `described` replaces the
    usual description of some statuses where the route means something else by them."""
    descriptions = {**_DESCRIPTIONS, **(described or {})}
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_response(request: Request, status: int, error: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    request.app.state.http_metrics.errors.labels(kind=error).inc()
    return JSONResponse(ErrorBody(error=error, detail=_one_line(detail)).model_dump(), status_code=status,
                        headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    """`image: Field required; mode: Input should be 'adaptive', 'fixed' or 'full'`: every problem, one line."""
    parts = []
    for problem in exc.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "header"))
        message = str(problem.get("msg", "invalid"))
        if "Expected UploadFile" in message:  # FastAPI's words for a text field where a file part belongs
            message = "must be a file part (curl -F image=@photo.jpg), not a text field"
        elif problem.get("type") == "extra_forbidden":
            message = "unknown field (misspelt?); the request's fields are in the OpenAPI schema, GET /docs"
        parts.append(f"{where}: {message}" if where else message)
    if len(parts) > _MAX_PROBLEMS:  # a request with hundreds of bad fields gets a readable answer, not all of them
        parts[_MAX_PROBLEMS:] = [f"and {len(parts) - _MAX_PROBLEMS} more problems"]
    return "; ".join(parts) or "invalid request"


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, ClientDisconnect):
        # FastAPI turns a client that left mid-upload into a 400 for a malformed body; the body was fine, and
        # counting it as a client error would page someone for every impatient caller
        return error_response(request, 499, "client_closed", "the client closed the connection during its upload")
    error = getattr(exc, "error", None) or _STATUS_KINDS.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, error, str(exc.detail), exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(request, 422, "invalid_request", _validation_detail(exc))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this response is sent, so the server logs its traceback.
    return error_response(request, 500, "internal", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
