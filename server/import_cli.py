"""`loyalty import members --csv FILE` and `loyalty import receipts --jsonl FILE`: the members
and the purchase history of a previous program, beside a serving server or alone.

Rows are checked as the API checks an enrollment or a receipt, then written in batches of
`--batch-rows`, each its own short transaction (storage/imports.py), so receipts arriving
meanwhile wait for one batch at most. A row whose card (members) or receipt identity
(receipts) is already stored is skipped, but for a member's changed CRM fields (counted as
updated): a rerun changes nothing, and a run that stopped half way is finished by running
it again. Every refused row is written to a report with
its line number and reason; the exit status is 0 when every row was taken (imported now
or before), 1 when some were refused or the run was stopped, 2 when it could not start,
130 when Ctrl-C stopped it (after the batch being written).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Callable, Iterator

import msgspec

from rules import Program, ProgramError, load_program
from server import databases, schema, validation
from server.clock import Clock
from server.config import ConfigError
from server.errors import ApiError
from server.interrupt import INTERRUPTED_STATUS, stop_between_batches
from server.privacy import Privacy, command_keys_problem, privacy_from_config
from server.reports import ProgressBar
from storage import imports
from storage.health import MigrationsBusy, StorageBusy, StorageError, is_busy
from storage.ledger import CONSENT_CHANNELS, PostingRef, iso
from storage.sql import unreachable_errors

BATCH_ROWS_DEFAULT = 1_000
BATCH_ROWS_MAX = 10_000
# Rows a file may hold: each run keeps every card or receipt identity it has read, to name
# the line a repeated one first appeared on (about 150 bytes each).
FILE_ROWS_MAX = 20_000_000
# A JSON line longer than this is refused unread; the API takes no larger body either.
LINE_BYTES_MAX = 1024 * 1024
# Refused rows printed to stderr; the report file has them all.
REFUSED_SHOWN_MAX = 10
TAG_SEPARATOR = ";"
# Only the one form: 20261124 or 2026-W48-2 are dates to Python, and typos to a person.
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
MEMBER_COLUMNS = ("card", "phone", "birthday", "tags", "opening_points", "opening_expires_on", "enrolled_on",
                  "crm_id", "consent")
JSON = msgspec.json.Encoder()


class RowRefused(Exception):
    def __init__(self, field_path: str, reason: str):
        super().__init__(f"{field_path}: {reason}")
        self.field, self.reason = field_path, reason


class CannotStart(Exception):
    """The input or the configuration cannot be used at all: one line, exit 2."""


class Unreadable(Exception):
    """The file cannot be read on from some line: the run stops there."""


class Interrupted(Unreadable):
    """Ctrl-C: the run stops after the row being read, as at a line it cannot read."""


@dataclass
class Refusal:
    line: int
    field: str
    reason: str


@dataclass
class Tally:
    rows: int = 0
    imported: int = 0
    already: int = 0
    updated: int = 0        # members: rows of enrolled cards that changed their CRM fields
    refused: list[Refusal] = field(default_factory=list)

    def refuse(self, line: int, field_path: str, reason: str) -> None:
        self.refused.append(Refusal(line, field_path, reason))


@dataclass
class Context:
    """What every row is judged against: the program's calendar and the import's moment."""
    program: Program
    privacy: Privacy
    now: datetime

    @property
    def today(self) -> date:
        return self.now.astimezone(self.program.timezone).date()


def add_parser(sub) -> None:
    parser = sub.add_parser("import", help="members and purchase history from a previous program")
    kinds = parser.add_subparsers(dest="import_command", required=True)
    members = kinds.add_parser("members", help="members with their opening balances, from CSV")
    members.add_argument("--csv", required=True, dest="source",
                         help=f"a CSV file with a header row; columns {', '.join(MEMBER_COLUMNS)} (card required)")
    receipts = kinds.add_parser("receipts", help="receipts of the history, one JSON receipt a line")
    receipts.add_argument("--jsonl", required=True, dest="source",
                          help="one receipt a line in the API's shape (POST /v1/receipts)")
    for p in (members, receipts):
        p.add_argument("--config", default="config.yaml")
        p.add_argument("--report", help="where to write the refused rows: .json for JSON, else CSV "
                                        "(default: beside the input, <name>.refused.csv)")
        p.add_argument("--batch-rows", type=_batch_rows, default=BATCH_ROWS_DEFAULT,
                       help=f"rows per transaction, 1 to {BATCH_ROWS_MAX} (default {BATCH_ROWS_DEFAULT})")


def _batch_rows(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= BATCH_ROWS_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {BATCH_ROWS_MAX}, got {text!r}")
    return value


class Stopped(Exception):
    """A storage fault or Ctrl-C stopped the run; the batches committed before it stay."""

    def __init__(self, line: str, tally: Tally, status: int = 1):
        super().__init__(line)
        self.line, self.tally, self.status = line, tally, status


def dispatch(args) -> int:
    source = Path(args.source)
    report = Path(args.report) if args.report else source.with_name(source.stem + ".refused.csv")
    try:
        config = databases.config_for_command(args.config)
    except databases.CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    try:
        # The input first: a mistyped path would otherwise be reported as its report's folder.
        if not source.is_file():
            what = "a folder" if source.is_dir() else "not a regular file" if source.exists() else "no such file"
            raise CannotStart(f"{source}: {what}")
        _check_report_path(report)
        tally = run_import(config, args.import_command, source, args.batch_rows)
    except CannotStart as e:
        print(f"import {args.import_command}: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        _finish(e.tally, source, report, args.import_command)
        print(e.line, file=sys.stderr)
        return e.status
    return _finish(tally, source, report, args.import_command)


def _check_report_path(report: Path) -> None:
    """Before any row is written: the report is written after the last batch, too late to
    refuse the run then."""
    folder = report.parent
    if report.is_dir():
        why = "is a folder"
    elif not folder.is_dir():
        why = f"is in {folder}, which {'is not a folder' if folder.exists() else 'does not exist'}"
    elif not os.access(folder, os.W_OK):
        why = f"cannot be written in {folder}"
    else:
        return
    raise CannotStart(f"the report {report} {why} (--report); nothing was imported")


def run_import(config, kind: str, source: Path, batch_rows: int) -> Tally:
    try:
        privacy = privacy_from_config(config)
    except ConfigError as e:
        raise CannotStart(f"config error: {e}") from None
    try:
        program = load_program(config.resolve(config.rules.dir))
    except ProgramError as e:
        raise CannotStart(f"the program in {config.rules.dir} does not load: {e.problems[0]}") from None
    ctx = Context(program, privacy, Clock(config.clock.start).now())
    db = databases.for_command(config)
    tally = Tally()
    try:
        db.open()
        if refused := db.read_sync(lambda conn: command_keys_problem(conn, privacy)):
            raise CannotStart(f"{refused}; nothing was imported")
        importer = MemberImport(ctx, db, tally) if kind == "members" else ReceiptImport(ctx, db, tally, source)
        importer.run(source, batch_rows, ProgressBar(f"importing {kind}"))
    except (StorageError, *unreachable_errors(), MigrationsBusy) as e:
        raise Stopped(_why_stopped(e, config), tally) from None
    finally:
        db.close()
        program.close()
    return tally


def _why_stopped(e: Exception, config) -> str:
    where = databases.described(config)
    if isinstance(e, StorageBusy) or is_busy(e):
        from server.startup import lock_holder
        db_path = config.resolve(config.database.path)
        return (f"import stopped: the database {db_path} is locked by {lock_holder(db_path)} for longer than "
                f"database.busy_wait_seconds ({config.database.busy_wait_seconds:g}s); the batches already "
                f"written stay, run the same import again once the lock is released")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"import stopped: cannot write to {where}: {first_line}; the batches already written stay"


def _finish(tally: Tally, source: Path, report: Path, kind: str) -> int:
    tally.refused.sort(key=lambda r: r.line)
    write_report(report, tally.refused)
    for r in tally.refused[:REFUSED_SHOWN_MAX]:
        print(f"{source}:{r.line}: {r.field}: {r.reason}", file=sys.stderr)
    if len(tally.refused) > REFUSED_SHOWN_MAX:
        print(f"... and {len(tally.refused) - REFUSED_SHOWN_MAX} more refused rows in {report}", file=sys.stderr)
    # Receipts are never changed by a rerun; a member's CRM fields are, and that is not "already there".
    updated = f"{tally.updated} updated, " if kind == "members" else ""
    print(f"{source}: {tally.rows} {kind} rows: {tally.imported} imported, {updated}{tally.already} already there, "
          f"{len(tally.refused)} refused (report: {report})")
    return 1 if tally.refused else 0


def write_report(path: Path, refused: list[Refusal]) -> None:
    """Written on every run, so a report left by an earlier run never stays behind."""
    rows = [{"line": r.line, "field": r.field, "reason": r.reason} for r in refused]
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["line", "field", "reason"])
        writer.writeheader()
        writer.writerows(rows)


def count_lines(path: Path) -> int:
    """For the progress bar: lines of the file, a last one without a newline included."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


