"""The campaign effect of a rule with a control group (rules.md, "Campaign effect").

Audience: the members enrolled by `to` (a member others were merged into, since the first
of them) who meet the rule's member conditions on `from` (all of them when it has none;
server/report_audience.py says who does); each is treated or control by the stable holdout
assignment. A member merged away counts as the member it went to; an erased member not at
all (Audience). Per group: members, buyers, receipts, spend (net
totals of the period's confirmed receipts, non-buyers counting zero), scope_spend (the same
over the lines in the rule's scope), points (issued by the rule to the treated; what it
would have given, for the control; both net of returns). The uplift of spend per member is
the difference of the means with a Welch–Satterthwaite t interval.

Sums and means are exact (integers and Fractions); the t quantile is computed in floating
point (it is a statistic, not money) to far better than a minor unit of any interval this
report gives; money is rounded half-up to minor units once, at the end.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Callable

import msgspec

from storage.ledger import BY_RULE_FROM, BY_RULE_ID, BY_RULE_POINTS, iso, member_public_id, unpack

TREATED, CONTROL = "treated", "control"


def holdout_member(program_id: str, rule_id: str, member_id: str, h: float | Decimal | Fraction) -> bool:
    """rules.md: in the control group when int(first 8 hex of sha256("<program>:<rule>:<member>"), 16) / 2^32 < h."""
    return _held(program_id, rule_id, member_id, _limit(h))


def _limit(h) -> int:
    """For a whole number x, x < h x 2^32 exactly when x < this."""
    return math.ceil(Fraction(str(h)) * 2 ** 32)


def _held(program_id: str, rule_id: str, member_id: str, limit: int) -> bool:
    digest = hashlib.sha256(f"{program_id}:{rule_id}:{member_id}".encode()).hexdigest()
    return int(digest[:8], 16) < limit


@dataclass(frozen=True)
class CampaignRule:
    """What the report needs of a rule."""
    id: str
    holdout: Decimal | None
    period_from: date | None = None
    period_to: date | None = None
    # (conn, day) -> whether a member meets the rule's member conditions (tier, tags, segment,
    # offers) on that day (server/report_audience.py); None: it has none.
    audience_on: Callable[[object, date], Callable[[int], bool]] | None = None
    # Whether a receipt line (as the API sends it) is in the rule's scope; None: every line.
    in_scope: Callable[[dict], bool] | None = None


@dataclass(frozen=True)
class Setting:
    program_id: str
    timezone: tzinfo
    point_value: int                 # minor units per point


@dataclass
class Group:
    members: int = 0
    buyers: int = 0
    receipts: int = 0
    spend: int = 0
    scope_spend: int = 0
    points: int = 0
    sum_squares: int = 0             # of spend per member, for the variance

    def public(self) -> dict:
        return {k: getattr(self, k) for k in ("members", "buyers", "receipts", "spend", "scope_spend", "points")}


# ------------------------------------------------------------------ reading

@dataclass
class Audience:
    """Who the report counts: each member in it with their group, and whose history is whose.
    A member merged away is no member of its own: its receipts and points are the customer's,
    counted for the member they went to (through any chain of merges). An erased member has
    no one left to compare: it and its history count nowhere."""
    groups: dict[int, str]           # member id -> TREATED | CONTROL
    owner: dict[int, int]            # member id (a merged-away one too) -> the member counted for its history

    def group_of(self, member_id: int) -> tuple[int, str] | None:
        counted = self.owner.get(member_id)
        return None if counted is None else (counted, self.groups[counted])


def _audience(conn, setting: Setting, rule: CampaignRule, first: date, last: date) -> Audience:
    end = iso(datetime.combine(last + timedelta(days=1), time.min, setting.timezone))
    limit = _limit(rule.holdout)
    meets = rule.audience_on(conn, first) if rule.audience_on is not None else None
    rows = conn.execute("SELECT id, enrolled_at, merged_into, erased_at FROM members ORDER BY id").fetchall()
    merged = {member_id: merged_into for member_id, _, merged_into, _ in rows if merged_into is not None}
    heirs = {member_id: _survivor(merged, member_id) for member_id in merged}
    # A customer is enrolled since the first of the memberships merged into one.
    since: dict[int, str] = {}
    for member_id, enrolled_at, _, _ in rows:
        heir = heirs.get(member_id, member_id)
        since[heir] = min(since.get(heir, enrolled_at), enrolled_at)
    groups = {}
    for member_id, _, merged_into, erased_at in rows:
        if merged_into is not None or erased_at is not None or since[member_id] >= end or \
                (meets is not None and not meets(member_id)):
            continue
        held = _held(setting.program_id, rule.id, member_public_id(member_id), limit)
        groups[member_id] = CONTROL if held else TREATED
    owner = {member_id: member_id for member_id in groups}
    for member_id, heir in heirs.items():
        if heir in groups:
            owner[member_id] = heir
    return Audience(groups, owner)


def _survivor(merged: dict[int, int], member_id: int) -> int:
    seen = set()
    while member_id in merged and member_id not in seen:    # a cycle is no merge the server makes
        seen.add(member_id)
        member_id = merged[member_id]
    return member_id


def _receipts(conn, rule: CampaignRule, first: date, last: date):
    """(member, receipt key, net total, net scope spend, scope spend as sold) of each
    confirmed receipt of the period."""
    returned: dict[tuple, dict[int, int]] = {}
    for *key, line_no, amount in conn.execute(
            "SELECT rl.receipt_store, rl.receipt_register, rl.receipt_id, rl.line_no, SUM(rl.amount) "
            "FROM return_lines rl JOIN receipts r ON r.store_id = rl.receipt_store "
            "AND r.register_id = rl.receipt_register AND r.receipt_id = rl.receipt_id "
            "WHERE r.status = 'confirmed' AND r.local_date BETWEEN ? AND ? AND r.member_id IS NOT NULL "
            "GROUP BY 1, 2, 3, 4", (first.isoformat(), last.isoformat())):
        returned.setdefault(tuple(key), {})[line_no] = amount
    # The bodies (most of the database) are read only when a scope needs their lines.
    body = "body" if rule.in_scope is not None else "NULL"
    for member_id, store, register, receipt_id, total, body in conn.execute(
            f"SELECT member_id, store_id, register_id, receipt_id, total, {body} FROM receipts "
            "WHERE status = 'confirmed' AND local_date BETWEEN ? AND ? AND member_id IS NOT NULL",
            (first.isoformat(), last.isoformat())):
        key = (store, register, receipt_id)
        back = returned.get(key, {})
        if rule.in_scope is None:
            sold, scope = total, total - sum(back.values())
        else:
            lines = [line for line in msgspec.json.decode(unpack(body))["lines"] if rule.in_scope(line)]
            sold = sum(line["amount"] for line in lines)
            scope = sold - sum(back.get(line["line_no"], 0) for line in lines)
        yield member_id, key, total - sum(back.values()), scope, sold


def _points(conn, rule_id: str, first: date, last: date) -> tuple[dict[int, int], dict[tuple, int]]:
    """Points issued by the rule by member (net of returns), and what it would have given
    the held out by receipt (as the receipt recorded it, before any return)."""
    period = (first.isoformat(), last.isoformat())
    # Accruals by rule are their posting_rules split (one accrual posting per lot); reversals
    # are posted per rule.
    issued = dict(conn.execute(
        f"SELECT p.member_id, SUM({BY_RULE_POINTS}) FROM {BY_RULE_FROM} JOIN receipts r ON r.store_id = p.store_id "
        f"AND r.register_id = p.register_id AND r.receipt_id = p.receipt_id WHERE {BY_RULE_ID} = ? "
        "AND p.kind IN ('accrual', 'reversal') AND r.status = 'confirmed' AND r.local_date BETWEEN ? AND ? "
        "GROUP BY p.member_id", (rule_id, *period)))
    would = {(store, register, receipt_id): points for store, register, receipt_id, points in conn.execute(
        "SELECT h.store_id, h.register_id, h.receipt_id, h.points FROM holdout_points h JOIN receipts r "
        "ON r.store_id = h.store_id AND r.register_id = h.register_id AND r.receipt_id = h.receipt_id "
        "WHERE h.rule_id = ? AND r.status = 'confirmed' AND r.local_date BETWEEN ? AND ?", (rule_id, *period))}
    return issued, would


def kept_after_returns(points: int, scope_sold: int, scope_kept: int) -> int:
    """What a control member's would-be points are once returns took back part of the
    receipt: a return takes the returned share of the lines in the rule's scope, rounded
    down as a return's reversal is (rules.md step 5), so a whole return takes them all. The
    receipt keeps only its total, not what each line would have had, so the share is of the
    scope's amount."""
    if scope_sold <= 0 or scope_kept >= scope_sold:
        return points
    return points - points * (scope_sold - max(scope_kept, 0)) // scope_sold


