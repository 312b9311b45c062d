"""Tools for people changing a program: explain one receipt, replay receipts through two
programs, export the stored receipts to replay.

`loyalty rules explain --config CFG RECEIPT.json [--card C] [--available N]`
`loyalty rules diff OLD_DIR NEW_DIR --receipts FILE.jsonl [--json]`
`loyalty export receipts --config CFG [--out FILE] [--from DATE] [--to DATE]`

They read the database (if at all) through their own read-only connection, so they can
run next to a live server.
"""
from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterable, Iterator
from contextlib import closing
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from rules import MemberFacts, Program, ProgramError, format_explanation, load_program
from server import validation
from server.databases import CannotOpen, config_for_command, described, read_connection, read_existing
from server.replay_member import OfferDrift, ReplayMember, facts_for, from_record
from server.schema import DECODERS, Receipt, every_problem, nulls_unsent
from storage import member_facts
from storage.ledger import unpack

EXPORT_BATCH_ROWS = 2_000
# A line of receipts as the API reads a body: every fraction exact, as qty decodes.
_plain_decoder = msgspec.json.Decoder(float_hook=Decimal)


class ToolError(Exception):
    """A problem the user can fix (bad file, unknown folder); printed without a traceback."""


def load(directory: str | Path) -> Program:
    try:
        return load_program(Path(directory))
    except ProgramError as e:
        raise ToolError(f"the program in {directory} does not load:\n" + "\n".join(str(p) for p in e.problems)) from None


