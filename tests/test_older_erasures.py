"""The upgrade (m040 on SQLite, p016 and p017 on PostgreSQL) indexes the erased members, which
an offer to a segment passes over, and brings members erased by earlier versions in line with
an erasure today: off every list segment, their personal offers ended, those not begun yet
gone. Other members, and offers over before, stay as they were.

The state earlier versions left is made the way they made it: an erasure through the API
with the steps they lacked (leaving the lists, ending the offers) turned off. The upgrade then
runs as a server start runs it, on a database without the index and with the migration
forgotten."""
from __future__ import annotations

from backend import POSTGRESQL, connect
from storage import offers, segments
from test_stranded_customer_value import APPLIED, member_id, rows, serve

MIGRATIONS = ("p016_members_erased", "p017_older_erasures") if POSTGRESQL else ("m040_erased_members",)
# As storage/member_care.py reachable_holders reads them.
ERASED = "SELECT id FROM members WHERE erased_at IS NOT NULL"


async def upgrade(api, aiohttp_client, tmp_path):
    """The server stopped, started again on a database the upgrade has not run on yet."""
    await api.client.close()
    conn = connect(tmp_path / "loyalty.db")
    conn.execute("DROP INDEX members_erased")
    for name in MIGRATIONS:
        conn.execute(f"DELETE FROM {APPLIED} WHERE name = ?", (name,))
    conn.commit()
    conn.close()
    return await serve(aiohttp_client, tmp_path)


async def assign(api, offer_id: str, first: str, last: str) -> None:
    body = {"offer_id": offer_id, "rule": "comeback", "cards": ["c1", "c2"], "from": first, "to": last}
    status, answer = await api.post("/v1/admin/offers", body)
    assert status == 201, answer


async def erase(api, card: str) -> None:
    status, body = await api.post(f"/v1/admin/members/{await member_id(api, card)}/erase", {"reason": "asked"})
    assert status == 200, body


async def customers(api) -> None:
    """c1 (m_1) and c2 (m_2) on the staff list, each with an offer over, one open, one not begun."""
    for card in ("c1", "c2"):
        assert (await api.post("/v1/members", {"card": card}))[0] == 201
    assert (await api.put("/v1/admin/segments/staff/members", {"cards": ["c1", "c2"]}))[1]["members"] == 2
    await assign(api, "o-past", "2026-11-01", "2026-11-10")
    await assign(api, "o-open", "2026-12-01", "2099-12-31")
    await assign(api, "o-later", "2099-01-01", "2099-12-31")


def held(tmp_path, member: int) -> tuple[list, list]:
    """The member's offers (id, from, to) and the list segments it is on."""
    conn = connect(tmp_path / "loyalty.db")
    try:
        return ([tuple(r) for r in conn.execute("SELECT offer_id, from_date, to_date FROM offer_members "
                                                "WHERE member_id = ? ORDER BY offer_id", (member,))],
                [r[0] for r in conn.execute("SELECT segment_id FROM segment_members WHERE member_id = ?", (member,))])
    finally:
        conn.close()


async def test_members_erased_by_earlier_versions_leave_their_lists_and_their_offers_end(
        aiohttp_client, tmp_path, monkeypatch):
    api = await serve(aiohttp_client, tmp_path)
    await customers(api)
    monkeypatch.setattr(segments, "leave_every_list", lambda conn, member_ids, at: None)
    monkeypatch.setattr(offers, "end_held_by", lambda conn, member_ids, day: None)
    await erase(api, "c1")
    monkeypatch.undo()
    # As earlier versions left it: the staff list counts the erased member, its offers run on.
    assert (await api.put("/v1/admin/segments/staff/members", {"cards": ["c2"]}))[1]["members"] == 2
    assert held(tmp_path, 1)[0] == [("o-later", "2099-01-01", "2099-12-31"), ("o-open", "2026-12-01", "2099-12-31"),
                                    ("o-past", "2026-11-01", "2026-11-10")]
    others = held(tmp_path, 2)

    api = await upgrade(api, aiohttp_client, tmp_path)
    # Off the list as of the erasure (10:00 UTC); the open offer ends on the latest date on
    # earth then, the one not begun is gone, the one over stays.
    offered, listed = held(tmp_path, 1)
    assert listed == []
    assert offered == [("o-open", "2026-12-01", "2026-12-11"), ("o-past", "2026-11-01", "2026-11-10")]
    conn = connect(tmp_path / "loyalty.db")
    spans = [tuple(r) for r in conn.execute("SELECT segment_id, valid_to FROM segment_spans WHERE member_id = 1")]
    erased_at = conn.execute("SELECT erased_at FROM members WHERE id = 1").fetchone()[0]
    conn.close()
    assert erased_at.startswith("2026-12-10T10:00") and spans == [("staff", erased_at)]
    assert held(tmp_path, 2) == others
    assert (await api.put("/v1/admin/segments/staff/members", {"cards": ["c2"]}))[1]["members"] == 1
    body = {"offer_id": "o-staff", "rule": "comeback", "segment": "staff", "from": "2026-12-10", "to": "2026-12-20"}
    assert (await api.post("/v1/admin/offers", body))[1]["members"] == 1

    after = rows(tmp_path)
    api = await upgrade(api, aiohttp_client, tmp_path)
    assert rows(tmp_path) == after, "a second run changed something"
    await api.client.close()


async def test_a_database_with_erasures_made_today_is_not_changed(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await customers(api)
    await erase(api, "c1")
    before = rows(tmp_path)
    api = await upgrade(api, aiohttp_client, tmp_path)
    assert rows(tmp_path) == before
    await api.client.close()


async def test_the_erased_members_are_read_through_their_index(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await api.client.close()
    conn = connect(tmp_path / "loyalty.db")
    try:
        if POSTGRESQL:
            # A table this small is scanned whatever its indexes; forbidding the scan shows
            # whether the index can answer the statement at all.
            conn.execute("SET enable_seqscan = off")
            plan = " ".join(r[0] for r in conn.execute(f"EXPLAIN {ERASED}"))
        else:
            plan = " ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {ERASED}"))
    finally:
        conn.close()
    assert "members_erased" in plan, plan
