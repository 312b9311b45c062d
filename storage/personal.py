"""Personal data at rest: converts rows written before card numbers and phones were kept
as HMACs (migration m011). Runs at start-up inside one write; a no-op once done."""
from __future__ import annotations

import sqlite3


def protect_existing(conn: sqlite3.Connection, privacy) -> int:
    """privacy: card(value) and phone(value) give the HMACs, card_last4/phone_last4 the display digits."""
    changed = 0
    for (card,) in conn.execute("SELECT card FROM cards WHERE card_last4 IS NULL").fetchall():
        conn.execute("UPDATE cards SET card = ?, card_last4 = ? WHERE card = ?",
                     (privacy.card(card), privacy.card_last4(card), card))
        changed += 1
    for member_id, phone in conn.execute("SELECT id, phone FROM members WHERE phone IS NOT NULL").fetchall():
        conn.execute("UPDATE members SET phone = NULL, phone_hmac = ?, phone_last4 = ? WHERE id = ?",
                     (privacy.phone(phone), privacy.phone_last4(phone), member_id))
        changed += 1
    return changed
