"""RFM scores and segment membership.

RFM (rules.md): among members with at least one confirmed receipt in the `window_days`
local days up to the job's local date, recency is the days from the last receipt's local
date to the job's, frequency the receipts, monetary their totals less what was returned of
them. Each score is 1 + floor(5 x b / n): n members scored, b of them strictly worse.
Members without a receipt in the window have no scores.

A run reads everything it needs in one read transaction (a reader connection: receipts
keep being written meanwhile), scores in memory, and writes its rows in batches under its
own run id; it is marked finished last, so readers always see one whole run (the newest
finished), never a half-written one. Rows of older runs are deleted afterwards, in batches.
"""
from __future__ import annotations

import sqlite3
from datetime import date, datetime, time, timedelta, tzinfo
from typing import NamedTuple

import msgspec

from storage.ledger import iso

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
    score) or an explicit `list` of members."""
    id: str
    r: ScoreRange | None = None
    f: ScoreRange | None = None
    m: ScoreRange | None = None
    list: bool = False

    @property
    def by_rfm(self) -> bool:
        return not self.list and (self.r or self.f or self.m) is not None


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
    start = iso(datetime.combine(today - timedelta(days=window_days - 1), time.min, tz))
    end = iso(datetime.combine(today + timedelta(days=1), time.min, tz))
    # Monetary is ranked by SQLite (RANK() - 1: how many spent strictly less) inside its own
    # step calls, which run without Python's GIL: sorting a million values in Python would
    # hold it, and stall the event loop, for as long as the sort takes.
    rows = conn.execute(
        "WITH back AS (SELECT r.member_id AS mid, SUM(rl.amount) AS amount FROM return_lines rl JOIN receipts r "
        "ON r.store_id = rl.receipt_store AND r.register_id = rl.receipt_register AND r.receipt_id = rl.receipt_id "
        "WHERE r.status = 'confirmed' AND r.member_id IS NOT NULL AND r.ts >= ?1 AND r.ts < ?2 GROUP BY 1), "
        "facts AS (SELECT member_id AS mid, MAX(ts) AS last, COUNT(*) AS n, SUM(total) AS spend FROM receipts "
        "WHERE member_id IS NOT NULL AND status = 'confirmed' AND ts >= ?1 AND ts < ?2 GROUP BY member_id) "
        "SELECT f.mid, f.last, f.n, f.spend - COALESCE(b.amount, 0), "
        "RANK() OVER (ORDER BY f.spend - COALESCE(b.amount, 0)) - 1 FROM facts f LEFT JOIN back b ON b.mid = f.mid",
        (start, end))
    local_day = _local_days(tz)
    return [Facts(mid, local_day(last), count, spend, less) for mid, last, count, spend, less in rows]


def _local_days(tz: tzinfo):
    """ts (as stored) -> its local date, remembering each UTC hour's offset: a million
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


def score_all(facts: list[Facts], today: date) -> list[Score]:
    """score = 1 + floor(5 x b / n), b = how many members scored are strictly worse."""
    n = len(facts)
    if not n:
        return []
    recency = [(today - f.last_date).days for f in facts]
    r = _worse_than(recency, higher_is_better=False)
    f = _worse_than([x.receipts for x in facts], higher_is_better=True)
    return [Score(x.member_id, 1 + 5 * r[days] // n, 1 + 5 * f[x.receipts] // n, 1 + 5 * x.spend_worse // n, days,
                  x.receipts, x.spend) for x, days in zip(facts, recency)]


# ------------------------------------------------------------------ storing a run

def start_run(conn: sqlite3.Connection, today: date, window_days: int, now: datetime) -> int:
    return conn.execute("INSERT INTO rfm_runs (local_date, window_days, started_at) VALUES (?, ?, ?) RETURNING id",
                        (today.isoformat(), window_days, iso(now))).fetchone()[0]


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


def due(conn: sqlite3.Connection, today: date) -> bool:
    """Scores are recomputed once a local day."""
    return conn.execute("SELECT 1 FROM rfm_runs WHERE finished_at IS NOT NULL AND local_date = ?",
                        (today.isoformat(),)).fetchone() is None


# ------------------------------------------------------------------ reading

def current_run(conn: sqlite3.Connection) -> int | None:
    return conn.execute("SELECT MAX(id) FROM rfm_runs WHERE finished_at IS NOT NULL").fetchone()[0]


def scores_of(conn: sqlite3.Connection, member_id: int) -> Score | None:
    """The member's scores from the newest finished run, or None (unscored)."""
    row = conn.execute(
        "SELECT member_id, r, f, m, recency_days, receipts, spend FROM rfm_scores "
        "WHERE run_id = (SELECT MAX(id) FROM rfm_runs WHERE finished_at IS NOT NULL) AND member_id = ?",
        (member_id,)).fetchone()
    return Score(*row) if row else None


def listed_in(conn: sqlite3.Connection, member_id: int) -> set[str]:
    return {s for (s,) in conn.execute("SELECT segment_id FROM segment_members WHERE member_id = ?", (member_id,))}


def segments_of(conn: sqlite3.Connection, member_id: int, definitions: list[SegmentDefinition]) -> list[str]:
    """The ids of the segments the member is in now, in the program's order."""
    score = scores_of(conn, member_id)
    listed = listed_in(conn, member_id)
    return [d.id for d in definitions if _holds(d, score, listed)]


def _holds(d: SegmentDefinition, score: Score | None, listed: set[str]) -> bool:
    if d.list:
        return d.id in listed
    if score is None or not d.by_rfm:
        return False
    return all(rng is None or rng.holds(value) for rng, value in ((d.r, score.r), (d.f, score.f), (d.m, score.m)))


def members_of(conn: sqlite3.Connection, d: SegmentDefinition) -> list[int]:
    """Every member of a segment now (an offer assigned to a segment is resolved with it)."""
    if d.list:
        return [mid for (mid,) in conn.execute(
            "SELECT member_id FROM segment_members WHERE segment_id = ? ORDER BY member_id", (d.id,))]
    if not d.by_rfm:
        return []
    run = current_run(conn)
    clauses, args = ["run_id = ?"], [run]
    for column, rng in (("r", d.r), ("f", d.f), ("m", d.m)):
        if rng is not None:
            clauses.append(f"{column} BETWEEN ? AND ?")
            args += [rng.low, rng.high]
    return [mid for (mid,) in conn.execute(
        f"SELECT member_id FROM rfm_scores WHERE {' AND '.join(clauses)} ORDER BY member_id", args)]


# ------------------------------------------------------------------ list segments

def add_members(conn: sqlite3.Connection, segment_id: str, member_ids: list[int], now: datetime) -> int:
    conn.executemany("INSERT OR IGNORE INTO segment_members (segment_id, member_id, added_at) VALUES (?, ?, ?)",
                     [(segment_id, mid, iso(now)) for mid in member_ids])
    return size(conn, segment_id)


def remove_members(conn: sqlite3.Connection, segment_id: str, member_ids: list[int]) -> int:
    conn.executemany("DELETE FROM segment_members WHERE segment_id = ? AND member_id = ?",
                     [(segment_id, mid) for mid in member_ids])
    return size(conn, segment_id)


def size(conn: sqlite3.Connection, segment_id: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM segment_members WHERE segment_id = ?", (segment_id,)).fetchone()[0]
