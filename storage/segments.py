"""RFM scores and segment membership.

RFM (rules.md): among members with at least one confirmed receipt in the `window_days`
local days up to the job's local date, recency is the days from the last receipt's local
date to the job's, frequency the receipts, monetary their totals less what was returned of
them. Each score is 1 + floor(5 x b / n): n members scored, b of them strictly worse.
Members without a receipt in the window have no scores. A member merged into another is
one customer with it: its receipts are scored as those of the member at the end of its
chain of merges (customers), and it is in no computed segment itself.

A run reads everything it needs in one read transaction (a reader connection: receipts
keep being written meanwhile), scores in memory, and writes its rows in batches under its
own run id; it is marked finished last, so readers always see one whole run (the newest
finished), never a half-written one. Rows of older runs are deleted afterwards, in batches.

Membership of the computed (`rfm` and `when`) segments is what a run decided, kept as spans
(segment_spans, m028): a run writes only what changed since the spans it found open,
opening and closing them under its run id; a reader takes the spans open at the newest
finished run. Spans are never deleted, so who was in a segment at a past moment can be
answered (the campaign report's audience). A `list` segment's spans follow the API.
"""
from __future__ import annotations

import sqlite3
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, tzinfo
from typing import NamedTuple

import msgspec

from storage.ledger import iso
from storage.sql import is_postgresql

WRITE_BATCH_ROWS = 2_000        # one write transaction of a few ms: receipts commit between batches
DELETE_BATCH_ROWS = 2_000
WINDOW_DAYS_MAX = 3660


class ScoreRange(msgspec.Struct, frozen=True):
    """Inclusive score bounds, as `r: [4, 5]` in a program."""
    low: int = 1
    high: int = 5

    def holds(self, score: int) -> bool:
        return self.low <= score <= self.high


class SegmentDefinition(msgspec.Struct, frozen=True):
    """One segment of a program: by RFM score ranges (an absent range holds for any
    score), an explicit `list` of members, or (`when`) a condition the daily job evaluates."""
    id: str
    r: ScoreRange | None = None
    f: ScoreRange | None = None
    m: ScoreRange | None = None
    list: bool = False
    when: bool = False

    @property
    def by_rfm(self) -> bool:
        return not self.list and not self.when and (self.r or self.f or self.m) is not None


class Facts(NamedTuple):
    member_id: int
    last_date: date
    receipts: int
    spend: int
    spend_worse: int        # members of the window who spent strictly less


class Score(NamedTuple):
    member_id: int
    r: int
    f: int
    m: int
    recency_days: int
    receipts: int
    spend: int


# ------------------------------------------------------------------ computing

def window_facts(conn: sqlite3.Connection, today: date, window_days: int, tz: tzinfo) -> list[Facts]:
    """Each member's last receipt date, receipt count and net spend in the window.

    The window is read by `ts` (UTC, as stored) between the first moments of its first local
    day and of the day after `today`: the receipts_member_counts index covers that query, so
    it never reads the receipts' rows (their bodies are most of the database)."""
    start, end = _window_bounds(today, window_days, tz)
    # Monetary is ranked by SQLite (RANK() - 1: how many spent strictly less) inside its own
    # step calls, which run without Python's GIL: sorting a million values in Python would
    # hold it, and stall the event loop, for as long as the sort takes. In the ranking's
    # order (SQLite and PostgreSQL sort once for both): customers() looks values up by bisection.
    rows = conn.execute(
        "WITH back AS (SELECT r.member_id AS mid, SUM(rl.amount) AS amount FROM return_lines rl JOIN receipts r "
        "ON r.store_id = rl.receipt_store AND r.register_id = rl.receipt_register AND r.receipt_id = rl.receipt_id "
        "WHERE r.status = 'confirmed' AND r.member_id IS NOT NULL AND r.ts >= ? AND r.ts < ? GROUP BY 1), "
        "facts AS (SELECT member_id AS mid, MAX(ts) AS last, COUNT(*) AS n, SUM(total) AS spend FROM receipts "
        "WHERE member_id IS NOT NULL AND status = 'confirmed' AND ts >= ? AND ts < ? GROUP BY member_id) "
        "SELECT f.mid, f.last, f.n, f.spend - COALESCE(b.amount, 0), "
        "RANK() OVER (ORDER BY f.spend - COALESCE(b.amount, 0)) - 1 FROM facts f LEFT JOIN back b ON b.mid = f.mid "
        "ORDER BY 4", (start, end, start, end))
    local_day = local_days(tz)
    return [Facts(mid, local_day(last), count, spend, less) for mid, last, count, spend, less in rows]


