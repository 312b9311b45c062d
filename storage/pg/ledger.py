"""The ledger's writes on PostgreSQL that differ from SQLite's, where several transactions
write at once. storage/ledger.py calls these for a PostgreSQL connection (new_lots,
append_postings, post); everything else it runs as it is.

- A member's row lock orders everything done to the member's points. lock_member takes it
  first thing in a write, before the member's state is read (READ COMMITTED: every
  statement after it sees what the transaction that held it committed).
- Lots and postings get their ids from identity columns at insert.
- The hash chain is the member's own: each posting carries the member's running number
  (chain_seq) and a SHA-256 over the member's previous posting's hash and its fields, the
  same fields as SQLite's chain with chain_seq in the place of the global id. chain_heads
  keeps each member's last (seq, hash), written under the member's lock, so writers of
  different members never wait for one chain head. verify_chains recomputes them.
"""
from __future__ import annotations

import itertools
from collections import defaultdict

from storage.ledger import GENESIS_HASH, NewPosting, PostingRef, card_match, posting_hash
from storage.pg.connection import Connection

# The fields of postings hashed into a member's chain, in order (ledger.HASHED_SELECT
# with chain_seq in the place of the id).
CHAIN_SELECT = ("p.chain_seq, p.member_id, p.lot_id, l.available_from, l.expires_on, p.kind, p.points, "
                "p.counter_account, p.effective_at, p.created_at, p.rule_id, p.rules_version, p.store_id, "
                "p.register_id, p.receipt_id, p.ref, p.key_id, p.note")


def lock_member(conn: Connection, member_id: int) -> None:
    conn.execute("SELECT 1 FROM members WHERE id = ? FOR UPDATE", (member_id,))


def lock_member_by_card(conn: Connection, card: str) -> int | None:
    """Locks the member a card (its HMAC, with the older ones of a key rotation) belongs to;
    their id, or None when no member has it. One statement for every hash (ledger.card_match)."""
    match, digests = card_match(card)
    row = conn.execute(f"SELECT m.id FROM cards c JOIN members m ON m.id = c.member_id WHERE {match} "
                       "LIMIT 1 FOR UPDATE OF m", digests).fetchone()
    return row[0] if row else None


def new_lots(conn: Connection, lots: list[tuple[int, str, str | None, int]]) -> list[int]:
    """(member_id, available_from, expires_on, points) each, counting the points their
    first postings bring; their ids, in order."""
    return [conn.execute("INSERT INTO lots (member_id, available_from, expires_on, remaining) VALUES (?, ?, ?, ?) "
                         "RETURNING id", lot).fetchone()[0] for lot in lots]


