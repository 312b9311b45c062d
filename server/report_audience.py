"""The campaign report's audience: who met a rule's member conditions on a past day.

The rule's `when` is read with its member conditions known (`tier`, `tags`, `segment`) and
every other condition (the receipt's store, total, hours, the period, ...) as one that may
hold: a member is in the audience unless the rule could not apply to them on any receipt
that day. A `personal` rule also needs an offer of it valid that day. The facts are the
day's first moment: the tier the member held then (server/member_state.py), the segments
they were in then (their spans, storage/segments.py), the tags as stored now (tags keep no
history), the offers whose dates hold that day.
"""
from __future__ import annotations

import sqlite3
from datetime import date, datetime, time
from typing import Callable

import msgspec

from rules.conditions import Node, constants, may_hold
from server.member_state import tiers_at
from storage import offers, segments

Test = Callable[[int], bool]


def audience_of(program, rule) -> Callable[[sqlite3.Connection, date], Test] | None:
    """For a rule of the program: (conn, day) -> whether a member id is in the audience on
    that day; None when the rule has no member conditions (every member enrolled counts)."""
    node = program.matcher.conditions[rule.condition] if rule.condition is not None else None
    fields = member_fields(program, node) if node is not None else set()
    if not fields and not rule.personal:
        return None

    def on(conn: sqlite3.Connection, day: date) -> Test:
        facts = facts_on(conn, program, fields, datetime.combine(day, time.min, program.timezone))
        offered = offers.members_offered(conn, rule.id, day) if rule.personal else None

        def test(member_id: int) -> bool:
            if offered is not None and member_id not in offered:
                return False
            return not fields or may_hold(node, facts(member_id)) is not False
        return test
    return on


def member_fields(program, node: Node) -> set[str]:
    """The fact fields of node that are member conditions."""
    compared: dict[str, set] = {}
    constants(node, compared)
    known = {"tier", *program.member_tag_fields.values(), *program.segment_fields.values()}
    return set(compared) & known


def facts_on(conn: sqlite3.Connection, program, fields: set[str], moment: datetime) -> Callable[[int], dict]:
    """member id -> the member-condition fields among `fields`, at `moment`."""
    members = segments.member_records(conn)
    tiers = tiers_at(conn, program, members, moment, as_of=moment) if "tier" in fields else {}
    tags = {f: t for t, f in program.member_tag_fields.items() if f in fields}
    tagged = {m.member_id: frozenset(msgspec.json.decode(m.tags)) for m in members} if tags else {}
    inside = {field: _segment_members(conn, program, sid, moment)
              for sid, field in program.segment_fields.items() if field in fields}

    def fact(member_id: int) -> dict:
        out: dict = {field: member_id in members_of for field, members_of in inside.items()}
        held = tagged.get(member_id, frozenset())
        out.update({field: tag in held for field, tag in tags.items()})
        if tiers:
            out["tier"] = tiers.get(member_id, program.tiers[0][0])
        return out
    return fact


def _segment_members(conn: sqlite3.Connection, program, segment_id: str, moment: datetime) -> set[int]:
    segment = program.segments.get(segment_id)
    if segment is None:             # named by a rule, never defined: nobody is in it
        return set()
    return segments.members_at(conn, segment_id, segment.kind == "list", moment)