def window_and_tier_facts(conn: sqlite3.Connection, today: date, window_days: int, tz: tzinfo,
                          tier_since: str) -> tuple[list[Facts], dict[int, tuple[int, int]]]:
    """window_facts, and tier_metrics(conn, tier_since, None) with it, from one pass over the
    receipts instead of two (both are most of what the daily job reads)."""
    start, end = _window_bounds(today, window_days, tz)
    low = min(start, tier_since)        # both ISO text: the earlier of the two
    # Plain `?` each time, in order (PostgreSQL's driver numbers them itself), counts with CASE.
    in_window = "ts >= ? AND ts < ?"
    rows = conn.execute(
        "WITH back AS (SELECT r.member_id AS mid, SUM(CASE WHEN r.ts >= ? AND r.ts < ? THEN rl.amount END) AS w, "
        "SUM(CASE WHEN r.ts > ? THEN rl.amount END) AS t FROM return_lines rl JOIN receipts r "
        "ON r.store_id = rl.receipt_store AND r.register_id = rl.receipt_register AND r.receipt_id = rl.receipt_id "
        "WHERE r.status = 'confirmed' AND r.member_id IS NOT NULL AND r.ts >= ? GROUP BY 1), "
        f"facts AS (SELECT member_id AS mid, MAX(CASE WHEN {in_window} THEN ts END) AS last, "
        f"SUM(CASE WHEN {in_window} THEN 1 ELSE 0 END) AS n, SUM(CASE WHEN {in_window} THEN total END) AS spend, "
        "SUM(CASE WHEN ts > ? THEN 1 ELSE 0 END) AS tier_n, SUM(CASE WHEN ts > ? THEN total END) AS tier_spend "
        "FROM receipts WHERE member_id IS NOT NULL AND status = 'confirmed' AND ts >= ? GROUP BY member_id) "
        "SELECT f.mid, f.last, f.n, f.spend - COALESCE(b.w, 0), "
        "RANK() OVER (PARTITION BY f.n > 0 ORDER BY f.spend - COALESCE(b.w, 0)) - 1, "
        "f.tier_n, COALESCE(f.tier_spend, 0) - COALESCE(b.t, 0) FROM facts f LEFT JOIN back b ON b.mid = f.mid "
        "ORDER BY f.n > 0, 4",
        (start, end, tier_since, low, start, end, start, end, start, end, tier_since, tier_since, low))
    local_day = local_days(tz)
    facts, tiers = [], {}
    for mid, last, count, spend, less, tier_count, tier_spend in rows:
        if count:
            facts.append(Facts(mid, local_day(last), count, spend, less))
        if tier_count:
            tiers[mid] = (tier_count, tier_spend)
    return facts, tiers


class Customers(NamedTuple):
    """The window's facts by customer (customers()). monetary: a customer's monetary score
    when a merge changed who is scored (a member's spend_worse is then as read: see
    customers), None when spend_worse is every member's own count."""
    facts: list[Facts]
    monetary: Callable[[Facts], int] | None = None


