"""The dispatcher: delivers the events outbox (storage/events.py) to the configured webhooks.

At least once, in order per member: each round gives every webhook delivery rows for the new
events it subscribes to, reads each member's oldest pending delivery that is due (on a reader
connection), POSTs them concurrently (at most events.concurrency_max at once, each within
events.timeout_seconds) and records every outcome in one write. A delivery is done only once
the receiver answered 2xx and that was committed, so a crash in between sends the event again,
with the same X-Loyalty-Event-Id. A failed delivery is retried after 1 s, 2, 4 ... up to
events.retry_max_seconds, with jitter, for events.retry_for_seconds; then it is dead: a dead
letter no longer holds back that member's later events, counts in loyalty_webhook_dead_letters
and goes again with `loyalty events retry`.

Each member's pending deliveries go in id order. On SQLite that is the order the events were
written in. On PostgreSQL, where several writers commit out of id order, the fan-out takes each
event once it is committed (storage/events.py fan_out), so an event whose transaction committed
after a later-numbered one had already been sent is sent after it: late, never skipped.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import sqlite3
import time
from datetime import datetime, timedelta
from typing import Callable

import aiohttp
import msgspec

from server.config import Config, WebhookConfig
from server.metrics import Metrics
from server.member_state import tier_view
from storage import events, ledger
from storage.apply import ReferralPoints
from storage.db import Database, StorageError

log = logging.getLogger("loyalty.webhooks")

JITTER = 0.2                    # a retry waits up to this share less, so receivers coming back are not hit at once
METRICS_EVERY_SECONDS = 1.0
PURGE_EVERY_SECONDS = 60.0
PURGE_ROWS_MAX = 1_000          # per statement, so one write never holds the writer long
ERROR_CHARS_MAX = 200

_JSON = msgspec.json.Encoder()


def signature(secret: str, body: bytes) -> str:
    """The X-Loyalty-Signature header's value."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay(config, attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after `attempts` failed ones."""
    base = min(config.retry_max_seconds, config.retry_initial_seconds * 2 ** min(attempts - 1, 30))
    return base * (1 - JITTER * rng())


