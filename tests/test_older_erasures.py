"""m040 on SQLite, p016 on PostgreSQL: the erased members, which an offer to a segment passes
over, are read through an index of their own, not a scan of every member."""
from __future__ import annotations

from backend import POSTGRESQL, connect
from test_stranded_customer_value import serve

# As storage/member_care.py reachable_holders reads them.
ERASED = "SELECT id FROM members WHERE erased_at IS NOT NULL"


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
