"""Requests that overlap, as at a busy till: each answer and the ledger afterwards are those
of the requests run one after another in some order. On SQLite the one writer orders them;
on PostgreSQL (LOYALTY_TEST_BACKEND=postgresql) the server's connections run them at once,
as several servers' would, and the member's row lock orders them."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket

import pytest
from backend import POSTGRESQL, connect
from conftest import KEYS, MARKET, line, receipt
from test_crash_safety import Server
from test_storage_writer import WriterGate, wait_until

from server.keys import DATABASE
from storage import audit

NOW = "2026-11-28T09:00:05+02:00"
TS = "2026-11-28T09:00:00+02:00"
CARD = "7000000000061"
OTHER = "7000000000062"
AT_ONCE = 6
WELCOME = 100


def ref(receipt_id: str, register: str = "K01") -> dict:
    return {"store_id": "S001", "register_id": register, "receipt_id": receipt_id}


def a_return(return_id: str, receipt_id: str, lines: list[tuple[int, int]], register: str = "K01") -> dict:
    return {"return_id": return_id, "store_id": "S001", "register_id": register, "receipt": ref(receipt_id),
            "lines": [{"line_no": no, "qty": qty} for no, qty in lines]}


async def member_with(api, card: str, points: int) -> dict:
    """A member with `points` available: the welcome event's 100, adjusted."""
    status, member = await api.post("/v1/members", {"card": card})
    assert status == 201, member
    if points != WELCOME:
        status, adj = await api.post("/v1/admin/adjustments", {"card": card, "points": points - WELCOME,
                                                               "reason": "r", "adjustment_id": f"start-{card}"})
        assert status == 201, adj
    return member


async def balance(api, card: str) -> dict:
    status, member = await api.get(f"/v1/members/{card}")
    assert status == 200, member
    return member["balance"]


def three_lines(receipt_id: str, card: str | None = CARD, redeem: int = 0) -> dict:
    return receipt(receipt_id, [line(1, "grocery", 30000, qty=3, sku="coffee-1"),
                                line(2, "dairy", 20000, sku="cheese-1"), line(3, "grocery", 50000, sku="tea-1")],
                   card=card, ts=TS, redeem=redeem)


# ---------------------------------------------------------------- returns

