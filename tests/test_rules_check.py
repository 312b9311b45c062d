"""Loading and checking programs: every problem, at the right file:line:column."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
from datetime import date, datetime

import pytest
from conftest import line, receipt
from test_rules_watch import wait_for

from rules import Problem, ProgramError, check_dir, check_files, load_files, load_program
from server.cli import main

MARKET = pathlib.Path(__file__).parent / "programs" / "market"
TODAY = date(2026, 11, 24)  # the checker's date: the market's November promotion is still on

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


def problems_of(files: dict[str, str], today: date | datetime = TODAY) -> list[str]:
    return [str(problem) for problem in check_files({k: textwrap.dedent(v) for k, v in files.items()}, today)]


def test_shipped_program_has_no_problems():
    assert check_dir(MARKET, TODAY) == []
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
        "rules.yaml:3:18: warning: unknown tier 'glod', did you mean 'gold'?",
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


def test_a_file_nested_fifty_thousand_levels_deep_is_a_problem_not_a_crash(tmp_path):
    """The server reads a watched folder, and POST /v1/admin/rules/check a manager's files,
    in its own process: such a file overflowed the C stack of the YAML parser and killed it.
    Run apart, so a crash is this test's failure only."""
    deep = "rules: " + "[" * 50_000 + "]" * 50_000 + "\n"
    write(tmp_path, {"program.yaml": SETTINGS, "deep.yaml": deep})
    done = subprocess.run([sys.executable, "-m", "server.cli", "rules", "check", str(tmp_path)],
                          capture_output=True, text=True, cwd=MARKET.parent.parent.parent, timeout=120)
    assert (done.returncode, done.stdout) == (1, "deep.yaml:1:48: nested more than 40 levels deep\n"), done.stderr


def test_a_named_pipe_or_a_device_among_the_files_is_a_problem_not_a_wait(tmp_path):
    """Opening a named pipe waits for a writer, and the server reloads on its event loop:
    every request waited with it. /dev/zero never ends. Run apart, so a wait fails this test."""
    write(tmp_path, {"program.yaml": SETTINGS})
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    done = subprocess.run([sys.executable, "-m", "server.cli", "rules", "check", str(tmp_path)],
                          capture_output=True, text=True, cwd=MARKET.parent.parent.parent, timeout=60)
    assert (done.returncode, done.stdout.splitlines()) == (1, [
        "pipe.yaml:1:1: not a regular file (a named pipe or a device)",
        "zero.yaml:1:1: not a regular file (a named pipe or a device)"]), done.stderr


def test_a_link_to_nothing_among_the_files_is_a_problem_saying_where_it_points(tmp_path):
    write(tmp_path, {"program.yaml": SETTINGS})
    (tmp_path / "gone.yaml").symlink_to("releases/old/gone.yaml")
    assert [str(p) for p in check_dir(tmp_path, TODAY)] == [
        "gone.yaml:1:1: cannot read: a symbolic link to releases/old/gone.yaml, which does not exist"]


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


def test_yml_files_are_part_of_the_program_like_yaml_files(tmp_path):
    write(tmp_path, {
        "program.yml": SETTINGS,
        "campaigns/a.yaml": "rules:\n  - {id: first, reward: {points: 1}}\n",
        "campaigns/b.yml": "rules:\n  - {id: second, reward: {points: 2}}\n",
    })
    assert check_dir(tmp_path, TODAY) == []
    program = load_program(tmp_path)
    try:
        assert [name for name, _ in program.files] == ["campaigns/a.yaml", "campaigns/b.yml", "program.yml"]
        assert [rule["id"] for rule in program.rule_summaries] == ["first", "second"]  # path order
    finally:
        program.close()
    (tmp_path / "campaigns" / "b.yml").write_text("rules:\n  - {id: second, rewrad: {points: 2}}\n")
    assert [str(p) for p in check_dir(tmp_path, TODAY)] == [
        "campaigns/b.yml:2:5: missing required key 'reward'",
        "campaigns/b.yml:2:18: unknown key 'rewrad', did you mean 'reward'?",
    ]


