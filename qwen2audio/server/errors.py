"""OpenAI-shaped errors: every 4xx/5xx body is {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# HTTP status -> OpenAI error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server answers with `status` and a message that says what to change."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than this server's limit of {limit} bytes "
                              f"(--max-request-mb)", code="request_too_large")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None  # clients such as openai's back off and retry
    return JSONResponse(error_body(err.status, err.message, err.code, err.param), status_code=err.status,
                        headers=headers)