def append_postings(conn: Connection, postings: list[NewPosting], key_id: str | None = None,
                    note: str | None = None) -> None:
    """Appends postings, each chained to its member's previous one, with one INSERT, their
    accruals' split by rule (posting_rules), and counts in lots.remaining those not already
    counted. Each member's lock is taken first (again, for a caller that holds it: a
    no-op), in the order of their ids, so two writers never deadlock on them."""
    if not postings:
        return
    members = sorted({p.member_id for p in postings})
    marks = ", ".join("?" * len(members))
    conn.execute(f"SELECT 1 FROM members WHERE id IN ({marks}) ORDER BY id FOR UPDATE", members)
    heads = {m: (0, GENESIS_HASH) for m in members}
    heads.update({m: (seq, bytes(h)) for m, seq, h in conn.execute(
        f"SELECT member_id, seq, hash FROM chain_heads WHERE member_id IN ({marks})", members)})
    rows, counts = [], defaultdict(int)
    for p in postings:
        seq, prev = heads[p.member_id]
        seq += 1
        store, register, receipt = p.receipt or (None, None, None)
        digest = posting_hash(prev, (seq, p.member_id, p.lot_id, *p.lot_dates, p.kind, p.points, p.counter,
                                     p.effective_at, p.created_at, p.rule_id, p.rules_version, store, register,
                                     receipt, p.ref, key_id, note))
        heads[p.member_id] = (seq, digest)
        rows.append((p.member_id, seq, p.lot_id, p.kind, p.points, p.counter, p.effective_at, p.created_at,
                     p.rule_id, p.rules_version, store, register, receipt, p.ref, key_id, note, digest))
        if not p.counted:
            counts[p.lot_id] += p.points
    ids = _insert_postings(conn, rows)
    split = [(posting_id, rule, points) for posting_id, p in zip(ids, postings) for rule, points in p.rules]
    if split:
        conn.executemany("INSERT INTO posting_rules (posting_id, rule_id, points) VALUES (?, ?, ?)", split)
    conn.executemany("INSERT INTO chain_heads (member_id, seq, hash) VALUES (?, ?, ?) ON CONFLICT (member_id) "
                     "DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                     [(m, *heads[m]) for m in members])
    if counts:
        conn.executemany("UPDATE lots SET remaining = remaining + ? WHERE id = ?",
                         [(points, lot) for lot, points in counts.items()])


def _insert_postings(conn: Connection, rows: list[tuple]) -> list[int]:
    """The postings' ids from their identity column, in the rows' order: their accruals'
    split by rule (posting_rules) names them."""
    # psycopg's cursor and placeholders: Connection.executemany gives no row back per row.
    cur = conn.raw.cursor()
    cur.executemany("INSERT INTO postings (member_id, chain_seq, lot_id, kind, points, counter_account, effective_at, "
                    "created_at, rule_id, rules_version, store_id, register_id, receipt_id, ref, key_id, note, hash) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    rows, returning=True)
    return [cur.fetchone()[0] for _ in cur.results()]


def post(conn: Connection, member_id: int, lot_id: int, kind: str, points: int, counter: str, at: PostingRef,
         rule_id: str | None = None, dates: tuple[str, str | None] | None = None, counted: bool = False) -> None:
    """ledger.post: one transfer of `points` from `counter` to the member."""
    dates = dates or tuple(conn.execute("SELECT available_from, expires_on FROM lots WHERE id = ?",
                                        (lot_id,)).fetchone())
    append_postings(conn, [NewPosting(member_id, lot_id, dates, kind, points, counter, at.effective_at,
                                      at.created_at, rule_id, at.rules_version, at.receipt, at.ref, counted)],
                    key_id=at.key_id, note=at.note)


def verify_chains(conn: Connection, problems_max: int = 20) -> list[str]:
    """Each member's chain recomputed from its first posting, and its head against
    chain_heads: the first posting of each member that does not match, in words. Postings
    and heads are both read in member order and merged as they stream in, so that no
    read of either is held whole in memory (a head or a posting per member of the program)."""
    problems: list[str] = []
    heads = conn.stream("SELECT member_id, seq, hash FROM chain_heads ORDER BY member_id")
    head = next(heads, None)
    postings = conn.stream(f"SELECT {CHAIN_SELECT}, p.hash FROM postings p JOIN lots l ON l.id = p.lot_id "
                           "ORDER BY p.member_id, p.chain_seq")
    for member, rows in itertools.groupby(postings, key=lambda row: row[1]):
        while head is not None and head[0] < member:
            problems.append(_head_without_postings(head))
            head = next(heads, None)
        recorded = None
        if head is not None and head[0] == member:
            recorded, head = (head[1], bytes(head[2])), next(heads, None)
        problem = _chain_problem(member, rows, recorded)
        if problem is not None:
            problems.append(problem)
        if len(problems) >= problems_max:
            return problems[:problems_max]
    while head is not None and len(problems) < problems_max:
        problems.append(_head_without_postings(head))
        head = next(heads, None)
    return problems[:problems_max]


def _chain_problem(member: int, rows, recorded: tuple[int, bytes] | None) -> str | None:
    """What is wrong with one member's chain (its postings in chain order) and its recorded
    head (seq, hash), in words; None when nothing is."""
    prev, seq = GENESIS_HASH, 0
    for row in rows:
        fields, stored = list(row[:-1]), bytes(row[-1])
        seq += 1
        if fields[0] != seq:
            return f"member m_{member}: posting {seq} of its chain is missing"
        if posting_hash(prev, tuple(fields)) != stored:
            return (f"member m_{member}: posting {fields[0]} of its chain does not match its contents "
                    "or the posting before it")
        prev = stored
    if recorded != (seq, prev):
        return (f"member m_{member}: its chain ends at posting {seq}, its recorded head is posting "
                f"{recorded[0] if recorded else 0}")
    return None


def _head_without_postings(head) -> str:
    member, seq, _ = head
    return f"member m_{member}: chain head at posting {seq}, but the member has no postings"