def decode_receipt(data: bytes | dict, where: str) -> Receipt:
    """One receipt in the API's shape (an optional "member" object is read separately). A
    refused one lists every problem in the words a 422 from the API uses (server/validation.py).
    `data`: the JSON text, or its plain values with fractions as Decimal (_plain_decoder)."""
    try:
        if isinstance(data, dict):
            receipt = msgspec.convert(data, Receipt)
        else:
            receipt = DECODERS[Receipt].decode(data)
        nulls_unsent(receipt)
    except msgspec.ValidationError as e:
        if isinstance(data, dict):
            found = validation.find(data, Receipt)
            found = found if found.count else validation.from_error(e, Receipt)
        else:
            found = _every_problem_of_text(data, e, where)
        raise ToolError(_not_a_receipt(where, found)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ToolError(f"{where}: not JSON: {e}") from None
    if receipt.ts.tzinfo is None:
        found = validation.Problems()
        found.add("ts", "needs a UTC offset, e.g. 2026-11-24T12:00:00+02:00")
        raise ToolError(_not_a_receipt(where, found))
    return receipt


def _every_problem_of_text(data: bytes, first: msgspec.ValidationError, where: str) -> validation.Problems:
    try:
        return every_problem(data, Receipt, first)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:      # stops being JSON past its first problem
        raise ToolError(f"{where}: not JSON: {e}") from None


def _not_a_receipt(where: str, found: validation.Problems) -> str:
    """The API's problems as lines: `path words`, as a 422's message says the first one."""
    lines = [f"{where}: not a receipt ({'' if found.complete else 'at least '}{found.count} problem(s)):"]
    lines += [f"  {'the receipt' if path == '$' else path} {words}" for path, words in found.listed]
    if found.count > len(found.listed):
        lines.append(f"  and {'at least ' if not found.complete else ''}{found.count - len(found.listed)} more")
    return "\n".join(lines)


def default_member(program: Program, member_id: str = "-") -> MemberFacts:
    """A returning member of the program's first tier without tags, segments, offers or
    coupons: what a replay assumes when the receipt's member is not known."""
    return facts_for(program, None, member_id)


# ------------------------------------------------------------------ explain

def member_from_db(conn: sqlite3.Connection, program: Program, card: str, receipt: Receipt,
                   now: datetime | None = None, coupon_mac=None) -> MemberFacts | None:
    """The facts the rules see for card (its HMAC, server/privacy.py) on this receipt, read
    from the database as the member is now: what a receipt sent now would get.

    Tier: as the server computes it at the receipt's moment (a manual tier while valid, else
    the level reached over the window before ts). receipt_number: as the server counts it,
    in arrival order: the confirmed receipts that arrived before this one (all of them when
    it is not stored), plus one. Segments as they are at `now`, the offers valid at ts, and
    the receipt's coupon codes judged at ts without using them (coupon_mac: the key codes
    are stored under; without it the codes are not judged)."""
    from server.member_state import customer_value_facts
    from storage.ledger import member_by_card, receipts_confirmed_before

    member = member_by_card(conn, card)
    if member is None:
        return None
    if coupon_mac is None and receipt.coupons:
        receipt = msgspec.structs.replace(receipt, coupons=msgspec.UNSET)
    facts, _, _ = customer_value_facts(conn, program, member, receipt, card, coupon_mac,
                                       now or datetime.now(timezone.utc))
    before = receipts_confirmed_before(conn, member.id, (receipt.store_id, receipt.register_id, receipt.receipt_id))
    if before is None:
        return facts
    return msgspec.structs.replace(facts, receipt_number=before + 1)


def explain_command(config_path: str, receipt_path: str, card: str | None, available: int | None,
                    as_json: bool = False) -> int:
    from server.config import ConfigError, load_config

    if available is not None and available < 0:    # a balance below zero is a debt, which spends nothing
        print(f"--available must be 0 or more points, not {available}", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path)
        program = load(config.resolve(config.rules.dir))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ToolError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        try:
            raw = Path(receipt_path).read_bytes()
        except OSError as e:
            raise ToolError(f"{receipt_path}: {e.strerror or e}") from None
        receipt = decode_receipt(raw, receipt_path)
        card = card or receipt.card
        member = None
        db_path = described(config)
        # The program's own first tier, as the explanation below prints it ("regular" in the cafe).
        returning = f"a returning member of the first tier, {program.tiers[0][0]}"
        conn = read_connection(config) if card else None
        if conn is not None:
            from server.privacy import command_keys_problem, privacy_from_config
            with closing(conn):
                try:
                    privacy = privacy_from_config(config)
                    card_key = privacy.card(card)    # members are found by the card's HMAC
                except ConfigError as e:
                    raise ToolError(f"config error: {e}") from None
                # Under keys other than the server's no card is found: say so, not "not enrolled".
                if refused := command_keys_problem(conn, privacy):
                    raise ToolError(f"rules explain: {refused}")
                member = member_from_db(conn, program, card_key, receipt, _now(config), privacy.coupon)
            if member is not None:
                print("the member as they are now: segments now, offers and coupon codes at the receipt's moment "
                      "(codes judged, not used)", file=sys.stderr)
            else:
                # Cut to its last four digits, as everywhere else the product shows a card.
                print(f"card ending {privacy.card_last4(card)} is not enrolled in {db_path}: explaining for {returning}",
                      file=sys.stderr)
        elif card:
            print(f"{db_path}: no database: explaining for {returning}", file=sys.stderr)
        else:
            print(f"the receipt has no card (it would earn nothing): explaining for {returning}", file=sys.stderr)
        if member is None:
            member = default_member(program)    # not the card: the output would show its full number
        explanation = program.explain(receipt, member, receipt.redeem_points, available)
        if as_json:
            print(msgspec.json.encode(explanation).decode())
        else:
            print(format_explanation(explanation, program.currency))
        return 0
    except ToolError as e:
        print(e, file=sys.stderr)
        return 2
    finally:
        program.close()


def _now(config) -> datetime:
    """The server's clock: `clock.start` when the config sets one (tests, demos)."""
    from server.clock import Clock
    return Clock(config.clock.start).now()


# ------------------------------------------------------------------ diff

class RuleTotals(msgspec.Struct):
    rule: str
    old: int = 0
    new: int = 0
    old_receipts: int = 0  # receipts on which it fired
    new_receipts: int = 0

    @property
    def difference(self) -> int:
        return self.new - self.old


class Replay:
    """One program replaying receipts in order, counting limits and budgets as it goes
    (from the first receipt replayed: history before it is not known), each member as
    recorded with their receipt (server/replay_member.py)."""

    def __init__(self, program: Program):
        self.program = program
        self.fires: dict[tuple[str, str], list[date]] = {}  # (member, rule) -> local dates it fired
        self.issued: dict[str, int] = {}  # budgeted rule -> points issued so far
        self.offers = OfferDrift()

    def run(self, receipt: Receipt, member: ReplayMember | None) -> dict[str, int]:
        program = self.program
        who = member.member_id if member is not None and member.member_id else receipt.card
        if who is None:
            return {}  # anonymous receipts earn nothing, as at the server
        facts = facts_for(program, member, who, self.offers.left(who, member) if member is not None else None)
        day = receipt.ts.astimezone(program.timezone).date()
        usage = {}
        for rule_id, (first, last) in program.limit_windows(day).items():
            dates = self.fires.get((who, rule_id), ())
            usage[rule_id] = sum(1 for fired in dates if first <= fired <= last)
        budget_left = {rule_id: budget - self.issued.get(rule_id, 0) for rule_id, budget in program.budgets.items()}
        ev = program.evaluate(receipt, facts, receipt.redeem_points, 10**15, usage, budget_left)
        for rule_id in ev.fired:
            if rule_id in program.limited_rule_ids:
                self.fires.setdefault((who, rule_id), []).append(day)
        points = dict(ev.by_rule)
        for rule_id in program.budgets:
            self.issued[rule_id] = self.issued.get(rule_id, 0) + points.get(rule_id, 0)
        if member is not None:
            self.offers.given(who, member, points)
        return points


class DiffReport(msgspec.Struct):
    receipts: int
    anonymous: int          # without a card or a recorded member: they earn nothing
    without_member_facts: int   # with a card but no member facts: replayed as a returning first-tier member
    changed: int  # receipts whose total points differ
    rules: list[RuleTotals]
    old_total: int
    new_total: int


_member_decoder = msgspec.json.Decoder(ReplayMember)
_member_json = msgspec.json.Encoder().encode


def read_receipts(path: str | Path) -> Iterator[tuple[Receipt, ReplayMember | None]]:
    """Each line: a receipt in the API's shape, optionally with "member": the facts
    `export receipts` writes (server/replay_member.py ReplayMember), any of them; blank
    lines are skipped."""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = _plain_decoder.decode(raw)
            except msgspec.DecodeError as e:
                raise ToolError(f"{where}: not JSON: {e}") from None
            except RecursionError:
                raise ToolError(f"{where}: expected a receipt object, found values nested too deeply to read") \
                    from None
            if not isinstance(data, dict):
                raise ToolError(f"{where}: expected a receipt object")
            member = _member(data.pop("member", None), where)
            yield decode_receipt(data, where), member


def _member(facts: Any, where: str) -> ReplayMember | None:
    if facts is None:
        return None
    try:
        return _member_decoder.decode(msgspec.json.encode(facts))
    except msgspec.ValidationError as e:     # in the API's words, every problem: the line may be written by hand
        found = validation.find(facts, ReplayMember)
        found = found if found.count else validation.from_error(e, ReplayMember)
        raise ToolError(f"{where}: member: " + "; ".join(f"{'the member' if path == '$' else path} {words}"
                                                         for path, words in found.listed)) from None


def diff(old: Program, new: Program, receipts: Iterable[tuple[Receipt, ReplayMember | None]]) -> DiffReport:
    """Replays receipts through both programs; per rule the points each issues."""
    replays = (Replay(old), Replay(new))
    totals: dict[str, RuleTotals] = {}
    for rule in [*old.rules, *new.rules]:
        totals.setdefault(rule.id, RuleTotals(rule.id))
    count = anonymous = unknown = changed = 0
    for receipt, member in receipts:
        count += 1
        if receipt.card is None and member is None:
            anonymous += 1
            continue
        unknown += member is None
        before, after = (replay.run(receipt, member) for replay in replays)
        for rule_id, points in before.items():
            totals[rule_id].old += points
            totals[rule_id].old_receipts += 1
        for rule_id, points in after.items():
            totals[rule_id].new += points
            totals[rule_id].new_receipts += 1
        changed += sum(before.values()) != sum(after.values())
    rows = list(totals.values())
    return DiffReport(count, anonymous, unknown, changed, rows, sum(r.old for r in rows), sum(r.new for r in rows))


def format_diff(report: DiffReport, old_name: str, new_name: str) -> str:
    width = max([len(row.rule) for row in report.rules] + [5])
    head = f"{'rule':<{width}}  {'old':>10}  {'new':>10}  {'difference':>11}  {'receipts old/new':>16}"
    out = [
        f"{report.receipts} receipt(s) replayed ({report.anonymous} without a card earn nothing), "
        f"{report.changed} with a different total; old: {old_name}, new: {new_name}",
        f"{report.without_member_facts} receipt(s) without recorded member facts (confirmed before they were "
        "recorded) replayed as a returning first-tier member without segments, offers or coupons",
        head,
    ]
    for row in report.rules:
        fired = f"{row.old_receipts}/{row.new_receipts}"
        out.append(f"{row.rule:<{width}}  {row.old:>10}  {row.new:>10}  {row.difference:>+11}  {fired:>16}")
    out.append(f"{'total':<{width}}  {report.old_total:>10}  {report.new_total:>10}  "
               f"{report.new_total - report.old_total:>+11}")
    return "\n".join(out)


def diff_command(old_dir: str, new_dir: str, receipts_path: str, as_json: bool) -> int:
    programs = []
    try:
        programs = [load(old_dir), load(new_dir)]
        report = diff(programs[0], programs[1], read_receipts(receipts_path))
    except ToolError as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{receipts_path}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        for program in programs:
            program.close()
    if as_json:
        data = msgspec.to_builtins(report)
        for row, built in zip(report.rules, data["rules"]):
            built["difference"] = row.difference
        print(msgspec.json.encode(data).decode())
    else:
        print(format_diff(report, old_dir, new_dir))
    return 0


# ------------------------------------------------------------------ export receipts

def export_receipts(conn: sqlite3.Connection, out, first: date | None = None, last: date | None = None,
                    progress=None) -> int:
    """The stored bodies of confirmed receipts, oldest first, one JSON object a line, each
    with the member facts recorded with it as "member" (server/replay_member.py).
    first/last: inclusive local dates of the receipts."""
    where, params = ["status = 'confirmed'"], []
    if first is not None:
        where.append("local_date >= ?")
        params.append(first.isoformat())
    if last is not None:
        where.append("local_date <= ?")
        params.append(last.isoformat())
    condition = " AND ".join(where)
    total = conn.execute(f"SELECT COUNT(*) FROM receipts WHERE {condition}", params).fetchone()[0]
    facts_column, facts_join = member_facts.source(conn)
    cursor = conn.execute(f"SELECT body, {facts_column} FROM receipts r {facts_join} "
                          f"WHERE {condition} ORDER BY r.ts, r.store_id, r.register_id, r.receipt_id", params)
    done = 0
    if progress:
        progress(0, total)
    while rows := cursor.fetchmany(EXPORT_BATCH_ROWS):
        for body, facts in rows:
            text = (unpack(body).decode() if isinstance(body, bytes) else body).rstrip("\n")
            if facts is not None:     # bodies are canonical JSON objects on one line
                text = f'{text[:-1]},"member":{_member_json(from_record(member_facts.decode(facts))).decode()}}}'
            out.write(text + "\n")
        done += len(rows)
        if progress:
            progress(done, total)
    return done


def export_receipts_command(config_path: str, out_path: str | None, first: str | None, last: str | None) -> int:
    from server.reports import export_bar, export_to

    try:
        config = config_for_command(config_path)
        first_day = date.fromisoformat(first) if first else None
        last_day = date.fromisoformat(last) if last else None
        conn = read_existing(config)
    except CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"--from/--to must be dates (YYYY-MM-DD): {e}", file=sys.stderr)
        return 2
    if first_day and last_day and last_day < first_day:
        conn.close()
        print(f"export receipts: --to {last_day} is before --from {first_day}; nothing was exported", file=sys.stderr)
        return 2
    bar = export_bar("exporting receipts", out_path)
    with closing(conn):
        return export_to("export receipts", out_path, "receipts",
                         lambda stream: export_receipts(conn, stream, first_day, last_day, bar))
