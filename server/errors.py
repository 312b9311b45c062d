"""One error body for every error, built here and nowhere else.

    {"error": {"code": "...", "message": "...", "details": [{"path": "...", "message": "..."}]}}

Domain code raises ApiError with its code; the middleware turns everything else
(aiohttp's own HTTP errors, undecodable JSON, schema violations, bugs) into the same shape.
"""
from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from rules import RuleEngineError
from server import validation
from server.answer_types import Error, ErrorBody, ErrorDetail
from server.validation import UNKNOWN_FIELD  # noqa: F401  (config.py words its hint from it)
from storage.db import Overloaded, Refusal, StorageBusy, StorageClosed, StorageError, StorageFull, StorageLost
from storage.health import StorageUnavailable
from storage.imports import ImportedReceipt

log = logging.getLogger("loyalty.http")


class ApiError(Refusal):
    def __init__(self, status: int, code: str, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers


def unprocessable(code: str, message: str, details: list[dict] | None = None) -> ApiError:
    return ApiError(422, code, message, details)


def forbidden(message: str, details: list[dict] | None = None) -> ApiError:
    return ApiError(403, "forbidden", message, details)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(404, code, message)


def conflict(code: str, message: str) -> ApiError:
    return ApiError(409, code, message)


def error_body(code: str, message: str, details: list[dict] | None = None) -> Error:
    """The one shape, as the type /openapi.json gives every refusal."""
    return Error(ErrorBody(code, message, [ErrorDetail(d["path"], d["message"]) for d in details or ()]))


def error_response(status: int, code: str, message: str, details: list[dict] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(error_body(code, message, details)),
                        content_type="application/json", headers=headers)


def validation_error(e: msgspec.ValidationError, root: type | None = None) -> ApiError:
    """One msgspec schema error (a config file's) as a 422 in the words of server/validation.py;
    `root`, the type that was decoded, lets a pattern be explained by its description."""
    return problems_error(validation.from_error(e, root))


def problems_error(found: validation.Problems) -> ApiError:
    """A 422 listing the problems found; the message names the first and counts the others."""
    details = [{"path": path, "message": words} for path, words in found.listed]
    message = _sentence(*found.listed[0])
    more = found.count - 1
    if more:
        message += f"; and {'' if found.complete else 'at least '}{more} more problem{'s' if more > 1 else ''}"
        if found.count > len(found.listed):
            message += f" (details lists the first {len(found.listed)})"
    return unprocessable("validation_error", message, details)


def field_error(path: str, reason: str, code: str = "validation_error") -> ApiError:
    return unprocessable(code, _sentence(path, reason), [{"path": path, "message": reason}])


def folder_clash(name: str, reason: str) -> ApiError:
    """A program file the served folder has a folder in the way of, or a file above (a
    program_versions.FolderClash): sending it again cannot help, so not the 503 of a folder
    that could not be written."""
    return unprocessable("rules_dir_clash", f"{name} {reason}; nothing was changed, the previous version keeps "
                                            "serving", [{"path": f"files.{name}", "message": reason}])


def _sentence(path: str, words: str) -> str:
    return f"the body {words}" if path == "$" else f"{path} {words}"


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "body_too_large", 429: "rate_limited",
                 503: "unavailable"}


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except Exception as e:
        if isinstance(e, web.HTTPRequestEntityTooLarge):
            # The register must split the body: it needs the limit to know by how much.
            from server.keys import CONFIG
            limit = request.app[CONFIG].server.max_body_bytes
            e = ApiError(413, "body_too_large", f"the body is larger than the limit of {limit} bytes "
                                                "(server.max_body_bytes)")
        answer = error_answer(e, request.method, _route_name(request))
        if answer is None:
            raise
        status, body, headers = answer
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def error_answer(e: Exception, method: str, route: str) -> tuple[int, bytes, dict[str, str] | None] | None:
    """Any exception as (status, body in the one shape, headers); None for a non-error HTTP
    answer (a redirect) that must propagate. `route` is the route's pattern, for the log."""
    if isinstance(e, ApiError):
        return _parts(e.status, e.code, e.message, e.details, e.headers)
    if isinstance(e, ImportedReceipt):
        return _parts(422, "receipt_imported", str(e), [{"path": "receipt", "message": "imported from history"}])
    if isinstance(e, msgspec.ValidationError):
        v = validation_error(e)
        return _parts(v.status, v.code, v.message, v.details)
    if isinstance(e, msgspec.DecodeError):
        return _parts(400, "malformed_json", f"the body is not valid JSON: {e}")
    if isinstance(e, Overloaded):
        # The write queue is full: nothing of this request was written; try again shortly.
        return _parts(503, "overloaded", "the server is overloaded; nothing was written, retry shortly",
                      headers=RETRY_SOON)
    if isinstance(e, StorageError):
        # Storage logs these itself, once per interval: a traceback per request would flood the log.
        code, retry_after_s, message = _STORAGE.get(type(e), _STORAGE[StorageError])
        return _parts(503, code, f"{message} ({e})", headers={"Retry-After": str(retry_after_s)})
    if isinstance(e, StorageClosed):
        return _parts(503, "unavailable", "the server is shutting down; retry on another instance",
                      headers=RETRY_SOON)
    if isinstance(e, RuleEngineError):
        # Evaluation failed before anything was written: the receipt can be sent again as is.
        log.error("rule engine failed on %s %s", method, route, exc_info=e)
        return _parts(503, "rules_unavailable", "the rule engine failed; nothing was written, retry shortly",
                      headers=RETRY_SOON)
    if isinstance(e, web.HTTPException):
        if e.status < 400:
            return None
        code = _STATUS_CODES.get(e.status, "http_error")
        message = _HTTP_MESSAGES.get(e.status, e.reason)
        allow = _allow(e)
        if allow:
            message = f"{method} is not a method of this path; it takes {allow['Allow'].replace(',', ', ')}"
        return _parts(e.status, code, message, headers=allow)
    # A bug: log it whole, answer in the one shape, keep serving. The route's pattern,
    # not the path: paths carry card numbers.
    log.error("unhandled error on %s %s", method, route, exc_info=e)
    return _parts(500, "internal_error", "internal error; it has been logged")


