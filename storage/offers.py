"""Personal offers: a `personal: true` rule applies only to members holding an offer of it.

An offer is resolved to its members when it is assigned (a segment's members as they are
then) and recorded per member with its dates and its own points budget. A receipt charges
that budget with what the rule gives (the receipt that would cross it gets the remainder),
from the offer rows its member's read found (takes), without reading them again. The
receipt's row keeps which budget it took how much of (storage/receipt_takes.py; on PostgreSQL,
and for receipts confirmed before m038, offer_charges rows do), so a cancel gives exactly
that back.
"""
from __future__ import annotations

import sqlite3
from datetime import date, datetime
from typing import NamedTuple

from storage import events, ledger, receipt_takes
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


class OfferRow(NamedTuple):
    """A member's offer as a receipt reads it."""
    offer_id: str
    rule_id: str
    points: int | None      # the member's budget; None: none
    used: int
    to_date: str


# A member's offers valid on a local date (member id, the date twice); storage/customer_value.py
# reads them in the statement that reads the receipt's segments and codes too.
VALID = "member_id = ? AND from_date <= ? AND to_date >= ?"
_VALID_ROWS = f"SELECT offer_id, rule_id, points, points_used, to_date FROM offer_members WHERE {VALID}"


def valid(conn: sqlite3.Connection, member_id: int, local_date: date) -> list[OfferRow]:
    """The member's offers valid that day, the budget that ends first first."""
    day = local_date.isoformat()
    return in_budget_order(map(OfferRow._make, conn.execute(_VALID_ROWS, (member_id, day, day))))


def in_budget_order(rows) -> list[OfferRow]:
    """The budget that ends first is used first (ties: by offer id)."""
    return sorted(rows, key=lambda row: (row.to_date, row.offer_id))


def offers_for(conn: sqlite3.Connection, member_id: int, local_date: date) -> dict[str, int | None]:
    """{rule id: points left for the member, or None for no budget} of the offers valid that day."""
    return left_by_rule(valid(conn, member_id, local_date))


def left_by_rule(rows: list[OfferRow]) -> dict[str, int | None]:
    """{rule id: points left, or None for no budget}. Several offers of one rule add up; one
    of them without a budget makes it unbudgeted."""
    out: dict[str, int | None] = {}
    for row in rows:
        if row.rule_id in out and out[row.rule_id] is None:
            continue
        out[row.rule_id] = None if row.points is None else out.get(row.rule_id, 0) + max(0, row.points - row.used)
    return out


def takes(rows: list[OfferRow], rule_id: str, points: int) -> tuple[tuple[str, int], ...] | None:
    """What each of the member's budgets of the rule gives of `points` (offer id, points), in
    budget order (rows as valid() gives them), up to what they have left: the receipt that
    would cross a budget gets the remainder. None when an offer of the rule has no budget:
    nothing is charged then."""
    out, granted = [], 0
    for row in rows:
        if row.rule_id != rule_id:
            continue
        if row.points is None:
            return None
        take = min(points - granted, row.points - row.used)
        if take > 0:
            out.append((row.offer_id, take))
            granted += take
    return tuple(out)


class Charge(NamedTuple):
    receipt_key: tuple[str, str, str]
    member_id: int
    offer_id: str
    points: int


def charge(conn: sqlite3.Connection, charges: list[Charge], in_rows: bool) -> bool:
    """Charges each offer's budget with its points for its receipt (takes() decided them), in
    the caller's write transaction, with one statement of each kind for all of them. False
    when a budget no longer had that much left: then nothing was recorded, and what the
    others took is the caller's to roll back (the receipt path's savepoint does). in_rows:
    each charge is also an offer_charges row; otherwise the receipt's row keeps them."""
    if not charges:
        return True
    took = conn.executemany(
        "UPDATE offer_members SET points_used = points_used + ? WHERE member_id = ? AND offer_id = ? "
        "AND points_used + ? <= points", [(c.points, c.member_id, c.offer_id, c.points) for c in charges]).rowcount
    if took < len(charges):
        return False
    if in_rows:
        conn.executemany("INSERT INTO offer_charges (store_id, register_id, receipt_id, member_id, offer_id, points) "
                         "VALUES (?, ?, ?, ?, ?, ?)", [(*c.receipt_key, c.member_id, c.offer_id, c.points)
                                                       for c in charges])
    return True


def give_back(conn: sqlite3.Connection, receipt_key: tuple[str, str, str], recorded: list[tuple[str, int]],
              holder: int) -> int:
    """Returns to each offer budget what the receipt took of it (a cancel); the points given
    back. recorded: the (offer id, points) its row kept (storage/receipt_takes.py), which go to the
    budgets of `holder`, the member holding the receipt's member's points (itself, or the
    member a merge moved them to, with its offers: take_over)."""
    rows = conn.execute("DELETE FROM offer_charges WHERE store_id = ? AND register_id = ? AND receipt_id = ? "
                        "RETURNING member_id, offer_id, points", receipt_key).fetchall()
    rows += [(holder, offer_id, points) for offer_id, points in recorded]
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


def end_held_by(conn: sqlite3.Connection, member_ids: list[int], day: date) -> None:
    """An erasure: the members' offers end that (local) day, those not begun yet go. No card
    reaches the members any more, so an offer left open would count as a live offer of the
    campaign on a customer it can never serve. The offers over by then, and what each gave
    up to that day, stay as the record of what was given."""
    marks, last = ", ".join("?" * len(member_ids)), day.isoformat()
    conn.execute(f"DELETE FROM offer_members WHERE member_id IN ({marks}) AND from_date > ?", [*member_ids, last])
    conn.execute(f"UPDATE offer_members SET to_date = ? WHERE member_id IN ({marks}) AND to_date > ?",
                 [last, *member_ids, last])