def customers(facts: list[Facts], heirs: dict[int, int]) -> Customers:
    """The window's facts by customer. A member merged into another (heirs: each member
    merged away -> the member at the end of its chain of merges) is no member of its own:
    its receipts are that member's, scored once with the later last receipt and the
    receipts and net spend of them all. facts: in order of spend, as window_facts reads
    them.

    Ranking the spend again would sort a million values holding the GIL (window_facts), and
    a new count for each member costs more than the rest of the job's Python: merges are
    few, so what changes is worked out from them. A member's count of those who spent less
    becomes its old one, less the replaced values under its own, plus the folded values
    under it; that only grows with the old count, so the monetary score of a member not
    merged is where its old count falls among four thresholds, found by bisection over the
    facts in order of spend. A folded customer's count is its own bisections."""
    linked = heirs.keys() | set(heirs.values())
    groups: dict[int, list[Facts]] = {}
    for f in ([f for f in facts if f[0] in linked] if heirs else ()):
        groups.setdefault(heirs.get(f.member_id, f.member_id), []).append(f)
    groups = {heir: group for heir, group in groups.items() if len(group) > 1 or group[0].member_id != heir}
    if not groups:
        return Customers(facts)
    left = [f for group in groups.values() for f in group]
    gone = {f.member_id for f in left}
    sums = [(heir, max(f.last_date for f in group), sum(f.receipts for f in group), sum(f.spend for f in group))
            for heir, group in sorted(groups.items())]
    replaced, came = sorted(f.spend for f in left), sorted(spend for *_, spend in sums)
    n = len(facts) - len(left) + len(sums)

    def under(spend: int) -> tuple[int, bool]:
        """How many members as read spent less than `spend`, and whether one spent it."""
        at = bisect_left(facts, spend, key=_spend)
        return at, at < len(facts) and facts[at].spend == spend
    # From which old count on each moved value is under a member's value: a replaced value
    # (one of the old) from the count just above its own; a folded one from the count of the
    # first old value above it.
    left_from = sorted(f.spend_worse + 1 for f in left)
    came_from = sorted(at + 1 if equal else at for at, equal in map(under, came))

    def worse_now(old: int) -> int:
        return old - bisect_right(left_from, old) + bisect_right(came_from, old)
    thresholds = []
    for k in range(1, 5):       # the monetary score is 1 + 5 x worse // n: it passes k where 5 x worse >= k x n
        at = bisect_left(range(len(facts)), True, key=lambda i: 5 * worse_now(facts[i].spend_worse) >= k * n)
        thresholds.append(facts[at].spend_worse if at < len(facts) else len(facts))
    folded, scores = [], {}
    for heir, last, receipts, spend in sums:
        worse = under(spend)[0] - bisect_left(replaced, spend) + bisect_left(came, spend)
        folded.append(Facts(heir, last, receipts, spend, worse))
        scores[heir] = 1 + 5 * worse // n

    def monetary(f: Facts) -> int:
        return scores[f.member_id] if f.member_id in scores else 1 + bisect_right(thresholds, f.spend_worse)
    return Customers([f for f in facts if f.member_id not in gone] + folded, monetary)


def _spend(f: Facts) -> int:
    return f.spend


def latest_by_customer(last: dict[int, str], heirs: dict[int, int]) -> dict[int, str]:
    """last_purchases with a member merged away's last receipt counted as its heir's."""
    moved = [member_id for member_id in last if member_id in heirs] if heirs else []
    if not moved:
        return last
    out = dict(last)
    for member_id in moved:
        ts, heir = out.pop(member_id), heirs[member_id]
        out[heir] = max(out.get(heir, ts), ts)
    return out


def local_days(tz: tzinfo):
    """A stored instant (a receipt's ts, enrolled_at) -> its local date, remembering each UTC hour's offset: a million
    conversions would otherwise be most of the job's time. An hour in which the offset
    changes (a zone that moves its clocks at a half hour) is converted receipt by receipt."""
    offsets: dict[str, timedelta | None] = {}

    def local_day(ts: str) -> date:
        hour = ts[:13]
        if hour not in offsets:
            first = datetime.fromisoformat(hour + ":00:00+00:00")
            before, after = first.astimezone(tz).utcoffset(), (first + timedelta(seconds=3599)).astimezone(tz).utcoffset()
            offsets[hour] = before if before == after else None
        offset = offsets[hour]
        if offset is None:
            return datetime.fromisoformat(ts).astimezone(tz).date()
        return (datetime.fromisoformat(ts[:19]) + offset).date()
    return local_day


def _worse_than(values: list[int], higher_is_better: bool) -> dict[int, int]:
    """value -> how many of `values` are strictly worse. Counted, not sorted: recency and
    frequency take few distinct values, and a loop lets other threads run between steps."""
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    out, seen = {}, 0
    for v in sorted(counts, reverse=not higher_is_better):
        out[v] = seen
        seen += counts[v]
    return out


def score_all(facts: list[Facts], today: date, monetary: Callable[[Facts], int] | None = None) -> list[Score]:
    """score = 1 + floor(5 x b / n), b = how many members scored are strictly worse.
    monetary: the monetary score of each, when not from spend_worse (Customers)."""
    n = len(facts)
    if not n:
        return []
    recency = [(today - f.last_date).days for f in facts]
    r = _worse_than(recency, higher_is_better=False)
    f = _worse_than([x.receipts for x in facts], higher_is_better=True)
    if monetary is not None:
        return [Score(x.member_id, 1 + 5 * r[days] // n, 1 + 5 * f[x.receipts] // n, monetary(x), days,
                      x.receipts, x.spend) for x, days in zip(facts, recency)]
    return [Score(x.member_id, 1 + 5 * r[days] // n, 1 + 5 * f[x.receipts] // n, 1 + 5 * x.spend_worse // n, days,
                  x.receipts, x.spend) for x, days in zip(facts, recency)]


