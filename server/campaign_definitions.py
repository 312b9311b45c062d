"""Which definition of a rule the campaign effect report measures.

A campaign is mostly measured once it has ended, often after its rule was taken out of the
program. Every program that went live is stored (storage/program_versions.py), so the
report reads the rule from the stored versions as well as from the live program: the
definition in force during the report's period (docs/managers.md, "After a campaign").

Over the loads of the stored versions, oldest first, each load is in force from its
`loaded_at` until the next one. What the report's numbers depend on is the rule's
definition: its holdout share, the program id the assignment is salted with, its member
and receipt conditions (`when`, `personal`) and its scope. Consecutive loads that define
the rule alike are one span; a load without the rule is a span without a definition. For a
period (local dates):
- the definitions of the spans in force during it must all be the same one, or it is
  refused (422 `rule_redefined`): groups drawn by two definitions compare nothing;
- when no span with the rule is in force during it, the last one in force before it (the
  weeks after a campaign ended), else the first one after it;
- the version the definition is read from is the latest load of that span.
A changed reward or period does not make another campaign: the period is only the
report's default (the latest definition's, as the manager sees it now).

The rules of a stored version are read by loading its files once per process (a version
is named by the hash of its files, so what is read of it never changes); a version this
server cannot load any more is taken as one without the rule.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

import msgspec

from rules import ProgramError
from rules.loader import load_files
from rules.problems import suggest
from server.report_campaign import CampaignRule, Setting, period_of, setting_of
from storage import program_versions as store
from storage.ledger import iso

log = logging.getLogger("loyalty.reports")

# Versions whose rules were read, newest use last: a dictionary of the rule ids, each naming
# a definition shared with the versions that define the rule alike.
VERSIONS_REMEMBERED = 4096
INTERNED_MAX = 65536


@dataclass(frozen=True)
class Definition:
    """One rule as one stored version defines it, in what the report needs."""
    key: bytes                       # equal keys: the same campaign (see the module's words)
    holdout: bool
    period: tuple[date, date] | None


@dataclass
class Span:
    """Consecutive loads defining the rule alike (definition None: without the rule)."""
    definition: Definition | None
    start: str                       # the first load's loaded_at (UTC, as stored)
    end: str | None                  # the next span's start; None: in force now
    versions: list[str] = field(default_factory=list)

    def during(self, start: str, end: str) -> bool:
        return self.start < end and (self.end is None or self.end > start)

    def days(self, tz) -> str:
        """"from 2026-11-01 to 2026-12-05" (local dates; "since" for the one in force)."""
        first = _local_day(self.start, tz)
        return f"since {first}" if self.end is None else f"from {first} to {_local_day(self.end, tz)}"


@dataclass(frozen=True)
class Live:
    """The program the caller serves (or the folder's, for a command) and its rules as the
    report sees them (cvm.Definitions.rules)."""
    program: object
    rules: dict[str, CampaignRule]


@dataclass
class Chosen:
    """The definition a report uses and what it says about where it came from."""
    rule: CampaignRule
    setting: Setting
    first: date
    last: date
    version: str | None              # None: no program version is stored; the live program's
    live: bool
    warnings: list[str]

    def described(self, result: dict) -> dict:
        return {**result, "rules_version": self.version, "live": self.live, "warnings": self.warnings}


class _Remembered:
    """version -> {rule id: Definition} | None (does not load), for every thread of the process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_version: OrderedDict[str, dict[str, Definition] | None] = OrderedDict()
        # Most versions change a rule or two: the others' definitions are kept once, not once a version.
        self._interned: dict[Definition, Definition] = {}

    def get(self, conn, version: str) -> dict[str, Definition] | None:
        with self._lock:
            if version in self._by_version:
                self._by_version.move_to_end(version)
                return self._by_version[version]
        program = _compiled(conn, version)
        found = None if program is None else {r.id: definition_of(program, r) for r in program.rules}
        if program is not None:
            program.close()
        with self._lock:
            if found is not None:
                found = {rule_id: self._interned.setdefault(d, d) for rule_id, d in found.items()}
            self._by_version[version] = found
            while len(self._by_version) > VERSIONS_REMEMBERED:
                self._by_version.popitem(last=False)
            if len(self._interned) > INTERNED_MAX:
                self._interned.clear()      # only sharing is lost: each version keeps its own
        return found


REMEMBERED = _Remembered()


def definition_of(program, rule) -> Definition:
    holdout = None if rule.holdout is None else str(rule.holdout.normalize())
    key = msgspec.json.encode([program.id, holdout, rule.summary.get("when"), bool(rule.personal),
                               rule.summary.get("scope")])
    return Definition(key, holdout is not None, tuple(rule.period) if rule.period else None)


def _compiled(conn, version: str):
    files = store.files(conn, version)
    if files is None:
        return None
    try:
        return load_files(files)
    except ProgramError as e:
        log.warning("program version %s does not load here, so the campaign report leaves it out: %s", version,
                    "; ".join(str(p) for p in e.problems[:3]))
        return None


# ------------------------------------------------------------------ choosing (pure)

def spans_of(rule_id: str, loads: list[tuple[str, str]], rules_of) -> list[Span]:
    """loads: (version, loaded_at), oldest first; rules_of(version) -> {rule id: Definition} | None."""
    spans: list[Span] = []
    for version, at in loads:
        definition = (rules_of(version) or {}).get(rule_id)
        if spans and _same(spans[-1].definition, definition):
            spans[-1].versions.append(version)
            continue
        if spans:
            spans[-1].end = at
        spans.append(Span(definition, at, None, [version]))
    return spans


def _same(a: Definition | None, b: Definition | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.key == b.key)


class Redefined(Exception):
    def __init__(self, spans: list[Span]):
        super().__init__("redefined")
        self.spans = spans


def choose(spans: list[Span], start: str, end: str) -> Span:
    """The span whose definition measures [start, end) (UTC, as stored); Redefined when
    spans of different definitions were in force during it. spans: at least one with a definition."""
    defined = [s for s in spans if s.definition is not None]
    during = [s for s in defined if s.during(start, end)]
    if during:
        different = [s for i, s in enumerate(during) if i == 0 or not _same(during[i - 1].definition, s.definition)]
        if any(not _same(different[0].definition, s.definition) for s in different):
            raise Redefined(different)
        return during[-1]
    before = [s for s in defined if s.end is not None and s.end <= start]
    return before[-1] if before else defined[0]


# ------------------------------------------------------------------ reading and deciding

def choose_definition(conn, live: Live, rule_id: str, first_raw: str | None, last_raw: str | None) -> Chosen:
    """The definition of `rule_id` the report for ?from=&to= uses, with the period; an
    ApiError as the report answers it otherwise (404 unknown_rule, 422 rule_without_holdout,
    rule_redefined, or a field of the period)."""
    from server.errors import not_found, unprocessable
    loads = store.load_history(conn)
    tz = live.program.timezone
    spans = spans_of(rule_id, loads, lambda version: REMEMBERED.get(conn, version))
    defined = [s for s in spans if s.definition is not None]
    newest = loads[-1][0] if loads else None
    if not defined:
        rule = live.rules.get(rule_id)
        if rule is None:
            known = set(live.rules)
            for version in dict.fromkeys(v for v, _ in loads):
                known.update(REMEMBERED.get(conn, version) or {})
            raise not_found("unknown_rule", f"the program has no rule {rule_id}, and no stored version of it had "
                                            f"one{suggest(rule_id, known)}")
        # The live program's own rule, with no stored version to tell its history (not recorded).
        _refuse_without_holdout(rule_id, rule.holdout is not None)
        first, last = period_of(rule, first_raw, last_raw)
        return Chosen(rule, setting_of(live.program), first, last, _version(live.program), True, [])
    latest = defined[-1]
    # The live program's rules as the caller sees them (tests give their own) stand for its version's.
    own = live.rules.get(rule_id) if latest.versions[-1] == _version(live.program) else None
    _refuse_without_holdout(rule_id, any(s.definition.holdout for s in defined[:-1]) or
                            (latest.definition.holdout if own is None else own.holdout is not None))
    defaults = own or CampaignRule(rule_id, None, *(latest.definition.period or (None, None)))
    first, last = period_of(defaults, first_raw, last_raw)
    start = iso(datetime.combine(first, time.min, tz))
    end = iso(datetime.combine(last + timedelta(days=1), time.min, tz))
    try:
        span = choose(spans, start, end)
    except Redefined as e:
        raise _redefined(rule_id, e.spans, tz) from None
    version = span.versions[-1]
    now_live = spans[-1].definition is not None and _same(spans[-1].definition, span.definition)
    if version == _version(live.program) and rule_id in live.rules:
        rule, setting = live.rules[rule_id], setting_of(live.program)
    else:
        rule, setting = _stored_rule(conn, version, rule_id)
    if rule.holdout is None:
        raise unprocessable("rule_without_holdout", f"rule {rule_id} as program version {version} defines it "
                            f"({span.days(tz)}) has no holdout: it has no control group to compare with",
                            [{"path": "rule", "message": "has no holdout"}])
    return Chosen(rule, setting, first, last, version if loads else _version(live.program), now_live,
                  _notes(rule_id, spans, span, now_live, start, end, tz, newest))


def _refuse_without_holdout(rule_id: str, any_holdout: bool) -> None:
    from server.errors import unprocessable
    if not any_holdout:
        raise unprocessable("rule_without_holdout", f"rule {rule_id} has no holdout: it has no control group "
                            "to compare with", [{"path": "rule", "message": "has no holdout"}])


def _redefined(rule_id: str, spans: list[Span], tz):
    from server.errors import unprocessable
    named = "; ".join(f"as program version {s.versions[-1]} defines it {s.days(tz)}" for s in spans)
    since = _local_day(spans[1].start, tz)
    # The day a definition came in had both in force: a period may end the day before or start the day after.
    return unprocessable(
        "rule_redefined",
        f"rule {rule_id} was defined differently during the period ({named}): the control group of one period "
        f"must be drawn by one definition, so ask for a period that ends before {since} or starts after it",
        [{"path": "to", "message": f"must be before {since}, the day rule {rule_id} was defined anew, "
                                   f"unless from is after it"}])


def _stored_rule(conn, version: str, rule_id: str) -> tuple[CampaignRule, Setting]:
    from server.cvm import campaign_rule
    program = _compiled(conn, version)
    try:
        return campaign_rule(program, next(r for r in program.rules if r.id == rule_id)), setting_of(program)
    finally:
        # The audience and the scope keep the conditions they read; only the engine's rulesets,
        # which they never use, are freed.
        program.close()


def _notes(rule_id: str, spans: list[Span], span: Span, now_live: bool, start: str, end: str, tz,
           newest: str | None) -> list[str]:
    if now_live:
        return []
    where = f"program version {span.versions[-1]}, which had it in force {span.days(tz)}"
    if spans[-1].definition is None:
        said = f"rule {rule_id} is no longer in the live program ({newest}): the report uses its definition in {where}"
    else:
        said = (f"the live program ({newest}) defines rule {rule_id} differently: the report uses its definition "
                f"in force during the period, in {where}")
    if not span.during(start, end):
        said += "; no version had it in force during the period"
    return [said]


def _version(program) -> str | None:
    return getattr(program, "version", None)


def _local_day(at: str, tz) -> date:
    return datetime.fromisoformat(at).astimezone(tz).date()


def report(conn, live: Live, rule_id: str, first_raw: str | None, last_raw: str | None,
           weeks: bool = False) -> tuple[dict, Chosen, list | None]:
    """The campaign effect (report_campaign.report) with where its definition came from, in
    one snapshot; with the weekly series when `weeks`."""
    from server import report_campaign
    chosen = choose_definition(conn, live, rule_id, first_raw, last_raw)
    result = report_campaign.report(conn, chosen.setting, chosen.rule, chosen.first, chosen.last)
    series = report_campaign.weekly(conn, chosen.setting, chosen.rule, chosen.first, chosen.last) if weeks else None
    return chosen.described(result), chosen, series
