"""One receipt computed exactly (rules.md, "Computing one receipt").

Per-rule, per-line points are kept as integer numerators over a per-rule
denominator, brought to one common denominator only to round the receipt total
once and attribute the integer back to (rule, line) pairs.

A rule's points may be capped ("caps": what its campaign budget, or the member's
personal offer of it, may still give): the receipt that reaches a cap gets what is
left, and a rule with nothing left does not apply. A member in a rule's control
group is evaluated as if the rule were not applicable; what it would have given
comes from the same computation with the rule treated.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from itertools import chain
from math import lcm
from typing import Any

from .arith import largest_remainder, round_fraction
from .conditions import UNKNOWN_DAYS, WEEKDAYS, holds
from .records import Evaluation, MemberFacts
from .segments import holdout_member

# rule index -> (denominator, line positions, numerators over the denominator)
Exact = dict[int, tuple[int, list[int], list[int]]]


def evaluate(program: Any, receipt: Any, member: MemberFacts | None, redeem_requested: int,
             redeem_available: int, usage: dict[str, int], budget_left: dict[str, int] | None) -> Evaluation:  # fmt: skip
    if receipt.ts.tzinfo is None:
        raise ValueError("receipt ts needs a UTC offset: rules are read in the program's timezone")
    local = receipt.ts.astimezone(program.timezone)
    day = local.date()
    expires_on = day + timedelta(days=program.expiry_days) if program.expiry_days else None
    result = Evaluation(day, day + timedelta(days=program.activation_delay_days), expires_on)
    lines = receipt.lines
    classes, line_nos, paid = _read_lines(program, lines)
    earning = [position for position, found in enumerate(classes) if found[0]]
    if member is None:  # anonymous receipts are kept for statistics only
        result.by_line = [(line_nos[position], 0) for position in earning]
        return result
    for position, amount in _redeem(program, classes, line_nos, paid, redeem_requested, redeem_available, result):
        paid[position] -= amount
    fact = _fact(program, receipt, member, local, day) if program.matcher.fields else {}
    held = program.matcher.match(fact) if fact else ()
    caps = _caps(program, member, budget_left)
    passing = _passing(program, held, member, usage, caps)
    control = _control(program, passing, member)
    treated = [rule for rule in passing if rule.index not in control] if control else passing
    exact = _exact_points(_choose(classes, earning, treated), lines, paid)
    _attribute(program, exact, line_nos, earning, caps, result)
    if control:
        result.held_out = _would_have(program, classes, line_nos, earning, passing, control, lines, paid, caps, result)
    if member.coupons and program.coupon_fields and exact:
        result.coupons_used = _coupons_used(program, exact, fact, member.coupons)
    return result


def _read_lines(program: Any, lines: list) -> tuple[list[tuple[bool, bool, frozenset[int]]], list[int], list[int]]:
    """Each line's class (see Program.line_class), its line_no and its amount (never negative)."""
    key_of, known, classify = program.line_key, program.line_classes.get, program.line_class
    classes = [known(key_of(line)) or classify(line) for line in lines]
    amounts = [line.amount for line in lines]
    if amounts and min(amounts) < 0:
        amounts = [max(amount, 0) for amount in amounts]
    return classes, [line.line_no for line in lines], amounts


def _redeem(program: Any, classes: list, line_nos: list[int], amounts: list[int], requested: int,
            available: int, result: Evaluation) -> list[tuple[int, int]]:  # fmt: skip
    """Apply points as a discount; (line position, discount) for each discounted line."""
    requested, available = max(int(requested), 0), max(int(available), 0)
    if not requested:
        return []
    payable = [position for position, found in enumerate(classes) if found[1]]
    weights = [amounts[position] for position in payable]
    share_num, share_den = program.max_share_ratio
    cap = share_num * sum(weights) // (share_den * program.point_value)
    applied = min(requested, available, cap)
    needed = max(program.redemption_min_points, 1)
    if applied < needed:
        # The request or the receipt is too small, or else the balance is what is short.
        result.redeem_refusal = "below_min_redemption" if min(requested, cap) < needed else "insufficient_points"
        if requested >= needed > cap:
            result.redeem_most = cap
        return []
    discount = applied * program.point_value
    payable_nos = [line_nos[position] for position in payable]
    points = split_by_line(applied, weights, payable_nos)
    money = split_by_line(discount, weights, payable_nos)
    result.redeemed_points, result.discount = applied, discount
    result.redeemed_by_line = [
        (line_nos[position], share, amount)
        for position, share, amount in zip(payable, points, money)
        if share or amount
    ]
    return [(position, amount) for position, amount in zip(payable, money) if amount]