# ------------------------------------------------------------------ every member's facts, in bulk

class MemberRecord(NamedTuple):
    member_id: int
    tags: str                   # JSON list, as stored
    enrolled_at: str
    manual_tier: str | None
    manual_tier_until: str | None


def member_records(conn: sqlite3.Connection) -> list[MemberRecord]:
    return list(map(MemberRecord._make, conn.execute(
        "SELECT id, tags, enrolled_at, manual_tier, manual_tier_until FROM members ORDER BY id")))


def erased_members(conn: sqlite3.Connection) -> set[int]:
    return {mid for (mid,) in conn.execute("SELECT id FROM members WHERE erased_at IS NOT NULL")}


def tier_metrics(conn: sqlite3.Connection, since: str, until: str | None) -> dict[int, tuple[int, int]]:
    """member -> (confirmed receipts with a ts after since up to until, included; their
    totals less every return of them stored so far), for every member with one: what
    ledger.receipt_counts answers for one member, by one pass of receipts_member_counts."""
    until = until or "9999"
    out = {mid: (n, spend) for mid, n, spend in conn.execute(
        "SELECT member_id, COUNT(*), SUM(total) FROM receipts WHERE member_id IS NOT NULL "
        "AND status = 'confirmed' AND ts > ? AND ts <= ? GROUP BY member_id", (since, until))}
    for mid, amount in conn.execute(
            "SELECT r.member_id, SUM(rl.amount) FROM return_lines rl JOIN receipts r ON r.store_id = rl.receipt_store "
            "AND r.register_id = rl.receipt_register AND r.receipt_id = rl.receipt_id WHERE r.status = 'confirmed' "
            "AND r.member_id IS NOT NULL AND r.ts > ? AND r.ts <= ? GROUP BY 1", (since, until)):
        n, spend = out[mid]
        out[mid] = (n, spend - amount)
    return out


def last_purchases(conn: sqlite3.Connection, before: str) -> dict[int, str]:
    """member -> the ts of their last confirmed receipt, for those whose last one is before `before`."""
    return dict(conn.execute(
        "SELECT member_id, MAX(ts) FROM receipts WHERE member_id IS NOT NULL AND status = 'confirmed' "
        "GROUP BY member_id HAVING MAX(ts) < ?", (before,)))


def window_start(today: date, window_days: int, tz: tzinfo) -> datetime:
    return datetime.combine(today - timedelta(days=window_days - 1), time.min, tz)


def _window_bounds(today: date, window_days: int, tz: tzinfo) -> tuple[str, str]:
    """The window's first moment and the first moment of the day after `today`, as stored."""
    return iso(window_start(today, window_days, tz)), iso(datetime.combine(today + timedelta(days=1), time.min, tz))


# ------------------------------------------------------------------ storing a run

def start_run(conn: sqlite3.Connection, today: date, window_days: int, now: datetime,
              definitions_sha256: str | None = None) -> int:
    return conn.execute("INSERT INTO rfm_runs (local_date, window_days, started_at, definitions_sha256) "
                        "VALUES (?, ?, ?, ?) RETURNING id",
                        (today.isoformat(), window_days, iso(now), definitions_sha256)).fetchone()[0]


