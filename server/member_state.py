"""A member as one receipt needs them, read once inside the write transaction: the lots
with their dates (or, for a receipt that neither redeems nor repays, their totals), the
holds, the tier facts and the limited rules' uses at the receipt's ts, the budgets left,
the segments, personal offers and the receipt's coupon codes (server/plan.py
MemberState). Also the tier a member holds at a moment, and the segments a member is in,
which member views show."""
from __future__ import annotations

import sqlite3
from datetime import date, datetime, timedelta
from typing import Callable, NamedTuple

import msgspec

from rules import MemberFacts, Program
from server.errors import unprocessable
from server.plan import MemberState, key_of, local_date, local_day
from storage import coupons, customer_value, ledger, offers, segments
from storage.ledger import iso
from storage.member_facts import TierFacts


def read_member_state(conn: sqlite3.Connection, receipt, program: Program, now: datetime,
                      card: str | None, coupon_mac: Callable[[str], str] | None = None,
                      kept: segments.MembershipCache | None = None) -> MemberState | None:
    """None for an anonymous receipt. card: the card number's HMAC. coupon_mac: the HMAC
    coupon codes are stored under (server/privacy.py), needed when the receipt sends codes.
    kept: members' segments kept in memory, read instead of their spans when current."""
    if card is None:
        return None
    member = ledger.member_by_card(conn, card)
    if member is None:
        raise unprocessable("unknown_card", f"card {receipt.card} is not enrolled",
                            [{"path": "card", "message": "not enrolled"}])
    key = key_of(receipt)
    windows = program.limit_windows(local_date_of(program, receipt.ts))
    holds = ledger.open_holds(conn, member.id, iso(now))
    hold_open = any(h.key == key and h.points for h in holds) or \
        ledger.hold_member(conn, key, open_only=True) is not None
    value = _customer_value(conn, program, member, receipt, card, coupon_mac, now, kept)
    lots, totals = _lots(conn, member.id, receipt, local_day(program, now))
    return MemberState(member, value.facts, lots, holds,
                       ledger.rule_usage(conn, member.id, windows), budget_left(conn, program), hold_open,
                       value.judged, value.tier, value.tier_now, value.offers, totals)


def _lots(conn, member_id: int, receipt, today: str) -> tuple[list[ledger.Lot] | None, ledger.LotTotals | None]:
    """The member's lots when the receipt redeems (it draws from them) or a debt must be
    repaid from its points; otherwise only their totals at arrival, whose cost does not
    grow with the member's history."""
    if receipt.redeem_points:
        return ledger.lots_of(conn, member_id), None
    totals = ledger.lot_totals(conn, member_id, today)
    return (ledger.lots_of(conn, member_id), None) if totals.debts else (None, totals)


def judge_codes(conn: sqlite3.Connection, receipt, program: Program, coupon_mac) -> coupons.Judged | None:
    """The codes of a receipt without a card judged at its ts, so that the answer says why
    each does not apply (None: it sent none). Reads only."""
    sent = getattr(receipt, "coupons", None)
    if not sent:
        return None
    return coupons.judge(conn, sent, None, local_date_of(program, receipt.ts), program.coupons, coupon_mac)


def customer_value_facts(conn: sqlite3.Connection, program: Program, member: ledger.MemberRow, receipt,
                         card: str, coupon_mac, now: datetime) -> tuple[MemberFacts, coupons.Judged | None, TierFacts]:
    """The member's facts with their segments (as they are at arrival), the offers valid
    at ts and the receipt's usable codes; with the judgement of every code it sent and what
    the tier was computed from. Reads only: judging a code does not use it."""
    value = _customer_value(conn, program, member, receipt, card, coupon_mac, now)
    return value.facts, value.judged, value.tier


class CustomerValue(NamedTuple):
    facts: MemberFacts
    judged: coupons.Judged | None
    tier: TierFacts
    tier_now: TierTotals                # what the member's tier at `now` counts before the receipt
    offers: list[offers.OfferRow]       # valid at ts, which a confirm charges without reading them again