def _fact(program: Any, receipt: Any, member: MemberFacts, local: datetime, day: date) -> dict[str, Any]:
    store = program.stores.get(receipt.store_id)
    fact = {
        "store": receipt.store_id,
        "partner": (store.partner or "") if store else "",
        "register": receipt.register_id,
        "channel": receipt.channel,
        "total": receipt.total,
        "items": len(receipt.lines),
        "tier": member.tier,
        "receipt_number": member.receipt_number,
        "weekday": WEEKDAYS[local.weekday()],
        "minute": local.hour * 60 + local.minute,
        "date": day.year * 10000 + day.month * 100 + day.day,
    }
    needed = program.matcher.fields
    if "birthday_days" in needed:
        fact["birthday_days"] = birthday_distance(day, member.birthday)
    if "enrolled_days" in needed:
        enrolled = member.enrolled_on
        fact["enrolled_days"] = max((day - enrolled).days, 0) if enrolled else UNKNOWN_DAYS
    for tag, field in program.member_tag_fields.items():
        fact[field] = tag in member.tags
    if program.store_tag_fields:
        store_tags = store.tags if store else ()
        for tag, field in program.store_tag_fields.items():
            fact[field] = tag in store_tags
    for segment, field in program.segment_fields.items():
        fact[field] = segment in member.segments
    for campaign, field in program.coupon_fields.items():
        fact[field] = campaign in member.coupons
    return fact


def birthday_distance(day: date, birthday: date | None) -> int:
    """Days from day to the nearest birthday, before or after it."""
    if birthday is None:
        return UNKNOWN_DAYS
    return min(abs((day - _birthday_in(year, birthday)).days) for year in (day.year - 1, day.year, day.year + 1))


def _birthday_in(year: int, birthday: date) -> date:
    try:
        return birthday.replace(year=year)
    except ValueError:  # 29 February in a common year: celebrated on the 28th
        return date(year, 2, 28)


def _caps(program: Any, member: MemberFacts, budget_left: dict[str, int] | None) -> dict[str, int]:
    """rule id -> the most points it may still give on this receipt (budget, personal offer)."""
    caps: dict[str, int] = {}
    if budget_left is not None:
        for rule_id, budget in program.budgets.items():
            caps[rule_id] = budget_left.get(rule_id, budget)
    if member.offers:
        personal = program.personal_rule_ids
        for rule_id, left in member.offers.items():
            if left is not None and rule_id in personal:
                caps[rule_id] = min(left, caps.get(rule_id, left))
    return caps


def _passing(program: Any, held: Any, member: MemberFacts, usage: dict[str, int], caps: dict[str, int]) -> list:
    """Rules whose conditions hold and that the member's offers, limits and caps allow. Only
    the restricted candidates can be stopped (caps are budgets' and personal rules'), so
    only they are checked."""
    candidates, restricted = program.candidates(held)
    if not restricted:
        return list(candidates)
    offers = member.offers
    stopped = set()
    for rule in restricted:
        if (rule.personal and rule.id not in offers) or \
                (rule.limit_count is not None and usage.get(rule.id, 0) >= rule.limit_count) or \
                (caps and caps.get(rule.id, 1) <= 0):
            stopped.add(rule.index)
    if not stopped:
        return list(candidates)
    return [rule for rule in candidates if rule.index not in stopped]


def _control(program: Any, passing: list, member: MemberFacts) -> set[int]:
    """Indexes of the passing rules whose control group the member is in."""
    if not program.holdout_rules:
        return set()
    return {
        rule.index
        for rule in passing
        if rule.holdout is not None and holdout_member(program.id, rule.id, member.member_id, rule.holdout)
    }


