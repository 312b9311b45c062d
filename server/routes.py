"""The HTTP surface: one table of routes (method, path, roles, body type), thin handlers.

Every route has two halves. The HTTP half (`bind`) authenticates, rate-limits and decodes
the body into a `Call`; the handler in the table turns a Call into a `Reply` (status and an
encoded body), so handlers never touch the request and the checks are written once.

The table is also what /openapi.json is generated from, so the document cannot drift
from what the server actually accepts.
"""
from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import date, datetime, time as dtime
from pathlib import Path
from typing import Any, Awaitable, Callable, NamedTuple

import msgspec
from aiohttp import web

from rules import ProgramError, check_dir
from server import answer_types as A, cvm, member_care, program_versions, report_campaign, schema
from server.auth import Principal, require_adjustment_within, require_role
from server.errors import ApiError, field_error, folder_clash, not_found
from server.keys import (CLOCK, CONFIG, DATABASE, EVENTS_SETTLED, IN_FLIGHT, KEYRING, LIMITER, METRICS, OPS, PRIVACY,
                         PROGRAMS, STATE, VERSIONS)
from server.ops import adjustments, members, receipts, returns
from server.validation import DAY_EARLIEST, DAY_LATEST, DAY_RANGE
from storage import admin_audit, events
from storage.db import StorageClosed, StorageError
from storage.ledger import STATEMENT_ROWS_MAX, iso

REGISTER, MANAGER, SUPPORT, MONITOR = "register", "manager", "support", "monitor"
JSON_TYPE = "application/json"
log = logging.getLogger("loyalty.http")


class Call(msgspec.Struct, frozen=True):
    """One API call without its HTTP: the caller, the path and query parameters, the decoded body."""
    principal: Principal | None = None
    path: dict[str, str] = {}
    query: dict[str, str] = {}
    body: Any = None


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] | None = None


