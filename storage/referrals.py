"""The referral reward a referee's first purchase paid (`referred_first_purchase`), as the
ledger holds it, for the cancel or return that takes it back.

The reward is an `event` posting on the member who held the referrer's points when it was
paid, with the ref `event:<event id>:referral:<referee>`, and event_fires keeps its occasion
(`referral:<referee>`) so that it is paid once. A take-back is a `reversal` posting with the
same ref on the same lot, so what a reward still gives is the sum of the two on its lot,
whatever merges moved the points since (they move them by `transfer` postings, and a
take-back follows them as a receipt's does: storage.member_care.follow_merge). A cancel
of a first purchase whose whole return took the reward back, while a later receipt of the
referee stands, pays it again under the same ref on a new lot (the occasion forgotten and
fired once more): that receipt is the first purchase now.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from storage import ledger, member_care
from storage.sql import arrival


def occasion(referee_id: int) -> str:
    return f"referral:{referee_id}"


def reward_ref(event_id: str, referee_id: int) -> str:
    """The ref fire_events (storage/apply.py) writes on the event's posting."""
    return f"event:{event_id}:{occasion(referee_id)}"


@dataclass(frozen=True)
class Reward:
    """What one paid reward still gives, on one lot of the member it was paid to."""
    member_id: int
    event_id: str
    ref: str
    lot_id: int
    counter: str
    points: int                 # paid less what was taken back; > 0
    expires_on: str | None      # the lot's, with what its expiry postings took so far
    expired: int


@dataclass(frozen=True)
class Referral:
    """A referee's referral as a cancel or return of one of their receipts finds it."""
    fires: list[tuple[int, str]]    # (member it fired for, event id) of the referee's occasion
    rewards: list[Reward]
    first_purchase: bool            # the receipt is the referee's first confirmed one not cancelled
    others: bool                    # other confirmed receipts of the referee, not cancelled, stand
    referrer: int = 0               # the member who referred (referred_by), maybe merged away since
    # When a whole return took the first purchase's reward back: the referee's receipt that
    # becomes the first purchase if this one is cancelled (the next to arrive that stands),
    # what has been returned of it (ledger.returned_lines) and, when anything was, what it
    # sold (ledger.receipt_line_records).
    successor: ledger.ReceiptKey | None = None
    successor_returned: dict = field(default_factory=dict)
    successor_sold: dict = field(default_factory=dict)


def referral_of(conn: sqlite3.Connection, referee_id: int | None, key: ledger.ReceiptKey) -> Referral | None:
    """key: a confirmed receipt of the referee. None when nobody referred them, or no reward
    was paid for them (or a cancel took it back). Locks (PostgreSQL) the members the reward
    may have been paid to before reading their postings: a merge of the referrer moving its
    points meanwhile is then seen whole or not at all. Taken after the referee's (and its
    points holder's), out of id order only without waiting (ledger.lock_members_after)."""
    if referee_id is None:
        return None
    row = conn.execute("SELECT referred_by FROM members WHERE id = ?", (referee_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    chain = merged_chain(conn, row[0])
    ledger.lock_members_after(conn, chain)
    marks = ", ".join("?" * len(chain))
    fires = [(m, e) for m, e in conn.execute(
        f"SELECT member_id, event_id FROM event_fires WHERE occasion = ? AND member_id IN ({marks}) "
        "ORDER BY member_id, event_id", (occasion(referee_id), *chain))]
    if not fires:
        return None
    rewards = []
    for member_id, event_id in fires:
        ref = reward_ref(event_id, referee_id)
        rewards += [(member_id, event_id, ref, lot, counter, points) for lot, counter, points in conn.execute(
            "SELECT lot_id, counter_account, SUM(points) FROM postings WHERE member_id = ? AND ref = ? "
            "AND kind IN ('event', 'reversal') GROUP BY lot_id, counter_account HAVING SUM(points) > 0 "
            "ORDER BY lot_id", (member_id, ref))]
    facts = ledger.lot_facts(conn, [r[3] for r in rewards])
    before = ledger.receipts_confirmed_before(conn, referee_id, key)
    standing = conn.execute("SELECT COUNT(*) FROM receipts WHERE member_id = ? AND status = 'confirmed'",
                            (referee_id,)).fetchone()[0]
    successor = next_standing(conn, referee_id, key) if before == 0 and standing > 1 and not rewards else None
    # The referee's lock, which a cancel or a return holds (storage.member_care.lock_receipt),
    # keeps the successor's returns as read here until the write commits.
    returned = {} if successor is None else ledger.returned_lines(conn, successor)
    sold = ledger.receipt_line_records(conn, successor) if returned else {}
    return Referral(fires, [Reward(*r, *facts[r[3]]) for r in rewards], before == 0, standing > 1, row[0],
                    successor, returned, sold)


def next_standing(conn: sqlite3.Connection, member_id: int, key: ledger.ReceiptKey) -> ledger.ReceiptKey | None:
    """The member's first confirmed receipt to arrive other than `key`."""
    row = conn.execute("SELECT store_id, register_id, receipt_id FROM receipts WHERE member_id = ? "
                       "AND status = 'confirmed' AND NOT (store_id = ? AND register_id = ? AND receipt_id = ?) "
                       f"ORDER BY {arrival(conn)} LIMIT 1", (member_id, *key)).fetchone()
    return None if row is None else tuple(row)


def merged_chain(conn: sqlite3.Connection, member_id: int) -> list[int]:
    """The member and each member it was merged into, in turn, up to the one holding its points."""
    chain = [member_id]
    for _ in range(member_care.MERGED_MAX):
        row = conn.execute("SELECT merged_into FROM members WHERE id = ?", (chain[-1],)).fetchone()
        if row is None or row[0] is None or row[0] in chain:
            break
        chain.append(row[0])
    return chain


def forget(conn: sqlite3.Connection, fires: list[tuple[int, str]], referee_id: int) -> None:
    """The referee's occasion no longer fired: their next first purchase pays the reward again."""
    conn.executemany("DELETE FROM event_fires WHERE member_id = ? AND event_id = ? AND occasion = ?",
                     [(member_id, event_id, occasion(referee_id)) for member_id, event_id in fires])
