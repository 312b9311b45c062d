"""`loyalty audit verify`: recompute what the ledger claims and name the first thing that
does not hold.

1. The hash chain: every posting's hash over the previous hash and its own fields
   (and its lot's dates). An edited, inserted or deleted row breaks it from there on.
2. Balances from postings: each lot's kept remaining points equal the sum of its
   postings; a lot below zero is a debt and is only allowed where a return reversed
   points the member had already spent (or a merge transferred such a debt). Each accrual
   posting's split by rule (posting_rules, m030) sums to its points, and each rule's kept
   total (rule_totals, what budgets count) equals its accruals by rule plus its reversal
   postings.
3. Receipts: each confirmed receipt's postings match its stored answer; a cancelled
   receipt nets to zero; returns posted what they answered.
4. Accounts: the members' total equals minus the counter accounts' total (zero sum).
"""
from __future__ import annotations

import contextlib
import itertools
import sqlite3
from dataclasses import dataclass, field

import msgspec

from storage.ledger import BY_RULE_FROM, BY_RULE_ID, BY_RULE_POINTS, GENESIS_HASH, HASHED_SELECT, posting_hash, unpack
from storage.sql import byte_order, is_postgresql, stream

PROGRESS_EVERY_ROWS = 100_000


@dataclass
class AuditReport:
    postings: int = 0
    receipts: int = 0
    members: int = 0
    liability: int = 0
    accounts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    chain_head: str = GENESIS_HASH.hex()

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(conn: sqlite3.Connection, problems_max: int = 20) -> AuditReport:
    if is_postgresql(conn):     # each member's chain and the anchors over them
        from storage.pg.audit import verify as verify_postgresql
        return verify_postgresql(conn, problems_max)
    report = AuditReport()
    with _one_snapshot(conn):
        for check in (_chain, *LEDGER_CHECKS):
            check(conn, report)
            if len(report.problems) >= problems_max:
                break
    return report