def test_other_files_are_reported_as_ignored_and_hidden_ones_are_not(tmp_path):
    write(tmp_path, {
        "program.yaml": SETTINGS,
        "README.md": "# our program\n",
        "campaigns/notes.txt": "ideas: [",
        "campaigns/old.yaml.bak": "rules: [",
        ".#program.yaml": "broken: [",          # an editor's lock file
        ".program.yaml.swp": "broken: [",       # vim's swap file
        "program.yaml~": "broken: [",           # a backup
        "#program.yaml#": "broken: [",          # an emacs auto-save
        ".git/x.yaml": "[",
    })
    assert [str(p) for p in check_dir(tmp_path, TODAY)] == [
        "README.md:1:1: warning: ignored: only .yaml and .yml files are part of the program",
        "campaigns/notes.txt:1:1: warning: ignored: only .yaml and .yml files are part of the program",
        "campaigns/old.yaml.bak:1:1: warning: ignored: only .yaml and .yml files are part of the program",
    ]
    program = load_program(tmp_path, TODAY)
    try:
        assert [name for name, _ in program.files] == ["program.yaml"]
        assert len(program.warnings) == 3
    finally:
        program.close()


def test_a_folder_with_too_many_files_is_refused(tmp_path):
    write(tmp_path, {"program.yaml": SETTINGS})
    for n in range(1001):
        (tmp_path / f"scan-{n:04}.png").write_bytes(b"")
    assert [str(p) for p in check_dir(tmp_path, TODAY)] == [f"{tmp_path}:1:1: more than 1000 files in the folder"]


WARNED = {
    "program.yaml": SETTINGS + """\
stores:
  - {id: S001, tags: [kyiv]}
  - {id: S002, tags: [lviv, mall]}
  - {id: F001, partner: fuelco}
partners:
  - {id: fuelco, name: Fuel Co, funding_share: 1.0}
""",
    "rules.yaml": """\
rules:
  - {id: one-store, when: {store: S0001}, reward: {points: 1}}
  - {id: not-there, when: {store: {ne: [S001, S9]}}, reward: {points: 1}}
  - {id: tagged, when: {store_tags: [kyiv, lvov]}, reward: {points: 1}}
  - {id: platinum, when: {tier: platinum}, reward: {points: 1}}
  - {id: golden, when: {any: [{tier: glod}, {partner: fulco}]}, reward: {points: 1}}
  - {id: generous, reward: {percent: 150}}
  - {id: fair, reward: {percent: 100}}
  - {id: black-friday, period: {from: "2026-11-27", to: "2026-11-27"}, reward: {points: 1}}
  - {id: autumn, period: {from: "2026-09-01", to: "2026-11-23"}, reward: {points: 1}}
""",
}
WARNINGS = [
    "rules.yaml:2:35: warning: unknown store 'S0001', did you mean 'S001'?",
    "rules.yaml:3:47: warning: unknown store 'S9'",
    "rules.yaml:4:44: warning: unknown store tag 'lvov', did you mean 'lviv'?",
    "rules.yaml:5:33: warning: unknown tier 'platinum'",
    "rules.yaml:6:38: warning: unknown tier 'glod', did you mean 'gold'?",
    "rules.yaml:6:55: warning: unknown partner 'fulco', did you mean 'fuelco'?",
    "rules.yaml:7:38: warning: percent 150 is over 100: more points than the amount paid is worth",
    "rules.yaml:10:51: warning: period ended on 2026-11-23, before today (2026-11-24): the rule no longer applies",
]


def test_each_kind_of_warning_at_the_offending_value():
    assert problems_of(WARNED) == WARNINGS


def test_a_program_with_only_warnings_loads_and_carries_them():
    program = load_files(WARNED, TODAY)
    try:
        assert [str(w) for w in program.warnings] == WARNINGS
        assert len(program.rules) == 9
    finally:
        program.close()


def test_warnings_are_listed_with_the_errors_of_a_refused_program():
    files = dict(WARNED, **{"more.yaml": "rules:\n  - {id: typo, reward: {pionts: 1}}\n"})
    found = problems_of(files)
    assert found == ["more.yaml:2:25: unknown key 'pionts', did you mean 'points'?"] + WARNINGS
    with pytest.raises(ProgramError) as refused:
        load_files(files, TODAY)
    assert [str(p) for p in refused.value.problems] == found[:1]
    assert [str(w) for w in refused.value.warnings] == WARNINGS


def test_a_period_is_over_only_after_its_last_local_day():
    rule = '{id: nov, period: {from: "2026-11-01", to: "2026-11-30"}, reward: {points: 1}}'
    files = {"program.yaml": SETTINGS, "rules.yaml": f"rules:\n  - {rule}\n"}
    late_evening_in_kyiv = datetime.fromisoformat("2026-11-30T21:30:00+00:00")   # 23:30 on the 30th
    after_midnight_in_kyiv = datetime.fromisoformat("2026-11-30T22:30:00+00:00")  # 00:30 on the 1st
    assert problems_of(files, late_evening_in_kyiv) == []
    assert problems_of(files, after_midnight_in_kyiv) == [
        "rules.yaml:2:48: warning: period ended on 2026-11-30, before today (2026-12-01): the rule no longer applies"]


