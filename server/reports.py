"""Finance's views of the ledger: partner settlement and full exports."""
from __future__ import annotations

import csv
import sqlite3
import sys
from datetime import date, datetime, time
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from contextlib import contextmanager
from pathlib import Path

import msgspec

from rules import Program
from storage import accounts
from storage.ledger import iso

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


def settle(conn: sqlite3.Connection, program: Program, period: str) -> list[dict]:
    """Per partner: points issued at its stores and the share it funds, points spent at its
    stores and what the program owes for them, and the net in currency (positive: the
    program pays the partner). Returns and cancels count in the month they happened."""
    start, end = month_bounds(program, period)
    out = []
    for partner in sorted(program.partners.values(), key=lambda p: p.id):
        issued = _net(conn, accounts.issue_account(partner.id), start, end)
        redeemed = -_net(conn, accounts.redemption_account(partner.id), start, end)
        share = Fraction(partner.funding_share)
        funded_points = Fraction(issued) * share
        funded_money = _minor(funded_points * program.point_value)
        owed_money = redeemed * program.point_value
        out.append({"partner": partner.id, "name": partner.name, "period": period, "currency": program.currency,
                    "points_issued": issued, "funding_share": str(partner.funding_share),
                    "points_funded": str(Decimal(funded_points.numerator) / Decimal(funded_points.denominator)),
                    "amount_funded": funded_money, "points_redeemed": redeemed, "amount_owed": owed_money,
                    "net_amount": owed_money - funded_money})
    return out


def _net(conn, account: str, start: datetime, end: datetime) -> int:
    """Points moved to members from `account` in [start, end): issue minus reversals."""
    return conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings WHERE counter_account = ? "
                        "AND effective_at >= ? AND effective_at < ?", (account, iso(start), iso(end))).fetchone()[0]


def _minor(amount: Fraction) -> int:
    """Money rounds once, half to even, to whole minor units."""
    d = Decimal(amount.numerator) / Decimal(amount.denominator)
    return int(d.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def write_settlement(rows: list[dict], out_dir: Path, period: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"settlement-{period}.json"
    csv_path = out_dir / f"settlement-{period}.csv"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(rows)) + b"\n")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        fields = list(rows[0]) if rows else ["partner"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, json_path


def export_ledger(conn: sqlite3.Connection, out, fmt: str, progress=None) -> int:
    """Every posting, oldest first, as CSV or JSON lines; `progress(done, total)` is called per batch."""
    total = conn.execute("SELECT COUNT(*) FROM postings").fetchone()[0]
    # Hashes are stored as 32 bytes (storage/schema.py m013) and exported as hex, as before.
    columns = ", ".join("lower(hex(hash))" if c == "hash" else c for c in EXPORT_COLUMNS)
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


@contextmanager
def output(path: str | None):
    """A file to write an export to, or standard output; closed or flushed afterwards."""
    stream = open(path, "w", newline="", encoding="utf-8") if path else sys.stdout
    try:
        yield stream
    finally:
        stream.close() if path else stream.flush()


def export_bar(label: str, path: str | None) -> "ProgressBar":
    """A progress bar on a terminal's stderr, but never amid exported lines on that terminal."""
    bar = ProgressBar(label)
    bar.enabled = bar.enabled and (bool(path) or not sys.stdout.isatty())
    return bar
