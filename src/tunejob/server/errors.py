"""OpenAI's error object, as every answer of `tunejob serve` that is not a success carries it:
raised anywhere in the server (a route, the chat engine's vLLM client, start-up), answered by the
handlers in app.py. No FastAPI routing here, so every room of the server may import it."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # e.g. a 429's Retry-After


def error_response(status: int, message: str, type: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)
