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
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from rules import MemberFacts, Program, ProgramError, format_explanation, load_program
from server import validation
from server.schema import DECODERS, Receipt, every_problem
from storage.ledger import unpack

DEFAULT_RECEIPT_NUMBER = 2  # a returning member: first-purchase rules stay out of a replay
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


def default_member(program: Program, member_id: str = "-", **facts: Any) -> MemberFacts:
    """A returning base-tier member with no tags: what a replay assumes when facts are missing."""
    facts.setdefault("tier", program.tiers[0][0])
    facts.setdefault("receipt_number", DEFAULT_RECEIPT_NUMBER)
    return MemberFacts(member_id=member_id, **facts)


# ------------------------------------------------------------------ explain

def member_from_db(conn: sqlite3.Connection, program: Program, card: str, receipt: Receipt) -> MemberFacts | None:
    """The facts the rules see for card (its HMAC, server/privacy.py) at the receipt's moment, read
    from the database.

    Tier: as the server computes it at the receipt's moment (a manual tier while valid, else
    the level reached over the window before ts). receipt_number: as the server counts it,
    in arrival order: the confirmed receipts that arrived before this one (all of them when
    it is not stored), plus one."""
    from server.member_state import tier_view
    from storage.ledger import from_iso, member_by_card, receipts_confirmed_before

    member = member_by_card(conn, card)
    if member is None:
        return None
    view, ever = tier_view(conn, program, member, receipt.ts, of_receipt=True)
    tier = view["id"]
    before = receipts_confirmed_before(conn, member.id, (receipt.store_id, receipt.register_id, receipt.receipt_id))
    if before is None:
        before = ever
    return MemberFacts(
        member_id=member.public_id,
        tier=tier,
        tags=frozenset(msgspec.json.decode(member.tags)),
        birthday=date.fromisoformat(member.birthday) if member.birthday else None,
        enrolled_on=from_iso(member.enrolled_at).astimezone(program.timezone).date(),
        receipt_number=before + 1,
    )


