"""rule_totals (what each rule issued, which budgets count) is kept by the ledger's writers,
once per batch of confirms, instead of by triggers per row (m032): a database the previous
schema made upgrades with its totals as they were, and confirms grouped into one batch,
cancels and returns keep them equal to the ledger."""
import asyncio
import sqlite3

import pytest

from conftest import line, receipt
from storage.audit import verify
from test_budgets_and_referrals import api_with_extra, buy, cancel, launch_points

pytestmark = pytest.mark.sqlite_only(reason="rule_totals kept per batch by SQLite's one writer and its upgrade from m031's triggers;"
                                     " PostgreSQL keeps them by trigger (tests/test_pg_receipt_path.py)")

M030_TRIGGERS = """
CREATE TRIGGER postings_rule_totals AFTER INSERT ON postings
WHEN NEW.rule_id IS NOT NULL AND NEW.kind = 'reversal'
BEGIN INSERT INTO rule_totals (rule_id, points) VALUES (NEW.rule_id, NEW.points)
      ON CONFLICT (rule_id) DO UPDATE SET points = points + excluded.points; END;
CREATE TRIGGER posting_rules_rule_totals AFTER INSERT ON posting_rules
BEGIN INSERT INTO rule_totals (rule_id, points) VALUES (NEW.rule_id, NEW.points)
      ON CONFLICT (rule_id) DO UPDATE SET points = points + excluded.points; END;
DELETE FROM _sqlite_migrations WHERE name = 'm032_rule_totals_per_batch';
"""


def to_m031(path) -> None:
    """The database as the schema before m032 left it: the totals kept by triggers."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(f"BEGIN;{M030_TRIGGERS}COMMIT;")
    conn.close()


def kept_and_posted(path) -> tuple[dict, dict, list]:
    """rule_totals as kept, the same sums computed from the ledger, and the triggers left."""
    conn = sqlite3.connect(path)
    try:
        kept = dict(conn.execute("SELECT rule_id, points FROM rule_totals WHERE points != 0"))
        posted = dict(conn.execute(
            "SELECT rule_id, SUM(points) FROM (SELECT rule_id, points FROM posting_rules UNION ALL "
            "SELECT rule_id, points FROM postings WHERE kind = 'reversal' AND rule_id IS NOT NULL) "
            "GROUP BY rule_id HAVING SUM(points) != 0"))
        triggers = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                               "AND sql LIKE '%rule_totals%'")]
        report = verify(conn)
        assert report.ok, report.problems
        return kept, posted, triggers
    finally:
        conn.close()


async def test_an_upgraded_database_keeps_its_totals_through_batches_cancels_and_returns(make_api, tmp_path):
    db = tmp_path / "loyalty.db"
    api = await api_with_extra(make_api, tmp_path)
    for card in ("c0", "c1", "c2", "c3", "c4"):
        await api.post("/v1/members", {"card": card})
    status, first = await buy(api, "R-0", "c0")
    assert status == 201 and launch_points(first) == 30
    await api.client.close()
    to_m031(db)
    before, posted, triggers = kept_and_posted(db)
    assert before == posted and before["launch"] == 30 and len(triggers) == 2

    api = await api_with_extra(make_api, tmp_path)      # m032 runs at start
    kept, posted, triggers = kept_and_posted(db)
    assert triggers == [] and kept == before

    # Four receipts at once share a batch: the 20 points left of the budget go to one of them.
    answers = await asyncio.gather(*(buy(api, f"B-{n}", f"c{n}", second=1) for n in range(1, 5)))
    assert [s for s, _ in answers] == [201] * 4
    assert sorted(launch_points(r) for _, r in answers) == [0, 0, 0, 20]
    kept, posted, _ = kept_and_posted(db)
    assert kept == posted and kept["launch"] == 50

    # A cancel posts its reversals one by one; they count against the rules they reverse.
    status, _ = await cancel(api, "R-0")
    assert status == 200
    kept, posted, _ = kept_and_posted(db)
    assert kept == posted and kept["launch"] == 20
    # A return of the one line of a receipt two rules paid on.
    paid = next(r for _, r in answers if launch_points(r) == 20)["receipt"]
    status, returned = await api.post("/v1/returns", {
        "return_id": "RT-1", "store_id": "S001", "register_id": "K01", "receipt": paid,
        "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201 and returned["reversed"]["points"] > 0
    kept, posted, _ = kept_and_posted(db)
    assert kept == posted and "launch" not in kept     # all 50 given back
    status, again = await buy(api, "R-5", "c0", second=4)
    assert status == 201 and launch_points(again) == 30
    await api.client.close()
    kept, posted, _ = kept_and_posted(db)
    assert kept == posted and kept["launch"] == 30


async def test_a_batch_counts_every_rule_of_every_receipt_once(make_api, tmp_path):
    """Receipts several rules pay on, confirmed together: each rule's total is what the
    answers say it issued."""
    api = await api_with_extra(make_api, tmp_path)
    cards = [f"m{n}" for n in range(8)]
    for card in cards:
        await api.post("/v1/members", {"card": card})
    bodies = [receipt(f"S-{n}", [line(1, "dairy", 4550 + n), line(2, "bakery", 3000)], card=card,
                      ts="2026-11-24T12:00:02+02:00") for n, card in enumerate(cards)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert [s for s, _ in answers] == [201] * len(cards)
    issued: dict[str, int] = {}
    for _, answer in answers:
        for item in answer["accrued"]["by_rule"]:
            issued[item["rule"]] = issued.get(item["rule"], 0) + item["points"]
    await api.client.close()
    kept, posted, _ = kept_and_posted(tmp_path / "loyalty.db")
    assert len([r for r in issued if issued[r]]) >= 3
    assert kept == posted == {rule: points for rule, points in issued.items() if points}