class Importer:
    """Reads rows, keeps the first line of each identity, writes full batches."""

    def __init__(self, ctx: Context, db: databases.CommandDatabase, tally: Tally):
        self.ctx, self.db, self.tally = ctx, db, tally
        self.first_line: dict = {}

    def run(self, source: Path, batch_rows: int, progress: Callable[[int, int], None]) -> None:
        total = count_lines(source)
        batch: list = []
        try:
            with stop_between_batches() as stop:
                for line, item in self.rows(source):
                    self.tally.rows += 1
                    if self.tally.rows > FILE_ROWS_MAX:
                        raise Unreadable(f"{source}:{line}: more than {FILE_ROWS_MAX} rows; split the file, the rows "
                                         "before this line were taken")
                    if item is not None:
                        batch.append(item)
                    if len(batch) >= batch_rows:
                        self.write(batch)
                        batch = []
                        progress(line, total)
                    if stop.requested:
                        raise Interrupted(f"{source}:{line}: interrupted (Ctrl-C) after this line; the rows up to "
                                          "it were taken, run the same import again to finish it")
        except Unreadable as e:
            if batch:
                self.write(batch)
            raise Stopped(str(e), self.tally, INTERRUPTED_STATUS if isinstance(e, Interrupted) else 1) from None
        if batch:
            self.write(batch)
        progress(total, total)

    def repeated(self, identity, line: int, what: str) -> None:
        first = self.first_line.setdefault(identity, line)
        if first != line:
            raise RowRefused(what, f"repeats line {first}")

    def rows(self, source: Path) -> Iterator[tuple[int, object | None]]:
        raise NotImplementedError

    def write(self, batch: list) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- members

