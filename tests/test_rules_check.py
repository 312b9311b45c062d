"""Loading and checking programs: every problem, at the right file:line:column."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

import rules
from rules import Problem, ProgramError, check_dir, check_files, load_files, load_program

MARKET = pathlib.Path(rules.__file__).parent / "programs" / "market"

SETTINGS = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100}
tiers:
  levels:
    - {id: base, from: 0}
    - {id: gold, from: 1000}
"""


def write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def problems_of(files: dict[str, str]) -> list[str]:
    return [str(problem) for problem in check_files({k: textwrap.dedent(v) for k, v in files.items()})]


def test_shipped_program_has_no_problems():
    assert check_dir(MARKET) == []
    program = load_program(MARKET)
    try:
        assert program.id == "market"
        assert [rule["id"] for rule in program.rule_summaries] == [
            "base", "base-silver", "base-gold", "dairy-x2", "big-basket", "morning", "fuel",
        ]  # fmt: skip
        assert program.version.startswith("sha256:") and len(program.version) == 7 + 64
        assert [name for name, _ in program.files] == ["campaigns/base.yaml", "campaigns/promos.yaml", "program.yaml"]
    finally:
        program.close()


def test_broken_program_reports_every_problem_with_its_position(tmp_path):
    write(
        tmp_path,
        {
            "program.yaml": SETTINGS,
            "campaigns/a.yaml": """\
                rules:
                  - id: base
                    group: base
                    reward: {percent: 2}
                  - id: promo
                    rewrad: {points: 5}
                """,
            "campaigns/b.yaml": """\
                rules:
                  - id: base
                    reward: {points: 1}
                  - id: triple
                    reward: {multiply: bsae, by: 3}
                  - id: late
                    period: {from: "2026-12-01", to: "2026-11-01"}
                    reward: {percent: 1}
                  - id: typed
                    priority: high
                    reward: {points: 10}
                """,
            "campaigns/c.yaml": """\
                rules:
                  - {id: broken, reward: {points: 1}
                """,
        },
    )
    found = [str(problem) for problem in check_dir(tmp_path)]
    assert found == [
        "campaigns/a.yaml:5:5: missing required key 'reward'",
        "campaigns/a.yaml:6:5: unknown key 'rewrad', did you mean 'reward'?",
        "campaigns/b.yaml:2:9: duplicate id 'base' (first defined at campaigns/a.yaml:2:9)",
        "campaigns/b.yaml:5:24: no rule has group 'bsae', did you mean 'base'?",
        "campaigns/b.yaml:7:38: period ends (2026-11-01) before it starts (2026-12-01)",
        "campaigns/b.yaml:10:15: 'priority' should be an integer, not text",
        "campaigns/c.yaml:3:1: YAML syntax error: while parsing a flow mapping did not find expected ',' or '}'",
    ]
    with pytest.raises(ProgramError) as refused:
        load_program(tmp_path)
    assert [str(problem) for problem in refused.value.problems] == found
    assert str(refused.value).splitlines() == found


def test_problem_formats_as_file_line_column():
    problem = Problem("rules.yaml", 3, 7, "unknown key 'x'")
    assert str(problem) == "rules.yaml:3:7: unknown key 'x'"


