"""A small program for the tests of the contract's decisions: short expiry and tier window,
so late receipts, tiers at their ts and arrival-order receipt numbers show in a few calls."""
from __future__ import annotations

from pathlib import Path

NOW = "2026-11-24T12:00:05+02:00"

PROGRAM = """
program: {id: decide, name: Decisions, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 14, expiry_days: 30}
redemption: {max_share: 0.5, min_points: 10}
holds: {ttl_minutes: 15}
tiers:
  metric: spend
  window_days: 30
  levels:
    - {id: base, from: 0}
    - {id: silver, from: 100000}
    - {id: gold, from: 500000}
stores:
  - {id: S001}
  - {id: S002}
events:
  - {id: welcome, on: enrolled, reward: {points: 100}}
rules:
  - {id: base, group: earn, reward: {percent: 1}}
  - {id: silver, group: earn, priority: 1, when: {tier: silver}, reward: {percent: 5}}
  - {id: gold, group: earn, priority: 2, when: {tier: gold}, reward: {percent: 10}}
  - {id: first, when: {receipt_number: 1}, reward: {points: 7}}
  - id: daily
    reward: {points: 3}
    limit: {per_member: {count: 1, per: day}}
"""


def write_program(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "program.yaml").write_text(PROGRAM + extra)
    return folder


def points_of(result: dict, rule: str) -> int:
    return sum(x["points"] for x in result["accrued"]["by_rule"] if x["rule"] == rule)
