"""The console's pages. Each handler is a page: it reads through the operations (server/ops/), program
holder and database (as server/routes.py does) and renders a template.

A refused action is shown on the page in the one error shape (server/errors.py builds it);
the one JSON endpoint, the check as you type, answers it as JSON like the API.
"""
from __future__ import annotations

import logging
import secrets
from datetime import date, datetime, time as dtime, timedelta
from functools import wraps
from urllib.parse import quote, urlsplit

import msgspec
from aiohttp import web

from rules import ProgramError
from server import campaign_definitions, program_versions, schema
from server.auth import Principal
from server.console import chart, program_edit, queries, words
from server.console.backtest import as_rows
from server.console.sessions import COOKIE, LOGIN_COOKIE, LOGIN_FORM_SECONDS, Session, remember_lookup, token_matches
from server.cvm import definitions
from server.errors import ApiError, conflict, error_body, field_error, folder_clash, forbidden, not_found
from server.ops import adjustments, members
from server.keys import CLOCK, CONFIG, CONSOLE, DATABASE, KEYRING, LIMITER, OPS, PRIVACY, PROGRAMS
from server.reports import money_text
from server.replay_member import facts_for, from_record
from server.rules_tools import ToolError, decode_receipt, default_member, member_from_db
from storage import admin_audit, member_facts
from storage.ledger import iso, lots_of, member_by_id, member_id_of_card, statement

log = logging.getLogger("loyalty.console")
MANAGER = "manager"
DEPLOY_PATH = "/console/program/deploy"
ROLLBACK_PATH = "/console/program/rollback"
VERSIONS_PAGE_ROWS = 10
REASON_CHARS_MAX = 500      # as the API's deploy and rollback (schema.Reason)
STATEMENT_ROWS = 50
# The dashboard's link for a rule without a period of its own: its effect over these last days.
CAMPAIGN_RECENT_DAYS = 28
# No page loads anything from elsewhere or runs inline script; none may be framed. The
# referrer stays on this server (with no-referrer at all, the browser names a form's origin
# "null", and the origin check below could not tell this console from anywhere else).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class ConsoleCheck(msgspec.Struct, forbid_unknown_fields=True):
    """The body of the check as you type: one file of the program and its edited text."""
    file: str
    text: str


def see_other(location: str) -> web.Response:
    """After a form: the browser goes to the page showing the outcome (a reload does not resend)."""
    return web.Response(status=303, headers={**HEADERS, "Location": location})


def money_filter(minor_units: int, currency: str) -> str:
    return money_text(minor_units, currency)


def short_version(version: str | None) -> str:
    return (version or "")[:19]


# ------------------------------------------------------------------ plumbing

def render(request: web.Request, template: str, session: Session | None, status: int = 200,
           headers: dict[str, str] | None = None, **context) -> web.Response:
    console = request.app[CONSOLE]
    program = request.app[PROGRAMS].current
    text = console.templates.get_template(template).render(
        session=session, path=request.path, currency=program.currency if program else "", **context)
    return web.Response(text=text, content_type="text/html", headers={**HEADERS, **(headers or {})},
                        status=status)


def error_page(request: web.Request, session: Session | None, e: ApiError, template: str = "error.html",
               **context) -> web.Response:
    return render(request, template, session, e.status, e.headers, error=error_body(e.code, e.message,
                                                                                    e.details).error, **context)