Handler = Callable[[web.Application, Call], Awaitable[Reply]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    roles: frozenset[str] | None      # None: no key needed
    body: type | None = None
    summary: str = ""
    # Fields of the body kept in the audit row's detail: what the action was for, in its author's words.
    audit_detail: tuple[str, ...] = ()
    # (status, answer type, description) of each success: what /openapi.json says it answers.
    # None as the type: not JSON. Every route may also answer an error (server/openapi.py).
    answers: tuple[tuple[int, type | None, str], ...] = ()


def json_reply(data, status: int = 200) -> Reply:
    return Reply(status, schema.ENCODER.encode(data))


def explains_retired_cards(card_of: Callable[[Call], str | None]):
    """`unknown_card` for a card a replacement or a merge took out of use says which instead
    (card_replaced, card_merged), with the same status."""
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(app, call: Call) -> Reply:
            try:
                return await handler(app, call)
            except ApiError as e:
                card = card_of(call) if e.code == "unknown_card" else None
                if card:
                    await member_care.refuse_retired(app, card, e)
                raise
        return run
    return wrap


def _card_in_body(call: Call) -> str | None:
    return getattr(call.body, "card", None)


def _card_in_path(call: Call) -> str | None:
    return call.path.get("card")


# ------------------------------------------------------------------ registers

# Receipt requests counted in loyalty_receipts_total, by route name: successes by the
# operation once its transaction is over, refusals (decoding included) by their error code
# where the answer is made (server/app.py), so each request is counted once.
COUNTED_ENDPOINTS = {"calculate": "calculate", "confirm": "confirm", "cancel": "cancel", "return_items": "return"}


@explains_retired_cards(_card_in_body)
async def calculate(app, call: Call) -> Reply:
    return json_reply(await receipts.calculate(app[OPS], call.body, call.principal))


@explains_retired_cards(_card_in_body)
async def confirm(app, call: Call) -> Reply:
    status, result, encoded = await receipts.confirm(app[OPS], call.body, call.principal)
    return json_reply(result, status) if encoded is None else Reply(status, encoded)


async def cancel(app, call: Call) -> Reply:
    m = call.path
    key = (m["store_id"], m["register_id"], m["receipt_id"])
    return json_reply(await receipts.cancel(app[OPS], key, call.principal))


async def return_items(app, call: Call) -> Reply:
    status, result = await returns.return_items(app[OPS], call.body, call.principal)
    return json_reply(result, status)


# ------------------------------------------------------------------ members

def _referrer_in_body(call: Call) -> str | None:
    return getattr(call.body, "referred_by", None)


@explains_retired_cards(_referrer_in_body)
async def enroll(app, call: Call) -> Reply:
    # A card out of use is not given to a new member: the register is told what happened to it.
    # A referrer's card out of use is refused like any card presented (422), saying which instead.
    await member_care.refuse_retired(app, call.body.card, status=409)
    return json_reply(await member_care.with_crm(app, await members.enroll(app[OPS], call.body, call.principal)), 201)


@explains_retired_cards(_card_in_path)
async def get_member(app, call: Call) -> Reply:
    ops = app[OPS]
    at = parse_moment(call.query.get("at"), "at", ops.program().timezone)
    return json_reply(await member_care.with_crm(app, await members.get_member(ops, call.path["card"], at)))


@explains_retired_cards(_card_in_path)
async def patch_member(app, call: Call) -> Reply:
    # The CRM's fields first: a PATCH refused for its crm_id changes nothing of the profile,
    # and one whose profile write fails is sent again whole (it sets values, so that is safe).
    await member_care.set_crm(app, call.path["card"], call.body)
    answer = await members.patch_member(app[OPS], call.path["card"], call.body)
    return json_reply(await member_care.with_crm(app, answer))


@explains_retired_cards(_card_in_path)
async def member_statement(app, call: Call) -> Reply:
    ops = app[OPS]
    tz = ops.program().timezone
    since = parse_moment(call.query.get("from"), "from", tz)
    until = parse_moment(call.query.get("to"), "to", tz, end_of_day=True)
    limit = parse_int(call.query.get("limit"), "limit", default=100)
    # Refused like the other pages' limits: a 0 or 5000 quietly served as 1 or 1000 rows
    # would look like a member with fewer postings than they have.
    if not 1 <= limit <= STATEMENT_ROWS_MAX:
        raise field_error("limit", f"must be 1 to {STATEMENT_ROWS_MAX}")
    statement = await members.statement(ops, call.path["card"], since, until, limit)
    keyring = app[KEYRING]
    for posting in statement.postings:
        posting.key_name = keyring.name_of(posting.key_id)
    return json_reply(statement)


# ------------------------------------------------------------------ admin

@explains_retired_cards(_card_in_body)
async def adjust(app, call: Call) -> Reply:
    require_adjustment_within(call.principal, call.body.points, app[CONFIG].auth.support_adjustment_max_points)
    status, result = await adjustments.adjust(app[OPS], call.body, call.principal)
    # A replay names the key that made the adjustment, not the one asking again.
    result.key_name = app[KEYRING].name_of(result.key_id)
    return json_reply(result, status)


@explains_retired_cards(_card_in_path)
async def set_tier(app, call: Call) -> Reply:
    return json_reply(await member_care.with_crm(app, await members.set_tier(app[OPS], call.path["card"], call.body)))


# ------------------------------------------------------------------ member care

async def members_search(app, call: Call) -> Reply:
    return json_reply(await member_care.find_by_phone(app, call.body))


async def replace_card(app, call: Call) -> Reply:
    status, result = await member_care.replace_card(app, call.path["member_id"], call.body)
    return json_reply(result, status)


async def merge_members(app, call: Call) -> Reply:
    status, result = await member_care.merge(app, call.body, call.principal)
    return json_reply(result, status)


async def erase_member(app, call: Call) -> Reply:
    return json_reply(await member_care.erase(app, call.path["member_id"], call.body))


async def rules_info(app, call: Call) -> Reply:
    holder = app[PROGRAMS]
    p = holder.current
    return json_reply(A.RulesAnswer(
        p.version, A.ProgramInfo(p.id, p.name, p.currency, p.timezone_name), str(holder.directory),
        [A.ProgramFile(f, h) for f, h in p.files],
        # The summaries and the last reload are the dicts the console shows; converting checks them.
        msgspec.convert(p.rule_summaries, list[A.RuleSummary]),
        [A.EventInfo(e.id, e.on, e.points, e.expires_in_days) for e in p.events],
        msgspec.convert(holder.last_reload, A.LastReload | None)))


async def rules_reload(app, call: Call) -> Reply:
    who = call.principal.key_id
    ok, program, problems = app[PROGRAMS].reload(f"api:{who}", who)
    if not ok:
        raise rules_invalid(problems, "the program was not loaded; the previous version keeps serving")
    await app[VERSIONS].settled()     # recorded before the answer says it is live
    await app[PROGRAMS].lost_tiers_counted()
    return json_reply(A.ReloadAnswer(program.version, msgspec.convert(app[PROGRAMS].last_reload, A.LastReload)))


async def rules_versions(app, call: Call) -> Reply:
    limit = parse_int(call.query.get("limit"), "limit", default=20)
    if not 1 <= limit <= program_versions.LIST_LIMIT_MAX:
        raise field_error("limit", f"must be 1 to {program_versions.LIST_LIMIT_MAX}")
    before = call.query.get("before")
    before_id = parse_int(before, "before", default=0) if before is not None else None
    if before_id is not None and not 1 <= before_id <= program_versions.LOAD_ID_MAX:
        raise field_error("before", "must be the id of a listed version (a positive whole number)")
    loads = await app[DATABASE].read(lambda conn: program_versions.list_versions(conn, limit, before_id))
    return json_reply(A.VersionsAnswer(app[PROGRAMS].current.version, msgspec.convert(loads, list[A.VersionLoad])))


EVENTS_PAGE_MAX = 1_000


async def events_page(app, call: Call) -> Reply:
    """The outbox as a warehouse pulls it: events after an id, oldest first. On PostgreSQL
    only up to the settled id (events.Settled), read after it was settled, so `next_after`
    never passes an event that is still to commit."""
    after = parse_int(call.query.get("after"), "after", default=0)
    if not 0 <= after <= events.ID_MAX:
        raise field_error("after", "must be 0 or the id of an event")
    limit = parse_int(call.query.get("limit"), "limit", default=100)
    if not 1 <= limit <= EVENTS_PAGE_MAX:
        raise field_error("limit", f"must be 1 to {EVENTS_PAGE_MAX}")
    db = app[DATABASE]
    if db.backend == "postgresql":
        rows = await _settled_page(db, app[EVENTS_SETTLED], after, limit)
    else:
        rows = await db.read(lambda conn: events.page(conn, after, limit))
    return json_reply(A.EventsAnswer(msgspec.convert(rows, list[A.Event]), rows[-1]["id"] if rows else after))


async def _settled_page(db, settled: events.Settled, after: int, limit: int) -> list[dict]:
    # A warehouse catching up reads pages below the id settled before, and makes the
    # writers wait for nothing; only a page that reaches it settles anew.
    known = settled.known
    if known - after >= limit:
        rows = await db.read(lambda conn: events.page(conn, after, limit, known))
        if len(rows) == limit:
            return rows
    upto = await db.read(settled.settle)
    return await db.read(lambda conn: events.page(conn, after, limit, upto))


async def rules_version(app, call: Call) -> Reply:
    version = call.path["version"]
    try:
        info = await app[DATABASE].read(lambda conn: program_versions.version_files(conn, version))
        return json_reply(msgspec.convert(info, A.VersionAnswer))
    except program_versions.UnknownVersion as e:
        raise not_found("unknown_version", str(e)) from None


async def rules_deploy(app, call: Call) -> Reply:
    body = call.body
    refuse_folder_clashes(body.files)
    return await _put_live(program_versions.deploy(app, body.files, call.principal.key_id, body.reason))


async def rules_rollback(app, call: Call) -> Reply:
    body = call.body
    return await _put_live(program_versions.rollback(app, body.version, call.principal.key_id, body.reason))


async def _put_live(operation) -> Reply:
    try:
        return json_reply(msgspec.convert(await operation, A.PutLiveAnswer))
    except ProgramError as e:
        raise rules_invalid(e.problems, "the program was not loaded; the previous version keeps serving") from None
    except program_versions.UnknownVersion as e:
        raise not_found("unknown_version", str(e)) from None
    except program_versions.FolderClash as e:
        raise folder_clash(e.name, e.reason) from None
    except program_versions.FolderUnwritable as e:
        raise ApiError(503, "rules_dir_unwritable", f"{e}; the previous version keeps serving") from None


def refuse_folder_clashes(files: dict[str, str]) -> None:
    """A name that is also the folder of another ("a.yaml" and "a.yaml/b.yaml") cannot be
    written: 422 naming the file inside, before anything is written."""
    names = set(files)
    for name in sorted(names):
        for folder in program_versions.folders_above(name):
            if folder in names:
                raise field_error(f"files.{name}", f"is inside {folder}, which is a file of the program too")


async def rules_check(app, call: Call) -> Reply:
    refuse_folder_clashes(call.body.files)
    folder = Path(tempfile.mkdtemp(prefix="rules-check-"))
    try:
        for name, text in call.body.files.items():
            target = (folder / name).resolve()
            if folder.resolve() not in target.parents or not name.endswith((".yaml", ".yml")):
                raise field_error(f"files.{name}", "must be a relative path to a .yaml or .yml file")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        clock = app.get(CLOCK)  # a worker process has none: the system clock judges dates
        found = check_dir(folder, clock.now() if clock else None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    problems = [str(p) for p in found if not p.warning]
    return json_reply(A.CheckAnswer(not problems, problems, [str(p) for p in found if p.warning]))


def rules_invalid(problems, message: str) -> ApiError:
    return ApiError(422, "rules_invalid", message,
                    [{"path": f"{p.file}:{p.line}:{p.column}", "message": p.message} for p in problems])


# ------------------------------------------------------------------ operations

async def healthz(app, call: Call) -> Reply:
    return json_reply(A.HealthAnswer("alive"))


async def readyz(app, call: Call) -> Reply:
    check_ready(app)
    return json_reply(A.ReadyAnswer("ready", app[PROGRAMS].current.version, app[DATABASE].queue_depth()))


def check_ready(app) -> None:
    """What /readyz answers 503 for, raised; loyalty_ready says the same at each scrape."""
    if app[STATE].get("draining") or not app[STATE].get("started"):
        raise ApiError(503, "unavailable", "starting or draining")
    if app[STATE].get("preloading"):
        raise ApiError(503, "unavailable", "reading the members into the cache (database.preload)")
    # A storage fault in force answers 503 with its own code (server/errors.py); a deep
    # write queue is load, not a fault: it is reported, and the answer stays 200.
    app[DATABASE].check_ready()


async def metrics(app, call: Call) -> Reply:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    m = app[METRICS]
    m.write_queue.set(app[DATABASE].queue_depth())
    m.observe_storage(app[DATABASE])
    try:
        check_ready(app)
        m.ready.set(1)
    except (ApiError, StorageError, StorageClosed):
        m.ready.set(0)
    return Reply(200, generate_latest(m.registry), CONTENT_TYPE_LATEST)


async def openapi(app, call: Call) -> Reply:
    from server.openapi import document
    return json_reply(document(ROUTES))


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
        raise field_error(name, "must be a date like 2026-12-08 or a moment like 2026-12-08T12:00:00+02:00") from None
    if not DAY_EARLIEST <= moment.date() <= DAY_LATEST:
        raise field_error(name, DAY_RANGE)
    return moment


def parse_int(raw: str | None, name: str, default: int) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise field_error(name, "must be a whole number") from None


R = frozenset


def ok(answer: type | None, description: str = "OK") -> tuple:
    return ((200, answer, description),)


def created(answer: type, replayed: bool = True) -> tuple:
    """201 for what was written now; 200 for a retry, answered from what was stored."""
    if not replayed:
        return ((201, answer, "Created"),)
    return ((201, answer, "Created"), (200, answer, "Replayed: the stored answer of the same request"))


ROUTES: list[Route] = [
    Route("POST", "/v1/receipts/calculate", calculate, R({REGISTER}), schema.Receipt,
          "What confirming this receipt would give; holds points to be redeemed", answers=ok(A.CalculateAnswer)),
    Route("POST", "/v1/receipts", confirm, R({REGISTER}), schema.Receipt,
          "Confirm a paid receipt: 201 once the ledger write is on disk; 200 replayed for a retry",
          answers=created(A.ConfirmAnswer)),
    Route("POST", "/v1/receipts/{store_id}/{register_id}/{receipt_id}/cancel", cancel, R({REGISTER}), None,
          "Release a hold or reverse a confirmed receipt entirely", answers=ok(A.CancelAnswer)),
    Route("POST", "/v1/returns", return_items, R({REGISTER}), schema.ReturnRequest,
          "Return lines of a confirmed receipt: reverses their points and refunds points spent on them",
          answers=created(A.ReturnAnswer)),
    Route("POST", "/v1/members", enroll, R({REGISTER, MANAGER}), schema.Enrollment, "Enroll a card",
          answers=created(A.MemberAnswer, replayed=False)),
    Route("GET", "/v1/members/{card}", get_member, R({REGISTER, MANAGER, SUPPORT}), None,
          "Balance, tier and expiring points; ?at= answers as of a date or moment", answers=ok(A.MemberAnswer)),
    Route("PATCH", "/v1/members/{card}", patch_member, R({MANAGER, SUPPORT}), schema.MemberPatch,
          "Update a profile", answers=ok(A.MemberAnswer)),
    Route("GET", "/v1/members/{card}/statement", member_statement, R({MANAGER, SUPPORT}), None,
          "Postings newest first with running balance; ?from=&to= (a local date or a moment with offset) "
          "and ?limit= (1-1000, 100)", answers=ok(A.StatementAnswer)),
    Route("POST", "/v1/admin/adjustments", adjust, R({MANAGER, SUPPORT}), schema.Adjustment,
          "Add or remove points by hand (a support key: up to auth.support_adjustment_max_points)",
          answers=created(A.AdjustmentAnswer)),
    Route("PUT", "/v1/admin/members/{card}/tier", set_tier, R({MANAGER}), schema.TierAssignment,
          "Assign a tier manually until a date", answers=ok(A.MemberAnswer)),
    Route("GET", "/v1/admin/events", events_page, R({MANAGER}), None,
          "Events after an id, oldest first: ?after= (0) and ?limit= (1-1000, 100); next_after for the next page",
          answers=ok(A.EventsAnswer)),
    Route("POST", "/v1/admin/members/search", members_search, R({MANAGER, SUPPORT}), schema.PhoneSearch,
          "Members with this phone (found by its HMAC), at most 20: ids, cards' last digits, balance, CRM fields",
          answers=ok(A.MemberSearchAnswer)),
    Route("POST", "/v1/admin/members/{member_id}/replace-card", replace_card, R({MANAGER, SUPPORT}),
          schema.CardReplacement, "Give the member a new card in place of one of theirs; balance, lots and "
          "history stay with the member, the old card is refused with card_replaced", audit_detail=("reason",),
          answers=created(A.CardReplacementAnswer)),
    Route("POST", "/v1/admin/members/merge", merge_members, R({MANAGER}), schema.MemberMerge,
          "Move every point of one member to another through transfer postings; the first member's cards are "
          "refused with card_merged; idempotent by merge_id",
          audit_detail=("merge_id", "from_member_id", "into_member_id", "reason"), answers=created(A.MergeAnswer)),
    Route("POST", "/v1/admin/members/{member_id}/erase", erase_member, R({MANAGER}), schema.Erasure,
          "Erase the member's personal data (cards, phone, birthday, tags, CRM fields); the member id and "
          "ledger stay", audit_detail=("reason",), answers=ok(A.ErasureAnswer)),
    Route("GET", "/v1/admin/rules", rules_info, R({MANAGER}), None, "The loaded program",
          answers=ok(A.RulesAnswer)),
    Route("POST", "/v1/admin/rules/reload", rules_reload, R({MANAGER}), None, "Reload the program from disk",
          answers=ok(A.ReloadAnswer)),
    Route("POST", "/v1/admin/rules/check", rules_check, R({MANAGER}), schema.RulesCheck,
          "Validate a program sent as {files: {path: yaml}} without loading it", answers=ok(A.CheckAnswer)),
    Route("GET", "/v1/admin/rules/versions", rules_versions, R({MANAGER}), None,
          "Each time a program version went live, newest first; ?limit= (1-100, 20) and ?before= (an id)",
          answers=ok(A.VersionsAnswer)),
    Route("GET", "/v1/admin/rules/versions/{version}", rules_version, R({MANAGER}), None,
          "A recorded program version with its files", answers=ok(A.VersionAnswer)),
    Route("POST", "/v1/admin/rules/deploy", rules_deploy, R({MANAGER}), schema.RulesDeploy,
          "Put a program sent as {files: {path: yaml}, reason} live: recorded, served and written into rules.dir",
          audit_detail=("reason",), answers=ok(A.PutLiveAnswer)),
    Route("POST", "/v1/admin/rules/rollback", rules_rollback, R({MANAGER}), schema.RulesRollback,
          "Put a recorded version live again: {version, reason}", audit_detail=("version", "reason"),
          answers=ok(A.PutLiveAnswer)),
    Route("GET", "/healthz", healthz, None, None, "Alive", answers=ok(A.HealthAnswer)),
    Route("GET", "/readyz", readyz, None, None,
          "Program loaded, database writable (no storage fault in force: full, busy, lost), cache preloaded",
          answers=ok(A.ReadyAnswer)),
    Route("GET", "/metrics", metrics, R({MONITOR, MANAGER}), None, "Prometheus metrics",
          answers=ok(None, "Prometheus text")),
    Route("GET", "/openapi.json", openapi, None, None, "This API as OpenAPI 3.1", answers=ok(A.OpenApiDocument)),
]
ROUTES += cvm.routes() + report_campaign.routes()


ADMIN_PREFIX = "/v1/admin/"
DETAIL_CHARS_MAX = 1000     # per field: a refused body may be any size up to max_body_bytes
PRINCIPAL = web.RequestKey("principal", Principal)   # the authenticated caller, for the audit log


def bind(route: Route):
    async def handle(request: web.Request) -> web.StreamResponse:
        principal = None
        slot = None
        in_flight = request.app[IN_FLIGHT]
        if route.roles is not None:
            principal = request.app[KEYRING].authenticate(request.headers.get("Authorization"))
            request[PRINCIPAL] = principal
            request.app[LIMITER].check(principal.key_id)
            require_role(principal, route.roles)
            slot = in_flight.enter_key(principal.key_id, request.path)
        try:
            for name, value in request.match_info.items():
                if "\0" in value:      # %00: refused as in a body (server/schema.py)
                    raise field_error(name, schema.NUL_WORDS)
            body = None
            if route.body is not None:
                raw = await request.read()
                if not raw:
                    raise ApiError(400, "malformed_json", "a JSON body is required")
                body = schema.decode(raw, route.body)
            call = Call(principal, dict(request.match_info), first_values(request.query), body)
            return response(await route.handler(request.app, call))
        finally:
            in_flight.leave_key(slot)
    handle.__name__ = route.handler.__name__
    handle.route = route    # for the audit middleware
    return handle


def first_values(query) -> dict[str, str]:
    """A repeated query parameter counts with its first value, as request.query.get gives it."""
    out: dict[str, str] = {}
    for name, value in query.items():
        out.setdefault(name, value)
    return out


def response(reply: Reply) -> web.Response:
    headers = {"Content-Type": reply.content_type}
    if reply.headers:
        headers.update(reply.headers)
    return web.Response(status=reply.status, body=reply.body, headers=headers)


@web.middleware
async def audit_middleware(request: web.Request, handler):
    """Every admin request by a known key, allowed or refused, goes into the audit log with
    the status it got (this runs outside the error middleware, so errors are answers here)."""
    response = await handler(request)
    principal = request.get(PRINCIPAL)
    if principal is not None and request.path.startswith(ADMIN_PREFIX):
        row = await audit_row(request, principal, response.status)
        try:
            await request.app[DATABASE].write(lambda conn: admin_audit.append(conn, **row))
        except Exception:
            log.exception("could not write the audit row for %s %s by %s", request.method,
                          request.match_info.route.resource.canonical, principal.key_id)
    return response


async def audit_row(request: web.Request, principal: Principal, status: int) -> dict:
    privacy = request.app[PRIVACY]
    match = dict(request.match_info)
    if "card" in match:     # the card's HMAC, never the number
        match["card"] = "hmac-" + privacy.card(match["card"])
    path = str(request.match_info.route.resource.url_for(**match)) if match else request.path
    try:
        raw = await request.read()
    except (web.HTTPException, ApiError):   # over the size limit or too late: digest what is known
        raw = b""
    route = getattr(request.match_info.handler, "route", None)
    # The time is the server's clock, the one the ledger uses.
    return dict(at=iso(request.app[CLOCK].now()), key_id=principal.key_id, key_name=principal.name,
                method=request.method, path=path, body_digest=privacy.body_digest(raw), status=status,
                detail=audit_detail(raw, route.audit_detail) if route else None)


def audit_detail(raw: bytes, fields: tuple[str, ...]) -> str | None:
    """The body's text fields named, as a JSON object (refused requests too: why someone
    tried is worth keeping); None when there are none or the body is not a JSON object, or
    one nested too deep to read (the request still gets its own answer)."""
    if not fields:
        return None
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    kept = {name: body[name][:DETAIL_CHARS_MAX] for name in fields if isinstance(body.get(name), str)}
    return msgspec.json.encode(kept).decode() if kept else None


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, bind(route), name=route.handler.__name__)