def test_settings_problems():
    found = problems_of(
        {
            "a.yaml": """\
                program: {id: shop, currency: uah, timezone: Europe/Kiev_}
                points: {value: 100, rounding: flor, activation_delay_days: -1}
                redemption: {max_share: 1.5, min_points: 10}
                stores:
                  - {id: S1, partner: fuleco}
                partners:
                  - {id: fuelco, name: Fuel, funding_share: 0.3333333}
                tiers:
                  levels:
                    - {id: base, from: 10}
                    - {id: gold, from: 5}
                """,
            "b.yaml": "points: {value: 1}\nholds: {ttl_minutes: 0}\n",
        }
    )
    assert found == [
        "a.yaml:1:31: currency 'uah' should be a 3-letter code in capitals, e.g. UAH",
        "a.yaml:1:46: unknown timezone 'Europe/Kiev_' (e.g. Europe/Kyiv)",
        "a.yaml:2:32: unknown value 'flor' for 'rounding', did you mean 'floor'?",
        "a.yaml:2:61: 'activation_delay_days' must be >= 0",
        "a.yaml:3:25: 'max_share' must be >= 0 and <= 1, got 1.5",
        "a.yaml:5:23: unknown partner 'fuleco', did you mean 'fuelco'? (add it under 'partners')",
        "a.yaml:7:45: 'funding_share' has more than 6 decimal places",
        "a.yaml:10:24: the first tier must start 'from: 0'",
        "a.yaml:11:24: tiers must ascend: 5 is not above 10",
        "b.yaml:1:1: 'points' is already set in a.yaml:2:1",
        "b.yaml:2:22: 'ttl_minutes' must be >= 1",
    ]


def test_missing_sections_and_unknown_top_level_key():
    found = problems_of({"a.yaml": "rulez: []\n"})
    assert found == [
        "a.yaml:1:1: missing required section 'points'",
        "a.yaml:1:1: missing required section 'program'",
        "a.yaml:1:1: unknown key 'rulez', did you mean 'rules'?",
    ]


def test_when_problems():
    found = problems_of(
        {
            "program.yaml": SETTINGS,
            "rules.yaml": """\
                rules:
                  - id: a
                    when: {tier: glod, weekdays: [mon, tuesday], hours: "25:00-26:00"}
                    reward: {percent: 1}
                  - id: b
                    when: {total: {gte_: 5}, items: {between: [5, 2]}, stor: S1}
                    reward: {percent: 1}
                  - id: c
                    when: {total: 10.5, store: {gt: S1}, not: {}}
                    reward: {percent: 1}
                """,
        }
    )
    assert found == [
        "rules.yaml:3:18: unknown tier 'glod', did you mean 'gold'?",
        "rules.yaml:3:40: unknown weekday 'tuesday', did you mean 'tue'?",
        "rules.yaml:3:57: bad hours '25:00-26:00': expected \"HH:MM-HH:MM\", e.g. \"07:00-10:00\" (end excluded)",
        "rules.yaml:6:20: unknown operator 'gte_', did you mean 'gte'?",
        "rules.yaml:6:47: 'between' ends (2) before it starts (5)",
        "rules.yaml:6:56: unknown condition 'stor', did you mean 'store'?",
        "rules.yaml:9:19: expected a whole number (money is in minor units), got 10.5",
        "rules.yaml:9:33: only 'ne' applies to a name",
        "rules.yaml:9:47: expected a non-empty mapping of conditions",
    ]


def test_reward_limit_and_multiply_problems():
    found = problems_of(
        {
            "program.yaml": SETTINGS,
            "rules.yaml": """\
                rules:
                  - id: base
                    group: base
                    reward: {percent: 2}
                  - id: x2
                    group: promo
                    reward: {multiply: base, by: 2}
                  - id: x3
                    reward: {multiply: promo, by: 3}
                  - id: both
                    reward: {percent: 2, points: 5}
                  - id: none
                    reward: {}
                  - id: lonely-by
                    reward: {percent: 1, by: 2}
                  - id: once
                    limit: {per_member: {count: 1, per: period}}
                    reward: {points: 5}
                  - id: soon
                    expires_in_days: 0
                    reward: {points: 5}
                """,
        }
    )
    assert found == [
        "rules.yaml:9:24: group 'promo' has multiply rules itself; multiply a group of plain rewards",
        "rules.yaml:11:13: a reward needs exactly one of: percent, points, per_unit, per_amount, multiply (percent, points given)",
        "rules.yaml:13:13: a reward needs exactly one of: percent, points, per_unit, per_amount, multiply",
        "rules.yaml:15:30: 'multiply: <group>' and 'by: <factor>' go together",
        "rules.yaml:17:41: 'per: period' needs the rule to have a 'period'",
        "rules.yaml:20:22: 'expires_in_days' must be >= 1",
    ]