def same_origin(request: web.Request) -> bool:
    """A browser names the page a POST came from; it must be this server."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


async def form_of(request: web.Request) -> dict[str, str]:
    """The posted fields; 400 for a body no browser sends (not UTF-8, a part without a name)."""
    try:
        form = await request.post()
    except ValueError as e:     # UnicodeDecodeError is one
        raise ApiError(400, "bad_request", f"the form could not be read: {e}") from None
    return {name: value for name, value in form.items() if isinstance(value, str)}


def page(handler=None, *, as_json: bool = False):
    """A handler for a signed-in manager: GET without a session goes to the sign-in page; a
    POST needs the session's CSRF token (form field `csrf` or header X-CSRF-Token) and this
    server as its origin. Refusals render as a page (as JSON for as_json)."""
    def decorate(handler):
        @wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            session = request.app[CONSOLE].sessions.get(request.cookies.get(COOKIE))
            try:
                if session is None:
                    if request.method == "GET":
                        return see_other("/console/login")
                    raise ApiError(401, "unauthorized", "the session has ended: sign in again")
                request.app[LIMITER].check(session.principal.key_id)
                form: dict[str, str] = {}
                if request.method == "POST":
                    form = {} if as_json else await form_of(request)
                    presented = form.get("csrf") or request.headers.get("X-CSRF-Token")
                    if not same_origin(request) or not token_matches(session.csrf, presented):
                        raise forbidden("the form is not from this console session (CSRF token); reload the page")
                return await handler(request, session, form)
            except ApiError as e:
                if as_json:
                    raise
                return error_page(request, session, e)
        return wrapped
    return decorate(handler) if handler else decorate


async def audit(request: web.Request, principal: Principal, body: bytes, status: int,
                detail: dict | None = None) -> None:
    app = request.app
    row = dict(at=iso(app[CLOCK].now()), key_id=principal.key_id, key_name=principal.name, method=request.method,
               path=request.path,
               body_digest=app[PRIVACY].body_digest(body), status=status,
               detail=msgspec.json.encode(detail).decode() if detail else None)
    await app[DATABASE].write(lambda conn: admin_audit.append(conn, **row))


def local_today(app) -> date:
    return app[CLOCK].now().astimezone(app[PROGRAMS].current.timezone).date()


def parse_day(raw: str | None, name: str) -> date:
    try:
        return date.fromisoformat(raw or "")
    except ValueError:
        raise field_error(name, "must be a date like 2026-11-24") from None


# ------------------------------------------------------------------ signing in and out

async def login_form(request: web.Request) -> web.Response:
    return _login_page(request)


def _login_page(request: web.Request, error: ApiError | None = None) -> web.Response:
    token = secrets.token_urlsafe(32)
    context = {"login_csrf": token}
    if error is not None:
        response = error_page(request, None, error, "login.html", **context)
    else:
        response = render(request, "login.html", None, **context)
    _set_cookie(request, response, LOGIN_COOKIE, token, LOGIN_FORM_SECONDS)
    return response


def _set_cookie(request: web.Request, response: web.Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, path="/console", httponly=True, samesite="Strict", max_age=max_age,
                        secure=request.app[CONFIG].console.secure_cookie)


async def login(request: web.Request) -> web.Response:
    """A manager key opens a session; the key itself is not kept anywhere."""
    app = request.app
    try:
        form = await form_of(request)
        if not same_origin(request) or not token_matches(request.cookies.get(LOGIN_COOKIE, ""), form.get("csrf")):
            raise forbidden("the sign-in form has expired or is not from this server; try again")
        principal = app[KEYRING].authenticate(f"Bearer {form.get('key', '')}")
        # As on the API, a known key's bucket; an unknown key gets none (the buckets stay bounded).
        app[LIMITER].check(principal.key_id)
        if principal.role != MANAGER:
            await audit(request, principal, b"", 403)
            raise forbidden(f"a {principal.role} key may not use the console: sign in with a manager key")
    except ApiError as e:
        return _login_page(request, e)
    session_id, _session = app[CONSOLE].sessions.open(principal)
    await audit(request, principal, b"", 303)
    response = see_other("/console")
    _set_cookie(request, response, COOKIE, session_id, None)
    response.del_cookie(LOGIN_COOKIE, path="/console")
    return response


@page
async def logout(request: web.Request, session: Session, form: dict) -> web.Response:
    request.app[CONSOLE].sessions.close(request.cookies.get(COOKIE))
    await audit(request, session.principal, b"", 303)
    response = see_other("/console/login")
    response.del_cookie(COOKIE, path="/console")
    return response


async def static(request: web.Request) -> web.Response:
    found = request.app[CONSOLE].static.get(request.match_info["name"])
    if found is None:
        raise not_found("not_found", "no such file")
    return web.Response(body=found[0], content_type=found[1], headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------ dashboard

@page
async def dashboard(request: web.Request, session: Session, form: dict) -> web.Response:
    app = request.app
    program = app[PROGRAMS].current
    day = local_today(app)
    start = datetime.combine(day, dtime.min, program.timezone)
    numbers = await app[DATABASE].read(lambda conn: queries.today(
        conn, program.partners, day.isoformat(), iso(start), iso(start + timedelta(days=1))))
    return render(request, "dashboard.html", session, day=day, numbers=numbers, program=program,
                  point_value=program.point_value, reload=app[PROGRAMS].last_reload,
                  campaigns=_holdout_rules(app, day), recent_days=CAMPAIGN_RECENT_DAYS)


# ------------------------------------------------------------------ the program

@page
async def program_page(request: web.Request, session: Session, form: dict) -> web.Response:
    app = request.app
    holder = app[PROGRAMS]
    program = holder.current
    before = request.query.get("before")
    before_id = _load_id(before, "before") if before is not None else None

    def read(conn):
        actions = []
        for path in (DEPLOY_PATH, ROLLBACK_PATH):
            actions += admin_audit.rows(conn, VERSIONS_PAGE_ROWS, path)
        actions.sort(key=lambda row: row["id"], reverse=True)
        # One more than a page: whether there is an older page to link to.
        return actions[:VERSIONS_PAGE_ROWS], program_versions.list_versions(conn, VERSIONS_PAGE_ROWS + 1, before_id)
    actions, loads = await app[DATABASE].read(read)
    for row in actions:
        row["detail"] = msgspec.json.decode(row["detail"]) if row["detail"] else {}
    older = loads[VERSIONS_PAGE_ROWS - 1]["id"] if len(loads) > VERSIONS_PAGE_ROWS else None
    return render(request, "program.html", session, program=program, directory=holder.directory,
                  groups=words.by_group(program.rule_summaries), reload=holder.last_reload, actions=actions,
                  loads=loads[:VERSIONS_PAGE_ROWS], older=older, paged=before_id is not None)


def _load_id(raw: str, name: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= program_versions.LOAD_ID_MAX:
        raise field_error(name, "must be the id of a listed version (a positive whole number)")
    return value


@page
async def version_page(request: web.Request, session: Session, form: dict) -> web.Response:
    """A recorded version's files, as they went live."""
    version = request.match_info["version"]
    try:
        info = await request.app[DATABASE].read(lambda conn: program_versions.version_files(conn, version))
    except program_versions.UnknownVersion as e:
        raise not_found("unknown_version", str(e)) from None
    return render(request, "version.html", session, info=info, serving=request.app[PROGRAMS].current.version)


