"""A rule as a sentence or two for the program page: what it gives, when, on which lines,
how often. Read from the rule's summary (the values as written in its file), so the page
says what the file says."""
from __future__ import annotations

from typing import Any

_OPS = {"gt": "above", "gte": "at least", "lt": "below", "lte": "at most", "ne": "not"}
_SUBJECTS = {
    "store": "the store is", "partner": "the partner is", "register": "the register is",
    "channel": "the channel is", "tier": "the member's tier is", "total": "the receipt's total (minor units) is",
    "items": "the receipt has a number of lines", "receipt_number": "it is the member's receipt number",
    "weekdays": "the day is", "hours": "the local time is within", "tags": "the member has a tag of",
    "store_tags": "the store has a tag of",
}


def _listed(value: Any) -> str:
    if isinstance(value, list):
        return " or ".join(str(item) for item in value) if value else "nothing"
    return str(value)


def _compared(value: Any) -> str:
    if not isinstance(value, dict):
        return _listed(value)
    parts = []
    for op, operand in value.items():
        if op == "between" and isinstance(operand, list) and len(operand) == 2:
            parts.append(f"between {operand[0]} and {operand[1]}")
        else:
            parts.append(f"{_OPS.get(op, op)} {_listed(operand)}")
    return " and ".join(parts)


def condition(key: str, value: Any) -> str:
    if key == "not" and isinstance(value, dict):
        return "not (" + when(value) + ")"
    if key == "any" and isinstance(value, list):
        return "any of: " + "; or ".join(f"({when(block)})" for block in value if isinstance(block, dict))
    if key == "birthday_within_days":
        return f"the birthday is at most {value} day(s) away"
    if key == "enrolled_within_days":
        return f"the member enrolled at most {value} day(s) before"
    subject = _SUBJECTS.get(key, key)
    return f"{subject} {_compared(value)}"


def when(block: dict) -> str:
    return "; ".join(condition(key, value) for key, value in block.items())


def reward(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    if "percent" in value:
        return f"{value['percent']} % of the paid amount in points"
    if "points" in value and len(value) == 1:
        return f"{value['points']} point(s) per receipt"
    if "per_unit" in value:
        return f"{value['per_unit']} point(s) per unit"
    if "per_amount" in value and isinstance(value["per_amount"], dict):
        every = value["per_amount"]
        return f"{every.get('points')} point(s) for every full {every.get('every')} (minor units) paid"
    if "multiply" in value:
        return f"what group {value['multiply']} gave the lines, {value.get('by')} times in all"
    return ", ".join(f"{k}: {v}" for k, v in value.items())


def scope(value: Any) -> str:
    if not isinstance(value, dict):
        return "every line"
    parts = [f"{name} {_listed(value[name])}" for name in ("categories", "skus", "brands") if name in value]
    excluded = [f"{name[len('exclude_'):]} {_listed(v)}" for name, v in value.items() if name.startswith("exclude")]
    if isinstance(value.get("exclude"), dict):
        excluded += [f"{name} {_listed(v)}" for name, v in value["exclude"].items()]
    text = "lines of " + ", ".join(parts) if parts else "every line"
    return text + (", except " + ", ".join(excluded) if excluded else "")


def limit(value: Any) -> str:
    per_member = value.get("per_member") if isinstance(value, dict) else None
    if isinstance(per_member, dict):
        return f"at most {per_member.get('count')} receipt(s) per member per {per_member.get('per')}"
    return str(value)


def describe(summary: dict) -> dict:
    """The summary with its parts in words (keys absent from the rule are None)."""
    period = summary.get("period")
    return {
        "id": summary["id"], "file": summary.get("file"), "line": summary.get("line"),
        "priority": summary.get("priority"),
        "reward": reward(summary.get("reward")),
        "when": when(summary["when"]) if isinstance(summary.get("when"), dict) else "always",
        "period": (f"from {period.get('from', 'the start')} to {period.get('to', 'no end')}"
                   if isinstance(period, dict) else None),
        "scope": scope(summary.get("scope")),
        "limit": limit(summary["limit"]) if "limit" in summary else None,
        "budget": f"at most {summary['budget']} point(s) in all" if "budget" in summary else None,
    }


def by_group(summaries: list[dict]) -> list[tuple[str | None, list[dict]]]:
    """Grouped rules (highest priority first: the one that wins) and then the ungrouped ones."""
    groups: dict[str | None, list[dict]] = {}
    for summary in summaries:
        groups.setdefault(summary.get("group"), []).append(describe(summary))
    named = sorted((name, rules) for name, rules in groups.items() if name is not None)
    out = [(name, sorted(rules, key=lambda r: -(r["priority"] or 0))) for name, rules in named]
    if None in groups:
        out.append((None, groups[None]))
    return out


# How a program version went live (program_loads.source), for the program page and the last-reload panel.
LOAD_SOURCES = {"directory": "loaded from the folder", "api": "deployed through the API",
                "console": "deployed from the console", "rollback": "rolled back"}
