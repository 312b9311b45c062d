"""A member's offer budget: the receipt that would cross it gets the remainder; a cancel gives back."""
from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from conftest import add_members, storage_database
from storage import offers

NOW = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
DEC = date(2026, 12, 10)


@pytest.fixture
def db(tmp_path):
    database = storage_database(tmp_path / "offers.db")
    database.open()
    add_members(database, 2)
    yield database
    database.close()


def assign(db, offer_id, points, first="2026-12-01", last="2026-12-31", members=(1,)):
    return db.write_sync(lambda conn: offers.assign(conn, offer_id, "comeback", offer_id, date.fromisoformat(first),
                                                    date.fromisoformat(last), points, list(members), NOW))


def charge(db, points, receipt, day=DEC, member=1):
    """As a confirm does: what the member's offers valid that day give, then charged; the points granted."""
    def charge_in(conn):
        takes = offers.takes(offers.valid(conn, member, day), "comeback", points)
        if takes is None:
            return points
        assert offers.charge(conn, [offers.Charge(("S001", "K01", receipt), member, o, p) for o, p in takes], True)
        return sum(p for _, p in takes)
    return db.write_sync(charge_in)


def left(db, day=DEC, member=1):
    return db.read_sync(lambda conn: offers.offers_for(conn, member, day))


def test_budget_charged_to_its_end_then_given_back_by_a_cancel(db):
    assign(db, "o1", 500)
    assert charge(db, 300, "r1") == 300 and left(db) == {"comeback": 200}
    assert charge(db, 300, "r2") == 200 and left(db) == {"comeback": 0}       # the remainder, not more
    assert charge(db, 300, "r3") == 0
    assert db.write_sync(lambda conn: offers.give_back(conn, ("S001", "K01", "r2"), [], 1)) == 200
    assert left(db) == {"comeback": 200}
    assert db.write_sync(lambda conn: offers.give_back(conn, ("S001", "K01", "r2"), [], 1)) == 0


def test_offers_outside_their_dates_or_of_others_are_not_charged(db):
    assign(db, "o1", 500)
    assert charge(db, 100, "r1", day=date(2026, 11, 30)) == 0
    assert charge(db, 100, "r2", member=2) == 0
    assert left(db, day=date(2027, 1, 1)) == {}
    listed = db.read_sync(lambda conn: offers.listed(conn, 1, date(2026, 12, 31)))
    assert listed == [{"rule": "comeback", "from": "2026-12-01", "to": "2026-12-31", "points_left": 500}]
    assert db.read_sync(lambda conn: offers.listed(conn, 1, date(2027, 1, 1))) == []


def test_two_offers_of_one_rule_add_up_and_the_one_ending_first_is_used_first(db):
    assign(db, "late", 100, last="2026-12-31")
    assign(db, "early", 100, last="2026-12-15")
    assert left(db) == {"comeback": 200}
    assert charge(db, 150, "r1") == 150
    got = db.read_sync(lambda conn: sorted(offers.listed(conn, 1, DEC), key=lambda o: o["to"]))
    assert [o["points_left"] for o in got] == [0, 50]


def test_an_offer_without_a_budget_is_never_used_up(db):
    assign(db, "free", None)
    assert charge(db, 10**6, "r1") == 10**6 and left(db) == {"comeback": None}