async def live_files(app) -> dict[str, bytes]:
    try:
        return await program_versions.live_files(app)
    except ProgramError as e:
        raise program_edit.invalid(e.problems) from None


@page
async def edit_page(request: web.Request, session: Session, form: dict) -> web.Response:
    name = request.query.get("file", "")
    text = program_edit.file_text(await live_files(request.app), name)
    return _editor(request, session, name, text, program_edit.sha256_text(text))


def _editor(request, session, name: str, text: str, base_sha256: str, error: ApiError | None = None,
            problems: list | None = None) -> web.Response:
    today = local_today(request.app)
    context = dict(file=name, text=text, base_sha256=base_sha256, problems=problems or [],
                   first=(today - timedelta(days=30)).isoformat(), last=today.isoformat(),
                   file_max_bytes=request.app[CONFIG].console.file_max_bytes)
    if error is not None:
        return error_page(request, session, error, "edit.html", **context)
    return render(request, "edit.html", session, **context)


@page(as_json=True)
async def check(request: web.Request, session: Session, form: dict) -> web.Response:
    """The edited text checked as `loyalty rules check` would: every error and warning with its place."""
    app = request.app
    body = msgspec.json.decode(await request.read(), type=ConsoleCheck)
    found = program_edit.check(await live_files(app), body.file, body.text, app[CONFIG].console.file_max_bytes,
                               app[CLOCK].now())
    problems = [{"file": p.file, "line": p.line, "column": p.column, "message": p.message, "warning": p.warning}
                for p in found]
    return web.json_response({"ok": not any(not p.warning for p in found), "problems": problems},
                             headers={"Cache-Control": "no-store"})


