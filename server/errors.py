"""The error taxonomy and its single mapping to HTTP status codes and OpenAI's error envelope.

Domain code raises these exceptions; only this module knows which status and which `type`/`code`
each one becomes on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """Base of every error that reaches a client with a chosen status and envelope."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    # The connection cannot serve another request after this answer (a body was left half-read).
    close_connection: bool = False

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    """A field is missing, has the wrong type or is out of range; an image that cannot be used."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"

    def __init__(self, param: str | None, message: str, *, code: str = "invalid_value") -> None:
        super().__init__(message, param=param)
        self.code = code


class AuthenticationFailed(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ApiError):
    """The client stopped sending its request body."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    close_connection = True


class RequestTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(ApiError):
    """The request head (request line and headers) is over the HTTP layer's limit."""

    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Overloaded(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "server_overloaded"


class NotReady(ApiError):
    status = 503
    type = "server_error"
    code = "not_ready"


class TooManyConnections(ApiError):
    """More connections are open than the server serves at once (--max-connections)."""

    status = 503
    type = "server_error"
    code = "too_many_connections"


class StorageUnavailable(ApiError):
    """A url result cannot be stored or read because the result storage is unreachable or refuses access."""

    status = 503
    type = "server_error"
    code = "storage_unavailable"


class InsufficientStorage(ApiError):
    """A url result cannot be stored because the result storage is out of space."""

    status = 507
    type = "server_error"
    code = "insufficient_storage"


class Timeout(ApiError):
    status = 504
    type = "server_error"
    code = "timeout"


class InternalError(ApiError):
    status = 500
    type = "server_error"
    code = "internal_error"


@dataclass(frozen=True)
class ErrorResponse:
    """What the HTTP layer needs to answer an error: status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def to_response(error: ApiError) -> ErrorResponse:
    body = {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if error.close_connection:
        headers["Connection"] = "close"
    return ErrorResponse(status=error.status, body=body, headers=headers)


def internal_error(request_id: str) -> InternalError:
    """The 500 a client sees for anything unexpected: a short message and the request id, no internals."""
    return InternalError(f"The server had an error while processing the request (request id {request_id}).")
