"""Customer value that merges and card replacements left behind before they carried it along.

A merge now moves the personal offers and list segments of the member merged away to the
surviving member, and a replacement or a merge binds the coupon codes of the card it takes
out of use to the card taking its place (server/member_care.py). Those made before did
neither, so a database that ran them may hold offers and open list memberships of members
no card reaches any more, and codes bound to a card no register can present again. The
upgrade (m039 on SQLite, p015 on PostgreSQL) moves them with the functions today's merge
and replacement move them with, so the two can never disagree on what a merge keeps:

- offers and list memberships of a merged-away member go to the member at the end of its
  chain of merges (storage/member_care.py survivor), as a merge into that member would move
  them (storage/offers.py take_over, storage/segments.py take_over_lists);
- codes bound to a retired card go to the card that replaced it while the same member still
  has it, and otherwise to the first card of the member holding the retired card's member's
  points (retired_cards records a successor by its last digits or its member, never by its
  hash). A holder without a card (erased) keeps them where they are, as a merge into it does.

The ledger is not touched. What is already where today's rules put it matches nothing, so a
second run changes nothing. Stored hashes are matched as stored: a key rotation left half
done is finished (`privacy rotate-key`) before the codes of its retired cards can all be
found, since the forms of a hash under later keys need the keys.
"""
from __future__ import annotations

import sqlite3
from datetime import datetime

from storage import coupons, ledger, member_care, segments


_OFFERS_AWAY = ("SELECT DISTINCT o.member_id FROM offer_members o JOIN members m ON m.id = o.member_id "
                "WHERE m.merged_into IS NOT NULL ORDER BY o.member_id")
_LISTED_AWAY = ("SELECT DISTINCT s.member_id FROM segment_members s JOIN members m ON m.id = s.member_id "
                "WHERE m.merged_into IS NOT NULL ORDER BY s.member_id")
_RETIRED_WITH_CODES = ("SELECT r.card, r.member_id, r.reason, r.successor, r.retired_at FROM retired_cards r "
                       "WHERE EXISTS (SELECT 1 FROM coupon_codes c WHERE c.card = r.card) ORDER BY r.card")


def repair(conn: sqlite3.Connection, now: datetime) -> None:
    """Moves what was left behind, in the caller's transaction. now: when the members merged
    away leave their list segments and their survivors join them."""
    for (source,) in conn.execute(_OFFERS_AWAY).fetchall():
        target = member_care.survivor(conn, source)
        ledger.lock_members(conn, [source, target])
        member_care.move_offers(conn, source, target)
    for (source,) in conn.execute(_LISTED_AWAY).fetchall():
        target = member_care.survivor(conn, source)
        ledger.lock_members(conn, [source, target])
        segments.take_over_lists(conn, source, target, now)
    for card, *retired in conn.execute(_RETIRED_WITH_CODES).fetchall():
        heir = _heir_card(conn, *retired)
        if heir is not None:
            coupons.rebind_codes(conn, (card,), heir)


def _heir_card(conn: sqlite3.Connection, member_id: int, reason: str, successor: str, retired_at: str) -> str | None:
    """The card a code bound to the retired card belongs on now (the module's docstring)."""
    holder = member_care.points_holder(conn, member_id)
    if reason == "replaced" and holder == member_id:
        # A replacement adds the new card at the moment it retires the old (member_care.replaced_by).
        row = conn.execute("SELECT card FROM cards WHERE member_id = ? AND card_last4 = ? AND created_at = ?",
                           (member_id, successor, retired_at)).fetchone()
        if row is not None:
            return row[0]
    cards = member_care.active_cards(conn, holder)
    return cards[0][0] if cards else None
