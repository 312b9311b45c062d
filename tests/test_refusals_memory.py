"""Refused receipts (an unknown card, a redemption the program refuses) get their one error
shape and their neighbours in the same batch their answers; and a refusal reaches its caller
without the writer's frames in its traceback. Those frames held the whole batch (its
receipts, plans, answers and futures, one of which held the refusal again): a reference cycle
that only the cyclic garbage collector freed, in full collections that paused every request
of the server meanwhile."""
from __future__ import annotations

import asyncio

import pytest

from conftest import line, receipt
from server.errors import ApiError
from storage.db import Grouped
from test_error_shape import assert_error_shape
from test_storage_writer import open_db  # noqa: F401 - a fixture

pytestmark = pytest.mark.sqlite_only(reason="the batches of SQLite's one writer (storage.db)")

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000101"


async def test_refused_and_confirmed_receipts_of_one_batch_get_their_answers(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    answers = await asyncio.gather(*(
        api.post("/v1/receipts", receipt(f"R-{n}", [line(1, "dairy", 500)], card=card, redeem=redeem), as_="register")
        for n, (card, redeem) in enumerate([(CARD, 0), ("7999999999999", 0), (CARD, 5_000), (CARD, 0)] * 5)))
    statuses = [status for status, _ in answers]
    assert statuses.count(201) == 10, statuses
    refused = [body for status, body in answers if status != 201]
    assert len(refused) == 10
    for body in refused:
        assert_error_shape(body)
    assert {body["error"]["code"] for body in refused} == {"unknown_card", "below_min_redemption"}
    status, member = await api.get(f"/v1/members/{CARD}")
    assert status == 200, member
    assert member["balance"]["pending"] + member["balance"]["available"] > 0, member


def frames_of(err: BaseException) -> list[str]:
    names, tb = [], err.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


async def test_a_refusal_reaches_its_caller_without_the_writers_frames(open_db):  # noqa: F811
    db = open_db()

    def refuse(conn, group):
        raise ApiError(422, "refused", "not this one")

    def accept(conn, group):
        return "planned"

    outcomes = await asyncio.gather(db.write_grouped(Grouped(refuse, lambda conn, plans: [])),
                                    db.write_grouped(Grouped(accept, lambda conn, plans: ["kept"] * len(plans))),
                                    return_exceptions=True)
    refusal, kept = outcomes
    assert kept == "kept"
    assert isinstance(refusal, ApiError) and refusal.code == "refused"
    assert not {"_plan_and_apply", "_run_group", "_loop_turn", "refuse"} & set(frames_of(refusal)), frames_of(refusal)
