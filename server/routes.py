"""The HTTP surface: one table of routes (method, path, roles, body type), thin handlers.

The table is also what /openapi.json is generated from, so the document cannot drift
from what the server actually accepts.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import date, datetime, time as dtime
from pathlib import Path
from typing import Awaitable, Callable

import msgspec
from aiohttp import web

from rules import check_dir
from server import schema
from server.auth import Principal, require_role
from server.errors import ApiError, field_error
from server.keys import CLOCK, DATABASE, KEYRING, LIMITER, METRICS, PRIVACY, PROGRAMS, SERVICE, STATE
from storage import admin_audit
from storage.ledger import iso

REGISTER, MANAGER, MONITOR = "register", "manager", "monitor"
JSON_TYPE = "application/json"
Handler = Callable[..., Awaitable[web.StreamResponse]]
log = logging.getLogger("loyalty.http")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    roles: frozenset[str] | None      # None: no key needed
    body: type | None = None
    summary: str = ""
    ok_status: int = 200


def json_response(data, status: int = 200) -> web.Response:
    return web.Response(body=schema.ENCODER.encode(data), status=status, content_type=JSON_TYPE)


# ------------------------------------------------------------------ registers

def counted(endpoint: str):
    """Refused receipt requests are counted by their error code (successes are counted by the service)."""
    def wrap(handler: Handler) -> Handler:
        async def run(request, principal, body):
            try:
                return await handler(request, principal, body)
            except ApiError as e:
                request.app[METRICS].receipts.labels(endpoint, e.code).inc()
                raise
        run.__name__ = handler.__name__
        return run
    return wrap


@counted("calculate")
async def calculate(request, principal: Principal, body: schema.Receipt):
    return json_response(await request.app[SERVICE].calculate(body, principal))


@counted("confirm")
async def confirm(request, principal: Principal, body: schema.Receipt):
    status, result = await request.app[SERVICE].confirm(body, principal)
    return json_response(result, status)


@counted("cancel")
async def cancel(request, principal: Principal, body=None):
    m = request.match_info
    key = (m["store_id"], m["register_id"], m["receipt_id"])
    return json_response(await request.app[SERVICE].cancel(key, principal))


@counted("return")
async def return_items(request, principal: Principal, body: schema.ReturnRequest):
    status, result = await request.app[SERVICE].return_items(body, principal)
    return json_response(result, status)


# ------------------------------------------------------------------ members

async def enroll(request, principal: Principal, body: schema.Enrollment):
    return json_response(await request.app[SERVICE].enroll(body, principal), 201)


async def get_member(request, principal: Principal, body=None):
    service = request.app[SERVICE]
    at = parse_moment(request.query.get("at"), "at", service.program().timezone)
    return json_response(await service.get_member(request.match_info["card"], at))


async def patch_member(request, principal: Principal, body: schema.MemberPatch):
    return json_response(await request.app[SERVICE].patch_member(request.match_info["card"], body))


async def member_statement(request, principal: Principal, body=None):
    service = request.app[SERVICE]
    tz = service.program().timezone
    since = parse_moment(request.query.get("from"), "from", tz)
    until = parse_moment(request.query.get("to"), "to", tz, end_of_day=True)
    limit = parse_int(request.query.get("limit"), "limit", default=100)
    return json_response(await service.statement(request.match_info["card"], since, until, limit))


# ------------------------------------------------------------------ admin

async def adjust(request, principal: Principal, body: schema.Adjustment):
    status, result = await request.app[SERVICE].adjust(body, principal)
    return json_response(result, status)


async def set_tier(request, principal: Principal, body: schema.TierAssignment):
    return json_response(await request.app[SERVICE].set_tier(request.match_info["card"], body))


async def rules_info(request, principal: Principal, body=None):
    holder = request.app[PROGRAMS]
    p = holder.current
    return json_response({
        "version": p.version, "program": {"id": p.id, "name": p.name, "currency": p.currency,
                                          "timezone": p.timezone_name},
        "directory": str(holder.directory),
        "files": [{"path": f, "sha256": h} for f, h in p.files],
        "rules": p.rule_summaries,
        "events": [{"id": e.id, "on": e.on, "points": e.points, "expires_in_days": e.expires_in_days}
                   for e in p.events],
        "last_reload": holder.last_reload,
    })


async def rules_reload(request, principal: Principal, body=None):
    ok, program, problems = request.app[PROGRAMS].reload(f"api:{principal.key_id}")
    if not ok:
        raise rules_invalid(problems, "the program was not loaded; the previous version keeps serving")
    return json_response({"version": program.version, "last_reload": request.app[PROGRAMS].last_reload})


async def rules_check(request, principal: Principal, body: schema.RulesCheck):
    folder = Path(tempfile.mkdtemp(prefix="rules-check-"))
    try:
        for name, text in body.files.items():
            target = (folder / name).resolve()
            if folder.resolve() not in target.parents or not name.endswith((".yaml", ".yml")):
                raise field_error(f"files.{name}", "must be a relative path to a .yaml file")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        problems = check_dir(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return json_response({"ok": not problems, "problems": [str(p) for p in problems]})


def rules_invalid(problems, message: str) -> ApiError:
    return ApiError(422, "rules_invalid", message,
                    [{"path": f"{p.file}:{p.line}:{p.column}", "message": p.message} for p in problems])


# ------------------------------------------------------------------ operations

async def healthz(request, principal=None, body=None):
    return json_response({"status": "alive"})


async def readyz(request, principal=None, body=None):
    app = request.app
    if app[STATE].get("draining") or not app[STATE].get("started"):
        raise ApiError(503, "unavailable", "starting or draining")
    try:
        await app[DATABASE].write(lambda conn: conn.execute("SELECT 1").fetchone())
    except Exception as e:
        raise ApiError(503, "unavailable", f"database not writable: {e}") from None
    return json_response({"status": "ready", "rules_version": app[PROGRAMS].current.version})


async def metrics(request, principal: Principal, body=None):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    m = request.app[METRICS]
    m.write_queue.set(request.app[DATABASE].queue_depth())
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request, principal=None, body=None):
    from server.openapi import document
    return json_response(document(ROUTES))


# ------------------------------------------------------------------ parameters

def parse_moment(raw: str | None, name: str, tz, end_of_day: bool = False) -> datetime | None:
    """A date means the start of that day in the program's timezone (the end, for `to`)."""
    if not raw:
        return None
    try:
        if len(raw) == 10:
            d = date.fromisoformat(raw)
            moment = datetime.combine(d, dtime.max if end_of_day else dtime.min, tz)
        else:
            moment = datetime.fromisoformat(raw.replace(" ", "+"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz)
    except ValueError:
        raise field_error(name, "must be a date (2026-12-08) or a datetime with offset") from None
    return moment


def parse_int(raw: str | None, name: str, default: int) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise field_error(name, "must be an integer") from None


R = frozenset
ROUTES: list[Route] = [
    Route("POST", "/v1/receipts/calculate", calculate, R({REGISTER}), schema.Receipt,
          "What confirming this receipt would give; holds points to be redeemed"),
    Route("POST", "/v1/receipts", confirm, R({REGISTER}), schema.Receipt,
          "Confirm a paid receipt: 201 once the ledger write is on disk; 200 replayed for a retry", 201),
    Route("POST", "/v1/receipts/{store_id}/{register_id}/{receipt_id}/cancel", cancel, R({REGISTER}), None,
          "Release a hold or reverse a confirmed receipt entirely"),
    Route("POST", "/v1/returns", return_items, R({REGISTER}), schema.ReturnRequest,
          "Return lines of a confirmed receipt: reverses their points and refunds points spent on them", 201),
    Route("POST", "/v1/members", enroll, R({REGISTER, MANAGER}), schema.Enrollment, "Enroll a card", 201),
    Route("GET", "/v1/members/{card}", get_member, R({REGISTER, MANAGER}), None,
          "Balance, tier and expiring points; ?at= answers as of a date or moment"),
    Route("PATCH", "/v1/members/{card}", patch_member, R({MANAGER}), schema.MemberPatch, "Update a profile"),
    Route("GET", "/v1/members/{card}/statement", member_statement, R({MANAGER}), None,
          "Postings newest first with running balance; ?from=&to=&limit="),
    Route("POST", "/v1/admin/adjustments", adjust, R({MANAGER}), schema.Adjustment,
          "Add or remove points by hand", 201),
    Route("PUT", "/v1/admin/members/{card}/tier", set_tier, R({MANAGER}), schema.TierAssignment,
          "Assign a tier manually until a date"),
    Route("GET", "/v1/admin/rules", rules_info, R({MANAGER}), None, "The loaded program"),
    Route("POST", "/v1/admin/rules/reload", rules_reload, R({MANAGER}), None, "Reload the program from disk"),
    Route("POST", "/v1/admin/rules/check", rules_check, R({MANAGER}), schema.RulesCheck,
          "Validate a program sent as {files: {path: yaml}} without loading it"),
    Route("GET", "/healthz", healthz, None, None, "Alive"),
    Route("GET", "/readyz", readyz, None, None, "Program loaded and database writable"),
    Route("GET", "/metrics", metrics, R({MONITOR, MANAGER}), None, "Prometheus metrics"),
    Route("GET", "/openapi.json", openapi, None, None, "This API as OpenAPI 3"),
]


ADMIN_PREFIX = "/v1/admin/"
PRINCIPAL = web.RequestKey("principal", Principal)   # the authenticated caller, for the audit log


def bind(route: Route) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        principal = None
        if route.roles is not None:
            principal = request.app[KEYRING].authenticate(request.headers.get("Authorization"))
            request[PRINCIPAL] = principal
            request.app[LIMITER].check(principal.key_id)
            require_role(principal, route.roles)
        body = None
        if route.body is not None:
            raw = await request.read()
            if not raw:
                raise ApiError(400, "malformed_json", "a JSON body is required")
            body = schema.decode(raw, route.body)
        return await route.handler(request, principal, body)
    handle.__name__ = route.handler.__name__
    return handle


@web.middleware
async def audit_middleware(request: web.Request, handler):
    """Every admin request by a known key, allowed or refused, goes into the audit log with
    the status it got (this runs outside the error middleware, so errors are answers here)."""
    response = await handler(request)
    principal = request.get(PRINCIPAL)
    if principal is not None and request.path.startswith(ADMIN_PREFIX):
        await write_audit(request, principal, response.status)
    return response


async def write_audit(request: web.Request, principal: Principal, status: int) -> None:
    app = request.app
    privacy = app[PRIVACY]
    match = dict(request.match_info)
    if "card" in match:     # the card's HMAC, never the number
        match["card"] = "hmac-" + privacy.card(match["card"])
    path = str(request.match_info.route.resource.url_for(**match)) if match else request.path
    try:
        raw = await request.read()
    except web.HTTPException:   # over the size limit: digest what is known
        raw = b""
    row = dict(at=iso(app[CLOCK].now()), key_id=principal.key_id, method=request.method, path=path,
               body_digest=privacy.body_digest(raw), status=status)
    try:
        await app[DATABASE].write(lambda conn: admin_audit.append(conn, **row))
    except Exception:
        log.exception("could not write the audit row for %s %s by %s", request.method,
                      request.match_info.route.resource.canonical, principal.key_id)


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, bind(route), name=route.handler.__name__)