def test_duplicate_yaml_key_and_settings_key_in_two_files():
    found = problems_of(
        {
            "a.yaml": SETTINGS + "exclusions: {categories: [x]}\n",
            "b.yaml": "exclusions: {flags: [y]}\nrules:\n  - id: r\n    id: s\n    reward: {points: 1}\n",
        }
    )
    assert found == [
        "b.yaml:1:1: 'exclusions' is already set in a.yaml:7:1",
        "b.yaml:4:5: duplicate key 'id'",
    ]


def test_event_problems_and_id_shared_with_rules():
    found = problems_of(
        {
            "program.yaml": SETTINGS,
            "events.yaml": """\
                events:
                  - {id: welcome, on: enroled, reward: {points: 100}}
                  - {id: gift, on: birthday, reward: {points: 0}}
                  - {id: base, on: birthday, reward: {points: 5}, expires_in_days: 7}
                rules:
                  - {id: base, reward: {percent: 1}}
                """,
        }
    )
    assert found == [
        "events.yaml:2:23: unknown value 'enroled' for 'on', did you mean 'enrolled'?",
        "events.yaml:3:47: 'points' must be >= 1",
        "events.yaml:6:10: duplicate id 'base' (first defined at events.yaml:4:10)",
    ]


def test_expiry_shorter_than_activation_is_refused():
    found = problems_of(
        {
            "program.yaml": SETTINGS.replace("points: {value: 100}", "points: {value: 100, activation_delay_days: 14}"),
            "rules.yaml": "rules:\n  - {id: quick, expires_in_days: 7, reward: {points: 5}}\n",
        }
    )
    assert found == [
        "rules.yaml:2:34: points that expire after 7 days would never become available "
        "(points.activation_delay_days is 14)"
    ]


def test_limits_on_size(tmp_path):
    (tmp_path / "big.yaml").write_bytes(b"# " + b"x" * (1024 * 1024) + b"\n")
    assert [str(p) for p in check_dir(tmp_path)] == ["big.yaml:1:1: file larger than 1048576 bytes"]
    many = {"program.yaml": SETTINGS, "rules.yaml": "rules:\n" + "".join(
        f"  - {{id: r{n}, reward: {{points: 1}}}}\n" for n in range(2001)
    )}  # fmt: skip
    assert problems_of(many) == ["rules.yaml:2002:5: more than 2000 rules"]


def test_alias_bomb_is_refused():
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n"
    for name, previous in zip("bcdefg", "abcdef"):
        bomb += f"{name}: &{name} [" + ",".join([f"*{previous}"] * 10) + "]\n"
    assert problems_of({"a.yaml": bomb}) == ["a.yaml:1:1: file expands to more than 200000 values (aliases?)"]


def test_scalars_keep_their_written_text():
    program = load_files(
        {
            "program.yaml": SETTINGS,
            "rules.yaml": """\
                rules:
                  - id: sku-promo
                    scope: {skus: [0042, 4820000000011]}
                    reward: {percent: 2.5}
                """,
        }
    )
    try:
        assert program.rules[0].scope.skus == frozenset({"0042", "4820000000011"})
        assert (program.rules[0].ratio_num, program.rules[0].ratio_den) == (5, 2 * 100 * 100)
        assert program.rule_summaries[0]["reward"] == {"percent": "2.5"}
    finally:
        program.close()


def test_hidden_files_and_other_extensions_are_ignored(tmp_path):
    write(tmp_path, {"program.yaml": SETTINGS, ".#program.yaml": "broken: [", "notes.yml": "x: [", ".git/x.yaml": "["})
    assert check_dir(tmp_path) == []


def test_close_is_idempotent():
    program = load_program(MARKET)
    program.close()
    program.close()