def _choose(classes: list, earning: list[int], passing: list) -> list[tuple[Any, list[int]]]:
    """The rules that apply, with the line positions in their scope; one per group."""
    # Scopes only for the rules whose conditions hold: in a large program most do not,
    # and every line selects every rule without a scope.
    scopes = _scopes(classes, earning, {rule.index for rule in passing})
    candidates = [(rule, scopes[rule.index]) for rule in passing if rule.index in scopes]
    best: dict[str, Any] = {}
    for rule, _ in candidates:
        if rule.group is not None:
            current = best.get(rule.group)
            if current is None or rule.priority > current.priority:  # ties: defined first
                best[rule.group] = rule
    if not best:
        return candidates
    return [(rule, scope) for rule, scope in candidates if rule.group is None or best[rule.group] is rule]


def _would_have(program: Any, classes: list, line_nos: list[int], earning: list[int], passing: list,
                control: set[int], lines: list, paid: list[int], caps: dict[str, int],
                result: Evaluation) -> list[tuple[str, int]]:  # fmt: skip
    """(rule id, points) the control-group rules would have given had the member been treated."""
    chosen = _choose(classes, earning, passing)
    if not any(rule.index in control for rule, _ in chosen):
        return []  # each would have been outranked or had no line anyway
    exact = _exact_points(chosen, lines, paid)
    if control.isdisjoint(exact):
        return []
    treated = Evaluation(result.local_date, result.available_from, result.expires_on)
    _attribute(program, exact, line_nos, earning, caps, treated)
    ids = {program.rules[index].id for index in control}
    return [(rule_id, points) for rule_id, points in treated.by_rule if rule_id in ids]


def _coupons_used(program: Any, exact: Exact, fact: dict[str, Any], coupons: dict[str, str]) -> dict[str, str]:
    """campaign -> code, for the campaigns the fired rules needed.

    A rule needs the fewest of the receipt's campaigns its condition holds with: a
    campaign it can do without is dropped, the last named first, so of alternatives
    (`any: [{coupon: a}, {coupon: b}]`) the one written first is used.
    """
    used: set[str] = set()
    fields = program.coupon_fields
    needing_all = program.coupon_rules_needing_all
    for index in sorted(program.coupon_rule_indexes.intersection(exact)):
        rule = program.rules[index]
        present = [campaign for campaign in rule.coupons if campaign in coupons]
        if not present:
            continue
        if index in needing_all:    # none of them can be done without: no need to try
            used.update(present)
            continue
        node = program.matcher.conditions[rule.condition]
        trial = dict(fact)
        for campaign in reversed(present):
            trial[fields[campaign]] = False
            if not holds(node, trial):
                trial[fields[campaign]] = True
                used.add(campaign)
    return {campaign: code for campaign, code in coupons.items() if campaign in used}


def _scopes(classes: list, earning: list[int], wanted: set[int]) -> dict[int, list[int]]:
    """rule index -> positions of the lines its scope selects, in receipt order (wanted rules only)."""
    alike: dict[frozenset[int], list[int]] = {}  # lines of one class share the same rules
    for position in earning:
        found = alike.get(classes[position][2])
        if found is None:
            alike[classes[position][2]] = [position]
        else:
            found.append(position)
    scopes: dict[int, list[int]] = {}
    for selected, positions in alike.items():
        for index in wanted.intersection(selected):
            found = scopes.get(index)
            if found is None:
                scopes[index] = list(positions)
            else:
                found.extend(positions)
    if len(alike) > 1:
        for index, positions in scopes.items():
            # A rule every earning line selects has them all, in order: one list shared by
            # such rules, which _exact_points reads the amounts of once for all of them.
            if len(positions) == len(earning):
                scopes[index] = earning
            else:
                positions.sort()
    else:
        for index in scopes:
            scopes[index] = earning   # one class: every wanted rule has all its lines
    return scopes


