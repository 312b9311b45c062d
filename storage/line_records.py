"""What a confirmed receipt keeps per line, for its returns and its cancel.

Written with the receipt (receipts.lines, m023) from the same plan its answer and postings
come from, so a return reads what the receipt decided and never re-reads the answer: per
line the quantity and amount sold, the points each rule earned on it with the lot they
went to, the points spent on it and the discount they paid.

Stored as msgpack (ReceiptLines), its first field a version: a reader refuses a version
it does not know rather than misreading it. Version 1 is the only one so far.
"""
from __future__ import annotations

from decimal import Decimal

import msgspec

from storage import versioned

VERSION = 1


class Sold(msgspec.Struct, array_like=True, frozen=True):
    """One line as sold."""
    line_no: int
    qty: Decimal
    amount: int         # minor units
    redeemed: int       # points spent on this line
    discount: int       # minor units those points paid


class ReceiptLines(msgspec.Struct, array_like=True, frozen=True):
    """The stored form. Points per (rule, line) are the evaluation's pairs as they are, so a
    receipt with hundreds of them costs no object per pair to write."""
    version: int
    lines: list[Sold]
    accruals: list[tuple[str, int, int]]    # (rule, line_no, points), in the order the rules fired
    lots: dict[str, int | None]             # the lot each earning rule's points went to

    def views(self) -> dict[int, LineRecord]:
        """What a return reads per line, by line number."""
        accrued: dict[int, list[Accrual]] = {line.line_no: [] for line in self.lines}
        for rule, line_no, points in self.accruals:
            accrued[line_no].append(Accrual(rule, points, self.lots.get(rule)))
        return {line.line_no: LineRecord(line.line_no, line.qty, line.amount, tuple(accrued[line.line_no]),
                                         line.redeemed, line.discount) for line in self.lines}


class Accrual(msgspec.Struct, frozen=True):
    rule: str
    points: int
    lot: int | None     # the lot the points went to; None on an anonymous receipt (no lots)


class LineRecord(msgspec.Struct, frozen=True):
    """One line as a return reads it."""
    line_no: int
    qty: Decimal
    amount: int
    accrued: tuple[Accrual, ...]    # per rule, in the order the rules fired
    redeemed: int
    discount: int

    @property
    def points(self) -> int:
        return sum(a.points for a in self.accrued)


UnknownVersion = versioned.UnknownVersion
_read = versioned.reader(ReceiptLines, VERSION, "line records")


def encode(record: ReceiptLines) -> bytes:
    return versioned.encode(record)


def decode(data: bytes) -> dict[int, LineRecord]:
    """The records by line number."""
    return _read(data).views()


def build(sold: list[tuple[int, Decimal, int]], pairs: list[tuple[str, int, int]], redeemed_by_line,
          lot_of_rule: dict[str, int | None]) -> ReceiptLines:
    """sold: (line_no, qty, amount) in the receipt's order; pairs: (rule, line_no, points) in
    the order the rules fired; redeemed_by_line: (line_no, points, discount); lot_of_rule:
    the lot of each earning rule."""
    redeemed = {line_no: (points, discount) for line_no, points, discount in redeemed_by_line}
    return ReceiptLines(VERSION, [Sold(line_no, qty, amount, *redeemed.get(line_no, (0, 0)))
                                  for line_no, qty, amount in sold], pairs, lot_of_rule)


def with_lots(record: ReceiptLines, lot_of_rule: dict[str, int | None]) -> ReceiptLines:
    return msgspec.structs.replace(record, lots=lot_of_rule)


# ---------------------------------------------------------------- rows written before m023

def from_stored(body: bytes, result: bytes, detail: bytes | None, lot_of_rule: dict[str, int]) -> ReceiptLines:
    """The records of a receipt stored before line records, from what was stored then: the
    body (JSON), the answer (JSON) and receipts.detail, which held NULL when at most one rule
    earned (the answer's by_line then gives every pair), the (rule, line_no, points) pairs
    when several did, or, for rows written before m013, the whole per-line detail as a JSON
    object. lot_of_rule: the lot of each rule's accrual posting on the receipt."""
    if detail is not None and detail[:1] == b"{":
        lines = msgspec.json.decode(detail)["lines"]
        sold = [(int(no), Decimal(str(line["qty"])), line["amount"]) for no, line in lines.items()]
        pairs = [(rule, int(no), points) for no, line in lines.items() for rule, points in line["pairs"].items()]
        redeemed = [(int(no), line["redeemed"], line["discount"]) for no, line in lines.items()]
    else:
        answer = msgspec.json.decode(result)
        sold = [(line["line_no"], Decimal(str(line["qty"])), line["amount"])
                for line in msgspec.json.decode(body)["lines"]]
        pairs = [tuple(p) for p in msgspec.json.decode(detail)] if detail is not None else _answer_pairs(answer)
        redeemed = [(item["line_no"], item["points"], item["discount"]) for item in answer["redeemed"]["by_line"]]
    return build(sold, pairs, redeemed, lot_of_rule)


def _answer_pairs(answer: dict) -> list[tuple[str, int, int]]:
    # Stored without its pairs only when at most one rule earned on the receipt.
    earned = [item["rule"] for item in answer["accrued"]["by_rule"] if item["points"]]
    if not earned:
        return []
    return [(earned[0], item["line_no"], item["points"]) for item in answer["accrued"]["by_line"] if item["points"]]