async def test_the_same_return_sent_twice_at_once_is_written_once_and_replayed(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 0)
    assert (await api.post("/v1/receipts", three_lines("B-1"), as_="register"))[0] == 201
    body = a_return("RET-1", "B-1", [(1, 3), (3, 1)])
    answers = await asyncio.gather(*(api.post("/v1/returns", body, as_="register") for _ in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [200] * (AT_ONCE - 1) + [201], answers
    first = next(r for s, r in answers if s == 201)
    assert all(r == {**first, "replayed": True} for s, r in answers if s == 200)


async def test_returns_of_one_line_sent_at_once_never_return_more_than_was_sold(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 0)
    _, sold = await api.post("/v1/receipts", three_lines("B-1"), as_="register")
    answers = await asyncio.gather(*(api.post("/v1/returns", a_return(f"RET-{i}", "B-1", [(1, 2)]), as_="register")
                                     for i in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [201] + [422] * (AT_ONCE - 1), answers
    assert all(r["error"]["code"] == "return_exceeds_sold" for s, r in answers if s == 422)
    # What one return of 2 of the 3 units takes back, no more.
    reversed_ = next(r for s, r in answers if s == 201)["reversed"]["points"]
    assert (await balance(api, CARD))["pending"] == sold["accrued"]["points"] - reversed_


async def test_returns_of_a_receipt_without_a_card_sent_at_once_never_return_more_than_was_sold(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/receipts", three_lines("A-1", card=None), as_="register"))[0] == 201
    answers = await asyncio.gather(*(api.post("/v1/returns", a_return(f"RET-{i}", "A-1", [(1, 2)]), as_="register")
                                     for i in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [201] + [422] * (AT_ONCE - 1), answers


async def test_a_return_racing_the_cancel_of_its_receipt_takes_back_nothing_twice(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    _, sold = await api.post("/v1/receipts", three_lines("B-1", redeem=500), as_="register")
    assert sold["redeemed"]["points"] == 500
    (rs, ret), (cs, cancel) = await asyncio.gather(
        api.post("/v1/returns", a_return("RET-1", "B-1", [(3, 1)]), as_="register"),
        api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register"))
    assert cs == 200 and cancel["status"] == "cancelled", cancel
    # Either the return came first and the cancel reversed the rest, or the cancel came
    # first and the return found nothing left: the member is back where they started.
    assert (rs, rs == 422 and ret["error"]["code"]) in ((201, False), (422, "receipt_cancelled")), ret
    assert await balance(api, CARD) == {"available": 1000, "pending": 0, "held": 0}


# ---------------------------------------------------------------- holds, confirm and cancel

async def test_a_cancel_racing_the_confirm_of_its_receipt_leaves_it_wholly_one_or_the_other(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    body = three_lines("B-1", redeem=500)
    status, calc = await api.post("/v1/receipts/calculate", body, as_="register")
    assert status == 200 and calc["hold"]["points"] == 500
    (fs, confirmed), (cs, cancel) = await asyncio.gather(
        api.post("/v1/receipts", body, as_="register"),
        api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register"))
    assert fs == 201 and cs == 200, (confirmed, cancel)
    after = await balance(api, CARD)
    if cancel["status"] == "cancelled":         # after the confirm: reversed whole
        assert after == {"available": 1000, "pending": 0, "held": 0}
    else:                                       # before it: the hold let go, the confirm paid anyway
        assert cancel["status"] == "hold_released", cancel
        assert after == {"available": 500, "pending": confirmed["accrued"]["points"], "held": 0}


async def test_a_calculate_racing_the_confirm_of_its_receipt_leaves_no_hold_behind(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    body = three_lines("B-1", redeem=500)
    answers = await asyncio.gather(*(api.post("/v1/receipts" if n == 0 else "/v1/receipts/calculate", body,
                                              as_="register") for n in range(AT_ONCE)))
    assert answers[0][0] == 201 and all(s == 200 for s, _ in answers[1:]), answers
    # A calculate after the confirm answers its result and holds nothing: the confirm took
    # the only hold there was, and no register will confirm the receipt again to take another.
    assert (await balance(api, CARD))["held"] == 0
    assert all(r["hold"] is None and r["replayed"] for _, r in answers[1:] if r.get("replayed"))


async def test_calculating_one_receipt_at_once_holds_its_points_once(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    answers = await asyncio.gather(*(api.post("/v1/receipts/calculate", three_lines("B-1", redeem=400 + i),
                                              as_="register") for i in range(AT_ONCE)))
    assert [s for s, _ in answers] == [200] * AT_ONCE, answers
    assert (await balance(api, CARD))["held"] in {400 + i for i in range(AT_ONCE)}


async def test_holds_of_one_register_are_kept_from_confirms_on_others(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    assert (await api.post("/v1/receipts/calculate", three_lines("B-0", redeem=500), as_="register"))[0] == 200
    bodies = [receipt(f"B-{i}", [line(1, "grocery", 100000)], card=CARD, ts=TS, register=f"K{i:02d}", redeem=300)
              for i in range(1, AT_ONCE + 1)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert all(s in (201, 422) for s, _ in answers), answers
    spent = sum(r["redeemed"]["points"] for s, r in answers if s == 201)
    assert spent <= 500
    assert (await balance(api, CARD))["available"] == 500 - spent
    status, held = await api.post("/v1/receipts", three_lines("B-0", redeem=500), as_="register")
    assert status == 201 and held["redeemed"]["points"] == 500, held


# ---------------------------------------------------------------- adjustments and member care

async def test_adjustments_racing_redemptions_never_spend_a_point_twice(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    calls = [api.post("/v1/admin/adjustments", {"card": CARD, "points": -300, "reason": "r", "adjustment_id": f"A-{i}"})
             for i in range(3)]
    calls += [api.post("/v1/receipts", receipt(f"B-{i}", [line(1, "grocery", 100000)], card=CARD, ts=TS,
                                               register=f"K{i:02d}", redeem=300), as_="register") for i in range(3)]
    answers = await asyncio.gather(*calls)
    assert all(s in (201, 422) for s, _ in answers), answers
    spent = sum(300 if "adjustment_id" in r else r["redeemed"]["points"] for s, r in answers if s == 201)
    assert spent <= 1000
    assert (await balance(api, CARD))["available"] == 1000 - spent


async def test_the_same_adjustment_sent_at_once_is_written_once_and_replayed(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    body = {"card": CARD, "points": -800, "reason": "r", "adjustment_id": "A-1"}
    answers = await asyncio.gather(*(api.post("/v1/admin/adjustments", body) for _ in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [200] * (AT_ONCE - 1) + [201], answers
    assert (await balance(api, CARD))["available"] == 200


async def test_the_same_merge_sent_at_once_is_made_once_and_replayed(make_api):
    api = await make_api(now=NOW)
    old = await member_with(api, CARD, 1000)
    keep = await member_with(api, OTHER, 100)
    merge = {"merge_id": "MG-1", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "one customer"}
    answers = await asyncio.gather(*(api.post("/v1/admin/members/merge", merge) for _ in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [200] * (AT_ONCE - 1) + [201], answers
    assert (await balance(api, OTHER))["available"] == 1100


async def test_the_same_card_replacement_sent_at_once_is_made_once_and_replayed(make_api):
    api = await make_api(now=NOW)
    member = await member_with(api, CARD, 1000)
    path = f"/v1/admin/members/{member['member_id']}/replace-card"
    answers = await asyncio.gather(*(api.post(path, {"new_card": OTHER}) for _ in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [200] * (AT_ONCE - 1) + [201], answers
    assert (await balance(api, OTHER))["available"] == 1000


async def test_the_same_enrollment_sent_at_once_enrolls_once(make_api):
    api = await make_api(now=NOW)
    answers = await asyncio.gather(*(api.post("/v1/members", {"card": CARD}) for _ in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [201] + [409] * (AT_ONCE - 1), answers
    assert (await balance(api, CARD))["available"] == WELCOME     # welcomed once


async def test_the_same_erasure_sent_at_once_erases_once_while_receipts_come(make_api):
    api = await make_api(now=NOW)
    member = await member_with(api, CARD, 1000)
    path = f"/v1/admin/members/{member['member_id']}/erase"
    calls = [api.post(path, {"reason": "asked"}) for _ in range(3)]
    calls += [api.post("/v1/receipts", redeeming(f"R-{n}", CARD, f"K{n:02d}"), as_="register") for n in range(3)]
    answers = await asyncio.gather(*calls)
    erasures, receipts = answers[:3], answers[3:]
    assert [s for s, _ in erasures] == [200] * 3, erasures
    assert sorted(r["replayed"] for _, r in erasures) == [False, True, True], erasures
    assert all(s == 201 or (s, r["error"]["code"]) == (422, "unknown_card") for s, r in receipts), receipts
    await ledger_verifies(api)


async def test_an_adjustment_racing_a_merge_reaches_the_points_of_the_member_they_went_to(make_api):
    api = await make_api(now=NOW)
    old = await member_with(api, CARD, 100)
    keep = await member_with(api, OTHER, 0)
    merge = {"merge_id": "MG-1", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "one customer"}
    (ms, merged), (as_, adjusted) = await asyncio.gather(
        api.post("/v1/admin/members/merge", merge),
        api.post("/v1/admin/adjustments", {"card": CARD, "points": 50, "reason": "r", "adjustment_id": "A-1"}))
    assert ms == 201, merged
    # Before the merge, its points went along; after it, the card is refused as merged.
    assert as_ == 201 or (as_, adjusted["error"]["code"]) == (422, "card_merged"), adjusted
    kept = await balance(api, OTHER)
    assert kept["available"] == 100 + (50 if as_ == 201 else 0)


# ---------------------------------------------------------------- connections that fail midway

def http_request(path: str, body: dict | None, key: str, length: int | None = None) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data) if length is None else length}\r\n\r\n")
    return head.encode() + data


def answers_on(sock: socket.socket, count: int) -> list[tuple[int, dict]]:
    """`count` answers read off one connection, in order."""
    reader = sock.makefile("rb")
    out = []
    for _ in range(count):
        status = int(reader.readline().split()[1])
        length = 0
        while (header := reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        out.append((status, json.loads(reader.read(length))))
    return out


def call(server: Server, path: str, body: dict | None, key: str = KEYS["register"]) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(http_request(path, body, key))
        return answers_on(sock, 1)[0]


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.kill()


def test_a_confirm_whose_client_went_away_is_written_whole_or_not_at_all(server):
    assert call(server, "/v1/members", {"card": CARD}, KEYS["manager"])[0] == 201
    bodies = [receipt(f"GONE-{n}", [line(1, "grocery", 50000 + n)], card=CARD, ts="2026-11-24T12:00:00+02:00",
                      register=f"K{n:02d}") for n in range(AT_ONCE)]
    for body in bodies:     # sent, then the connection dropped before any answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(http_request("/v1/receipts", body, KEYS["register"]))
    retried = [call(server, "/v1/receipts", body) for body in bodies]
    assert all(status == 201 or (status, answer["replayed"]) == (200, True) for status, answer in retried), retried
    earned = sum(answer["accrued"]["points"] for _, answer in retried)
    # The member's balance, not the last retry's: a replay answers its stored result, and on
    # PostgreSQL the dropped confirms take the member's lock in no set order.
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(f"GET /v1/members/{CARD} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {KEYS['register']}\r\n\r\n".encode())
        status, member = answers_on(sock, 1)[0]
    assert status == 200 and member["balance"]["pending"] == earned, member    # each receipt's points once


def test_a_body_cut_short_writes_nothing_and_the_server_goes_on(server):
    assert call(server, "/v1/members", {"card": CARD}, KEYS["manager"])[0] == 201
    body = receipt("CUT-1", [line(1, "grocery", 50000)], card=CARD, ts="2026-11-24T12:00:00+02:00")
    whole = http_request("/v1/receipts", body, KEYS["register"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(whole[:-20])           # the header says more than comes
        sock.shutdown(socket.SHUT_WR)
        rest = sock.recv(65536)
    assert rest == b"" or rest.startswith(b"HTTP/1.1 4"), rest
    status, answer = call(server, "/v1/receipts", body)
    assert status == 201, answer            # the first never counted


def test_many_requests_pipelined_on_one_connection_are_answered_in_order(server):
    assert call(server, "/v1/members", {"card": CARD}, KEYS["manager"])[0] == 201
    bodies = [receipt(f"KA-{n}", [line(1, "grocery", 10000)], card=CARD, ts="2026-11-24T12:00:00+02:00")
              for n in range(40)]
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"".join(http_request("/v1/receipts", body, KEYS["register"]) for body in bodies))
        answers = answers_on(sock, len(bodies))
    assert [(status, answer["receipt"]["receipt_id"]) for status, answer in answers] == \
        [(201, body["receipt_id"]) for body in bodies]
    pending = [answer["balance"]["pending"] for _, answer in answers]
    assert pending == sorted(pending) and len(set(pending)) == len(pending)     # each saw the one before


# ---------------------------------------------------------------- member care racing receipts

def redeeming(receipt_id: str, card: str, register: str, redeem: int = 300) -> dict:
    return receipt(receipt_id, [line(1, "grocery", 100000)], card=card, ts=TS, register=register, redeem=redeem)


def spent_and_earned(answers) -> tuple[int, int]:
    done = [r for s, r in answers if s == 201]
    return sum(r["redeemed"]["points"] for r in done), sum(r["accrued"]["points"] for r in done)


async def test_a_merge_racing_receipts_on_both_cards_moves_every_point_once(make_api):
    api = await make_api(now=NOW)
    old = await member_with(api, CARD, 1000)
    keep = await member_with(api, OTHER, 500)
    merge = {"merge_id": "MG-1", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "one customer"}
    calls = [api.post("/v1/admin/members/merge", merge)]
    calls += [api.post("/v1/receipts", redeeming(f"R-{n}", CARD if n % 2 else OTHER, f"K{n:02d}"), as_="register")
              for n in range(AT_ONCE)]
    (ms, merged), *answers = await asyncio.gather(*calls)
    assert ms == 201, merged
    for (status, answer), n in zip(answers, range(AT_ONCE)):
        assert status == 201 or (status, answer["error"]["code"]) in \
            ((422, "card_merged" if n % 2 else "insufficient_points"), (422, "insufficient_points")), answer
    spent, earned = spent_and_earned(answers)
    assert spent <= 1500
    assert await balance(api, OTHER) == {"available": 1500 - spent, "pending": earned, "held": 0}
    await ledger_verifies(api)


async def test_a_card_replacement_racing_receipts_on_the_old_and_new_card(make_api):
    api = await make_api(now=NOW)
    member = await member_with(api, CARD, 1000)
    calls = [api.post(f"/v1/admin/members/{member['member_id']}/replace-card", {"new_card": OTHER})]
    calls += [api.post("/v1/receipts", redeeming(f"R-{n}", CARD if n % 2 else OTHER, f"K{n:02d}"), as_="register")
              for n in range(AT_ONCE)]
    (rs, replaced), *answers = await asyncio.gather(*calls)
    assert rs == 201, replaced
    for (status, answer), n in zip(answers, range(AT_ONCE)):
        assert status == 201 or (status, answer["error"]["code"]) in \
            ((422, "card_replaced" if n % 2 else "unknown_card"), (422, "insufficient_points")), answer
    spent, earned = spent_and_earned(answers)
    assert await balance(api, OTHER) == {"available": 1000 - spent, "pending": earned, "held": 0}
    await ledger_verifies(api)


async def ledger_verifies(api) -> None:
    report = await api.client.server.app[DATABASE].read(audit.verify)
    assert report.ok, report.problems


PROFILE_POINTS = "events:\n  - {id: profile-bonus, on: profile_completed, reward: {points: 50}}\n"


async def test_a_completed_profile_racing_a_merge_pays_the_member_the_points_went_to(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "profile.yaml").write_text(PROFILE_POINTS)
    api = await make_api(now=NOW, program_dir=program)
    old = await member_with(api, CARD, 100)
    keep = await member_with(api, OTHER, 100)
    merge = {"merge_id": "MG-1", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "one customer"}
    answers = await asyncio.gather(
        api.post("/v1/admin/members/merge", merge),
        *(api.patch(f"/v1/members/{CARD}", {"phone": "+380501234567", "birthday": "1990-05-01"}) for _ in range(3)))
    assert answers[0][0] == 201, answers[0]
    patched = [s for s, _ in answers[1:]]
    assert all(s == 200 or (s, r["error"]["code"]) == (422, "card_merged") for s, r in answers[1:]), answers
    # Completed before the merge: its 50 points went along; after it: refused, nothing paid.
    assert (await balance(api, OTHER))["available"] == 200 + (50 if 200 in patched else 0)


# Writes that find their member by card before they begin: each, written after a merge of
# that member it did not see, is refused as the card now is.
AFTER_A_LOOK_UP = {
    "adjustment": ("POST", "/v1/admin/adjustments",
                   {"card": CARD, "points": 50, "reason": "r", "adjustment_id": "A-1"}),
    "profile": ("PATCH", f"/v1/members/{CARD}", {"phone": "+380501234567", "birthday": "1990-05-01"}),
    "tier": ("PUT", f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-12-31"}),
    # Else the new member's referrer would be the member merged away, which no card reaches.
    "enrolment referred by it": ("POST", "/v1/members", {"card": "7000000000063", "referred_by": CARD}),
}


@pytest.mark.sqlite_only(reason="holds SQLite's one writer; on PostgreSQL a merge and an adjustment race above")
@pytest.mark.parametrize("write", AFTER_A_LOOK_UP)
async def test_a_write_that_looked_its_card_up_before_a_merge_queued_ahead_of_it_is_refused(make_api, write):
    """SQLite's one writer, held while a merge and then the write queue behind it: the
    write looked its card up before the merge was written, and is written after it."""
    api = await make_api(now=NOW)
    old = await member_with(api, CARD, 100)
    keep = await member_with(api, OTHER, 0)
    db = api.client.server.app[DATABASE]
    gate = WriterGate()
    held = await gate.close_on(db)
    merge = asyncio.create_task(api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": old["member_id"], "into_member_id": keep["member_id"], "reason": "r"}))
    await wait_until(lambda: db.queue_depth() == 1)
    method, path, body = AFTER_A_LOOK_UP[write]
    late = asyncio.create_task(api.call(method, path, body))
    await wait_until(lambda: db.queue_depth() == 2)
    gate.release.set()
    await held
    assert (await merge)[0] == 201
    status, refused = await late
    assert (status, refused["error"]["code"]) == (422, "card_merged"), refused
    assert await balance(api, OTHER) == {"available": 100, "pending": 0, "held": 0}


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "orders every write")
async def test_a_receipt_whose_card_arrives_just_after_its_lock_was_looked_for_reads_under_the_members_lock(
        make_api, tmp_path, monkeypatch):
    """A receipt on a card that an enrolment or a replacement commits between the receipt's
    look-up for the member's lock (no one has the card yet) and its read of the member (the
    card is there) plans from what it read under the member's lock, not beside the member's
    other writes: in a race of receipts with a replacement, one redeemed from a lot another
    was spending and a once-a-day reward was given twice."""
    from server.ops import receipts as ops
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    real_read, looked_for, reads_locked = ops.read_member_state, [], []

    def card_not_there_yet(conn, card):
        looked_for.append(card)
        return None

    def read(conn, *args, **kwargs):
        state = real_read(conn, *args, **kwargs)
        reads_locked.append(state is not None and locked_by_another(tmp_path / "loyalty.db", state.member.id))
        return state

    monkeypatch.setattr(ops.ledger, "lock_member_of_card", card_not_there_yet)
    monkeypatch.setattr(ops, "read_member_state", read)
    status, sold = await api.post("/v1/receipts", redeeming("R-1", CARD, "K01"), as_="register")
    assert status == 201 and sold["redeemed"]["points"] == 300, sold
    assert looked_for and reads_locked[-1] is True, reads_locked
    assert await balance(api, CARD) == {"available": 700, "pending": sold["accrued"]["points"], "held": 0}


def locked_by_another(path, member_id: int) -> bool:
    """Whether a transaction holds the member's row lock, asked from a connection of its own."""
    import psycopg
    with connect(path) as other:
        try:
            other.execute("SELECT 1 FROM members WHERE id = ? FOR UPDATE NOWAIT", (member_id,))
        except psycopg.errors.LockNotAvailable:
            return True
    return False


# What lands between a PATCH's look-up of its card and its write of the CRM's fields.
BEFORE_THE_CRM_WRITE = {
    "erasure": lambda member: ("POST", f"/v1/admin/members/{member}/erase", {"reason": "asked"}),
    "merge": lambda member: ("POST", "/v1/admin/members/merge", {"merge_id": "MG-1", "from_member_id": member,
                                                                 "into_member_id": "m_2", "reason": "r"}),
}


@pytest.mark.parametrize("between", BEFORE_THE_CRM_WRITE)
async def test_crm_fields_sent_as_their_member_is_erased_or_merged_are_not_written_to_it(make_api, monkeypatch,
                                                                                         between):
    """A PATCH of the CRM's fields whose card was looked up just before an erasure or a merge
    of its member committed is refused as the card now is: written, the erased member would
    carry a CRM id and consent again, and the member merged away would keep the CRM id from
    the member the customer is now."""
    from server import member_care
    api = await make_api(now=NOW)
    member = await member_with(api, CARD, 100)
    keep = await member_with(api, OTHER, 100)
    assert keep["member_id"] == "m_2"
    real, ran = member_care.member_ops.find_member, []

    async def then_committed(deps, card, path="card"):
        found = await real(deps, card, path)
        if not ran:
            ran.append(await api.call(*BEFORE_THE_CRM_WRITE[between](member["member_id"])))
        return found

    monkeypatch.setattr(member_care.member_ops, "find_member", then_committed)
    status, refused = await api.patch(f"/v1/members/{CARD}", {"crm_id": "CRM-1", "consent": {"sms": True}})
    assert ran[0][0] in (200, 201), ran
    # An erased member's cards are gone without a trace; a merged one's say where they went.
    code = {"erasure": "unknown_card", "merge": "card_merged"}[between]
    assert (status, refused["error"]["code"]) == (422, code), refused
    row = await api.client.server.app[DATABASE].read(lambda c: c.execute(
        "SELECT crm_id, consent_sms FROM members WHERE id = ?", (int(member["member_id"][2:]),)).fetchone())
    assert tuple(row) == (None, 0)
    status, kept = await api.patch(f"/v1/members/{OTHER}", {"crm_id": "CRM-1"})
    assert status == 200 and kept["crm_id"] == "CRM-1", kept


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "orders every write")
@pytest.mark.parametrize("undo", ["cancel", "return"])
async def test_taking_back_a_merged_members_receipt_follows_a_merge_committed_before_its_heir_was_locked(
        make_api, monkeypatch, undo):
    """m_1 merged into m_2, m_2 then into m_3: a cancel or a whole return of m_1's receipt
    that looked up where m_1's points went just before the second merge committed takes the
    points back from m_3, where they are, not from m_2, which then owed them with no card to
    reach it while m_3 kept them."""
    from storage import ledger
    api = await make_api(now=NOW)
    first = await member_with(api, CARD, 0)
    _, sold = await api.post("/v1/receipts", three_lines("B-1"), as_="register")
    earned = sold["accrued"]["points"]
    assert earned > 0, sold
    heir = await member_with(api, OTHER, 100)
    last = await member_with(api, "7000000000063", 100)
    for n, (source, target) in enumerate([(first, heir), (heir, last)]):
        status, merged = await api.post("/v1/admin/members/merge", {
            "merge_id": f"MG-{n}", "from_member_id": source["member_id"], "into_member_id": target["member_id"],
            "reason": "one customer"})
        assert status == 201, merged
    before = await balance(api, "7000000000063")
    m1, m2, m3 = (int(m["member_id"][2:]) for m in (first, heir, last))
    # Until m_2's lock is taken (and waited for the merge), m_2's merge is not seen.
    merged_yet = merge_seen_once_locked(monkeypatch, m2, lambda member_id, found: found if found != m3 else
                                        None if member_id == m2 else m2)
    if undo == "cancel":
        status, answer = await api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register")
    else:
        status, answer = await api.post("/v1/returns", a_return("RET-1", "B-1", [(1, 3), (2, 1), (3, 1)]),
                                        as_="register")
    assert status in (200, 201), answer
    assert merged_yet == [m2]
    after = await balance(api, "7000000000063")
    assert after["available"] + after["pending"] == before["available"] + before["pending"] - earned, (before, after)
    assert answer["balance"] == after, answer
    left = await api.client.server.app[DATABASE].read(
        lambda conn: [lot.remaining for m in (m1, m2) for lot in ledger.lots_of(conn, m)])
    assert not any(left), left      # nothing owed by, or left on, the members merged away
    await ledger_verifies(api)


REFERRAL = "events:\n  - {id: referral, on: referred_first_purchase, reward: {points: 500}}\n"


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "orders every write")
async def test_a_referral_reward_follows_a_merge_of_the_referrer_committed_before_its_lock_was_taken(
        make_api, tmp_path, monkeypatch):
    """The first purchase of a referred member, confirmed as its referrer is merged into
    another member: the reward goes where the referrer's points went. Looked up before the
    merge committed and credited after it, it stayed on the member merged away, which no card
    reaches."""
    from storage import ledger
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "referral.yaml").write_text(REFERRAL)
    api = await make_api(now=NOW, program_dir=program)
    referrer = await member_with(api, CARD, 100)
    keep = await member_with(api, OTHER, 100)
    assert (await api.post("/v1/members", {"card": "7000000000063", "referred_by": CARD}))[0] == 201
    status, merged = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": referrer["member_id"], "into_member_id": keep["member_id"],
        "reason": "one customer"})
    assert status == 201, merged
    source = int(referrer["member_id"][2:])
    # Until the referrer's lock is taken (and waited for the merge), its merge is not seen.
    merged_yet = merge_seen_once_locked(monkeypatch, source,
                                        lambda member_id, found: None if member_id == source else found)
    status, sold = await api.post("/v1/receipts", three_lines("F-1", card="7000000000063"), as_="register")
    assert status == 201, sold
    assert (await balance(api, OTHER))["available"] == 100 + 100 + 500
    left = await api.client.server.app[DATABASE].read(
        lambda conn: [lot.remaining for lot in ledger.lots_of(conn, source)])
    assert not any(left), left
    assert merged_yet == [source]
    await ledger_verifies(api)


def merge_seen_once_locked(monkeypatch, locked_id: int, unseen) -> list[int]:
    """Plays a merge that commits while a write waits for member `locked_id`'s lock: until
    that lock is taken, member_care.survivor answers unseen(member_id, what it found). The
    list returned holds `locked_id` once its lock was asked for."""
    from storage import ledger, member_care
    real_survivor, locked = member_care.survivor, []

    def survivor(conn, member_id):
        found = real_survivor(conn, member_id)
        return found if locked else unseen(member_id, found)

    def noting(real):
        def lock(conn, member_ids):
            if locked_id in ([member_ids] if isinstance(member_ids, int) else member_ids) and not locked:
                locked.append(locked_id)
            return real(conn, member_ids)
        return lock

    monkeypatch.setattr(member_care, "survivor", survivor)
    for name in ("lock_member", "lock_members", "lock_members_after"):
        monkeypatch.setattr(ledger, name, noting(getattr(ledger, name)))
    return locked


# ---------------------------------------------------------------- the order members' locks are taken in

class InOrder:
    """A write of the test's own, on a connection of its own, taking members' locks one at a
    time in the order of their ids, as every write of several members does (a merge, an
    erasure, a job's batch). Its own deadlock check waits long, so in a deadlock it is the
    server's write that PostgreSQL ends."""

    def __init__(self, path) -> None:
        self.path = path
        self.conn = connect(path).raw
        self.conn.execute("SET deadlock_timeout = '60s'")
        self.conn.execute("SET lock_timeout = '20s'")
        self.conn.execute("BEGIN")

    def lock(self, member_id: int) -> None:
        self.conn.execute("SELECT 1 FROM members WHERE id = %s FOR UPDATE", (member_id,))

    async def lock_when_waited_for(self, member_id: int) -> None:
        """Once a server's write waits for a lock this one holds: member_id's lock."""
        await wait_until(lambda: waiting_for_a_lock(self.path) >= 1, timeout_s=10)
        await asyncio.to_thread(self.lock, member_id)

    def commit(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


def waiting_for_a_lock(path) -> int:
    with connect(path) as other:
        return other.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                             "AND datname = current_database()").fetchone()[0]


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "orders every write")
@pytest.mark.parametrize("undo", ["cancel", "return"])
async def test_taking_back_a_merged_members_receipt_takes_its_locks_in_the_order_of_their_ids(
        make_api, tmp_path, undo):
    """m_2 merged into m_1: a cancel or a return of m_2's receipt locks both. Locking m_2,
    then m_1, it deadlocked with a write taking m_1 then m_2 (an erasure of m_1, a job's
    batch): one of the two failed, a 500 once `database.retries` ran out. Both at once, in
    the order of their ids, it waits for m_1 holding nothing, and both go through."""
    api = await make_api(now=NOW, database={"retries": 0})
    keep = await member_with(api, OTHER, 100)
    merged = await member_with(api, CARD, 0)
    _, sold = await api.post("/v1/receipts", three_lines("B-1"), as_="register")
    earned = sold["accrued"]["points"]
    status, answer = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": merged["member_id"], "into_member_id": keep["member_id"],
        "reason": "one customer"})
    assert status == 201, answer
    assert (await balance(api, OTHER))["pending"] == earned
    other = InOrder(tmp_path / "loyalty.db")
    other.lock(1)
    if undo == "cancel":
        undone = asyncio.create_task(api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register"))
    else:
        undone = asyncio.create_task(api.post("/v1/returns", a_return("RET-1", "B-1", [(1, 3), (2, 1), (3, 1)]),
                                              as_="register"))
    await other.lock_when_waited_for(2)
    other.commit()
    status, answer = await undone
    assert status in (200, 201), answer
    assert await balance(api, OTHER) == {"available": 100, "pending": 0, "held": 0}
    await ledger_verifies(api)


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "orders every write")
async def test_a_referral_reward_to_a_referrer_of_a_lower_id_waits_for_it_holding_nothing(make_api, tmp_path):
    """The first purchase of m_2, referred by m_1, pays m_1 with m_2's lock held. Waiting
    there for m_1's lock, it deadlocked with a write taking m_1 then m_2: a 500 once
    `database.retries` ran out. Finding m_1's lock taken, it now starts over with m_1
    locked first, holding nothing while it waits, and both go through."""
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "referral.yaml").write_text(REFERRAL)
    api = await make_api(now=NOW, program_dir=program, database={"retries": 0})
    await member_with(api, CARD, 100)
    assert (await api.post("/v1/members", {"card": OTHER, "referred_by": CARD}))[0] == 201
    other = InOrder(tmp_path / "loyalty.db")
    other.lock(1)
    first = asyncio.create_task(api.post("/v1/receipts", three_lines("F-1", card=OTHER), as_="register"))
    await other.lock_when_waited_for(2)
    other.commit()
    status, sold = await first
    assert status == 201, sold
    assert (await balance(api, CARD))["available"] == 100 + 500
    await ledger_verifies(api)


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "orders every write")
@pytest.mark.parametrize("merged_in", ["below", "above"])
async def test_an_erasure_holds_the_lock_of_a_member_merged_in_just_before_its_locks(
        make_api, tmp_path, monkeypatch, merged_in):
    """A merge into the member erased that commits between the erasure's read of who was
    merged into it and its locks: the member merged in is erased too, and under its own
    lock, so no write of it runs beside the erasure. Read before the locks, it was erased
    without its lock held."""
    from storage import ledger, member_care
    api = await make_api(now=NOW)
    first = await member_with(api, CARD, 100)
    second = await member_with(api, OTHER, 100)
    erased, merged = (second, first) if merged_in == "below" else (first, second)
    status, answer = await api.post("/v1/admin/members/merge", {
        "merge_id": "MG-1", "from_member_id": merged["member_id"], "into_member_id": erased["member_id"],
        "reason": "one customer"})
    assert status == 201, answer
    erased_id, merged_id = int(erased["member_id"][2:]), int(merged["member_id"][2:])
    real_with_merged, real_lock, real_erase = member_care.with_merged, ledger.lock_members, member_care.erase
    locked, held_when_erased = [], []

    def with_merged(conn, member_id):
        found = real_with_merged(conn, member_id)
        return found if locked else [m for m in found if m != merged_id]   # the merge not committed yet

    def lock_members(conn, member_ids):
        locked.append(sorted(member_ids))
        return real_lock(conn, member_ids)

    def erase(conn, member_id, *args):
        held_when_erased.append(locked_by_another(tmp_path / "loyalty.db", merged_id))
        return real_erase(conn, member_id, *args)

    monkeypatch.setattr(member_care, "with_merged", with_merged)
    monkeypatch.setattr(ledger, "lock_members", lock_members)
    monkeypatch.setattr(member_care, "erase", erase)
    status, answer = await api.post(f"/v1/admin/members/{erased['member_id']}/erase", {"reason": "asked"})
    assert status == 200, answer
    assert sorted(answer["members_erased"]) == sorted([erased["member_id"], merged["member_id"]]), answer
    assert locked[0] == [erased_id] and held_when_erased == [True], (locked, held_when_erased)
