"""Finance's views of the ledger: partner settlement and full exports."""
from __future__ import annotations

import csv
import os
import sqlite3
import sys
from datetime import date, datetime, time
from decimal import ROUND_HALF_EVEN, Decimal
from contextlib import contextmanager
from pathlib import Path

import msgspec

from rules import Program
from storage import accounts
from storage.ledger import iso
from storage.sql import is_postgresql

EXPORT_COLUMNS = ("id", "member_id", "lot_id", "kind", "points", "counter_account", "effective_at", "created_at",
                  "rule_id", "rules_version", "store_id", "register_id", "receipt_id", "ref", "key_id", "note",
                  "hash")
EXPORT_BATCH_ROWS = 5_000


def month_bounds(program: Program, period: str) -> tuple[datetime, datetime]:
    """`2026-11` as the first moment of the month and of the next, in the program's timezone."""
    year, month = (int(x) for x in period.split("-"))
    start = datetime.combine(date(year, month, 1), time.min, program.timezone)
    end = datetime.combine(date(year + month // 12, month % 12 + 1, 1), time.min, program.timezone)
    return start, end


# ISO 4217 minor units of the currencies that do not have 2 (every other one has 2).
CURRENCY_DECIMALS = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0, "RWF": 0,
    "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}


def currency_decimals(currency: str) -> int:
    return CURRENCY_DECIMALS.get(currency, 2)


def money_text(minor_units: int, currency: str) -> str:
    """Minor units as the currency's amount, exactly: 123450 UAH is "1234.50 UAH", 1234 JPY "1234 JPY"."""
    return f"{decimal_text(minor_units, currency)} {currency}"


def decimal_text(minor_units: int, currency: str) -> str:
    """"-1234.50": the amount with the currency's decimals, no grouping (for CSV as well)."""
    decimals = currency_decimals(currency)
    whole, part = divmod(abs(minor_units), 10 ** decimals)
    sign = "-" if minor_units < 0 else ""
    return f"{sign}{whole}.{part:0{decimals}d}" if decimals else f"{sign}{whole}"


SETTLEMENT_FIELDS = ("partner", "name", "period", "currency", "currency_decimals", "funding_share", "issued_points",
                     "funded_points", "funded_minor_units", "redeemed_points", "owed_minor_units",
                     "net_to_partner_minor_units")


def settle(conn: sqlite3.Connection, program: Program, period: str) -> list[dict]:
    """Per partner: points issued at its stores and the share of them it funds (it pays the
    program for those), points spent at its stores and what the program owes it for them,
    and the net, owed minus funded: positive, the program pays the partner; negative, the
    partner pays the program. Money in the currency's minor units, exact; every numeric
    field's name ends in its unit. Returns and cancels count in the month they happened."""
    start, end = month_bounds(program, period)
    out = []
    for partner in sorted(program.partners.values(), key=lambda p: p.id):
        issued = _net(conn, accounts.issue_account(partner.id), start, end)
        redeemed = -_net(conn, accounts.redemption_account(partner.id), start, end)
        funded_points = issued * partner.funding_share      # Decimal: exact
        funded_money = _minor(funded_points * program.point_value)
        owed_money = redeemed * program.point_value
        out.append({"partner": partner.id, "name": partner.name, "period": period, "currency": program.currency,
                    "currency_decimals": currency_decimals(program.currency),
                    "funding_share": str(partner.funding_share),
                    "issued_points": issued, "funded_points": format(funded_points.normalize(), "f"),
                    "funded_minor_units": funded_money, "redeemed_points": redeemed,
                    "owed_minor_units": owed_money, "net_to_partner_minor_units": owed_money - funded_money})
    return out


def _net(conn, account: str, start: datetime, end: datetime) -> int:
    """Points moved to members from `account` in [start, end): issue minus reversals."""
    return conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings WHERE counter_account = ? "
                        "AND effective_at >= ? AND effective_at < ?", (account, iso(start), iso(end))).fetchone()[0]


def _minor(amount: Decimal) -> int:
    """Money rounds once, half to even, to whole minor units."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def csv_field(field: str, currency: str) -> str:
    """A spreadsheet's column for a field: money in the currency (funded_uah), not minor units."""
    return field.removesuffix("minor_units") + currency.lower() if field.endswith("_minor_units") else field


def write_settlement(rows: list[dict], out_dir: Path, period: str, currency: str) -> tuple[Path, Path]:
    """settlement-<period>.json as settle() gives it; settlement-<period>.csv with money as
    the currency's amount ("1234.50") under columns named after the currency."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"settlement-{period}.json"
    csv_path = out_dir / f"settlement-{period}.csv"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(rows)) + b"\n")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(csv_field(field, currency) for field in SETTLEMENT_FIELDS)
        for row in rows:
            writer.writerow(decimal_text(row[field], currency) if field.endswith("_minor_units") else row[field]
                            for field in SETTLEMENT_FIELDS)
    return csv_path, json_path


def export_ledger(conn: sqlite3.Connection, out, fmt: str, progress=None) -> int:
    """Every posting, oldest first, as CSV or JSON lines; `progress(done, total)` is called per batch."""
    total = conn.execute("SELECT COUNT(*) FROM postings").fetchone()[0]
    # Hashes are stored as 32 bytes (storage/schema.py m013) and exported as hex, as before.
    hex_hash = "encode(hash, 'hex')" if is_postgresql(conn) else "lower(hex(hash))"
    columns = ", ".join(hex_hash if c == "hash" else c for c in EXPORT_COLUMNS)
    cursor = conn.execute(f"SELECT {columns} FROM postings ORDER BY id")
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(EXPORT_COLUMNS)
    done = 0
    while rows := cursor.fetchmany(EXPORT_BATCH_ROWS):
        for row in rows:
            if writer:
                writer.writerow(row)
            else:
                out.write(msgspec.json.encode(dict(zip(EXPORT_COLUMNS, row))).decode() + "\n")
        done += len(rows)
        if progress:
            progress(done, total)
    return done


class ProgressBar:
    """A one-line progress bar on stderr, redrawn in place; silent when stderr is not a
    terminal, so logs and CI output stay clean."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.enabled = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        filled = self.width * done // total if total else self.width
        pct = 100 * done // total if total else 100
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {pct:3d}% {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


class CannotWrite(Exception):
    """The export's file cannot be created (no such folder, no permission): nothing was exported."""


class ExportInterrupted(Exception):
    """Ctrl-C while exporting: no part of an export is left looking whole."""


@contextmanager
def output(path: str | None):
    """A file to write an export to, or standard output; closed or flushed afterwards."""
    try:
        stream = open(path, "w", newline="", encoding="utf-8") if path else sys.stdout
    except OSError as e:
        raise CannotWrite(f"cannot write {path}: {e.strerror}; nothing was exported") from None
    try:
        yield stream
    except KeyboardInterrupt:
        # A file cut short reads like a whole export (a ledger that seems to sum right): removed.
        if not path:
            raise ExportInterrupted("interrupted (Ctrl-C): what was written is only part of it") from None
        stream.close()
        os.unlink(path)
        raise ExportInterrupted(f"interrupted (Ctrl-C): {path} was removed, as it held only part of it; "
                                "nothing was exported") from None
    finally:
        stream.close() if path else stream.flush()


def export_to(command: str, path: str | None, noun: str, write) -> int:
    """Runs write(stream) into `path` (standard output when None) as `command` and returns its
    exit status: how many `noun` it exported said on stderr, or why nothing was."""
    from server.interrupt import INTERRUPTED_STATUS
    try:
        with output(path) as stream:
            count = write(stream)
    except CannotWrite as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    except ExportInterrupted as e:
        print(f"{command}: {e}", file=sys.stderr)
        return INTERRUPTED_STATUS
    print(f"{count} {noun} exported", file=sys.stderr)
    return 0


def export_bar(label: str, path: str | None) -> "ProgressBar":
    """A progress bar on a terminal's stderr, but never amid exported lines on that terminal."""
    bar = ProgressBar(label)
    bar.enabled = bar.enabled and (bool(path) or not sys.stdout.isatty())
    return bar
