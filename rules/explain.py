"""Why each rule did or did not give points on one receipt.

The points themselves come from Program.evaluate, so an explanation never computes
a different result than the server would. What this module adds is the reason for
every rule that gave nothing: which `when` entry failed and with which value, the
period, an empty scope, a lost group, a used-up limit or budget.

`when` blocks are read again entry by entry from the text the manager wrote, each
entry compiled with the same compiler the loader uses and judged with the plain
reading of conditions (conditions.holds), which the engine is tested against.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import msgspec

from .conditions import (
    INT_FIELDS,
    TEXT_FIELDS,
    UNKNOWN_DAYS,
    WEEKDAYS,
    WhenCompiler,
    holds,
)
from .evaluate import _fact, birthday_distance
from .records import Evaluation, MemberFacts
from .segments import holdout_member
from .yamlmarks import YamlInt

UNLIMITED = 10**15  # "as many points as asked for": the balance is not the question here

APPLIED = "applied"  # chosen and gave points (possibly 0 after the receipt's rounding)
NOT_APPLICABLE = "not applicable"  # a condition, the period, the scope, a limit or budget says no
OUTRANKED = "outranked"  # applicable, but another rule of its group won
NO_POINTS = "no points"  # chosen, but its exact points are 0 (e.g. everything paid with points)


class RuleExplanation(msgspec.Struct):
    id: str
    group: str | None
    priority: int
    status: str
    reasons: list[str] = []  # why it did not apply or gave nothing
    notes: list[str] = []  # what was not or could not be checked
    points: int = 0
    by_line: list[tuple[int, int]] = []  # (line_no, points), points != 0


class Explanation(msgspec.Struct):
    program: str
    version: str
    local_date: date
    weekday: str
    local_time: str
    member: MemberFacts | None
    rules: list[RuleExplanation]
    evaluation: Evaluation
    rounding: str


def explain(program: Any, receipt: Any, member: MemberFacts | None, redeem_requested: int = 0,
            redeem_available: int | None = None, usage: dict[str, int] | None = None,
            budget_left: dict[str, int] | None = None) -> Explanation:  # fmt: skip
    """Explain one receipt. usage/budget_left None: limits/budgets are not checked (noted)."""
    available = UNLIMITED if redeem_available is None else redeem_available
    evaluation = program.evaluate(receipt, member, redeem_requested, available, usage or {}, budget_left)
    local = receipt.ts.astimezone(program.timezone)
    day = local.date()
    result = Explanation(
        program=program.id,
        version=program.version,
        local_date=day,
        weekday=WEEKDAYS[local.weekday()],
        local_time=local.strftime("%H:%M"),
        member=member,
        rules=[],
        evaluation=evaluation,
        rounding=program.rounding,
    )
    if member is None:
        result.rules = [
            RuleExplanation(rule.id, rule.group, rule.priority, NOT_APPLICABLE, ["no member: an anonymous receipt earns nothing"])
            for rule in program.rules
        ]
        return result
    fact = _full_fact(program, receipt, member, local, day)
    reader = _WhenReader(program, fact, member, receipt)
    paid = _paid_amounts(program, receipt, evaluation)
    scopes = _scopes(program, receipt)
    explained: list[RuleExplanation] = []
    candidates = []
    for rule in program.rules:
        item = RuleExplanation(rule.id, rule.group, rule.priority, NOT_APPLICABLE)
        if rule.when is not None:
            ok, texts = reader.block(rule.when, "when")
            if not ok:
                item.reasons += texts
        if rule.period is not None:
            start, end = rule.period
            if day < start:
                item.reasons.append(f"period: {day} is before {start}")
            elif day > end:
                item.reasons.append(f"period: {day} is after {end}")
        if not scopes.get(rule.index):
            item.reasons.append("scope selects no line" + _scope_hint(program, rule, receipt))
        if rule.limit_count is not None:
            if usage is None:
                item.notes.append("limit: not checked")
            elif usage.get(rule.id, 0) >= rule.limit_count:
                per = rule.limit_per
                item.reasons.append(f"limit reached: fired {usage.get(rule.id, 0)} of {rule.limit_count} time(s) this {per}")
        if rule.budget:
            if budget_left is None:
                item.notes.append("budget: not checked")
            elif budget_left.get(rule.id, rule.budget) <= 0:
                item.reasons.append(f"budget used up ({rule.budget} points)")
        if rule.personal:
            item.reasons += _offer_reasons(rule, member)
        held_out = rule.holdout is not None and holdout_member(program.id, rule.id, member.member_id, rule.holdout)
        if held_out and not item.reasons:
            item.reasons.append(_held_out_reason(rule, evaluation))
        if not item.reasons:
            candidates.append(rule)
        explained.append(item)
    winners: dict[str, Any] = {}
    for rule in candidates:
        if rule.group is not None:
            current = winners.get(rule.group)
            if current is None or rule.priority > current.priority:
                winners[rule.group] = rule
    fired = dict(evaluation.by_rule)
    for rule, item in zip(program.rules, explained):
        if item.reasons:
            continue
        winner = winners.get(rule.group) if rule.group is not None else rule
        if winner is not rule:
            item.status = OUTRANKED
            item.reasons.append(f"group {rule.group}: {winner.id} (priority {winner.priority}) won")
        elif rule.id in fired:
            item.status = APPLIED
            item.points = fired[rule.id]
            item.by_line = [(line_no, points) for rule_id, line_no, points in evaluation.pairs if rule_id == rule.id]
            if budget_left is not None and rule.budget and item.points >= budget_left.get(rule.id, rule.budget):
                item.notes.append(f"budget: cut to the {budget_left.get(rule.id, rule.budget)} points left")
            offer = member.offers.get(rule.id) if rule.personal else None
            if offer is not None and item.points >= offer:
                item.notes.append(f"offer: cut to the {offer} points left")
            item.notes += [f"coupon {campaign}: code {evaluation.coupons_used[campaign]} used"
                           for campaign in rule.coupons if campaign in evaluation.coupons_used]
        else:
            item.status = NO_POINTS
            item.reasons.append(_why_nothing(rule, scopes[rule.index], paid, winners))
    held = program.matcher.match(dict(fact)) if program.matcher.fields else frozenset()
    for rule, item in zip(program.rules, explained):
        by_engine = rule.condition is None or rule.condition in held
        by_reading = not any(reason.startswith(("when", "period")) for reason in item.reasons)
        if by_engine != by_reading:  # never expected; says so rather than mislead
            item.notes.append(f"the rule engine finds the conditions {'hold' if by_engine else 'fail'}")
    result.rules = explained
    return result


def _offer_reasons(rule: Any, member: MemberFacts) -> list[str]:
    if rule.id not in member.offers:
        return ["personal: the member holds no offer of this rule"]
    left = member.offers[rule.id]
    if left is not None and left <= 0:
        return ["personal: the member's offer has no points left"]
    return []


def _held_out_reason(rule: Any, evaluation: Evaluation) -> str:
    would = dict(evaluation.held_out).get(rule.id)
    gives = f"would have given {would} point(s)" if would is not None else "would not have applied anyway"
    return f"holdout: the member is in the control group ({rule.holdout} of members); {gives}"


def _full_fact(program: Any, receipt: Any, member: MemberFacts, local, day: date) -> dict[str, Any]:
    fact = _fact(program, receipt, member, local, day)
    fact["birthday_days"] = birthday_distance(day, member.birthday)
    enrolled = member.enrolled_on
    fact["enrolled_days"] = max((day - enrolled).days, 0) if enrolled else UNKNOWN_DAYS
    return fact


def _scopes(program: Any, receipt: Any) -> dict[int, list[int]]:
    """rule index -> positions of the earning lines its scope selects."""
    scopes: dict[int, list[int]] = {}
    for position, line in enumerate(receipt.lines):
        may_earn, _, selected = program.line_class(line)
        if may_earn:
            for index in selected:
                scopes.setdefault(index, []).append(position)
    return scopes


def _scope_hint(program: Any, rule: Any, receipt: Any) -> str:
    """Names the lines the rule's scope would take but the program's exclusions remove."""
    excluded = [
        line.line_no
        for line in receipt.lines
        if program.exclusions.hits(line.category, line.sku, line.brand, tuple(line.flags))
        and rule.scope.selects(line.category, line.sku, line.brand, tuple(line.flags))
    ]
    if excluded:
        return f" (program exclusions remove line{'s' if len(excluded) > 1 else ''} {', '.join(map(str, excluded))})"
    return ""


def _paid_amounts(program: Any, receipt: Any, evaluation: Evaluation) -> list[int]:
    discount = {line_no: money for line_no, _, money in evaluation.redeemed_by_line}
    return [max(line.amount, 0) - discount.get(line.line_no, 0) for line in receipt.lines]


def _why_nothing(rule: Any, scope: list[int], paid: list[int], winners: dict[str, Any]) -> str:
    in_scope = sum(paid[position] for position in scope)
    if rule.kind == "multiply":
        winner = winners.get(rule.multiply)
        if winner is None:
            return f"multiply: no rule of group {rule.multiply} applies"
        return f"multiply: {winner.id} (group {rule.multiply}) gave nothing to the lines in scope"
    if rule.kind in ("percent", "points", "per_amount") and in_scope == 0:
        return "the lines in scope were paid wholly with points"
    if rule.kind == "per_amount":
        return f"per_amount: {in_scope} paid in scope is less than every {rule.every}"
    return "its reward comes to 0 points"


class _WhenReader:
    """Reads a `when` block as written and says, entry by entry, whether it holds and why."""

    def __init__(self, program: Any, fact: dict[str, Any], member: MemberFacts, receipt: Any):
        self.fact = fact
        self.member = member
        store = program.stores.get(receipt.store_id)
        self.store_tags = sorted(store.tags) if store else []
        self.compiler = WhenCompiler([], [], {})
        self.compiler.member_tags = dict(program.member_tag_fields)
        self.compiler.store_tags = dict(program.store_tag_fields)
        self.compiler.segments = dict(program.segment_fields)
        self.compiler.coupons = dict(program.coupon_fields)

    def block(self, block: dict, path: str) -> tuple[bool, list[str]]:
        """(holds, reasons): the failing entries when it fails, every entry when it holds."""
        results = [self.entry(key, value, f"{path}.{key}") for key, value in block.items()]
        ok = all(result for result, _ in results)
        return ok, [text for result, text in results if ok or not result]

    def entry(self, key: str, value: Any, path: str) -> tuple[bool, str]:
        if key == "not":
            inner, texts = self.block(value, path)
            if inner:
                return False, f"{path}: the negated block holds ({'; '.join(texts)})"
            return True, f"{path}: the negated block does not hold"
        if key == "any":
            failures = []
            for index, alternative in enumerate(value):
                ok, texts = self.block(alternative, f"{path}[{index}]")
                if ok:
                    return True, f"{path}[{index}] holds ({'; '.join(texts)})"
                failures.extend(texts)
            return False, f"{path}: no alternative holds ({'; '.join(failures)})"
        node = self.compiler.entry(key, value, (), 0)
        ok = node is not None and holds(node, self.fact)
        return ok, self.describe(key, value, path, ok)

    # Wording ---------------------------------------------------------------

    def describe(self, key: str, value: Any, path: str, ok: bool) -> str:
        if key in TEXT_FIELDS:
            return f"{path}: {self.fact[key] or 'none'} {_verdict(self.fact[key], value, ok)}"
        if key in INT_FIELDS:
            return f"{path}: {self.fact[key]} {_verdict(self.fact[key], value, ok)}"
        if key == "weekdays":
            return f"{path}: {self.fact['weekday']} {_verdict(self.fact['weekday'], value, ok)}"
        if key == "hours":
            minute = self.fact["minute"]
            within = "is within" if ok else "is not within"
            return f"{path}: {minute // 60:02d}:{minute % 60:02d} {within} {_text(value)}"
        if key == "tags":
            have = sorted(self.member.tags)
            return f"{path}: member tags {_listed(have)} {'include' if ok else 'include none of'} {_text(value)}"
        if key == "store_tags":
            return f"{path}: store tags {_listed(self.store_tags)} {'include' if ok else 'include none of'} {_text(value)}"
        if key == "segment":
            have = sorted(self.member.segments)
            return f"{path}: member segments {_listed(have)} {'include' if ok else 'include none of'} {_text(value)}"
        if key == "coupon":
            have = sorted(self.member.coupons)
            return f"{path}: usable coupons of {_listed(have)} {'include' if ok else 'include none of'} {_text(value)}"
        if key == "birthday_within_days":
            days = self.fact["birthday_days"]
            if days >= UNKNOWN_DAYS:
                return f"{path}: birthday unknown"
            return f"{path}: birthday is {days} day(s) away, {'within' if ok else 'not within'} {value}"
        if key == "enrolled_within_days":
            days = self.fact["enrolled_days"]
            if days >= UNKNOWN_DAYS:
                return f"{path}: enrolment date unknown"
            return f"{path}: enrolled {days} day(s) ago, {'within' if ok else 'not within'} {value}"
        return f"{path}: {'holds' if ok else 'does not hold'}"


_SYMBOLS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _verdict(actual: Any, value: Any, ok: bool) -> str:
    """'is not >= 100000', 'is one of [S001, S002]', 'is not between 1 and 5'..."""
    if isinstance(value, dict):
        phrases = []
        for op, operand in value.items():
            passed = _op_holds(actual, op, operand)
            if ok or not passed:  # when failing, name only the operators that fail
                phrases.append(_op_phrase(op, operand, passed))
        return " and ".join(phrases)
    if isinstance(value, list):
        return f"{'is' if ok else 'is not'} one of {_text(value)}"
    return f"{'is' if ok else 'is not'} {_text(value)}"


def _op_phrase(op: str, operand: Any, passed: bool) -> str:
    verb = "is" if passed else "is not"
    if op == "between":
        return f"{verb} between {_text(operand[0])} and {_text(operand[1])}"
    if op == "ne":
        return f"{'is not' if passed else 'is'} {'one of ' if isinstance(operand, list) else ''}{_text(operand)} (ne)"
    return f"{verb} {_SYMBOLS.get(op, op)} {_text(operand)}"


def _op_holds(actual: Any, op: str, operand: Any) -> bool:
    if op == "ne":
        values = operand if isinstance(operand, list) else [operand]
        if isinstance(actual, str):  # names keep their written text: register {ne: 0042}
            return all(actual != _text(item) for item in values)
        return all(actual != _plain(item) for item in values)
    if op == "between":
        return _plain(operand[0]) <= actual <= _plain(operand[1])
    right = _plain(operand)
    return {"gt": actual > right, "gte": actual >= right, "lt": actual < right, "lte": actual <= right}.get(op, False)


def _plain(value: Any) -> Any:
    if isinstance(value, YamlInt):
        return int(value)
    return value


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, YamlInt):
        return value.text
    return str(value)


def _listed(values: list[str]) -> str:
    return "[" + ", ".join(values) + "]" if values else "[]"


def format_explanation(explanation: Explanation, currency: str = "") -> str:
    """The explanation as text for a terminal."""
    ev = explanation.evaluation
    out = [
        f"program {explanation.program} ({explanation.version[:19]}…), receipt on {explanation.local_date} "
        f"({explanation.weekday} {explanation.local_time} local)"
    ]
    member = explanation.member
    if member is None:
        out.append("member: none (anonymous receipts earn nothing)")
    else:
        out.append(
            f"member {member.member_id}: tier {member.tier}, tags {_listed(sorted(member.tags))}, "
            f"birthday {member.birthday or 'unknown'}, enrolled {member.enrolled_on or 'unknown'}, "
            f"receipt #{member.receipt_number}"
        )
        if member.segments or member.offers or member.coupons:
            offers = [f"{rule} ({'no budget' if left is None else f'{left} left'})"
                      for rule, left in member.offers.items()]
            out.append(f"  segments {_listed(sorted(member.segments))}, offers {_listed(offers)}, "
                       f"coupons {_listed([f'{c}: {code}' for c, code in member.coupons.items()])}")
    if ev.redeemed_points:
        money = f"{ev.discount // 100}.{ev.discount % 100:02d}"  # minor units, two decimals
        out.append(f"redeemed: {ev.redeemed_points} points, discount {money} {currency}".rstrip())
    elif ev.redeem_refusal:
        out.append(f"redemption refused: {ev.redeem_refusal}")
    width = max([len(rule.id) for rule in explanation.rules] + [4])
    out.append("rules:")
    for rule in explanation.rules:
        group = f" [group {rule.group}, priority {rule.priority}]" if rule.group else ""
        if rule.status == APPLIED:
            lines = ", ".join(f"line {line_no}: {points}" for line_no, points in rule.by_line)
            head = f"applied: {rule.points} point(s)" + (f" ({lines})" if lines else "")
        else:
            head = f"{rule.status}: " + "; ".join(rule.reasons)
        notes = f"  ({'; '.join(rule.notes)})" if rule.notes else ""
        out.append(f"  {rule.id:<{width}}  {head}{group}{notes}")
    if ev.by_line:
        out.append("points by line: " + ", ".join(f"{line_no}: {points}" for line_no, points in ev.by_line))
    out.append(f"total: {ev.accrued_points} point(s), rounded once ({explanation.rounding})")
    if ev.held_out:
        held = ", ".join(f"{rule} would have given {points}" for rule, points in ev.held_out)
        out.append(f"held out (control group): {held}")
    if ev.lots:
        for available_from, expires_on, points in ev.lots:
            out.append(f"  {points} available from {available_from}, expire {expires_on or 'never'}")
    return "\n".join(out)