class MemberImport(Importer):
    def rows(self, source: Path) -> Iterator[tuple[int, imports.MemberRow | None]]:
        with open(source, "rb") as f:
            reader = csv.reader(_utf8_lines(f))
            header = _member_header(_next(reader, source), source)
            while (values := _next(reader, source)) is not None:
                line = reader.line_num
                if not any(v.strip() for v in values):
                    continue
                try:
                    if len(values) != len(header):
                        raise RowRefused("$", f"has {len(values)} fields, the header {len(header)}")
                    row = member_row(dict(zip(header, values)), line, self.ctx)
                    self.repeated(row.card, line, "card")
                    if row.crm_id is not None:
                        self.repeated(("crm_id", row.crm_id), line, "crm_id")
                except RowRefused as e:
                    self.tally.refuse(line, e.field, e.reason)
                    yield line, None
                    continue
                yield line, row

    def write(self, batch: list[imports.MemberRow]) -> None:
        now = iso(self.ctx.now)
        today = self.ctx.today.isoformat()
        note = "opening balance"
        profile_events = [event.id for event in self.ctx.program.events_on("profile_completed")]

        def fn(conn):
            # A new PostingRef each time: the database may run fn again in a fresh transaction.
            at = PostingRef(effective_at=now, created_at=now, rules_version=self.ctx.program.version,
                            ref="opening", note=note)
            return imports.insert_members(conn, batch, today=today, at=at, profile_events=profile_events,
                                          first_tier=self.ctx.program.tier_for(0)[0])
        done = self.db.write_sync(fn)
        for line in done.crm_id_taken:
            self.tally.refuse(line, "crm_id", "belongs to another member")
        for line, why in done.retired:
            self.tally.refuse(line, "card", f"was taken out of use ({why}): its points are with the member "
                                            "that took it over; enrol another card")
        self.tally.already += len(done.skipped)
        self.tally.updated += len(done.updated)
        self.tally.imported += len(batch) - len(done.skipped) - len(done.updated) - len(done.crm_id_taken) \
            - len(done.retired)


