"""What a confirmed receipt keeps per line, for its returns and its cancel.

Written with the receipt (receipts.lines, m018) from the same plan its answer and postings
come from, so a return reads what the receipt decided and never re-reads the answer: per
line the quantity and amount sold, the points each rule earned on it with the lot they
went to, the points spent on it and the discount they paid.

Stored as msgpack, prefixed by a version: a reader refuses a version it does not know
rather than misreading it. Version 1 is the only one so far.
"""
from __future__ import annotations

from decimal import Decimal

import msgspec

VERSION = 1


class Accrual(msgspec.Struct, array_like=True, frozen=True):
    rule: str
    points: int
    lot: int | None     # the lot the points went to; None on an anonymous receipt (no lots)


class LineRecord(msgspec.Struct, array_like=True, frozen=True):
    line_no: int
    qty: Decimal
    amount: int         # minor units, as sold
    accrued: tuple[Accrual, ...]    # per rule, in the order the rules fired
    redeemed: int       # points spent on this line
    discount: int       # minor units those points paid

    @property
    def points(self) -> int:
        return sum(a.points for a in self.accrued)


class _Stored(msgspec.Struct, array_like=True):
    version: int
    lines: list[LineRecord]


class UnknownVersion(ValueError):
    """A row written by a newer server; this one cannot read it."""


_encoder = msgspec.msgpack.Encoder()
_versioned = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
_v1 = msgspec.msgpack.Decoder(_Stored)


def encode(lines: list[LineRecord]) -> bytes:
    return _encoder.encode(_Stored(VERSION, lines))


def decode(data: bytes) -> dict[int, LineRecord]:
    """The records by line number."""
    version, _ = _versioned.decode(data)
    if version != VERSION:
        raise UnknownVersion(f"line records of version {version}; this server reads version {VERSION}")
    return {line.line_no: line for line in _v1.decode(data).lines}


def build(sold: list[tuple[int, Decimal, int]], pairs, redeemed_by_line, lot_of_rule: dict[str, int | None]
          ) -> list[LineRecord]:
    """sold: (line_no, qty, amount) in the receipt's order; pairs: (rule, line_no, points) in
    the order the rules fired; redeemed_by_line: (line_no, points, discount)."""
    accrued: dict[int, list[Accrual]] = {line_no: [] for line_no, _, _ in sold}
    for rule, line_no, points in pairs:
        accrued[line_no].append(Accrual(rule, points, lot_of_rule.get(rule)))
    redeemed = {line_no: (points, discount) for line_no, points, discount in redeemed_by_line}
    return [LineRecord(line_no, qty, amount, tuple(accrued[line_no]), *redeemed.get(line_no, (0, 0)))
            for line_no, qty, amount in sold]


# ---------------------------------------------------------------- rows written before m018

def from_stored(body: bytes, result: bytes, detail: bytes | None, lot_of_rule: dict[str, int]) -> list[LineRecord]:
    """The records of a receipt stored before line records, from what was stored then: the
    body (JSON), the answer (JSON) and receipts.detail, which held NULL when at most one rule
    earned (the answer's by_line then gives every pair), the (rule, line_no, points) pairs
    when several did, or, for rows written before m013, the whole per-line detail as a JSON
    object. lot_of_rule: the lot of each rule's accrual posting on the receipt."""
    if detail is not None and detail[:1] == b"{":
        return _from_old_detail(msgspec.json.decode(detail), lot_of_rule)
    answer = msgspec.json.decode(result)
    sold = [(line["line_no"], Decimal(str(line["qty"])), line["amount"]) for line in msgspec.json.decode(body)["lines"]]
    pairs = msgspec.json.decode(detail) if detail is not None else _answer_pairs(answer)
    redeemed = [(item["line_no"], item["points"], item["discount"]) for item in answer["redeemed"]["by_line"]]
    return build(sold, pairs, redeemed, lot_of_rule)


def _answer_pairs(answer: dict) -> list[tuple[str, int, int]]:
    # Stored without its pairs only when at most one rule earned on the receipt.
    earned = [item["rule"] for item in answer["accrued"]["by_rule"] if item["points"]]
    if not earned:
        return []
    return [(earned[0], item["line_no"], item["points"]) for item in answer["accrued"]["by_line"] if item["points"]]


def _from_old_detail(detail: dict, lot_of_rule: dict[str, int]) -> list[LineRecord]:
    return [LineRecord(int(line_no), Decimal(str(line["qty"])), line["amount"],
                       tuple(Accrual(rule, points, lot_of_rule.get(rule)) for rule, points in line["pairs"].items()),
                       line["redeemed"], line["discount"])
            for line_no, line in detail["lines"].items()]
