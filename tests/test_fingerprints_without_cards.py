"""Adjustments and offers keep a fingerprint of their body for idempotent retries. A plain
SHA-256 of a body with a card number in it gives the number back to anyone who tries every
card number with the row's other fields; the fingerprint is taken with each card replaced by
its keyed hash, as receipts are. Retries replay across a card-hash key rotation; rows stored
before (m031) are compared by their stored fields."""
from __future__ import annotations

import hashlib

import msgspec
import pytest

from conftest import FIRST_PRIVACY, ROTATED_PRIVACY, Api, connect, rotate_keys, serve_program

from server.schema import Adjustment, OfferAssignment, canonical

NOW = "2026-12-10T12:00:00+02:00"
CARD = "7000000000042"
PROGRAM = """\
program: {id: boutique, name: Boutique, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
rules:
  - id: base
    reward: {percent: 2}
  - id: comeback
    personal: true
    reward: {points: 30}
"""
ADJUSTMENT = {"adjustment_id": "adj-1", "card": CARD, "points": 50, "reason": "goodwill"}
OFFER = {"offer_id": "o-1", "rule": "comeback", "cards": [CARD], "from": "2026-12-01", "to": "2026-12-31",
         "points": 40}


async def serve(aiohttp_client, tmp_path, privacy=FIRST_PRIVACY) -> Api:
    return await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM, privacy)


def stored(tmp_path) -> tuple[str, str]:
    with connect(tmp_path / "loyalty.db") as conn:
        return (conn.execute("SELECT body_sha256 FROM adjustments").fetchone()[0],
                conn.execute("SELECT body_sha256 FROM offers").fetchone()[0])


def plain(body: dict, as_type) -> str:
    """The unkeyed fingerprint taken before m031, which anyone can compute for a guessed card."""
    return hashlib.sha256(canonical(msgspec.convert(body, as_type))).hexdigest()


async def assign_and_adjust(api: Api) -> None:
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    assert (await api.post("/v1/admin/offers", OFFER))[0] == 201
    assert (await api.post("/v1/admin/adjustments", ADJUSTMENT))[0] == 201


async def test_trying_every_card_number_finds_none_in_the_fingerprints(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await assign_and_adjust(api)
    adjustment, offer = stored(tmp_path)
    guesses = [f"70000000000{n:02d}" for n in range(100)]      # the card is among them
    assert CARD in guesses
    for guess in guesses:
        assert plain({**ADJUSTMENT, "card": guess}, Adjustment) != adjustment
        assert plain({**OFFER, "cards": [guess]}, OfferAssignment) != offer


async def test_a_retry_replays_and_another_body_is_a_conflict(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await assign_and_adjust(api)
    status, again = await api.post("/v1/admin/adjustments", ADJUSTMENT)
    assert status == 200 and again["replayed"] is True
    assert (await api.post("/v1/admin/offers", {**OFFER, "cards": [CARD, CARD]}))[0] == 409
    assert (await api.post("/v1/admin/offers", OFFER))[0] == 200
    status, err = await api.post("/v1/admin/adjustments", {**ADJUSTMENT, "points": 51})
    assert status == 409 and err["error"]["code"] == "idempotency_conflict"
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"]["available"] == 50


async def test_retries_replay_across_a_key_rotation(aiohttp_client, tmp_path):
    first = await serve(aiohttp_client, tmp_path)
    await assign_and_adjust(first)
    await first.client.close()
    rotated = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    status, again = await rotated.post("/v1/admin/adjustments", ADJUSTMENT)
    assert status == 200 and again["replayed"] is True
    assert (await rotated.post("/v1/admin/offers", OFFER))[0] == 200
    assert (await rotated.post("/v1/admin/adjustments", {**ADJUSTMENT, "reason": "other"}))[0] == 409
    assert (await rotated.post("/v1/admin/offers", {**OFFER, "to": "2026-12-30"}))[0] == 409
    # A new one is fingerprinted under the key in force, and replays too.
    assert (await rotated.post("/v1/admin/adjustments", {**ADJUSTMENT, "adjustment_id": "adj-2"}))[0] == 201
    assert (await rotated.post("/v1/admin/adjustments", {**ADJUSTMENT, "adjustment_id": "adj-2"}))[0] == 200
    await rotated.client.close()

    # rotate-key leaves no fingerprint taken under the first key: those become their rows' fields.
    assert await rotate_keys(tmp_path, NOW) == 0
    with connect(tmp_path / "loyalty.db") as conn:
        kept = dict(conn.execute("SELECT adjustment_id, body_sha256 FROM adjustments"))
        kept.update(conn.execute("SELECT offer_id, body_sha256 FROM offers"))
    assert kept["adj-1"].startswith("m031:") and kept["o-1"].startswith("m031:")
    assert kept["adj-2"].startswith("~k2~")
    after = await serve(aiohttp_client, tmp_path, ROTATED_PRIVACY)
    for adjustment in (ADJUSTMENT, {**ADJUSTMENT, "adjustment_id": "adj-2"}):
        status, again = await after.post("/v1/admin/adjustments", adjustment)
        assert status == 200 and again["replayed"] is True
        assert (await after.post("/v1/admin/adjustments", {**adjustment, "points": 7}))[0] == 409
    assert (await after.post("/v1/admin/offers", OFFER))[0] == 200
    assert (await after.post("/v1/admin/offers", {**OFFER, "to": "2026-12-30"}))[0] == 409


@pytest.mark.sqlite_only(reason="upgrades an SQLite file written before m031")
async def test_rows_from_before_keyed_fingerprints_lose_the_card_and_still_replay(aiohttp_client, tmp_path):
    api = await serve(aiohttp_client, tmp_path)
    await assign_and_adjust(api)
    await api.client.close()
    # As a database from before m031 holds them: the plain SHA-256 of the body, card and all.
    with connect(tmp_path / "loyalty.db") as conn:
        conn.execute("UPDATE adjustments SET body_sha256 = ?", (plain(ADJUSTMENT, Adjustment),))
        conn.execute("UPDATE offers SET body_sha256 = ?", (plain(OFFER, OfferAssignment),))
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm031_fingerprints_without_cards'")
    upgraded = await serve(aiohttp_client, tmp_path)
    adjustment, offer = stored(tmp_path)
    assert adjustment != plain(ADJUSTMENT, Adjustment) and offer != plain(OFFER, OfferAssignment)
    assert CARD not in adjustment + offer
    status, again = await upgraded.post("/v1/admin/adjustments", ADJUSTMENT)
    assert status == 200 and again["replayed"] is True
    assert (await upgraded.post("/v1/admin/offers", OFFER))[0] == 200
    assert (await upgraded.post("/v1/admin/adjustments", {**ADJUSTMENT, "points": 49}))[0] == 409
    assert (await upgraded.post("/v1/admin/offers", {**OFFER, "points": 41}))[0] == 409