def test_without_stores_every_store_named_is_warned_about_and_the_default_tier_is_known():
    rule = "{id: r, when: {store: S001, store_tags: kyiv, tier: base}, reward: {points: 1}}"
    files = {"program.yaml": "program: {id: p, currency: UAH, timezone: Europe/Kyiv}\npoints: {value: 100}\n",
             "rules.yaml": f"rules:\n  - {rule}\n"}
    assert problems_of(files) == [
        "rules.yaml:2:27: warning: unknown store 'S001'",
        "rules.yaml:2:45: warning: unknown store tag 'kyiv'",
    ]


def test_close_is_idempotent():
    program = load_program(MARKET)
    program.close()
    program.close()


# `loyalty rules check` ---------------------------------------------------------

IGNORED = "ignored: only .yaml and .yml files are part of the program"


def test_rules_check_prints_warnings_and_exits_0_when_there_are_only_warnings(tmp_path, capsys):
    write(tmp_path, {**WARNED, "notes.txt": "to do\n"})
    assert main(["rules", "check", str(tmp_path), "--today", "2026-11-24"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"notes.txt:1:1: warning: {IGNORED}", *WARNINGS, f"{tmp_path}: ok, 9 warning(s)"]
    assert out.err == ""


def test_rules_check_with_errors_and_warnings_exits_1_and_counts_both(tmp_path, capsys):
    write(tmp_path, {**WARNED, "more.yml": "rules:\n  - {id: typo, reward: {pionts: 1}}\n"})
    assert main(["rules", "check", str(tmp_path), "--today", "2026-11-24"]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == ["more.yml:2:25: unknown key 'pionts', did you mean 'points'?", *WARNINGS]
    assert out.err == "1 problem(s), 8 warning(s)\n"


def test_rules_check_without_warnings_says_ok(tmp_path, capsys):
    assert main(["rules", "check", str(MARKET), "--today", "2026-11-24"]) == 0
    assert capsys.readouterr().out == f"{MARKET}: ok\n"
    # A month later the November promotion is over: a warning, still exit 0.
    assert main(["rules", "check", str(MARKET), "--today", "2026-12-24"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "campaigns/promos.yaml:6:38: warning: period ended on 2026-11-30, before today (2026-12-24): "
        "the rule no longer applies",
        f"{MARKET}: ok, 1 warning(s)",
    ]


def test_rules_diff_reads_yml_files_too(tmp_path, capsys):
    changed = market_with(tmp_path, {"campaigns/bonus.yml": "rules:\n  - {id: bonus, reward: {points: 3}}\n"})
    receipts = tmp_path / "receipts.jsonl"
    receipts.write_text(json.dumps(receipt("D-1", [line(1, "bakery", 10000)], card="1")) + "\n")
    assert main(["rules", "diff", str(MARKET), str(changed), "--receipts", str(receipts), "--json"]) == 0
    rows = {row["rule"]: row for row in json.loads(capsys.readouterr().out)["rules"]}
    assert (rows["bonus"]["old"], rows["bonus"]["new"]) == (0, 3)


def test_rules_check_refuses_a_today_that_is_not_a_date(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["rules", "check", str(MARKET), "--today", "24.11.2026"])
    assert stopped.value.code == 2
    assert "'24.11.2026' is not a date like 2026-11-24" in capsys.readouterr().err


# The server: what it loads, serves and says --------------------------------------

NOW = "2026-11-24T12:00:05+02:00"
EXTRA = """\
rules:
  - {id: lviv-mall, when: {store_tags: lvov}, reward: {points: 50}}
  - {id: platinum, when: {tier: platinum}, reward: {points: 7}}
"""
EXTRA_WARNINGS = [
    f"NOTES.txt:1:1: warning: {IGNORED}",
    "campaigns/extra.yml:2:40: warning: unknown store tag 'lvov', did you mean 'lviv'?",
    "campaigns/extra.yml:3:33: warning: unknown tier 'platinum'",
]


def market_with(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    return write(program, files)


async def test_a_program_with_warnings_loads_serves_and_says_so(make_api, tmp_path, caplog):
    program = market_with(tmp_path, {"campaigns/extra.yml": EXTRA, "NOTES.txt": "ideas\n"})
    with caplog.at_level(logging.WARNING, logger="loyalty.rules"):
        api = await make_api(now=NOW, program_dir=program)
        status, info = await api.get("/v1/admin/rules")
    assert status == 200
    assert "campaigns/extra.yml" in [f["path"] for f in info["files"]]
    assert {"lviv-mall", "platinum"} <= {r["id"] for r in info["rules"]}
    assert info["last_reload"]["ok"] is True and info["last_reload"]["warnings"] == EXTRA_WARNINGS
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert all(warning in logged for warning in EXTRA_WARNINGS), logged

    assert (await api.post("/v1/members", {"card": "1"}))[0] == 201
    status, res = await api.post("/v1/receipts", receipt("W-1", [line(1, "bakery", 10000)], card="1"),
                                 as_="register")
    assert status == 201 and res["accrued"]["by_rule"] == [{"rule": "base", "points": 2}]
    assert res["rules_version"] == info["version"]


async def test_reloads_report_warnings_judged_by_the_servers_clock(make_api, tmp_path):
    program = market_with(tmp_path, {})
    api = await make_api(now=NOW, program_dir=program)
    assert (await api.get("/v1/admin/rules"))[1]["last_reload"]["warnings"] == []
    write(program, {"campaigns/late.yml": """\
        rules:
          - {id: early-bird, period: {from: "2026-11-01", to: "2026-11-23"}, reward: {percent: 101}}
        """})
    expected = [
        "campaigns/late.yml:2:55: warning: period ended on 2026-11-23, before today (2026-11-24): "
        "the rule no longer applies",
        "campaigns/late.yml:2:88: warning: percent 101 is over 100: more points than the amount paid is worth",
    ]
    status, res = await api.post("/v1/admin/rules/reload")
    assert status == 200 and res["last_reload"]["changed"] is True and res["last_reload"]["warnings"] == expected
    assert (await api.get("/v1/admin/rules"))[1]["last_reload"]["warnings"] == expected

    (program / "campaigns" / "late.yml").write_text("rules: [\n")
    status, err = await api.post("/v1/admin/rules/reload")
    assert status == 422 and err["error"]["code"] == "rules_invalid"
    write(program, {"campaigns/late.yml": "rules:\n  - {id: late, when: {tier: glod}, reward: {pionts: 1}}\n"})
    status, err = await api.post("/v1/admin/rules/reload")
    assert status == 422
    assert [d["path"] for d in err["error"]["details"]] == ["campaigns/late.yml:2:45"]  # errors only
    last = (await api.get("/v1/admin/rules"))[1]["last_reload"]
    assert last["ok"] is False
    assert last["errors"] == ["campaigns/late.yml:2:45: unknown key 'pionts', did you mean 'points'?"]
    assert last["warnings"] == ["campaigns/late.yml:2:29: warning: unknown tier 'glod', did you mean 'gold'?"]


async def test_check_endpoint_answers_warnings_beside_problems(make_api):
    api = await make_api(now=NOW)
    settings = (MARKET / "program.yaml").read_text()
    warned = "rules:\n  - {id: x, when: {store: S01}, period: {from: 2026-11-01, to: 2026-11-20}, reward: {points: 1}}\n"
    status, res = await api.post("/v1/admin/rules/check", {"files": {"program.yaml": settings, "rules.yml": warned}})
    assert status == 200
    assert res == {"ok": True, "problems": [], "warnings": [
        "rules.yml:2:27: warning: unknown store 'S01', did you mean 'S001'?",
        "rules.yml:2:64: warning: period ended on 2026-11-20, before today (2026-11-24): the rule no longer applies",
    ]}
    broken = warned + "  - {id: y, rewrad: {points: 1}}\n"
    status, res = await api.post("/v1/admin/rules/check", {"files": {"program.yaml": settings, "rules.yml": broken}})
    assert status == 200 and res["ok"] is False
    assert res["problems"] == ["rules.yml:3:5: missing required key 'reward'",
                               "rules.yml:3:13: unknown key 'rewrad', did you mean 'reward'?"]
    assert len(res["warnings"]) == 2


async def test_the_watched_folder_reloads_when_a_yml_file_changes(make_api, tmp_path):
    program = market_with(tmp_path, {})
    api = await make_api(now=NOW, program_dir=program, rules={"watch": True, "poll_interval_ms": 50, "settle_ms": 100})
    write(program, {"campaigns/extra.yml": EXTRA})

    async def extra_loaded():
        return "platinum" in {r["id"] for r in (await api.get("/v1/admin/rules"))[1]["rules"]}
    assert await wait_for(extra_loaded)

    write(program, {"NOTES.txt": "ideas\n"})  # not part of the program, but the report changes

    async def notes_reported():
        return (await api.get("/v1/admin/rules"))[1]["last_reload"]["warnings"] == EXTRA_WARNINGS
    assert await wait_for(notes_reported)
    assert (await api.get("/v1/admin/rules"))[1]["last_reload"]["changed"] is False
