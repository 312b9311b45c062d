"""The referral reward a referee's first purchase paid (`referred_first_purchase`), as the
ledger holds it, for the cancel or return that takes it back.

The reward is an `event` posting on the member who held the referrer's points when it was
paid, with the ref `event:<event id>:referral:<referee>`, and event_fires keeps its occasion
(`referral:<referee>`) so that it is paid once. A take-back is a `reversal` posting with the
same ref on the same lot, so what a reward still gives is the sum of the two on its lot,
whatever merges moved the points since (they move them by `transfer` postings, and a
take-back follows them as a receipt's does: storage.member_care.follow_merge).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from storage import ledger, member_care


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


def referral_of(conn: sqlite3.Connection, referee_id: int | None, key: ledger.ReceiptKey) -> Referral | None:
    """key: a confirmed receipt of the referee. None when nobody referred them, or no reward
    was paid for them (or a cancel took it back). Locks (PostgreSQL) the members the reward
    may have been paid to before reading their postings: a merge of the referrer moving its
    points meanwhile is then seen whole or not at all."""
    if referee_id is None:
        return None
    row = conn.execute("SELECT referred_by FROM members WHERE id = ?", (referee_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    chain = merged_chain(conn, row[0])
    ledger.lock_members(conn, chain)
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
    return Referral(fires, [Reward(*r, *facts[r[3]]) for r in rewards], before == 0, standing > 1)


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