def _customer_value(conn: sqlite3.Connection, program: Program, member: ledger.MemberRow, receipt, card: str,
                    coupon_mac, now: datetime, kept: segments.MembershipCache | None = None) -> CustomerValue:
    """customer_value_facts, with what the member's tier at `now` counts and their offer rows:
    segments (unless kept in memory), offers and the codes' rows in one statement
    (storage/customer_value.py)."""
    facts, tier, tier_now = member_facts(conn, program, member, receipt.ts, now)
    day = local_date_of(program, receipt.ts)     # offers and coupon campaigns are judged at ts
    sent = getattr(receipt, "coupons", None)
    hashes = coupons.hashes(sent, coupon_mac) if sent else []
    kept = kept if program.segments else None
    membership = None if kept is None else kept.get(member.segments_generation, member.id)
    rows = customer_value.read(conn, member.id, bool(program.segments) and membership is None,
                               day if program.personal_rule_ids else None,
                               [digest for digests in hashes for digest in digests])
    if membership is None:
        membership = rows.listed, rows.computed
        if kept is not None:
            kept.put(member.segments_generation, member.id, *membership)
    judged = coupons.judged(sent, hashes, rows.codes, card, day, program.coupons) if sent else None
    facts = msgspec.structs.replace(
        facts, segments=segments_in(program, *membership), offers=offers.left_by_rule(rows.offers),
        coupons={campaign: code for campaign, (code, _) in judged.usable.items()} if judged else {})
    return CustomerValue(facts, judged, tier, tier_now, rows.offers)


def local_date_of(program: Program, moment: datetime) -> date:
    return local_date(program, moment)


def segments_now(conn: sqlite3.Connection, program: Program, member_id: int) -> frozenset[str]:
    """The segments the member is in now (rules.md: taken as they are when a receipt arrives,
    whatever its ts): `list` ones as stored, `rfm` and `when` ones as the newest finished
    run of the daily job left them (server/rfm.py), for the segments the program defines."""
    if not program.segments:
        return frozenset()
    return segments_in(program, *segments.membership_of(conn, member_id))


def segments_in(program: Program, listed: set[str], computed: set[str]) -> frozenset[str]:
    """The program's segments among the member's stored ones (list and computed)."""
    if not (listed or computed):
        return frozenset()
    return program.list_segment_ids.intersection(listed) | program.computed_segment_ids.intersection(computed)


def budget_left(conn: sqlite3.Connection, program: Program) -> dict[str, int] | None:
    """Points each budgeted rule may still issue. rule_totals is added to in the transaction
    that writes the postings and their split by rule (storage/ledger.py add_rule_totals), so
    it counts every receipt written before this one, committed or not, and a receipt whose
    write is rolled back takes its points with it."""
    if not program.budgets:
        return None
    used = ledger.rule_totals(conn, list(program.budgets))
    return {r: max(0, cap - used[r]) for r, cap in program.budgets.items()}


def member_facts(conn: sqlite3.Connection, program: Program, member: ledger.MemberRow,
                 ts: datetime, now: datetime) -> tuple[MemberFacts, TierFacts, TierTotals]:
    """As the rules see the member on a receipt stamped `ts`: the tier at ts, the
    receipt_number in arrival order (this receipt not stored yet); the window's totals
    the tier came from, which the receipt records; and what the tier at `now` counts."""
    tier, ever, totals, tier_now = tier_of_receipt(conn, program, member, ts, now)
    return MemberFacts(
        member_id=member.public_id,
        tier=tier["id"],
        tags=frozenset(msgspec.json.decode(member.tags)),
        birthday=date.fromisoformat(member.birthday) if member.birthday else None,
        enrolled_on=ledger.from_iso(member.enrolled_at).astimezone(program.timezone).date(),
        receipt_number=ever + 1,
    ), totals, tier_now


class TierTotals(NamedTuple):
    """What a member's tier at a moment counts over the program's window up to it."""
    receipts: int
    spend: int                  # net of returns, minor units


def tier_of_receipt(conn: sqlite3.Connection, program: Program, member: ledger.MemberRow,
                    ts: datetime, now: datetime) -> tuple[dict, int, TierFacts, TierTotals]:
    """tier_view of a receipt stamped `ts`, with the totals of the window it read, and in
    the same pass what the tier at its arrival `now` counts before it is stored."""
    window = timedelta(days=program.tier_window_days)
    ever, count, spend, count_now, spend_now = ledger.tier_counts(conn, member.id, iso(ts - window), iso(ts),
                                                                  iso(now - window))
    view = _view(program, member, count, spend, local_day(program, ts))
    in_force = view["manual"] or "manual_ignored" in view     # ignored: another program may define it
    manual = member.manual_tier if in_force else None
    return view, ever, TierFacts(view["id"], manual, program.tier_window_days, spend, count), \
        TierTotals(count_now, spend_now)