class Dispatcher:
    def __init__(self, db: Database, config: Config, metrics: Metrics, clock, wall: Callable[[], float] = time.time):
        self.db, self.events, self.hooks = db, config.events, list(config.webhooks)
        self.metrics, self.clock, self.wall = metrics, clock, wall
        self._metrics_at = self._purge_at = 0.0
        self._failing: dict[str, int] = {}      # webhook id: failed attempts since it last delivered
        self._read_database = False             # whether the last round got past the jobs' lock

    async def start(self) -> None:
        """Every webhook's cursor exists before the first request is served, so none misses an event."""
        def start(conn):
            for hook in self.hooks:
                events.start_fanout(conn, hook.id)
        await self.db.write(start)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.events.timeout_seconds)
        connector = aiohttp.TCPConnector(limit=self.events.concurrency_max)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            gate = asyncio.Semaphore(self.events.concurrency_max)
            paused = False
            while True:
                try:
                    pause = await self.round(session, gate)
                except StorageError as e:    # storage logs the fault itself
                    if not paused:          # once per fault, not every few seconds while it lasts
                        log.warning("event delivery paused (%s: %s)", e.cause, e)
                    paused = True
                    pause = self.events.poll_interval_seconds * 4
                except Exception:  # noqa: BLE001 - a failed round is tried again, never ends delivery
                    log.exception("event delivery round failed")
                    pause = self.events.poll_interval_seconds * 4
                else:
                    # A round of a process that does not hold the jobs' lock reads nothing: on
                    # PostgreSQL still down, it would say resumed too early.
                    if paused and self._read_database:
                        log.info("event delivery resumed")
                        paused = False
                await asyncio.sleep(pause)

    async def round(self, session: aiohttp.ClientSession, gate: asyncio.Semaphore) -> float:
        """One round; returns how long to wait before the next one. Where several servers
        share the database, only the one running the jobs delivers (in order per member)."""
        self._read_database = False
        if not await asyncio.to_thread(self.db.runs_jobs):
            return self.events.poll_interval_seconds
        self._read_database = True
        now = self.wall()
        # Looked at on a reader first: an idle server does not write (nor fsync) every poll.
        ids = [hook.id for hook in self.hooks]
        if await self.db.read(lambda conn: events.fan_out_owed(conn, ids)):
            await self.db.write(lambda conn: self._fan_out(conn, now))
        work = await self.db.read(lambda conn: {h.id: events.due(conn, h.id, now, self.events.batch_max)
                                                for h in self.hooks}) if self.hooks else {}
        sends = [self._deliver(session, gate, hook, item) for hook in self.hooks for item in work[hook.id]]
        outcomes = list(await asyncio.gather(*sends))
        if outcomes:
            await self.db.write(lambda conn: events.record(conn, outcomes))
            self._count(outcomes)
        await self._housekeeping()
        return 0.0 if outcomes else await self._pause()

    def _fan_out(self, conn: sqlite3.Connection, now: float) -> None:
        hooks = [events.Hook(hook.id, hook.events) for hook in self.hooks]
        events.fan_out(conn, hooks, self.events.batch_max * 4, now)

    async def _deliver(self, session, gate, hook: WebhookConfig, item: events.Due) -> events.Outcome:
        body = _JSON.encode(item.event)
        headers = {"Content-Type": "application/json", "X-Loyalty-Event-Id": str(item.event_id),
                   "X-Loyalty-Signature": signature(hook.secret, body)}
        error = None
        async with gate:
            started = self.wall()
            try:
                async with session.post(hook.url, data=body, headers=headers, allow_redirects=False) as resp:
                    if not 200 <= resp.status < 300:
                        error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"[:ERROR_CHARS_MAX]
        return self._outcome(hook, item, started, error)

    def _outcome(self, hook: WebhookConfig, item: events.Due, started: float, error: str | None) -> events.Outcome:
        attempts, first = item.attempts + 1, item.first_attempt_at or started
        now = self.wall()
        if error is None:
            return events.Outcome(hook.id, item.event_id, "delivered", attempts, first, now, None, now)
        if now - first >= self.events.retry_for_seconds:
            log.warning("webhook %s: event %d (%s) is a dead letter after %d attempts, the last: %s; "
                        "`loyalty events retry` sends it again", hook.id, item.event_id, item.event["type"],
                        attempts, error)
            return events.Outcome(hook.id, item.event_id, "dead", attempts, first, now, error, now)
        return events.Outcome(hook.id, item.event_id, "pending", attempts, first,
                              now + retry_delay(self.events, attempts), error, None)

    def _count(self, outcomes: list[events.Outcome]) -> None:
        for o in outcomes:
            result = {"pending": "failed"}.get(o.state, o.state)
            self.metrics.webhook_deliveries.labels(result).inc()
            self._log_change(o)

    def _log_change(self, o: events.Outcome) -> None:
        """Once when a webhook starts failing and once when it delivers again, not per attempt."""
        if o.state == "delivered" and o.webhook_id in self._failing:
            log.info("webhook %s: delivering again after %d failed attempts", o.webhook_id,
                     self._failing.pop(o.webhook_id))
        elif o.state != "delivered":
            if o.webhook_id not in self._failing:
                log.warning("webhook %s: delivery failed (%s); retrying from %gs, doubling up to %gs, for %gs",
                            o.webhook_id, o.error, self.events.retry_initial_seconds,
                            self.events.retry_max_seconds, self.events.retry_for_seconds)
            self._failing[o.webhook_id] = self._failing.get(o.webhook_id, 0) + 1

    async def _pause(self) -> float:
        """Until the next retry is due, at most the poll interval."""
        if not self.hooks:
            return self.events.poll_interval_seconds
        soonest = await self.db.read(lambda conn: [events.next_due(conn, h.id) for h in self.hooks])
        due = [t for t in soonest if t is not None]
        wait = min(due) - self.wall() if due else self.events.poll_interval_seconds
        return max(0.0, min(self.events.poll_interval_seconds, wait))

    async def _housekeeping(self) -> None:
        now = self.wall()
        if self.hooks and now - self._metrics_at >= METRICS_EVERY_SECONDS:
            self._metrics_at = now
            await self._observe()
        if now - self._purge_at >= PURGE_EVERY_SECONDS:
            self._purge_at = now
            await self._purge()

    async def _observe(self) -> None:
        def read(conn):
            return events.counts(conn), {h.id: events.not_fanned_out(conn, h.id) for h in self.hooks}
        counts, unseen = await self.db.read(read)
        configured = {hook.id for hook in self.hooks}     # a webhook removed from the config sends nothing more
        self.metrics.events_backlog.set(sum(n for (w, state), n in counts.items()
                                            if state == "pending" and w in configured) + sum(unseen.values()))
        self.metrics.webhook_dead_letters.set(sum(n for (w, state), n in counts.items()
                                                  if state == "dead" and w in configured))

    async def _purge(self) -> None:
        before: datetime = self.clock.now() - timedelta(days=self.events.retention_days)
        if not await self.db.read(lambda conn: events.any_written_before(conn, before)):
            return      # an idle server does not write
        ids = [hook.id for hook in self.hooks]
        while await self.db.write(lambda conn: events.purge(conn, before, ids, PURGE_ROWS_MAX)) >= PURGE_ROWS_MAX:
            pass