def explain_command(config_path: str, receipt_path: str, card: str | None, available: int | None,
                    as_json: bool = False) -> int:
    from server.config import ConfigError, load_config

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
        db_path = config.resolve(config.database.path)
        if card and db_path.exists():
            from server.privacy import privacy_from_config
            try:
                card_key = privacy_from_config(config).card(card)    # members are found by the card's HMAC
            except ConfigError as e:
                raise ToolError(f"config error: {e}") from None
            with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
                member = member_from_db(conn, program, card_key, receipt)
            if member is None:
                print(f"card {card} is not enrolled in {db_path}: explaining for a returning base-tier member",
                      file=sys.stderr)
        elif card:
            print(f"{db_path}: no database: explaining for a returning base-tier member", file=sys.stderr)
        else:
            print("the receipt has no card (it would earn nothing): explaining for a returning base-tier member",
                  file=sys.stderr)
        if member is None:
            member = default_member(program, card or "-")
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
    (from the first receipt of the file: history before it is not known)."""

    def __init__(self, program: Program):
        self.program = program
        self.fires: dict[tuple[str, str], list[date]] = {}  # (card, rule) -> local dates it fired
        self.issued: dict[str, int] = {}  # budgeted rule -> points issued so far

    def run(self, receipt: Receipt, facts: dict | None) -> dict[str, int]:
        program = self.program
        if receipt.card is None:
            return {}  # anonymous receipts earn nothing, as at the server
        member = default_member(program, receipt.card, **(facts or {}))
        day = receipt.ts.astimezone(program.timezone).date()
        usage = {}
        for rule_id, (first, last) in program.limit_windows(day).items():
            dates = self.fires.get((receipt.card, rule_id), ())
            usage[rule_id] = sum(1 for fired in dates if first <= fired <= last)
        budget_left = {rule_id: budget - self.issued.get(rule_id, 0) for rule_id, budget in program.budgets.items()}
        ev = program.evaluate(receipt, member, receipt.redeem_points, 10**15, usage, budget_left)
        for rule_id in ev.fired:
            if rule_id in program.limited_rule_ids:
                self.fires.setdefault((receipt.card, rule_id), []).append(day)
        points = dict(ev.by_rule)
        for rule_id in program.budgets:
            self.issued[rule_id] = self.issued.get(rule_id, 0) + points.get(rule_id, 0)
        return points


class DiffReport(msgspec.Struct):
    receipts: int
    anonymous: int
    changed: int  # receipts whose total points differ
    rules: list[RuleTotals]
    old_total: int
    new_total: int


def read_receipts(path: str | Path) -> Iterator[tuple[Receipt, dict | None]]:
    """Each line: a receipt in the API's shape, optionally with "member": {tier, tags, birthday,
    enrolled_on, receipt_number}; blank lines are skipped."""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = _plain_decoder.decode(raw)
            except msgspec.DecodeError as e:
                raise ToolError(f"{where}: not JSON: {e}") from None
            if not isinstance(data, dict):
                raise ToolError(f"{where}: expected a receipt object")
            facts = _facts(data.pop("member", None), where)
            yield decode_receipt(data, where), facts


def _facts(facts: Any, where: str) -> dict | None:
    if facts is None:
        return None
    known = {"tier", "tags", "birthday", "enrolled_on", "receipt_number"}
    if not isinstance(facts, dict) or set(facts) - known:
        raise ToolError(f"{where}: 'member' may hold only {', '.join(sorted(known))}")
    out = dict(facts)
    try:
        if "tags" in out:
            out["tags"] = frozenset(out["tags"])
        for key in ("birthday", "enrolled_on"):
            if out.get(key) is not None:
                out[key] = date.fromisoformat(out[key])
        if "receipt_number" in out and (not isinstance(out["receipt_number"], int) or out["receipt_number"] < 1):
            raise ValueError("receipt_number must be a whole number >= 1")
    except (TypeError, ValueError) as e:
        raise ToolError(f"{where}: member: {e}") from None
    return out


def diff(old: Program, new: Program, receipts: Iterable[tuple[Receipt, dict | None]]) -> DiffReport:
    """Replays receipts through both programs; per rule the points each issues."""
    replays = (Replay(old), Replay(new))
    totals: dict[str, RuleTotals] = {}
    for rule in [*old.rules, *new.rules]:
        totals.setdefault(rule.id, RuleTotals(rule.id))
    count = anonymous = changed = 0
    for receipt, facts in receipts:
        count += 1
        if receipt.card is None:
            anonymous += 1
            continue
        before, after = (replay.run(receipt, facts) for replay in replays)
        for rule_id, points in before.items():
            totals[rule_id].old += points
            totals[rule_id].old_receipts += 1
        for rule_id, points in after.items():
            totals[rule_id].new += points
            totals[rule_id].new_receipts += 1
        changed += sum(before.values()) != sum(after.values())
    rows = list(totals.values())
    return DiffReport(count, anonymous, changed, rows, sum(r.old for r in rows), sum(r.new for r in rows))


def format_diff(report: DiffReport, old_name: str, new_name: str) -> str:
    width = max([len(row.rule) for row in report.rules] + [5])
    head = f"{'rule':<{width}}  {'old':>10}  {'new':>10}  {'difference':>11}  {'receipts old/new':>16}"
    out = [
        f"{report.receipts} receipt(s) replayed ({report.anonymous} without a card earn nothing), "
        f"{report.changed} with a different total; old: {old_name}, new: {new_name}",
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
    """The stored bodies of confirmed receipts, oldest first, one JSON object a line.
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
    cursor = conn.execute(f"SELECT body FROM receipts WHERE {condition} ORDER BY ts, store_id, register_id, "
                          "receipt_id", params)
    done = 0
    if progress:
        progress(0, total)
    while rows := cursor.fetchmany(EXPORT_BATCH_ROWS):
        for (body,) in rows:
            text = unpack(body).decode() if isinstance(body, bytes) else body
            out.write(text.rstrip("\n") + "\n")  # bodies are canonical JSON on one line
        done += len(rows)
        if progress:
            progress(done, total)
    return done


def export_receipts_command(config_path: str, out_path: str | None, first: str | None, last: str | None) -> int:
    from server.config import ConfigError, load_config
    from server.reports import export_bar, output

    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        first_day = date.fromisoformat(first) if first else None
        last_day = date.fromisoformat(last) if last else None
    except ValueError as e:
        print(f"--from/--to must be dates (YYYY-MM-DD): {e}", file=sys.stderr)
        return 2
    db_path = config.resolve(config.database.path)
    if not db_path.exists():
        print(f"{db_path}: no database", file=sys.stderr)
        return 2
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        with output(out_path) as stream:
            count = export_receipts(conn, stream, first_day, last_day, export_bar("exporting receipts", out_path))
    print(f"{count} receipts exported", file=sys.stderr)
    return 0
