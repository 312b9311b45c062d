"""Personal offers: a `personal: true` rule applies only to members holding an offer of it.

An offer is resolved to its members when it is assigned (a segment's members as they are
then) and recorded per member with its dates and its own points budget. A receipt charges
that budget with what the rule gives (the receipt that would cross it gets the remainder);
offer_charges keep which receipt took how much, so a cancel gives exactly that back.
"""
from __future__ import annotations

import sqlite3
from datetime import date, datetime
from typing import NamedTuple

from storage import events
from storage.ledger import iso


class OfferConflict(Exception):
    """The offer id is taken by an offer with another body."""


class Assigned(NamedTuple):
    created: bool       # False: the same offer was assigned before
    members: int


def assign(conn: sqlite3.Connection, offer_id: str, rule_id: str, fingerprints: list[str], first: date, last: date,
           points: int | None, member_ids: list[int], now: datetime) -> Assigned:
    """Records the offer for each member once, each with its offer.assigned event; a repeat
    with the same body changes nothing. fingerprints: the body's, the first stored, any of
    them matching a stored one making it a repeat (server/cvm.py offer_fingerprints)."""
    row = conn.execute("SELECT body_sha256, members FROM offers WHERE offer_id = ?", (offer_id,)).fetchone()
    if row is not None:
        if row[0] not in fingerprints:
            raise OfferConflict(f"offer {offer_id} was assigned before with another body")
        return Assigned(False, row[1])
    unique = sorted(set(member_ids))
    conn.execute("INSERT INTO offers (offer_id, rule_id, body_sha256, from_date, to_date, points, members, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (offer_id, rule_id, fingerprints[0], first.isoformat(), last.isoformat(), points, len(unique),
                  iso(now)))
    conn.executemany("INSERT INTO offer_members (member_id, offer_id, rule_id, from_date, to_date, points) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     [(mid, offer_id, rule_id, first.isoformat(), last.isoformat(), points) for mid in unique])
    events.offers_assigned(conn, offer_id, rule_id, first.isoformat(), last.isoformat(), points, unique, now)
    return Assigned(True, len(unique))


def _valid(conn: sqlite3.Connection, member_id: int, local_date: date, rule_id: str | None = None):
    day = local_date.isoformat()
    sql = ("SELECT offer_id, rule_id, points, points_used FROM offer_members WHERE member_id = ? "
           "AND from_date <= ? AND to_date >= ?")
    args: list = [member_id, day, day]
    if rule_id is not None:
        sql += " AND rule_id = ?"
        args.append(rule_id)
    return conn.execute(sql + " ORDER BY to_date, offer_id", args).fetchall()


def offers_for(conn: sqlite3.Connection, member_id: int, local_date: date) -> dict[str, int | None]:
    """{rule id: points left for the member, or None for no budget} of the offers valid that day.
    Several offers of one rule add up; one of them without a budget makes it unbudgeted."""
    out: dict[str, int | None] = {}
    for _, rule_id, points, used in _valid(conn, member_id, local_date):
        if rule_id in out and out[rule_id] is None:
            continue
        out[rule_id] = None if points is None else out.get(rule_id, 0) + max(0, points - used)
    return out


def charge(conn: sqlite3.Connection, member_id: int, rule_id: str, local_date: date, points: int,
           receipt_key: tuple[str, str, str]) -> int:
    """Charges the member's offers of the rule with `points` for the receipt, in the caller's
    write transaction; returns the points the offers allow (0 when none is valid). The
    budget that ends first is used first."""
    rows = _valid(conn, member_id, local_date, rule_id)
    if not rows:
        return 0
    if any(p is None for _, _, p, _ in rows):
        return points
    granted = 0
    for offer_id, _, budget, used in rows:
        take = min(points - granted, budget - used)
        if take <= 0:
            continue
        conn.execute("UPDATE offer_members SET points_used = points_used + ? WHERE member_id = ? AND offer_id = ?",
                     (take, member_id, offer_id))
        conn.execute("INSERT INTO offer_charges (store_id, register_id, receipt_id, member_id, offer_id, points) "
                     "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, register_id, receipt_id, offer_id) "
                     "DO UPDATE SET points = offer_charges.points + excluded.points",
                     (*receipt_key, member_id, offer_id, take))
        granted += take
    return granted


def give_back(conn: sqlite3.Connection, receipt_key: tuple[str, str, str]) -> int:
    """Returns to each offer budget what the receipt took of it (a cancel); the points given back."""
    rows = conn.execute("DELETE FROM offer_charges WHERE store_id = ? AND register_id = ? AND receipt_id = ? "
                        "RETURNING member_id, offer_id, points", receipt_key).fetchall()
    conn.executemany("UPDATE offer_members SET points_used = points_used - ? WHERE member_id = ? AND offer_id = ?",
                     [(points, mid, offer_id) for mid, offer_id, points in rows])
    return sum(r[2] for r in rows)


def listed(conn: sqlite3.Connection, member_id: int, local_date: date) -> list[dict]:
    """The member's offers not yet past their `to`, for GET /v1/members/{card}."""
    rows = conn.execute("SELECT rule_id, from_date, to_date, points, points_used FROM offer_members "
                        "WHERE member_id = ? AND to_date >= ? ORDER BY from_date, offer_id",
                        (member_id, local_date.isoformat())).fetchall()
    return [{"rule": rule, "from": first, "to": last, "points_left": None if points is None else points - used}
            for rule, first, last, points, used in rows]


def members_offered(conn: sqlite3.Connection, rule_id: str, local_date: date) -> set[int]:
    """The members holding an offer of the rule whose dates include that local date."""
    day = local_date.isoformat()
    return {mid for (mid,) in conn.execute(
        "SELECT DISTINCT member_id FROM offer_members WHERE rule_id = ? AND from_date <= ? AND to_date >= ?",
        (rule_id, day, day))}