def tier_after_receipt(program: Program, member: ledger.MemberRow, before: TierTotals, receipt,
                       now: datetime) -> str:
    """The member's tier at `now` once the receipt is stored: what it counted at arrival
    (tier_of_receipt) plus the receipt itself when its ts is inside the window, which
    counts receipts stamped up to any time after `now - window`. Exact as long as nothing
    else changed the member's receipts in between: a batch plans a member once."""
    receipts, spend = before
    if iso(receipt.ts) > iso(now - timedelta(days=program.tier_window_days)):
        receipts, spend = receipts + 1, spend + receipt.total
    return _view(program, member, receipts, spend, local_day(program, now))["id"]


def tier_view(conn: sqlite3.Connection, program: Program, member: ledger.MemberRow, moment: datetime,
              as_of: str | None = None, of_receipt: bool = False) -> tuple[dict, int]:
    """The member's tier at `moment`, and how many receipts they confirmed (in arrival order).

    The tier is a manual one while its date holds and the program defines it, else the level
    the program's metric reached over the rolling window before `moment` (of_receipt: a
    receipt's own tier, which leaves receipts stamped at its very moment out). `next` and
    `to_next` follow the tier the member actually has. A manual tier the program no longer
    defines is ignored (shown under `manual_ignored`): the rules only know their own tiers."""
    today = moment.astimezone(program.timezone).date().isoformat()
    until = iso(moment) if of_receipt else as_of
    ever, count, spend = ledger.receipt_counts(conn, member.id, tier_since(program, moment), until,
                                               until_inclusive=not of_receipt)
    return _view(program, member, count, spend, today), ever


def _view(program: Program, member: ledger.MemberRow, count: int, spend: int, today: str) -> dict:
    """The tier from the window's totals, or the manual tier while it holds on `today`."""
    metric = spend if program.tier_metric == "spend" else count
    tier, nxt, to_next = program.tier_for(metric)
    view = {"id": tier, "next": nxt, "to_next": to_next, "metric": program.tier_metric, "value": metric,
            "manual": False}
    if member.manual_tier and member.manual_tier_until and member.manual_tier_until >= today:
        levels = [level for level, _ in program.tiers]
        if member.manual_tier in levels:
            nxt, to_next = tier_after(program, levels.index(member.manual_tier), metric)
            view.update(id=member.manual_tier, next=nxt, to_next=to_next, manual=True,
                        until=member.manual_tier_until)
        else:
            view["manual_ignored"] = {"tier": member.manual_tier, "until": member.manual_tier_until,
                                      "reason": f"not a tier of program {program.id}"}
    return view


def tier_since(program: Program, moment: datetime) -> str:
    """The tier window's exclusive start for a tier at `moment`."""
    return iso(moment - timedelta(days=program.tier_window_days))


def tiers_at(conn: sqlite3.Connection, program: Program, members: list[segments.MemberRecord], moment: datetime,
             as_of: datetime | None = None, metrics: dict[int, tuple[int, int]] | None = None) -> dict[int, str]:
    """Each member's tier at `moment`, as tier_view gives it (receipts up to as_of, None:
    every one recorded), for many members by one pass over the receipts (or given its
    result, segments.tier_metrics)."""
    if metrics is None:
        metrics = segments.tier_metrics(conn, tier_since(program, moment), iso(as_of) if as_of else None)
    today = moment.astimezone(program.timezone).date().isoformat()
    levels = {level for level, _ in program.tiers}
    by_spend = program.tier_metric == "spend"
    computed: dict[int, str] = {}       # metric -> tier: few distinct values
    out = {}
    for m in members:
        if m.manual_tier in levels and m.manual_tier_until and m.manual_tier_until >= today:
            out[m.member_id] = m.manual_tier
            continue
        count, spend = metrics.get(m.member_id, (0, 0))
        metric = spend if by_spend else count
        if metric not in computed:
            computed[metric] = program.tier_for(metric)[0]
        out[m.member_id] = computed[metric]
    return out


def tier_after(program: Program, position: int, metric: int) -> tuple[str | None, int | None]:
    """The level after the one at `position`, and how much metric it still needs (0 when a
    manual tier below what the metric reached holds the member back)."""
    if position + 1 >= len(program.tiers):
        return None, None
    following, start = program.tiers[position + 1]
    return following, max(0, start - metric)