def _utf8_lines(f) -> Iterator[str]:
    """Decoded line by line, so bytes that are not UTF-8 are found on their own line; a
    spreadsheet's byte-order mark before the header is dropped."""
    for i, raw in enumerate(f):
        yield raw.decode("utf-8-sig" if i == 0 else "utf-8")


def _next(reader, source: Path) -> list[str] | None:
    """The next row; a file that stops being CSV (or UTF-8) stops the run where it does."""
    try:
        return next(reader, None)
    except (csv.Error, UnicodeDecodeError) as e:
        raise Unreadable(f"{source}:{reader.line_num + 1}: cannot be read as UTF-8 CSV ({e}); the rows before "
                         "it were taken, fix the file and run it again") from None


def _member_header(header: list[str] | None, source: Path) -> list[str]:
    if header is None:
        raise CannotStart(f"{source} is empty: the first line must name the columns")
    names = [h.strip().lower() for h in header]
    unknown = [n for n in names if n not in MEMBER_COLUMNS]
    if unknown:
        raise CannotStart(f"{source}: unknown column {unknown[0]!r} in the header; the columns are "
                          f"{', '.join(MEMBER_COLUMNS)}")
    if "card" not in names:
        raise CannotStart(f"{source}: the header has no card column")
    if len(set(names)) != len(names):
        raise CannotStart(f"{source}: a column is named twice in the header")
    return names


def member_row(values: dict[str, str], line: int, ctx: Context) -> imports.MemberRow:
    """One CSV row checked as POST /v1/members checks an enrollment, plus the opening balance
    and the enrollment date; raises RowRefused naming the column and what is wrong."""
    text = {k: v.strip() for k, v in values.items() if v.strip()}
    plain = {"card": text.get("card", "")}
    if "phone" in text:
        plain["phone"] = text["phone"]
    if "birthday" in text:
        plain["birthday"] = text["birthday"]
    if "tags" in text:
        plain["tags"] = [t.strip() for t in text["tags"].split(TAG_SEPARATOR) if t.strip()]
    try:
        member = msgspec.convert(plain, schema.Enrollment)
    except msgspec.ValidationError:
        found = validation.find(plain, schema.Enrollment)
        path, words = found.listed[0] if found.listed else ("$", "is not a valid member")
        raise RowRefused(path.split("[")[0], words) from None
    if member.birthday and (problem := schema.birthday_problem(member.birthday, ctx.today)):
        raise RowRefused("birthday", problem)
    points, expires_on = _opening(text, ctx)
    crm_id, consent = _crm(text)
    privacy = ctx.privacy
    return imports.MemberRow(
        line=line, card=privacy.card(member.card), card_last4=privacy.card_last4(member.card),
        phone_hmac=privacy.phone(member.phone) if member.phone else None,
        phone_last4=privacy.phone_last4(member.phone) if member.phone else None,
        birthday=member.birthday.isoformat() if member.birthday else None,
        tags=JSON.encode(sorted(set(member.tags))).decode(),
        enrolled_at=_enrolled_at(text.get("enrolled_on"), ctx), opening_points=points,
        opening_expires_on=expires_on, crm_id=crm_id, consent=consent)


