"""The operations the API offers, one module each: receipts (calculate, confirm, cancel),
returns, members, adjustments. Each is a set of functions over `Deps`, what every
operation needs from the running server; no object holds them all.

Concurrency: everything that reads a member's points and then changes them (a receipt, a
return, a cancel, an adjustment) runs as one function inside the single write
connection's transaction (storage.db.Database.write), so operations on one member happen
one after another by construction: a receipt sees the postings, limits and budget use of
every receipt written before it, committed or still in the same batch, and nothing it
decided can go stale before it is written. Identical requests in flight at the same
moment therefore write once: the second finds the first one's receipt.

On PostgreSQL (several server processes, each write a transaction of its own) the same
functions first take the member's row lock (storage.ledger.lock_member), which orders the
member's writes across processes as the one writer does here; identical requests in two
processes meet at the receipt's unique key, and the loser runs again as a replay.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import msgspec

from rules import Program
from server.clock import Clock
from server.errors import conflict
from server.metrics import Metrics
from server.privacy import Privacy, marked
from server.programs import ProgramHolder
from storage.db import Database
from storage.segments import MembershipCache

JSON = msgspec.json.Encoder()
T = TypeVar("T")


@dataclass(frozen=True)
class Deps:
    db: Database
    programs: ProgramHolder
    clock: Clock
    metrics: Metrics
    privacy: Privacy
    # Members' segments as the receipt path last read them (storage/segments.py).
    segments: MembershipCache = field(default_factory=MembershipCache)

    def program(self) -> Program:
        return self.programs.current


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keyed_fingerprints(body_under: Callable[[int], bytes], key_ids: list[str]) -> list[str]:
    """The fingerprints of a body whose card numbers are replaced by their keyed hashes
    (an unkeyed hash of a card number is guessed back by trying every number): under the
    key in force first, then under each earlier one, newest first, as a body stored before
    a rotation was fingerprinted. Each is marked with its key's id (server.privacy.marked),
    so `privacy rotate-key` finds those taken under an earlier key. body_under(i): the body
    with each card's i-th hash (server.privacy.candidates); key_ids: Privacy.key_ids."""
    return [marked(sha256(body_under(i)), key_id) for i, key_id in enumerate(reversed(key_ids))]


def replay_any(stored_sha: str, fingerprints: list[str], stored_result: bytes, answer: type[T]) -> T:
    """replay, the request matching when any of its fingerprints is the stored one."""
    return replay(stored_sha, stored_sha if stored_sha in fingerprints else fingerprints[0], stored_result, answer)


def replay(stored_sha: str, fingerprint: str, stored_result: bytes, answer: type[T]) -> T:
    """The stored answer of an identical earlier request, decoded into its answer type
    (server/answer_types.py) like every answer the server sends, so a replay says exactly
    what /openapi.json declares for it. Runs inside write transactions: no side effects
    beyond the answer."""
    if stored_sha != fingerprint:
        raise conflict("idempotency_conflict", "this identity was already used with a different body; use a new id")
    return msgspec.structs.replace(msgspec.json.decode(stored_result, type=answer), replayed=True)


def count(deps: Deps, endpoint: str, status: int, result=None) -> None:
    outcome = "replayed" if status == 200 and getattr(result, "replayed", False) else "ok"
    deps.metrics.receipts_of(endpoint, outcome).inc()