@page
async def start_backtest(request: web.Request, session: Session, form: dict) -> web.Response:
    app = request.app
    max_bytes, now = app[CONFIG].console.file_max_bytes, app[CLOCK].now()
    name, text, base = form.get("file", ""), form.get("text", ""), form.get("base_sha256", "")
    try:
        live = await live_files(app)
        found = program_edit.check(live, name, text, max_bytes, now)
        errors = [p for p in found if not p.warning]
        if errors:
            raise program_edit.invalid(errors)
        job = await app[CONSOLE].backtests.start(
            key_id=session.principal.key_id, file=name, text=text, base_sha256=base,
            first=parse_day(form.get("from"), "from"), last=parse_day(form.get("to"), "to"),
            old_files=live, new_files=program_edit.edited(live, name, text, max_bytes), now=now)
    except ApiError as e:
        return _editor(request, session, name, text, base, e)
    return see_other(f"/console/backtests/{job.id}")


@page
async def backtest_page(request: web.Request, session: Session, form: dict) -> web.Response:
    job = request.app[CONSOLE].backtests.get(request.match_info["id"])
    if job is None:
        raise not_found("not_found", "no such backtest: it finished long ago or the server restarted")
    # The run's thread sets the report before the state, so a state read first is never ahead of it.
    state = job.state
    running = state == "running"
    return render(request, "backtest.html", session, headers={"Refresh": "1"} if running else None, job=job,
                  state=state, report=None if running else job.report, rows=[] if running else as_rows(job))


@page
async def deploy(request: web.Request, session: Session, form: dict) -> web.Response:
    """The edit a backtest ran on, put live through program_versions.deploy: recorded with who
    and why, served by every server on the database, written into rules.dir. The program's
    other files stay as they are in the live program. Audited with the reason, refused or not."""
    app = request.app
    job = app[CONSOLE].backtests.get(form.get("backtest", ""))
    if job is None or job.state != "done":
        raise field_error("backtest", "must be a finished backtest of this edit")
    reason = form.get("reason", "").strip()
    serving = app[PROGRAMS].current.version
    who = session.principal.key_id

    async def put_live() -> dict:
        _require_reason(reason, "say why this change goes live")
        live = await live_files(app)
        program_edit.refuse_if_changed(job.file, job.base_sha256, live, app[PROGRAMS].directory)
        files = program_edit.edited(live, job.file, job.text, app[CONFIG].console.file_max_bytes)
        return await program_versions.deploy(app, _texts(files), who, reason, source="console", base_version=serving)

    try:
        await _audited_put_live(request, session, job.text.encode(), {"reason": reason, "file": job.file,
                                                                      "previous_version": serving}, put_live)
    except ApiError as e:   # the refusal keeps the edit on the page: it is the only copy of it
        return error_page(request, session, e, kept_edit={"file": job.file, "text": job.text})
    return see_other("/console/program")


@page
async def rollback(request: web.Request, session: Session, form: dict) -> web.Response:
    """A recorded version live again through program_versions.rollback, audited with the reason."""
    app = request.app
    version, reason = form.get("version", ""), form.get("reason", "").strip()
    detail = {"reason": reason, "version": version, "previous_version": app[PROGRAMS].current.version}

    async def put_live() -> dict:
        _require_reason(reason, "say why the program goes back to this version")
        return await program_versions.rollback(app, version, session.principal.key_id, reason)

    await _audited_put_live(request, session, msgspec.json.encode({"version": version, "reason": reason}), detail,
                            put_live)
    return see_other("/console/program")


def _require_reason(reason: str, why: str) -> None:
    if not 1 <= len(reason) <= REASON_CHARS_MAX:
        raise field_error("reason", f"must be 1 to {REASON_CHARS_MAX} characters: {why}")


def _texts(files: dict[str, bytes]) -> dict[str, str]:
    try:
        return {name: raw.decode("utf-8") for name, raw in files.items()}
    except UnicodeDecodeError:
        raise field_error("file", "the live program has a file that is not UTF-8 text") from None


