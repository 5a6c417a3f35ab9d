"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause becomes an :class:`APIError` with the right status; request
validation errors name the offending field (``param``) instead of FastAPI's default 422 body.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from dockyard.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
# What a 5xx body says: never the exception's text, which may show internals (the log has it).
INTERNAL_ERROR_MESSAGE = "internal server error; the server log has the details"


class APIError(Exception):
    """An error answered to the client with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its request was aborted."""


class RequestTooLarge(Exception):
    """The request body is over the server's limit."""


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first invalid field (and the rest in the message)."""
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    for err in errors:  # JSON has no NaN or Infinity, though Python's parsers accept them
        if err["type"] == "finite_number":
            where = _loc(err["loc"])
            return APIError(400, f"{where} must be a finite number; NaN and Infinity are not JSON numbers "
                                 f"(got {err.get('input')!r})", param=where, code="invalid_value")
    parts = []
    for err in errors[:5]:
        where = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "this field is required"
        shown = repr(err.get("input"))
        got = "" if err["type"] == "missing" else f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        parts.append(f"{where}: {msg}{got}" if where else f"request body: {msg}{got}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    param = _loc(errors[0]["loc"]) if errors and errors[0]["loc"] else None
    return APIError(400, "invalid request: " + "; ".join(parts), param=param, code="invalid_value")