def members_offered(conn: sqlite3.Connection, rule_id: str, local_date: date) -> set[int]:
    """The members holding an offer of the rule whose dates include that local date."""
    day = local_date.isoformat()
    return {mid for (mid,) in conn.execute(
        "SELECT DISTINCT member_id FROM offer_members WHERE rule_id = ? AND from_date <= ? AND to_date >= ?",
        (rule_id, day, day))}


class Held(NamedTuple):
    """A member's row of one offer, as a merge compares two of them."""
    from_date: str
    to_date: str
    points: int | None
    used: int

    def left(self) -> tuple[bool, int]:
        """Orders budgets by what is left of them: none (no budget) above any number."""
        return (True, 0) if self.points is None else (False, self.points - self.used)


def held_by(conn: sqlite3.Connection, member_id: int) -> dict[str, Held]:
    return {row[0]: Held(*row[1:]) for row in conn.execute(
        "SELECT offer_id, from_date, to_date, points, points_used FROM offer_members WHERE member_id = ?",
        (member_id,))}


def take_over(conn: sqlite3.Connection, source: int, target: int, charged_by: dict[int, list[int]]) -> int:
    """A merge of `source` into `target`: the target gets every offer the source holds that it
    does not, with its dates, budget and use as they were. An offer both hold stays one, the
    target's, with the later `to` and the larger of the two points left: never their sum, or
    the merge would make budget neither membership had. Each receipt's charge keeps naming
    the row holding the budget it took from, so a cancel gives back to it: the charges of a
    moved or kept budget go with it to the target, those of the budget not kept stay with the
    source, whose row goes (a cancel of them then gives back to nothing). A charge kept in
    its receipt's row (storage/receipt_takes.py) goes to the budget of the member holding the
    receipt's member's points, which is where a moved budget goes; of an offer both hold,
    such charges become rows first (_charges_to_rows). charged_by: member
    -> the members whose receipts may carry its charges (itself and those merged into it).
    How many offers the target got or kept from the source."""
    theirs = held_by(conn, target)
    taken = 0
    for offer_id, mine in held_by(conn, source).items():
        held = theirs.get(offer_id)
        if held is None:
            conn.execute("UPDATE offer_members SET member_id = ? WHERE member_id = ? AND offer_id = ?",
                         (target, source, offer_id))
            _recharge(conn, offer_id, source, target, charged_by[source])
            taken += 1
            continue
        _charges_to_rows(conn, offer_id, source, target, charged_by)
        if mine.left() > held.left():
            conn.execute("UPDATE offer_members SET points = ?, points_used = ? WHERE member_id = ? AND offer_id = ?",
                         (mine.points, mine.used, target, offer_id))
            _recharge(conn, offer_id, target, source, charged_by[target])
            _recharge(conn, offer_id, source, target, charged_by[source])
            taken += 1
        conn.execute("UPDATE offer_members SET from_date = ?, to_date = ? WHERE member_id = ? AND offer_id = ?",
                     (min(mine.from_date, held.from_date), max(mine.to_date, held.to_date), target, offer_id))
        conn.execute("DELETE FROM offer_members WHERE member_id = ? AND offer_id = ?", (source, offer_id))
    return taken


def _charges_to_rows(conn: sqlite3.Connection, offer_id: str, source: int, target: int,
                     charged_by: dict[int, list[int]]) -> None:
    """An offer both members hold: what their receipts' rows keep of it (storage/receipt_takes.py)
    becomes offer_charges rows naming the member whose budget each took, so that a charge
    follows its budget (_recharge) or stays with the one not kept, as rows do. A record
    alone would give back to whichever budget the surviving member holds. On PostgreSQL the
    members whose receipts these are are locked first: a return, a cancel or `privacy
    rotate-key` rewriting one of those records meanwhile would otherwise be written over
    (their locks are taken out of id order after the merge's two: a deadlock is retried).
    SQLite's one writer runs them one after another."""
    ledger.lock_members(conn, charged_by[source] + charged_by[target])
    for member in (source, target):
        for key, record in receipt_takes.of_members(conn, charged_by[member]):
            mine = [(offer, points) for offer, points in record.charges if offer == offer_id]
            if not mine:
                continue
            conn.executemany("INSERT INTO offer_charges (store_id, register_id, receipt_id, member_id, offer_id, "
                             "points) VALUES (?, ?, ?, ?, ?, ?)", [(*key, member, *c) for c in mine])
            receipt_takes.rewrite(conn, key, record.without_offer(offer_id))


def _recharge(conn: sqlite3.Connection, offer_id: str, old: int, new: int, owners: list[int]) -> None:
    """The charges of the offer naming member `old` name `new` instead. They are found through
    their receipts (receipts_member_counts), `owners`' receipts: offer_charges has no index
    by member, and a scan of it would hold every other write meanwhile."""
    marks = ", ".join("?" * len(owners))
    keys = conn.execute(
        "SELECT c.store_id, c.register_id, c.receipt_id FROM receipts r JOIN offer_charges c "
        "ON c.store_id = r.store_id AND c.register_id = r.register_id AND c.receipt_id = r.receipt_id "
        f"WHERE r.member_id IN ({marks}) AND c.offer_id = ? AND c.member_id = ?", (*owners, offer_id, old)).fetchall()
    conn.executemany("UPDATE offer_charges SET member_id = ? WHERE store_id = ? AND register_id = ? "
                     "AND receipt_id = ? AND offer_id = ?", [(new, *key, offer_id) for key in keys])