@contextlib.contextmanager
def _one_snapshot(conn: sqlite3.Connection):
    """Every check reads the same moment of the ledger. Beside a serving server, checks
    reading one after another saw different moments, and the postings committed between
    two of them made the accounts not sum to zero."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")


def _chain(conn, report: AuditReport) -> None:
    prev = GENESIS_HASH
    expected_id = 1
    for row in conn.execute(f"SELECT {HASHED_SELECT}, p.hash, l.member_id FROM postings p "
                            "LEFT JOIN lots l ON l.id = p.lot_id ORDER BY p.id"):
        fields, stored, lot_member = row[:-2], row[-2], row[-1]
        if fields[0] != expected_id:
            report.problems.append(f"posting {expected_id}: missing (the ids jump to {fields[0]})")
            return
        if posting_hash(prev, tuple(fields)) != stored:
            report.problems.append(f"posting {fields[0]}: hash does not match its contents or the chain "
                                   "(the row, its lot or an earlier row was changed)")
            return
        if lot_member != fields[1]:
            report.problems.append(f"posting {fields[0]}: lot {fields[2]} belongs to another member")
            return
        prev = stored
        expected_id += 1
        report.postings += 1
    report.chain_head = prev.hex()


def _lots(conn, report: AuditReport) -> None:
    for lot_id, member_id, kept, remaining in conn.execute(
            # The postings summed by lot in one pass: no index finds a lot's postings.
            "SELECT l.id, l.member_id, l.remaining, COALESCE(t.points, 0) FROM lots l LEFT JOIN "
            "(SELECT lot_id, SUM(points) AS points FROM postings GROUP BY lot_id) AS t ON t.lot_id = l.id "
            "WHERE l.remaining != COALESCE(t.points, 0)"):
        report.problems.append(f"lot {lot_id} of member m_{member_id} says {kept} points remain, "
                               f"its postings sum to {remaining}")
        return
    for lot_id, member_id, remaining, reversed_ in conn.execute(
            "SELECT p.lot_id, p.member_id, SUM(p.points), SUM(CASE WHEN p.kind IN ('reversal', 'transfer') "
            "THEN 1 ELSE 0 END) FROM postings p GROUP BY p.lot_id, p.member_id HAVING SUM(p.points) < 0"):
        if not reversed_:     # a transfer brings a debt along from a merged member
            report.problems.append(f"lot {lot_id} of member m_{member_id} is overspent ({remaining} points) "
                                   "without a return that explains it")
            return


def _has_table(conn, name: str) -> bool:
    if is_postgresql(conn):
        return conn.execute("SELECT 1 FROM information_schema.tables WHERE table_name = ?",
                            (name,)).fetchone() is not None
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _rule_totals(conn, report: AuditReport) -> None:
    # Audit reads the file as it is (read-only, no migrations): a database the server has
    # not opened since m016 keeps no totals, so none can disagree; one not opened since
    # m030 has its accruals by rule in the postings themselves.
    if not _has_table(conn, "rule_totals"):
        return
    if _has_table(conn, "posting_rules"):
        if not _splits(conn, report):
            return
        posted = ("SELECT rule_id, 0, points FROM posting_rules UNION ALL "
                  "SELECT rule_id, 0, points FROM postings WHERE rule_id IS NOT NULL AND kind = 'reversal'")
    else:
        posted = "SELECT rule_id, 0, points FROM postings WHERE rule_id IS NOT NULL AND kind IN ('accrual', 'reversal')"
    # Both sides in one pass: a kept row with no postings, or postings with no kept row,
    # differ as much as a wrong sum.
    for rule_id, kept, total in conn.execute(
            "SELECT rule_id, SUM(kept), SUM(posted) FROM ("
            f"SELECT rule_id, points AS kept, 0 AS posted FROM rule_totals UNION ALL {posted}"
            ") AS sides GROUP BY rule_id HAVING SUM(kept) != SUM(posted) ORDER BY rule_id"):
        report.problems.append(f"rule {rule_id}: rule_totals says it issued {kept} points, "
                               f"its accrual and reversal postings sum to {total}")


def _splits(conn, report: AuditReport) -> bool:
    """Every accrual posting's split by rule sums to its points, and every split row
    belongs to an accrual posting."""
    for posting_id, points, split in conn.execute(
            "SELECT p.id, p.points, COALESCE(SUM(pr.points), 0) FROM postings p "
            "LEFT JOIN posting_rules pr ON pr.posting_id = p.id WHERE p.kind = 'accrual' "
            "GROUP BY p.id HAVING COALESCE(SUM(pr.points), 0) != p.points ORDER BY p.id LIMIT 1"):
        report.problems.append(f"posting {posting_id}: accrual of {points} points, its split by rule "
                               f"(posting_rules) sums to {split}")
        return False
    for posting_id, rule_id in conn.execute(
            "SELECT pr.posting_id, pr.rule_id FROM posting_rules pr LEFT JOIN postings p ON p.id = pr.posting_id "
            "WHERE p.id IS NULL OR p.kind != 'accrual' ORDER BY pr.posting_id LIMIT 1"):
        report.problems.append(f"posting {posting_id}: split row for rule {rule_id} without an accrual posting")
        return False
    return True


def _receipts(conn, report: AuditReport) -> None:
    # Receipts and postings both in byte order of the identity, the order in which Python
    # compares the keys (InOrder.take).
    order = byte_order(conn)
    receipts = stream(conn, "SELECT store_id, register_id, receipt_id, member_id, status, result FROM receipts "
                      f"WHERE member_id IS NOT NULL ORDER BY store_id{order}, register_id{order}, "
                      f"receipt_id{order}")
    sums = _sums_by_receipt(conn, order)
    for store, register, receipt_id, member_id, status, result in receipts:
        report.receipts += 1
        found = sums.take((store, register, receipt_id, member_id))
        problem = _receipt_problem(status, result, {(row[4], row[5]): row[6] for row in found})
        if problem:
            report.problems.append(f"receipt {store}/{register}/{receipt_id}: {problem}")
            return


class InOrder:
    """The rows of a query sorted by their first `width` columns, grouped by them and handed
    out as the caller reads another query sorted by the same key: a merge of two sorted
    reads, so that neither side is looked up per row nor kept in a dict by key. Both reads
    stream (storage.sql.stream), so neither is held whole in memory either."""

    def __init__(self, rows, width: int):
        self._groups = itertools.groupby(rows, key=lambda row: tuple(row[:width]))
        self._next = next(self._groups, None)

    def take(self, key: tuple) -> list[tuple]:
        """The rows of `key` ([] when there are none); keys come in the rows' order. Rows of
        a key never asked for are passed."""
        while self._next is not None and self._next[0] < key:
            self._next = next(self._groups, None)
        if self._next is None or self._next[0] != key:
            return []
        found = list(self._next[1])
        self._next = next(self._groups, None)
        return found


def _sums_by_receipt(conn, order: str) -> InOrder:
    """Every receipt's postings summed by kind and rule (accruals by rule), in one pass over
    postings in order of the receipt's identity and member, the rows of a receipt (its
    identity, member, kind, rule, points). On SQLite no index finds a receipt's postings
    since m037, and a look-up per receipt among its member's postings would read a member's
    history once per receipt of theirs. Matched by member too, as a cancel and a return find
    them (storage.ledger.receipt_postings)."""
    source, rule, points = _by_rule(conn)
    return InOrder(stream(
        conn, f"SELECT p.store_id, p.register_id, p.receipt_id, p.member_id, p.kind, COALESCE({rule}, ''), "
        f"SUM({points}) FROM {source} "
        "WHERE p.store_id IS NOT NULL AND p.register_id IS NOT NULL AND p.receipt_id IS NOT NULL "
        f"GROUP BY p.store_id, p.register_id, p.receipt_id, p.member_id, p.kind, COALESCE({rule}, '') "
        f"ORDER BY p.store_id{order}, p.register_id{order}, p.receipt_id{order}, p.member_id"), 4)


def _by_rule(conn) -> tuple[str, str, str]:
    """Accruals by rule: from their split once the database has one (m030), else as posted."""
    if _has_table(conn, "posting_rules"):
        return BY_RULE_FROM, BY_RULE_ID, BY_RULE_POINTS
    return "postings p", "p.rule_id", "p.points"


def _receipt_problem(status: str, result: bytes, sums: dict[tuple[str, str], int]) -> str | None:
    """What is wrong with one receipt's postings (kind, rule) -> points against its row."""
    if status == "cancelled":
        # Expiry and debt repayment postings may carry the receipt too; what it earned and
        # spent must net to zero.
        net = sum(p for (k, _), p in sums.items() if k in ("accrual", "reversal", "redemption", "refund"))
        return f"cancelled but what it earned and spent nets to {net}" if net != 0 else None
    try:
        answer = msgspec.json.decode(unpack(result))
        answer["accrued"]["by_rule"], answer["accrued"]["points"], answer["redeemed"]["points"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return "its stored answer cannot be read"
    for item in answer["accrued"]["by_rule"]:
        if sums.get(("accrual", item["rule"]), 0) != item["points"]:
            return (f"rule {item['rule']} posted {sums.get(('accrual', item['rule']), 0)} "
                    f"but the receipt answered {item['points']}")
    posted = sum(p for (k, _), p in sums.items() if k == "accrual")
    if posted != answer["accrued"]["points"]:
        return f"accrual postings {posted} != answered {answer['accrued']['points']}"
    spent = -sum(p for (k, _), p in sums.items() if k == "redemption")
    if spent != answer["redeemed"]["points"]:
        return f"redemption postings {spent} != answered {answer['redeemed']['points']}"
    return None


def _returns(conn, report: AuditReport) -> None:
    # A return's postings carry its identity as their ref, which no index on either backend
    # holds: returns and the postings summed by ref are both read in byte order of the ref
    # and merged (InOrder), one pass over postings instead of a scan of them per return.
    order = byte_order(conn)
    ref = "store_id || '/' || register_id || '/' || return_id"
    returns = stream(conn, f"SELECT {ref}, result FROM returns WHERE member_id IS NOT NULL ORDER BY ({ref}){order}")
    sums = InOrder(stream(
        conn, "SELECT ref, SUM(CASE WHEN kind = 'reversal' THEN -points ELSE 0 END), "
        "SUM(CASE WHEN kind = 'refund' THEN points ELSE 0 END) FROM postings "
        f"WHERE ref IS NOT NULL AND kind IN ('reversal', 'refund') GROUP BY ref ORDER BY ref{order}"), 1)
    for ref, result in returns:
        found = sums.take((ref,))
        reversed_, refunded = found[0][1:] if found else (0, 0)
        answer = msgspec.json.decode(result)
        if reversed_ != answer["reversed"]["points"] or refunded != answer["refunded"]["points"]:
            report.problems.append(f"return {ref}: postings reverse {reversed_} and refund {refunded}, "
                                   f"the return answered {answer['reversed']['points']} and "
                                   f"{answer['refunded']['points']}")
            return


def _accounts(conn, report: AuditReport) -> None:
    report.liability = conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings").fetchone()[0]
    report.members = conn.execute("SELECT COUNT(*) FROM members").fetchone()[0]
    report.accounts = {acct: -total for acct, total in conn.execute(
        "SELECT counter_account, SUM(points) FROM postings WHERE counter_account NOT LIKE 'member:%' "
        "GROUP BY counter_account ORDER BY counter_account")}
    if report.liability + sum(report.accounts.values()) != 0:
        report.problems.append(f"accounts do not sum to zero: members {report.liability}, "
                               f"counter accounts {sum(report.accounts.values())}")


# The checks that do not depend on how the hash chain is kept, in SQL both databases
# accept: the PostgreSQL backend runs them after its own chain check (storage/pg/audit.py).
LEDGER_CHECKS = (_lots, _rule_totals, _receipts, _returns, _accounts)
