"""Anchors over the members' hash chains (docs/postgresql.md, the hash chain).

Each member's postings chain to the member's previous one (storage/pg/ledger.py), so a
posting edited or removed from the middle breaks that member's chain. What a chain alone
cannot show is its end cut off: postings removed from a member's end, with the head put
back, or a member's postings removed whole. An anchor lists the heads (member, chain_seq,
hash) that moved since they were last anchored and hashes that list with the previous
anchor's hash, so the anchors form one chain of their own over every member's chain.
verify() checks that every head an anchor lists is still the member's posting with that
number and that hash.

Writing an anchor never makes a receipt wait on it for long: it skips the heads a
transaction is writing right now (FOR UPDATE SKIP LOCKED: the next anchor takes them) and
takes at most HEADS_PER_ANCHOR heads, and the anchors themselves follow one another on a
transaction-level advisory lock, so several processes may try at once.
"""
from __future__ import annotations

import hashlib
from datetime import datetime

import msgspec

from storage.audit import InOrder
from storage.ledger import GENESIS_HASH, iso
from storage.pg.connection import Connection

# Bounds how long an anchor holds the heads it lists (a receipt of one of those members
# waits for the anchor's commit): ~10,000 rows are tens of milliseconds.
HEADS_PER_ANCHOR = 10_000
# pg_advisory_xact_lock's key for writing anchors: 'anchors' as a number, fixed for good.
ANCHOR_LOCK_KEY = 0x616E63686F7273
_ENCODE = msgspec.json.Encoder()


def anchor_hash(prev_hash: bytes, created_at: str, heads: list[tuple[int, int, bytes]]) -> bytes:
    """SHA-256 over the previous anchor's hash (hex), the anchor's time and its heads in
    member order, each (member_id, chain_seq, hash as hex)."""
    listed = [(member, seq, bytes(h).hex()) for member, seq, h in heads]
    return hashlib.sha256(prev_hash.hex().encode() + _ENCODE.encode([created_at, listed])).digest()


def write_anchor(conn: Connection, now: datetime) -> int:
    """One anchor over at most HEADS_PER_ANCHOR heads that moved since last anchored, in one
    transaction; how many it listed (0: nothing moved, no anchor written)."""
    return conn.transaction(lambda c: _anchor_in_tx(c, iso(now)))


def write_anchors(conn: Connection, now: datetime) -> int:
    """Anchors until every head that moved is anchored (heads being written right now
    excepted); how many heads they listed."""
    total = 0
    while listed := write_anchor(conn, now):
        total += listed
    return total


def _anchor_in_tx(conn: Connection, created_at: str) -> int:
    conn.execute("SELECT pg_advisory_xact_lock(?)", (ANCHOR_LOCK_KEY,))
    heads = [(m, seq, bytes(h)) for m, seq, h in conn.execute(
        "SELECT member_id, seq, hash FROM chain_heads WHERE seq > anchored_seq ORDER BY member_id "
        "LIMIT ? FOR UPDATE SKIP LOCKED", (HEADS_PER_ANCHOR,))]
    if not heads:
        return 0
    last = conn.execute("SELECT hash FROM chain_anchors ORDER BY id DESC LIMIT 1").fetchone()
    prev = bytes(last[0]) if last else GENESIS_HASH
    digest = anchor_hash(prev, created_at, heads)
    anchor_id = conn.execute("INSERT INTO chain_anchors (created_at, prev_hash, hash) VALUES (?, ?, ?) RETURNING id",
                             (created_at, prev, digest)).fetchone()[0]
    conn.executemany("INSERT INTO chain_anchor_heads (anchor_id, member_id, seq, hash) VALUES (?, ?, ?, ?)",
                     [(anchor_id, *head) for head in heads])
    conn.executemany("UPDATE chain_heads SET anchored_seq = ? WHERE member_id = ?",
                     [(seq, member) for member, seq, _ in heads])
    return len(heads)


def verify(conn: Connection, problems_max: int = 20) -> list[str]:
    """The anchors recomputed in order, and every head they list against the postings: the
    problems found, in words (none: every anchored chain is whole up to its anchor)."""
    problems: list[str] = []
    prev = GENESIS_HASH
    # Anchors and their heads in one ordered read each, merged as they stream in: one
    # anchor a minute makes half a million a year, too many for a statement each.
    listed = InOrder(conn.stream("SELECT anchor_id, member_id, seq, hash FROM chain_anchor_heads "
                                 "ORDER BY anchor_id, member_id"), 1)
    for anchor_id, created_at, prev_hash, stored in conn.stream(
            "SELECT id, created_at, prev_hash, hash FROM chain_anchors ORDER BY id"):
        heads = [(m, seq, bytes(h)) for _, m, seq, h in listed.take((anchor_id,))]
        if bytes(prev_hash) != prev or anchor_hash(prev, created_at, heads) != bytes(stored):
            problems.append(f"anchor {anchor_id}: does not match its heads or the anchor before it")
        prev = bytes(stored)
        if len(problems) >= problems_max:
            return problems
    for anchor_id, member, seq, posting_hash in conn.stream(
            "SELECT a.anchor_id, a.member_id, a.seq, p.hash = a.hash FROM chain_anchor_heads a "
            "LEFT JOIN postings p ON p.member_id = a.member_id AND p.chain_seq = a.seq "
            "WHERE p.hash IS DISTINCT FROM a.hash ORDER BY a.anchor_id, a.member_id"):
        what = "is missing" if posting_hash is None else "differs from its anchored hash"
        problems.append(f"member m_{member}: posting {seq} of its chain, anchored by anchor {anchor_id}, {what}")
        if len(problems) >= problems_max:
            break
    return problems[:problems_max]