async def _audited_put_live(request: web.Request, session: Session, body: bytes, detail: dict, operation) -> dict:
    """Runs the deploy or roll-back; its domain errors become the answers the API gives them.
    Audited either way: refused with the status, done with the version and its record."""
    try:
        try:
            answer = await operation()
        except ProgramError as e:
            raise program_edit.invalid(e.problems) from None
        except program_versions.UnknownVersion as e:
            raise field_error("version", f"is not a recorded program version ({e})", "unknown_version") from None
        except program_versions.ProgramChanged as e:
            raise conflict("program_changed", f"{e}; open the file again and redo the change") from None
        except program_versions.FolderClash as e:
            raise folder_clash(e.name, e.reason) from None
        except program_versions.FolderUnwritable as e:
            raise ApiError(503, "rules_dir_unwritable", f"{e}; the previous version keeps serving") from None
    except ApiError as e:
        # Why, for the program page's list of deploys: a bare status tells a manager nothing.
        await audit(request, session.principal, body, e.status, {**detail, "refused": e.code})
        raise
    detail.update(version=answer["version"], load_id=answer["load_id"], changed=answer["changed"])
    if "folder_error" in answer:
        detail["folder_error"] = answer["folder_error"]
    await audit(request, session.principal, body, 303, detail)
    return answer


# ------------------------------------------------------------------ explain

@page
async def explain_form(request: web.Request, session: Session, form: dict) -> web.Response:
    recent = await request.app[DATABASE].read(queries.recent_receipts)
    return render(request, "explain.html", session, recent=recent, receipt_json="", chosen="", result=None)


@page
async def explain(request: web.Request, session: Session, form: dict) -> web.Response:
    app = request.app
    recent = await app[DATABASE].read(queries.recent_receipts)
    context = dict(recent=recent, receipt_json=form.get("receipt", ""), chosen=form.get("stored", ""), result=None)
    try:
        receipt, card_hmac, stored = await _receipt_to_explain(app, form)
        program, now = app[PROGRAMS].current, app[CLOCK].now()
        member, source = await app[DATABASE].read(
            lambda conn: _member_to_explain(conn, program, receipt, card_hmac, stored, now, app[PRIVACY].coupon))
        result = program.explain(receipt, member or default_member(program, "-"), receipt.redeem_points, None)
    except ApiError as e:
        return error_page(request, session, e, "explain.html", **context)
    context["result"] = result
    return render(request, "explain.html", session, member_source=source, **context)


def _member_to_explain(conn, program, receipt, card_hmac: str | None, stored: tuple | None, now, coupon_mac):
    """(facts, where they come from): a stored receipt's recorded facts (`recorded`), else
    the member as they are now (`now`), else none (`unknown`)."""
    if stored is not None:
        record = member_facts.read(conn, stored)
        if record is not None:
            return facts_for(program, from_record(record), "-"), "recorded"
    if card_hmac:
        member = member_from_db(conn, program, card_hmac, receipt, now, coupon_mac)
        if member is not None:
            return member, "now"
    return None, "unknown"


async def _receipt_to_explain(app, form: dict):
    """(receipt, its card's HMAC, its key when stored): a stored receipt (its body carries
    the HMAC) or pasted JSON."""
    try:
        if form.get("stored"):
            parts = form["stored"].split("/")
            if len(parts) != 3:
                raise field_error("stored", "must be STORE/REGISTER/RECEIPT")
            body = await app[DATABASE].read(lambda conn: queries.stored_body(conn, *parts))
            if body is None:
                raise field_error("stored", "is not a stored receipt")
            receipt = decode_receipt(body, f"receipt {form['stored']}")
            return receipt, receipt.card, tuple(parts)
        raw = form.get("receipt", "").strip()
        if not raw:
            raise field_error("receipt", "paste a receipt's JSON or pick a stored receipt")
        receipt = decode_receipt(raw.encode(), "the pasted receipt")
        return receipt, app[PRIVACY].card(receipt.card) if receipt.card else None, None
    except ToolError as e:
        raise field_error("stored" if form.get("stored") else "receipt", str(e)) from None


# ------------------------------------------------------------------ members

@page
async def members_form(request: web.Request, session: Session, form: dict) -> web.Response:
    return render(request, "members.html", session, matches=None)