def _exact_points(chosen: list[tuple[Any, list[int]]], lines: list, paid: list[int]) -> Exact:
    exact: Exact = {}
    # Multiply rules read what their group's winner gave, so they come last.
    multiplying = [pair for pair in chosen if pair[0].kind == "multiply"]
    winners: dict[str, int] = {}
    if multiplying:
        winners = {rule.group: rule.index for rule, _ in chosen if rule.group is not None}
        chosen = [pair for pair in chosen if pair[0].kind != "multiply"] + multiplying
    read, amounts = None, []    # the amounts paid on the lines of scope `read`
    for rule, scope in chosen:
        if rule.kind == "multiply":
            points = _multiplied(rule, scope, exact.get(winners.get(rule.multiply, -1)))
        elif rule.kind in _OF_AMOUNTS:
            if scope is not read:   # rules on every earning line share their scope's list
                read, amounts = scope, [paid[position] for position in scope]
            points = _OF_AMOUNTS[rule.kind](rule, scope, amounts)
        else:
            points = _REWARDS[rule.kind](rule, scope, lines, paid)
        if points is None:
            continue
        if sum(points[2]) > 0:  # zero pairs stay: they never get a point, and are not listed
            exact[rule.index] = points
    return exact


def _percent(rule: Any, scope: list[int], lines: list, paid: list[int]):
    factor = rule.ratio_num
    return rule.ratio_den, scope, [paid[position] * factor for position in scope]


def _fixed(rule: Any, scope: list[int], amounts: list[int]):
    paid_in_scope = sum(amounts)
    if not paid_in_scope:  # everything was paid with points: nothing to earn on
        return None
    points = rule.points
    return paid_in_scope, scope, [points * amount for amount in amounts]


def _per_amount(rule: Any, scope: list[int], amounts: list[int]):
    paid_in_scope = sum(amounts)
    points = paid_in_scope // rule.every * rule.points
    if not points:
        return None
    return paid_in_scope, scope, [points * amount for amount in amounts]


