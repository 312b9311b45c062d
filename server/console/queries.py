"""What the console reads from the database beyond the operations' own answers. Each query
is bounded by an index (a day of receipts, a counter account's day of postings, the live
lots) so a page costs the same on a large member base as on a small one."""
from __future__ import annotations

import sqlite3

from server.privacy import candidates
from storage.accounts import issue_account, redemption_account
from storage.ledger import unpack

RECENT_RECEIPTS = 20
PHONE_MATCHES_MAX = 20


def today(conn: sqlite3.Connection, partners, local_date: str, start: str, end: str) -> dict:
    """Confirmed receipts of the local date; points issued (accrued and event points, before
    returns) and redeemed with an effective time in [start, end); the outstanding liability."""
    receipts, amount = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(total), 0) FROM receipts WHERE local_date = ? AND status = 'confirmed'",
        (local_date,)).fetchone()
    owners = [None, *sorted(partners)]
    issued = sum(_day_sum(conn, issue_account(p), start, end, "points > 0") for p in owners)
    redeemed = -sum(_day_sum(conn, redemption_account(p), start, end, "kind = 'redemption'") for p in owners)
    liability = conn.execute("SELECT COALESCE(SUM(remaining), 0) FROM lots WHERE remaining != 0").fetchone()[0]
    return {"receipts": receipts, "amount": amount, "issued": issued, "redeemed": redeemed, "liability": liability}


def _day_sum(conn, account: str, start: str, end: str, condition: str) -> int:
    return conn.execute(f"SELECT COALESCE(SUM(points), 0) FROM postings WHERE counter_account = ? "
                        f"AND effective_at >= ? AND effective_at < ? AND {condition}",
                        (account, start, end)).fetchone()[0]


def recent_receipts(conn: sqlite3.Connection) -> list[dict]:
    rows = conn.execute("SELECT store_id, register_id, receipt_id, ts, total FROM receipts WHERE status = 'confirmed' "
                        "ORDER BY local_date DESC, ts DESC LIMIT ?", (RECENT_RECEIPTS,))
    return [{"key": f"{s}/{r}/{i}", "store_id": s, "register_id": r, "receipt_id": i, "ts": ts, "total": total}
            for s, r, i, ts, total in rows]


def stored_body(conn: sqlite3.Connection, store_id: str, register_id: str, receipt_id: str) -> bytes | None:
    """The stored receipt as it was sent, the card replaced by its HMAC."""
    row = conn.execute("SELECT body FROM receipts WHERE store_id = ? AND register_id = ? AND receipt_id = ?",
                       (store_id, register_id, receipt_id)).fetchone()
    if row is None:
        return None
    return unpack(row[0]) if isinstance(row[0], bytes) else row[0].encode()


def members_by_phone(conn: sqlite3.Connection, phone_hmac: str) -> list[int]:
    """phone_hmac: under the key in force and, during a rotation, the earlier ones (privacy.candidates)."""
    digests = candidates(phone_hmac)
    marks = ", ".join("?" * len(digests))
    return [r[0] for r in conn.execute(f"SELECT id FROM members WHERE phone_hmac IN ({marks}) ORDER BY id LIMIT ?",
                                       (*digests, PHONE_MATCHES_MAX))]