def _crm(text: dict[str, str]) -> tuple[str | None, frozenset[str] | None]:
    """The CRM's id for the member and the channels they consented to (`sms;email`), checked
    as PATCH /v1/members checks them; consent None when the column is empty (none given)."""
    crm_id = text.get("crm_id")
    if crm_id is not None:
        try:
            msgspec.convert({"crm_id": crm_id}, schema.MemberPatch)
        except msgspec.ValidationError:
            raise RowRefused("crm_id", "must be up to 64 characters without spaces") from None
    if "consent" not in text:
        return crm_id, None
    channels = [c.strip().lower() for c in text["consent"].split(TAG_SEPARATOR) if c.strip()]
    unknown = [c for c in channels if c not in CONSENT_CHANNELS]
    if unknown:
        raise RowRefused("consent", f"{unknown[0][:20]!r} is not a channel: list some of "
                                    f"{', '.join(CONSENT_CHANNELS)} separated by {TAG_SEPARATOR}")
    return crm_id, frozenset(channels)


def _opening(text: dict[str, str], ctx: Context) -> tuple[int, str | None]:
    """The opening balance and its expiry date: a date after the import's day, or, when
    left empty, the program's expiry_days from that day (as an adjustment's points)."""
    raw = text.get("opening_points", "0")
    if not raw.isdigit() or int(raw) > schema.POINTS_MAX:
        raise RowRefused("opening_points", f"must be a whole number of points from 0 to {schema.POINTS_MAX}")
    points = int(raw)
    if not points:
        return 0, None
    today = ctx.today
    if "opening_expires_on" not in text:
        days = ctx.program.expiry_days
        return points, (today + timedelta(days=days)).isoformat() if days else None
    expires_on = _date(text["opening_expires_on"], "opening_expires_on")
    if expires_on <= today:
        raise RowRefused("opening_expires_on", f"must be after the import's day {today}: points are gone "
                                               "from the first moment of their expiry date")
    return points, expires_on.isoformat()


def _enrolled_at(raw: str | None, ctx: Context) -> str:
    """The first moment of the enrollment day in the program's timezone; the import's moment
    when the column is empty."""
    if raw is None:
        return iso(ctx.now)
    day = _date(raw, "enrolled_on")
    if day > ctx.today:
        raise RowRefused("enrolled_on", f"must not be after the import's day {ctx.today}")
    return iso(datetime.combine(day, time(), ctx.program.timezone))