def _per_unit(rule: Any, scope: list[int], lines: list, paid: list[int]):
    ratios = [_ratio(lines[position].qty) for position in scope]
    common = lcm(*(den for _, den in ratios))
    values = [num * (common // den) * rule.ratio_num for num, den in ratios]
    return common * rule.ratio_den, scope, values


def _ratio(quantity: Any) -> tuple[int, int]:
    if isinstance(quantity, int):
        return quantity, 1
    return quantity.as_integer_ratio()


def _multiplied(rule: Any, scope: list[int], base: tuple[int, list[int], list[int]] | None):
    if base is None:
        return None
    denominator, positions, values = base
    given = dict(zip(positions, values))
    extra = rule.ratio_num - rule.ratio_den  # (by - 1) as a ratio over ratio_den
    return denominator * rule.ratio_den, scope, [extra * given.get(position, 0) for position in scope]


_REWARDS = {"percent": _percent, "per_unit": _per_unit}
_OF_AMOUNTS = {"points": _fixed, "per_amount": _per_amount}   # these read the scope's amounts


def _attribute(program: Any, exact: Exact, line_nos: list[int], earning: list[int],
               caps: dict[str, int], result: Evaluation) -> None:  # fmt: skip
    """Round the receipt total once and hand the integer back to (rule, line) pairs."""
    fired = sorted(exact)
    common = lcm(*[exact[index][0] for index in fired]) if fired else 1
    numerator = 0
    shares: list[list[int]] = []
    for index in fired:
        denominator, _, values = exact[index]
        numerator += sum(values) * (common // denominator)
        shares.append([value // denominator for value in values])
    left = round_fraction(numerator, common, program.rounding) - sum(map(sum, shares))
    if left > 0:
        _hand_out(left, fired, exact, shares, line_nos, common)
    if caps:
        _cut_to_caps(program.rules, fired, exact, shares, caps, line_nos)
    _fill(program.rules, fired, exact, shares, line_nos, earning, result)


def _hand_out(left: int, fired: list[int], exact: Exact, shares: list[list[int]], line_nos: list[int],
              common: int) -> None:  # fmt: skip
    """One more point each to the `left` largest remainders (ties: earlier rule, lower line_no)."""
    remainders = []  # over the common denominator, so rules compare; all pairs, rule by rule
    for index in fired:
        denominator, _, values = exact[index]
        scale = common // denominator
        remainders += [value % denominator * scale for value in values]
    if line_nos != sorted(line_nos):
        _hand_out_by_line_no(left, fired, exact, shares, line_nos, remainders)
        return
    # Pairs run by rule and, within a rule, in receipt order, which is line_no order here:
    # the stable sort puts ties in the order the rule demands, so its first `left` pairs are
    # the ones that get a point. (A threshold, then a pass over every pair to compare with
    # it, cost each pair a comparison and a look-up more.)
    bumped = list(chain.from_iterable(shares))
    for at in sorted(range(len(remainders)), key=remainders.__getitem__, reverse=True)[:left]:
        bumped[at] += 1
    start = 0
    for slot, rule_shares in enumerate(shares):
        end = start + len(rule_shares)
        shares[slot] = bumped[start:end]
        start = end


def _hand_out_by_line_no(left: int, fired: list[int], exact: Exact, shares: list[list[int]], line_nos: list[int],
                         remainders: list[int]) -> None:  # fmt: skip
    """_hand_out for lines sent out of line_no order: ties go by line_no, not by position."""
    threshold = sorted(remainders, reverse=True)[left - 1]
    ties = []
    start = 0
    for slot, rule_shares in enumerate(shares):
        rule_remainders = remainders[start:start + len(rule_shares)]
        start += len(rule_shares)
        for at in [at for at, remainder in enumerate(rule_remainders) if remainder >= threshold]:
            if rule_remainders[at] > threshold:
                rule_shares[at] += 1
                left -= 1
            else:
                index = fired[slot]
                ties.append((index, line_nos[exact[index][1][at]], slot, at))
    ties.sort()
    for _, _, slot, at in ties[:left]:
        shares[slot][at] += 1


def _cut_to_caps(rules: list, fired: list[int], exact: Exact, shares: list[list[int]],
                 caps: dict[str, int], line_nos: list[int]) -> None:  # fmt: skip
    # The receipt that would cross a budget or an offer gets what is left, spread like the rest.
    for slot, index in enumerate(fired):
        rule = rules[index]
        left = caps.get(rule.id)
        if left is not None and sum(shares[slot]) > left:
            positions = exact[index][1]
            shares[slot] = split_by_line(max(left, 0), exact[index][2], [line_nos[at] for at in positions])


def split_by_line(total: int, weights: list[int], nos: list[int]) -> list[int]:
    """largest_remainder with ties to the lower line number (`nos`, one per weight), in
    whatever order the register sent the lines."""
    if all(a < b for a, b in zip(nos, nos[1:])):
        return largest_remainder(total, weights)
    order = sorted(range(len(weights)), key=nos.__getitem__)
    parts = [0] * len(weights)
    for at, part in zip(order, largest_remainder(total, [weights[at] for at in order])):
        parts[at] = part
    return parts


def _fill(rules: list, fired: list[int], exact: Exact, shares: list[list[int]], line_nos: list[int],
          earning: list[int], result: Evaluation) -> None:  # fmt: skip
    per_line = [0] * len(line_nos)
    lots: dict[date | None, int] = {}
    pairs: list[tuple[str, int, int]] = []
    by_rule = []
    usual = result.expires_on
    for index, rule_shares in zip(fired, shares):
        rule = rules[index]
        rule_id = rule.id
        rule_total = 0
        for position, share in zip(exact[index][1], rule_shares):
            if share:  # never negative; a pair without a point is not listed
                per_line[position] += share
                pairs.append((rule_id, line_nos[position], share))
                rule_total += share
        by_rule.append((rule_id, rule_total))
        if rule_total:
            days = rule.expires_in_days
            expires = usual if days is None else result.local_date + timedelta(days=days)
            lots[expires] = lots.get(expires, 0) + rule_total
    result.pairs = pairs
    result.by_rule = by_rule
    result.fired = [rule_id for rule_id, _ in by_rule]
    result.by_line = [(line_nos[position], per_line[position]) for position in earning]
    result.accrued_points = sum(lots.values())
    available_from = result.available_from
    result.lots = [(available_from, expires, points)
                   for expires, points in (sorted(lots.items(), key=_by_expiry) if len(lots) > 1 else lots.items())]


def _by_expiry(item: tuple[date | None, int]) -> tuple[bool, date]:
    return item[0] is None, item[0] or date.min
