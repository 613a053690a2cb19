"""Errors of the Kubernetes API, keeping what the server said: status code, reason and message.

The classes follow the reasons of `metav1.Status` (NotFound, AlreadyExists, Conflict, Gone/Expired, ...),
so callers write `except NotFound:` instead of comparing numbers. `TransportError` is everything below
HTTP (refused, reset, timed out): the server never answered, so nothing is known about the object.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlreadyExists",
    "ApiError",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Expired",
    "Forbidden",
    "Invalid",
    "KubeError",
    "NotFound",
    "ServerError",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "api_error",
    "is_expired",
]


class KubeError(Exception):
    """Every error this package raises."""


class ConfigError(KubeError):
    """No usable cluster configuration (kubeconfig, in-cluster service account)."""


class TransportError(KubeError):
    """The request did not get an HTTP answer (connection refused or reset, TLS failure, timeout)."""

    def __init__(self, method: str, path: str, cause: BaseException):
        self.method = method
        self.path = path
        self.cause = cause
        super().__init__(f"{method} {path}: {type(cause).__name__}: {cause}")


class ApiError(KubeError):
    """The API server answered with an error status (a `metav1.Status` body, when it sent one)."""

    def __init__(self, status: int, reason: str = "", message: str = "", *, method: str = "", path: str = "",
                 details: dict[str, Any] | None = None, retry_after: float | None = None):
        self.status = status
        self.reason = reason
        self.message = message
        self.method = method
        self.path = path
        self.details = details or {}
        self.retry_after = retry_after
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status} {reason or 'Error'}: {message}".rstrip(": "))


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: a stale resourceVersion on update, or (as AlreadyExists) a name already taken."""


class AlreadyExists(Conflict):
    pass


class Expired(ApiError):
    """410 Gone: the resourceVersion asked for is older than anything the server still has."""


class Invalid(ApiError):
    """422: the object failed validation; `details['causes']` names the fields."""


class TooManyRequests(ApiError):
    pass


class ServerError(ApiError):
    pass


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 410: Expired,
    422: Invalid, 429: TooManyRequests,
}


def api_error(status: int, body: Any, *, method: str = "", path: str = "",
              retry_after: float | None = None) -> ApiError:
    """The ApiError for an HTTP status and its (decoded) body, a `metav1.Status` or anything else."""
    reason = message = ""
    details: dict[str, Any] = {}
    if isinstance(body, dict) and body.get("kind") == "Status":
        status = int(body.get("code") or status)
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")
        details = body.get("details") or {}
    elif isinstance(body, bytes | str):
        message = (body.decode(errors="replace") if isinstance(body, bytes) else body).strip()[:2000]
    if status == 409 and reason == "AlreadyExists":
        cls: type[ApiError] = AlreadyExists
    elif status >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(status, ApiError)
    return cls(status, reason, message, method=method, path=path, details=details, retry_after=retry_after)


def is_expired(err: BaseException) -> bool:
    """410 Gone, or the 'too old resource version' / 'Expired' reasons the server uses for the same thing."""
    if isinstance(err, Expired):
        return True
    if isinstance(err, ApiError):
        return err.reason in ("Expired", "Gone") or "too old resource version" in err.message
    return False