def _date(raw: str, column: str) -> date:
    try:
        if not ISO_DATE.fullmatch(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise RowRefused(column, f"must be a date like 2026-11-24, got {raw[:40]!r}") from None


# ---------------------------------------------------------------- receipts

class ReceiptImport(Importer):
    def __init__(self, ctx: Context, db: databases.CommandDatabase, tally: Tally, source: Path):
        super().__init__(ctx, db, tally)
        self.source = source.name

    def rows(self, source: Path) -> Iterator[tuple[int, imports.ReceiptRow | None]]:
        with open(source, "rb") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = receipt_row(raw, line, self.ctx)
                    if not self.first_time(row):
                        self.tally.already += 1
                        row = None
                except RowRefused as e:
                    self.tally.refuse(line, e.field, e.reason)
                    row = None
                yield line, row

    def first_time(self, row: imports.ReceiptRow) -> bool:
        """The same receipt twice in one file is taken once; one identity with two bodies is refused."""
        first = self.first_line.setdefault(row.key, (row.line, row.fingerprint))
        if first[0] != row.line and first[1] != row.fingerprint:
            raise RowRefused("receipt_id", f"repeats the identity of line {first[0]} with a different receipt")
        return first[0] == row.line

    def write(self, batch: list[imports.ReceiptRow]) -> None:
        now = iso(self.ctx.now)
        outcome = self.db.write_sync(lambda conn: imports.add_receipts(conn, batch, now=now, source=self.source))
        self.tally.imported += len(outcome.added)
        self.tally.already += len(outcome.already)
        for line in outcome.unknown_card:
            self.tally.refuse(line, "card", "is not enrolled: import the members first")
        for line in outcome.conflicting:
            self.tally.refuse(line, "receipt_id", "this identity is already stored with a different receipt")


def receipt_row(raw: bytes, line: int, ctx: Context) -> imports.ReceiptRow:
    """One JSON line checked as POST /v1/receipts checks a receipt, and as history: before the
    import's moment, paying with no points."""
    if len(raw) > LINE_BYTES_MAX:
        raise RowRefused("$", f"is longer than {LINE_BYTES_MAX} bytes")
    try:
        receipt = schema.decode(raw, schema.Receipt)
    except ApiError as e:
        detail = e.details[0] if e.details else {"path": "$", "message": e.message}
        raise RowRefused(detail["path"], detail["message"]) from None
    except (msgspec.DecodeError, ValueError) as e:
        raise RowRefused("$", f"is not valid JSON: {e}") from None
    _check_history(receipt, ctx)
    card = ctx.privacy.card(receipt.card) if receipt.card is not None else None
    # Stored with the card's HMAC in place of the number, as the receipt path stores bodies.
    body = schema.canonical(receipt if card is None else msgspec.structs.replace(receipt, card=card))
    key = (receipt.store_id, receipt.register_id, receipt.receipt_id)
    local_date = receipt.ts.astimezone(ctx.program.timezone).date().isoformat()
    earlier = tuple(imported_fingerprint(schema.canonical(msgspec.structs.replace(receipt, card=older)))
                    for older in getattr(card, "older", ()))
    return imports.ReceiptRow(line=line, key=key, card=card, fingerprint=imported_fingerprint(body),
                              ts=iso(receipt.ts), local_date=local_date, total=receipt.total, body=body,
                              result=imported_answer(key), earlier_fingerprints=earlier)


def _check_history(receipt: schema.Receipt, ctx: Context) -> None:
    if receipt.ts.tzinfo is None:
        raise RowRefused("ts", "needs a UTC offset, e.g. 2026-11-24T12:00:00+02:00")
    if receipt.ts > ctx.now:
        raise RowRefused("ts", f"is after the import's moment {ctx.now.isoformat(timespec='seconds')}: "
                               "only past receipts are history")
    if receipt.redeem_points:
        raise RowRefused("redeem_points", "must be 0: points spent before the program are in the opening balance")
    seen: set[int] = set()
    for i, ln in enumerate(receipt.lines):
        if ln.line_no in seen:
            raise RowRefused(f"lines[{i}].line_no", f"repeats line_no {ln.line_no}")
        seen.add(ln.line_no)
        if not ln.qty.is_finite() or ln.qty <= 0:
            raise RowRefused(f"lines[{i}].qty", "must be > 0")


def imported_fingerprint(body: bytes) -> bytes:
    """Differs from the fingerprint of the same receipt confirmed at a till, so a register
    sending an imported receipt's identity gets 409, never a replay of what the import stored."""
    return hashlib.sha256(b"imported\0" + body).digest()


def imported_answer(key) -> bytes:
    """What the receipt earned and spent here: nothing (audit verify checks its postings against it)."""
    return JSON.encode({"receipt": {"store_id": key[0], "register_id": key[1], "receipt_id": key[2]},
                        "imported": True, "rules_version": imports.IMPORTED_RULES_VERSION,
                        "accrued": {"points": 0, "by_rule": [], "by_line": []},
                        "redeemed": {"points": 0, "discount": 0, "by_line": []}, "messages": []})