@page
async def member_lookup(request: web.Request, session: Session, form: dict) -> web.Response:
    """By card or phone: found members get a handle, so their page's URL carries no number."""
    app = request.app
    card, phone = form.get("card", "").strip(), form.get("phone", "").strip()
    if card:
        member_id = await app[DATABASE].read(lambda conn: member_id_of_card(conn, app[PRIVACY].card(card)))
        if member_id is None:
            raise ApiError(404, "unknown_card", f"card {card} is not enrolled", [{"path": "card", "message": "not enrolled"}])
        return see_other(f"/console/members/{remember_lookup(session, 'card', card)}")
    if not phone:
        raise field_error("card", "give a card number or a phone number")
    found = await app[DATABASE].read(lambda conn: queries.members_by_phone(conn, app[PRIVACY].phone(phone)))
    if not found:
        raise ApiError(404, "unknown_phone", "no member has this phone number", [{"path": "phone", "message": "no member"}])
    if len(found) == 1:
        return see_other(f"/console/members/{remember_lookup(session, 'member', str(found[0]))}")
    matches = [{"handle": remember_lookup(session, "member", str(m)), "member_id": m} for m in found]
    return render(request, "members.html", session, matches=matches)


def _looked_up(session: Session, handle: str) -> tuple[str, str]:
    found = session.lookups.get(handle)
    if found is None:
        raise not_found("not_found", "look the member up again (look-ups last as long as the session)")
    return found


@page
async def member_page(request: web.Request, session: Session, form: dict) -> web.Response:
    return await _member(request, session, request.match_info["handle"])


async def _member(request, session: Session, handle: str, error: ApiError | None = None,
                  adjustment: dict | None = None) -> web.Response:
    app = request.app
    kind, value = _looked_up(session, handle)
    deps, program = app[OPS], app[PROGRAMS].current
    privacy = app[PRIVACY]

    def read(conn):
        member_id = member_id_of_card(conn, privacy.card(value)) if kind == "card" else int(value)
        member = member_by_id(conn, member_id)
        view = members.member_view(deps, conn, program, member, card=value if kind == "card" else None)
        return view, lots_of(conn, member_id), statement(conn, member_id, None, None, STATEMENT_ROWS)
    view, lots, postings = await app[DATABASE].read(read)
    for posting in postings:    # an adjustment names who made it
        posting["by"] = app[KEYRING].name_of(posting.get("key_id"))
    day = local_today(app).isoformat()
    context = dict(handle=handle, by_card=kind == "card", view=view, postings=postings, day=day,
                   lots=[{"id": lot.id, "available_from": lot.available_from, "expires_on": lot.expires_on,
                          "remaining": lot.remaining, "state": lot.state_on(day)} for lot in lots],
                   adjustment_id=secrets.token_hex(8), adjustment=adjustment)
    if error is not None:
        return error_page(request, session, error, "member.html", **context)
    return render(request, "member.html", session, **context)


@page
async def adjust(request: web.Request, session: Session, form: dict) -> web.Response:
    """A manual adjustment through server/ops/adjustments.py, as POST /v1/admin/adjustments makes it, audited
    with its reason. The form's adjustment id makes a second click a replay, not a second one."""
    app = request.app
    handle = request.match_info["handle"]
    kind, value = _looked_up(session, handle)
    card = value if kind == "card" else form.get("card", "").strip()
    raw = msgspec.json.encode({"card": card, "points": _points(form.get("points")),
                               "reason": form.get("reason", "").strip(),
                               "adjustment_id": "console-" + form.get("adjustment_id", "")})
    try:
        if kind != "card":
            owner = await app[DATABASE].read(lambda conn: member_id_of_card(conn, app[PRIVACY].card(card)))
            if owner != int(value):
                raise field_error("card", "must be a card of this member")
        req = schema.decode(raw, schema.Adjustment)
        status, _result = await adjustments.adjust(app[OPS], req, session.principal)
    except ApiError as e:
        await audit(request, session.principal, raw, e.status, {"reason": form.get("reason", "")})
        return await _member(request, session, handle, e)
    await audit(request, session.principal, raw, status, {"reason": req.reason, "points": req.points})
    return await _member(request, session, handle, adjustment={"points": req.points, "replayed": status == 200})


def _points(raw: str | None) -> int | str:
    try:
        return int(raw or "")
    except ValueError:
        return raw or ""      # decoding refuses it with the schema's own words


# ------------------------------------------------------------------ campaign effect