def groups(conn, setting: Setting, rule: CampaignRule, first: date, last: date) -> dict[str, Group]:
    audience = _audience(conn, setting, rule, first, last)
    issued, would = _points(conn, rule.id, first, last)
    spend: dict[int, int] = {}
    out = {TREATED: Group(), CONTROL: Group()}
    for member_id, key, net, scope, sold in _receipts(conn, rule, first, last):
        counted = audience.group_of(member_id)
        if counted is None:
            continue
        member, group = counted
        out[group].receipts += 1
        out[group].scope_spend += scope
        spend[member] = spend.get(member, 0) + net
        if group == CONTROL and key in would:
            out[group].points += kept_after_returns(would[key], sold, scope)
    for member_id, points in issued.items():
        counted = audience.group_of(member_id)
        if counted is not None and counted[1] == TREATED:
            out[TREATED].points += points
    for member_id, group in audience.groups.items():
        g = out[group]
        g.members += 1
        value = spend.get(member_id, 0)
        g.buyers += member_id in spend
        g.spend += value
        g.sum_squares += value * value
    return out


def weekly(conn, setting: Setting, rule: CampaignRule, first: date, last: date) -> list[tuple[date, float, float]]:
    """(first day of the week, treated, control) spend per member for each 7 days from `first`,
    for a chart (floats: drawn, never added up); a last week cut short by `last` is scaled
    to seven days so it compares with the others."""
    audience = _audience(conn, setting, rule, first, last)
    sizes = {TREATED: 0, CONTROL: 0}
    for group in audience.groups.values():
        sizes[group] += 1
    weeks = (last - first).days // 7 + 1
    spend = {TREATED: [0] * weeks, CONTROL: [0] * weeks}
    for member_id, day, net in _receipts_by_day(conn, first, last):
        counted = audience.group_of(member_id)
        if counted is not None:
            spend[counted[1]][(date.fromisoformat(day) - first).days // 7] += net
    out = []
    for w in range(weeks):
        start = first + timedelta(days=7 * w)
        days = (min(start + timedelta(days=6), last) - start).days + 1
        scale = 7 / days      # a short last week, as 7 days
        out.append((start, spend[TREATED][w] * scale / max(1, sizes[TREATED]),
                    spend[CONTROL][w] * scale / max(1, sizes[CONTROL])))
    return out


def _receipts_by_day(conn, first: date, last: date):
    return conn.execute(
        "SELECT r.member_id, r.local_date, r.total - COALESCE((SELECT SUM(rl.amount) FROM return_lines rl "
        "WHERE rl.receipt_store = r.store_id AND rl.receipt_register = r.register_id "
        "AND rl.receipt_id = r.receipt_id), 0) FROM receipts r WHERE r.status = 'confirmed' "
        "AND r.local_date BETWEEN ? AND ? AND r.member_id IS NOT NULL", (first.isoformat(), last.isoformat()))


# ------------------------------------------------------------------ statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p quantile (0.5 < p < 1) of Student's t with df (> 0, not necessarily whole) degrees of freedom."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-13 * max(1.0, high):
            break
    return (low + high) / 2.0


def _variance(g: Group) -> Fraction:
    n = g.members
    return Fraction(n * g.sum_squares - g.spend * g.spend, n * (n - 1))


def minor_units(value: Fraction | Decimal) -> int:
    """Half-up (halves away from zero) to a whole minor unit."""
    if isinstance(value, Fraction):
        with localcontext() as ctx:
            ctx.prec = 60
            value = Decimal(value.numerator) / Decimal(value.denominator)
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def uplift(treated: Group, control: Group) -> tuple[Fraction | None, Decimal | None]:
    """(difference of the means, half-width of its 95% interval); None where a group is too small."""
    if not treated.members or not control.members:
        return None, None
    diff = Fraction(treated.spend, treated.members) - Fraction(control.spend, control.members)
    if treated.members < 2 or control.members < 2:
        return diff, None
    vt, vc = _variance(treated) / treated.members, _variance(control) / control.members
    se2 = vt + vc
    if se2 == 0:
        return diff, Decimal(0)
    df = se2 * se2 / (vt * vt / (treated.members - 1) + vc * vc / (control.members - 1))
    t = Decimal(repr(t_quantile(0.975, float(df))))
    with localcontext() as ctx:
        ctx.prec = 40
        se = (Decimal(se2.numerator) / Decimal(se2.denominator)).sqrt()
        return diff, t * se


def report(conn, setting: Setting, rule: CampaignRule, first: date, last: date) -> dict:
    g = groups(conn, setting, rule, first, last)
    treated, control = g[TREATED], g[CONTROL]
    diff, half = uplift(treated, control)
    spend = None
    if diff is not None:
        spend = {"spend_per_member": minor_units(diff), "low": None, "high": None}
        if half is not None:
            exact = Decimal(diff.numerator) / Decimal(diff.denominator)
            spend["low"], spend["high"] = minor_units(exact - half), minor_units(exact + half)
    return {"rule": rule.id, "from": first.isoformat(), "to": last.isoformat(),
            "treated": treated.public(), "control": control.public(), "uplift": spend,
            "incremental_spend": None if diff is None else minor_units(diff * treated.members),
            "points_cost": treated.points * setting.point_value}


# ------------------------------------------------------------------ HTTP

def period_of(rule: CampaignRule, first: str | None, last: str | None) -> tuple[date, date]:
    """?from=&to= (local dates), each defaulting to the rule's period; a 422 naming the field otherwise."""
    from server.errors import field_error, problems_error
    from server.validation import DAY_EARLIEST, DAY_LATEST, DAY_RANGE, Problems
    problems, days = Problems(), {}
    for name, raw, default in (("from", first, rule.period_from), ("to", last, rule.period_to)):
        try:
            days[name] = date.fromisoformat(raw) if raw else default
        except ValueError:
            problems.add(name, "must be a date like 2026-12-08")
            continue
        if days[name] is None:
            problems.add(name, "is required: the rule has no period")
        elif not DAY_EARLIEST <= days[name] <= DAY_LATEST:
            problems.add(name, DAY_RANGE)
    if problems.count:
        raise problems_error(problems)
    if days["to"] < days["from"]:
        raise field_error("to", "must not be before from")
    if (days["to"] - days["from"]).days > PERIOD_DAYS_MAX:
        raise field_error("to", f"must be at most {PERIOD_DAYS_MAX} days after from")
    return days["from"], days["to"]


PERIOD_DAYS_MAX = 3660


def setting_of(program) -> Setting:
    return Setting(program.id, program.timezone, program.point_value)


async def campaign_report(app, call):
    from server.campaign_definitions import Live, report as effect
    from server.cvm import definitions
    from server.keys import DATABASE, PROGRAMS
    from server.answer_types import CampaignReport
    from server.routes import json_reply
    live = Live(app[PROGRAMS].current, definitions(app).rules)
    rule_id, first, last = call.path["rule"], call.query.get("from"), call.query.get("to")
    found, _, _ = await app[DATABASE].read(lambda conn: effect(conn, live, rule_id, first, last))
    return json_reply(msgspec.convert(found, CampaignReport))


def routes():
    from server.answer_types import CampaignReport
    from server.routes import MANAGER, Route, ok
    return [Route("GET", "/v1/admin/reports/campaigns/{rule}", campaign_report, frozenset({MANAGER}), None,
                  "The effect of a rule with a control group: per group members, buyers, receipts, spend, "
                  "scope_spend, points; the uplift of spend per member with its 95% interval; ?from=&to=. "
                  "A rule no longer live, or defined anew since, is measured by the stored program version "
                  "that had it in force during the period (rules_version, live, warnings)",
                  answers=ok(CampaignReport))]