def write_scores(conn: sqlite3.Connection, run_id: int, scores: list[Score]) -> None:
    conn.executemany("INSERT INTO rfm_scores (run_id, member_id, r, f, m, recency_days, receipts, spend) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(run_id, *s) for s in scores])


def finish_run(conn: sqlite3.Connection, run_id: int, scored: int, now: datetime) -> None:
    conn.execute("UPDATE rfm_runs SET finished_at = ?, members_scored = ? WHERE id = ?", (iso(now), scored, run_id))


def delete_older_batch(conn: sqlite3.Connection, run_id: int) -> int:
    """Deletes up to DELETE_BATCH_ROWS score rows of runs before run_id; how many it deleted."""
    old = conn.execute("SELECT MIN(run_id) FROM rfm_scores WHERE run_id < ?", (run_id,)).fetchone()[0]
    if old is None:
        return 0
    return conn.execute(
        "DELETE FROM rfm_scores WHERE run_id = ? AND member_id IN "
        "(SELECT member_id FROM rfm_scores WHERE run_id = ? ORDER BY member_id LIMIT ?)",
        (old, old, DELETE_BATCH_ROWS)).rowcount


def due(conn: sqlite3.Connection, today: date, definitions_sha256: str | None = None) -> bool:
    """Scores and segments are recomputed once a local day, and again when the computed
    segments' definitions (definitions_sha256, None: only scores) are not the last run's."""
    same = "" if definitions_sha256 is None else " AND definitions_sha256 = ?"
    return conn.execute("SELECT 1 FROM rfm_runs WHERE finished_at IS NOT NULL AND local_date = ?" + same,
                        (today.isoformat(),) + (() if definitions_sha256 is None else (definitions_sha256,))
                        ).fetchone() is None


# ------------------------------------------------------------------ computed membership

def open_spans(conn: sqlite3.Connection) -> dict[str, set[int]]:
    """segment id -> its members as the runs so far left them (spans no run closed yet)."""
    out: dict[str, set[int]] = {}
    for segment_id, member_id in conn.execute(
            "SELECT segment_id, member_id FROM segment_spans WHERE from_run IS NOT NULL AND valid_to IS NULL"):
        out.setdefault(segment_id, set()).add(member_id)
    return out


class Changes(NamedTuple):
    opened: list[tuple[str, int]]       # (segment id, member id) entering
    closed: list[tuple[str, int]]       # leaving, a segment no longer defined included


def changes(members: dict[str, set[int]], before: dict[str, set[int]]) -> Changes:
    """What a run changes: members maps each computed segment to who is in it now."""
    empty: set[int] = set()
    # In segment and member order, as the spans' indexes are: each batch appends to them.
    return Changes(
        [(sid, mid) for sid in sorted(members) for mid in sorted(members[sid] - before.get(sid, empty))],
        [(sid, mid) for sid in sorted(before) for mid in sorted(before[sid] - members.get(sid, empty))])


def write_changes(conn: sqlite3.Connection, run_id: int, now: datetime, changes: Changes) -> None:
    """One batch of a run's openings and closings (the same member may be in two batches).
    Readers see them once the run has finished, unless a newer run finished first."""
    at = iso(now)
    conn.executemany("UPDATE segment_spans SET valid_to = ?, to_run = ? WHERE segment_id = ? AND member_id = ? "
                     "AND from_run IS NOT NULL AND valid_to IS NULL",
                     [(at, run_id, sid, mid) for sid, mid in changes.closed])
    # DO NOTHING: a span another run (the server's and `loyalty jobs run` at once) opened already.
    conn.executemany("INSERT INTO segment_spans (segment_id, member_id, valid_from, from_run) "
                     "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", [(sid, mid, at, run_id) for sid, mid in changes.opened])
    newest = conn.execute(_NEWEST).fetchone() if changes.closed or changes.opened else None
    if newest is not None and run_id <= newest[0]:
        new_generation(conn)


def new_generation(conn: sqlite3.Connection) -> None:
    """After a write of spans readers see at once: segments_generation (m034) gets a new
    random value in the writer's transaction, so what servers keep of members' segments
    (MembershipCache) is dropped at their next read after it commits. Every writer of spans
    is in this module. PostgreSQL's triggers (p012) do it for every transaction that writes
    spans, a previous version's during a rolling upgrade too; SQLite's would cost the daily
    job a statement journal per span (m034)."""
    if not is_postgresql(conn):
        conn.execute("INSERT INTO segments_generation (id, value) VALUES (1, random()) "
                     "ON CONFLICT (id) DO UPDATE SET value = excluded.value")


# ------------------------------------------------------------------ reading

# The newest finished run: read backwards from the newest, so a year of daily runs (one row
# each) costs a receipt one or two rows, not a scan of them all.
_NEWEST = "SELECT id FROM rfm_runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1"


def scores_of(conn: sqlite3.Connection, member_id: int) -> Score | None:
    """The member's scores from the newest finished run, or None (unscored)."""
    row = conn.execute(
        "SELECT member_id, r, f, m, recency_days, receipts, spend FROM rfm_scores "
        f"WHERE run_id = ({_NEWEST}) AND member_id = ?",
        (member_id,)).fetchone()
    return Score(*row) if row else None


def current_spans(columns: str, guard: str = "") -> str:
    """SQL of a member's spans a reader takes as current, as `columns` (bound: the member's id
    twice, each after what `guard` binds): a list segment's open ones, and a computed
    segment's the newest finished run saw, i.e. opened by it or before and not closed by then
    (open, or closed by a run still writing); none before a run has finished. A computed span
    gets valid_to and to_run together, so both kinds of open span have neither:
    segment_spans_member_current (m033) finds each kind with one seek and reads them from the
    index alone, however many spans the member had before. Built once, at import."""
    return (f"SELECT {columns} FROM segment_spans WHERE {guard}member_id = ? AND to_run IS NULL "
            f"AND valid_to IS NULL AND (from_run IS NULL OR from_run <= ({_NEWEST})) "
            f"UNION ALL SELECT {columns} FROM segment_spans WHERE {guard}member_id = ? AND to_run > ({_NEWEST}) "
            f"AND from_run <= ({_NEWEST})")


_MEMBERSHIP = current_spans("segment_id, from_run")

# A computed segment's members as the newest finished run left them (segment id).
_MEMBERS_NOW = ("SELECT member_id FROM segment_spans WHERE segment_id = ? AND from_run IS NOT NULL "
                f"AND from_run <= ({_NEWEST}) AND (to_run IS NULL OR to_run > ({_NEWEST}))")


def membership_of(conn: sqlite3.Connection, member_id: int) -> tuple[set[str], set[str]]:
    """(list segments, computed segments) the member is in now: one read of its current spans."""
    return memberships(conn.execute(_MEMBERSHIP, (member_id, member_id)))


def memberships(rows) -> tuple[set[str], set[str]]:
    """(list segments, computed segments) from current_spans' (segment id, from_run)."""
    listed, computed = set(), set()
    for segment_id, from_run in rows:
        (listed if from_run is None else computed).add(segment_id)
    return listed, computed


# ------------------------------------------------------------------ membership kept in memory

Membership = tuple[frozenset[str], frozenset[str]]      # (list segments, computed segments)
CACHE_MEMBERS = 500_000         # ~125 bytes a member kept (README, "Segments kept in memory")


class MembershipCache:
    """Members' current spans (membership_of) kept in memory under the segments_generation
    (m034) they were read with: a receipt whose member's row carries the same generation
    reads no spans. Every write of spans or runs, by any connection or process, gives the
    generation a new random value, and the first read that sees another value drops
    everything kept. So an entry holds what the database held at (or after, on PostgreSQL,
    where the spans are read by a later statement) the generation it is kept under, and is
    served only while that generation is current.

    At most max_members members, the least recently read evicted first (O(1) each). Equal
    memberships are shared, so an entry costs its key and two slots, whatever its segments.
    A lock makes it safe for PostgreSQL's worker threads; a thread that read an older
    generation than another only costs both misses, never a wrong answer."""

    def __init__(self, max_members: int = CACHE_MEMBERS) -> None:
        self.max_members = max_members
        self._generation: int | None = None
        self._members: OrderedDict[int, Membership] = OrderedDict()
        self._shared: dict[Membership, Membership] = {}
        self._lock = threading.Lock()

    def get(self, generation: int | None, member_id: int) -> Membership | None:
        if generation is None or not self.max_members:
            return None
        with self._lock:
            if generation != self._generation:
                self._drop(generation)
                return None
            found = self._members.get(member_id)
            if found is not None:
                self._members.move_to_end(member_id)
            return found

    def put(self, generation: int | None, member_id: int, listed: set[str], computed: set[str]) -> None:
        """What the member's spans read, after `generation` was read, said."""
        if generation is None or not self.max_members:
            return
        membership = (frozenset(listed), frozenset(computed))
        with self._lock:
            if generation != self._generation:
                return      # read under a generation another thread has replaced since, or not yet seen
            if len(self._shared) >= self.max_members:
                self._shared.clear()            # only sharing is lost: entries keep their own
            membership = self._shared.setdefault(membership, membership)
            self._members[member_id] = membership
            self._members.move_to_end(member_id)
            if len(self._members) > self.max_members:
                self._members.popitem(last=False)

    def __len__(self) -> int:
        return len(self._members)

    def _drop(self, generation: int) -> None:
        self._generation = generation
        self._members = OrderedDict()
        self._shared = {}


def members_of(conn: sqlite3.Connection, d: SegmentDefinition) -> list[int]:
    """Every member of a segment now (an offer assigned to a segment is resolved with it)."""
    if d.list:
        return [mid for (mid,) in conn.execute(
            "SELECT member_id FROM segment_members WHERE segment_id = ? ORDER BY member_id", (d.id,))]
    return sorted(mid for (mid,) in conn.execute(_MEMBERS_NOW, (d.id,)))


def members_at(conn: sqlite3.Connection, segment_id: str, by_list: bool, moment: datetime) -> set[int]:
    """Who was in a segment at a moment, by its spans (a computed one: as the last run before
    that moment left it; a list one: as the API had left it)."""
    at = iso(moment)
    return {mid for (mid,) in conn.execute(
        "SELECT member_id FROM segment_spans WHERE segment_id = ? AND (from_run IS NULL) = ? "
        "AND valid_from <= ? AND (valid_to IS NULL OR valid_to > ?)", (segment_id, by_list, at, at))}


# ------------------------------------------------------------------ list segments

def add_members(conn: sqlite3.Connection, segment_id: str, member_ids: list[int], now: datetime) -> int:
    _join(conn, [(segment_id, mid) for mid in member_ids], now)
    return size(conn, segment_id)


def remove_members(conn: sqlite3.Connection, segment_id: str, member_ids: list[int], now: datetime) -> int:
    _leave(conn, [(segment_id, mid) for mid in member_ids], iso(now))
    return size(conn, segment_id)


def take_over_lists(conn: sqlite3.Connection, source: int, target: int, now: datetime) -> list[str]:
    """A merge of `source` into `target`: the target joins every list segment the source is
    on, and the source leaves them (no card reaches it any more: a segment counts the
    customer once, and an offer to the segment goes to the member who can use it). The
    computed segments are the daily job's to recompute. The list segments it joined."""
    listed = [sid for (sid,) in conn.execute(
        "SELECT segment_id FROM segment_members WHERE member_id = ? ORDER BY segment_id", (source,))]
    _join(conn, [(sid, target) for sid in listed], now)
    _leave(conn, [(sid, source) for sid in listed], iso(now))
    return listed


def leave_every_list(conn: sqlite3.Connection, member_ids: list[int], at: str) -> None:
    """An erasure: the members leave every list segment they are on. No card reaches them
    any more, so a segment that kept them would count a customer who cannot be served and
    give its offers to a member who cannot use them. at: the erasure's moment (iso)."""
    marks = ", ".join("?" * len(member_ids))
    _leave(conn, conn.execute(f"SELECT segment_id, member_id FROM segment_members WHERE member_id IN ({marks}) "
                              "ORDER BY segment_id, member_id", member_ids).fetchall(), at)


def _join(conn: sqlite3.Connection, pairs: list[tuple[str, int]], now: datetime) -> None:
    """(segment id, member id) pairs of list segments."""
    rows = [(sid, mid, iso(now)) for sid, mid in pairs]
    conn.executemany("INSERT INTO segment_members (segment_id, member_id, added_at) VALUES (?, ?, ?) "
                     "ON CONFLICT DO NOTHING", rows)
    # DO NOTHING: a member already in keeps the span that began when they were added.
    conn.executemany("INSERT INTO segment_spans (segment_id, member_id, valid_from) VALUES (?, ?, ?) "
                     "ON CONFLICT DO NOTHING", rows)
    if rows:
        new_generation(conn)


def _leave(conn: sqlite3.Connection, pairs: list[tuple[str, int]], at: str) -> None:
    pairs = [tuple(pair) for pair in pairs]
    conn.executemany("DELETE FROM segment_members WHERE segment_id = ? AND member_id = ?", pairs)
    conn.executemany("UPDATE segment_spans SET valid_to = ? WHERE segment_id = ? AND member_id = ? "
                     "AND from_run IS NULL AND valid_to IS NULL", [(at, *pair) for pair in pairs])
    if pairs:
        new_generation(conn)


def size(conn: sqlite3.Connection, segment_id: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM segment_members WHERE segment_id = ?", (segment_id,)).fetchone()[0]