def _holdout_rules(app, today: date) -> list[dict]:
    """The live program's rules with a control group, in the program's order: id, share held
    out, period, and the address of the latest report (its own period, else the last days)."""
    out = []
    for rule in definitions(app).rules.values():
        if rule.holdout is None:
            continue
        period = (rule.period_from, rule.period_to) if rule.period_from and rule.period_to else None
        latest = f"/console/campaigns?rule={quote(rule.id)}"
        if period is None:
            first = today - timedelta(days=CAMPAIGN_RECENT_DAYS - 1)
            latest += f"&from={first.isoformat()}&to={today.isoformat()}"
        share = f"{rule.holdout * 100:f}"
        out.append({"id": rule.id, "percent": share.rstrip("0").rstrip(".") if "." in share else share,
                    "period": period, "latest": latest})
    return out


@page
async def campaigns(request: web.Request, session: Session, form: dict) -> web.Response:
    """The campaign effect of a rule with a holdout (GET /v1/admin/reports/campaigns/{rule}'s
    numbers, from the same functions) with its weekly chart; without ?rule= only the choice."""
    app = request.app
    query = request.query
    context = dict(rules=_holdout_rules(app, local_today(app)), chosen=query.get("rule", ""),
                   first=query.get("from", ""), last=query.get("to", ""), result=None, chart=None)
    if not context["chosen"]:
        return render(request, "campaigns.html", session, **context)
    live = campaign_definitions.Live(app[PROGRAMS].current, definitions(app).rules)
    rule_id, first, last = context["chosen"], query.get("from"), query.get("to")
    try:
        # One snapshot for both, so the chart's groups are the table's; refused as the API refuses it.
        result, chosen, weeks = await app[DATABASE].read(
            lambda conn: campaign_definitions.report(conn, live, rule_id, first, last, weeks=True))
    except ApiError as e:
        return error_page(request, session, e, "campaigns.html", **context)
    currency = app[PROGRAMS].current.currency
    first, last = chosen.first, chosen.last
    svg = chart.weekly_svg(weeks, result, currency, f"{rule_id}: spend per member by week, {first} to {last}")
    return render(request, "campaigns.html", session, **{
        **context, "first": first.isoformat(), "last": last.isoformat(), "result": result,
        "chart": svg, "verdict": effect_words(result["uplift"], currency)})


def effect_words(uplift: dict | None, currency: str) -> str:
    """Whether the 95 % interval of the uplift excludes zero, in plain words."""
    if uplift is None:
        return "No uplift: a group has no members in this period."
    if uplift["low"] is None:
        return "No interval: a group has fewer than two members, so chance cannot be told from an effect."
    interval = f"{money_text(uplift['low'], currency)} to {money_text(uplift['high'], currency)}"
    if uplift["low"] > 0:
        return (f"The campaign raised spend per member: the 95 % interval, {interval}, lies above zero, "
                "so chance alone is unlikely to explain the difference.")
    if uplift["high"] < 0:
        return (f"The treated members spent less per member: the 95 % interval, {interval}, lies below zero, "
                "so chance alone is unlikely to explain the difference.")
    return (f"No effect shown yet: the 95 % interval, {interval}, includes zero. Wait for more receipts "
            "rather than read the single estimate.")


# ------------------------------------------------------------------ routes

def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/console/login", login_form)
    r.add_post("/console/login", login)
    r.add_post("/console/logout", logout)
    r.add_get("/console/static/{name}", static)
    r.add_get("/console", dashboard)
    r.add_get("/console/program", program_page)
    r.add_get("/console/program/edit", edit_page)
    r.add_post("/console/program/check", check)
    r.add_post("/console/program/backtest", start_backtest)
    r.add_get("/console/backtests/{id}", backtest_page)
    r.add_post(DEPLOY_PATH, deploy)
    r.add_post(ROLLBACK_PATH, rollback)
    r.add_get("/console/program/versions/{version}", version_page)
    r.add_get("/console/explain", explain_form)
    r.add_post("/console/explain", explain)
    r.add_get("/console/campaigns", campaigns)
    r.add_get("/console/members", members_form)
    r.add_post("/console/members", member_lookup)
    r.add_get("/console/members/{handle}", member_page)
    r.add_post("/console/members/{handle}/adjust", adjust)