def emit_noting_tier(conn: sqlite3.Connection, program, member_id: int, type_: str, data: dict,
                     now: datetime, card_last4: str | None = None, member=None, tier: str | None = None) -> None:
    """Emits the event, then tier.changed if the change moved the member's tier. member: the
    member's row when the caller has it (a receipt does), saving look-ups per receipt: its
    tier facts and its CRM fields. tier: the member's tier at `now` after the change when the
    caller knows it (a confirm does, from its plan); otherwise it is counted here."""
    crm = events.Crm(member.crm_id, member.consent) if member is not None else None
    events.emit(conn, type_, member_id, data, now, card_last4=card_last4, crm=crm)
    note_tier(conn, program, member_id, now, type_, member, card_last4, tier)


def emit_referral(conn: sqlite3.Connection, type_: str, moved: ReferralPoints, referee_id: int,
                  receipt: ledger.ReceiptKey, reason: str, now: datetime) -> None:
    """referral.rewarded or referral.reversed for the member holding the referrer's points.
    Event points never move a tier (tiers count purchases): no tier.changed follows.
    receipt: the friend's receipt whose purchase paid the reward, or whose cancel or return
    took it back; reason: the friend's event of the change (as tier.changed names it)."""
    events.emit(conn, type_, moved.member_id, {
        "referred_member_id": ledger.member_public_id(referee_id),
        "receipt": {"store_id": receipt[0], "register_id": receipt[1], "receipt_id": receipt[2]},
        "points": moved.points, "reason": reason, "balance": moved.balance.as_json()}, now)


def note_tier(conn: sqlite3.Connection, program, member_id: int, now: datetime, reason: str, member=None,
              card_last4: str | None = None, tier: str | None = None) -> None:
    """tier.changed when the member's tier as of `now` (tier: when the caller knows it) is
    not the one last announced."""
    if len(program.tiers) < 2:
        return                              # one level: nothing to move between
    row = member if member is not None else ledger.member_by_id(conn, member_id)
    if tier is None:
        tier = tier_view(conn, program, row, now)[0]["id"]
    events.note_tier(conn, member_id, tier, now, reason, card_last4, events.Crm(row.crm_id, row.consent))