RETRY_SOON = {"Retry-After": "1"}

# aiohttp's reasons ("Not Found") do not tell an integrator which kind of 404 it met: a
# path the API does not have is told apart from an unknown card.
_HTTP_MESSAGES = {404: "no such path; /openapi.json lists the API's paths"}

# Code, Retry-After in seconds and message of each storage fault. Nothing of a request refused
# for a full disk or another program's lock was written; one refused for a lost file may be in
# the copy the server saved of it. Either way the same request sent again is safe: one that
# was kept answers as a replay.
_STORAGE: dict[type, tuple[str, int, str]] = {
    StorageFull: ("storage_full", 10, "the database's disk is full; nothing was written, send the same "
                                      "request again later"),
    StorageBusy: ("storage_busy", 2, "another program holds the database's write lock; nothing was "
                                     "written, send the same request again shortly"),
    StorageLost: ("storage_lost", 30, "the database's files were deleted or replaced under the server, which "
                                      "stopped writing until it is restarted; nothing was acknowledged, send "
                                      "the same request again then"),
    StorageUnavailable: ("storage_unavailable", 1, "the database cannot be reached (restarting or failing "
                                                   "over); send the same request again shortly, and one that "
                                                   "was kept answers as a replay"),
    StorageError: ("storage_error", 5, "the database's storage failed; nothing was written, send the same "
                                       "request again later"),
}


def _parts(status: int, code: str, message: str, details: list[dict] | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str] | None]:
    return status, msgspec.json.encode(error_body(code, message, details)), headers


def overloaded_response(message: str) -> web.Response:
    return error_response(503, "overloaded", message, headers={"Retry-After": "1"})


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _allow(e: web.HTTPException) -> dict[str, str] | None:
    allow = e.headers.get("Allow") if e.headers else None
    return {"Allow": allow} if allow else None
