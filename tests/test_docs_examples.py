"""Every example in docs/ is what the project really accepts (or refuses, when it says so).

Each ```yaml block in docs/ (rules.md, managers.md, integrators.md, operators.md) carries a
marker on the line before it, an HTML comment the rendered page does not show:

    <!-- example: program -->             a whole program, one file
    <!-- example: fragment [PATH] -->     one more file (default campaigns/example.yaml) of
                                          a small base program; a setting the fragment
                                          writes replaces the base's
    <!-- example: invalid [PATH] -->      a fragment that `loyalty rules check` refuses:
                                          the ```text block right after it lists exactly
                                          the problems it prints
    <!-- example: warns [PATH] -->        a fragment that loads with warnings: the ```text
                                          block right after it lists exactly the warnings
    <!-- example: config -->              part of config.yaml, decoded like start-up does
    <!-- example: prometheus -->          a Prometheus configuration (`promtool check config
                                          --syntax-only` when promtool is installed)

A yaml block without a marker fails the test, so a new example is always checked. The
checks go through rules.check_dir, the function `loyalty rules check` calls, on a folder
written to tmp_path, as of DOCS_NOW (the pages' examples are dated around it). A program
or fragment example must load without a warning.

In docs/integrators.md each ```json block is marked `<!-- request: TYPE -->` (decoded
with server/schema.py's TYPE, as the server decodes that body) or `<!-- answer -->`
(must be JSON).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import yaml

from rules import check_dir
from rules.model import SETTINGS
from server import schema
from server.config import load_config

pytestmark = pytest.mark.no_database

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOCS_NOW = datetime.fromisoformat("2026-11-24T12:00:00+02:00")
PAGES = ("rules.md", "managers.md", "integrators.md", "operators.md")

# The base a fragment is added to, one section per file so a fragment can replace any of
# them. Like the shipped market program: stores, a partner, three tiers, a `base` group.
BASE = {
    "program.yaml": "program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}\n",
    "points.yaml": "points: {value: 100, rounding: floor, activation_delay_days: 14, expiry_days: 365}\n",
    "tiers.yaml": (
        "tiers:\n  metric: spend\n  window_days: 365\n  levels:\n"
        "    - {id: base, from: 0}\n    - {id: silver, from: 500000}\n    - {id: gold, from: 2000000}\n"
    ),
    "stores.yaml": "stores:\n  - {id: S001, tags: [kyiv]}\n  - {id: S002, tags: [lviv, mall]}\n  - {id: F001, partner: fuelco}\n",
    "partners.yaml": "partners:\n  - {id: fuelco, name: Fuel Co, funding_share: 1.0}\n",
    "everyday.yaml": "rules:\n  - {id: everyday, group: base, reward: {percent: 2}}\n",
}

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*(example|request|answer)\b:?\s*([^>]*?)\s*-->\s*$")


class Block(msgspec.Struct):
    doc: str
    line: int           # of the opening fence, 1-based
    lang: str
    text: str
    marker: tuple[str, str] | None      # (kind, argument) of the comment just above
    following: Block | None = msgspec.field(default=None)   # the next fenced block, for `invalid`

    def __str__(self) -> str:
        return f"docs/{self.doc}:{self.line}"


def blocks(name: str) -> list[Block]:
    return parse_blocks(name, (DOCS / name).read_text(encoding="utf-8"))


def parse_blocks(name: str, text: str) -> list[Block]:
    """The fenced blocks of a page, each with the marker on the nearest non-blank line above."""
    lines = text.splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence or not fence.group(1):
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"docs/{name}:{index + 1}: a fenced block that never closes"
        above = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(above.strip())
        found.append(Block(name, index + 1, fence.group(1), "\n".join(lines[index + 1:end]) + "\n",
                           (marker.group(1), marker.group(2)) if marker else None))
        index = end + 1
    for block, after in zip(found, found[1:]):
        block.following = after
    return found


def yaml_blocks() -> list[Block]:
    return [block for name in PAGES for block in blocks(name) if block.lang in ("yaml", "yml")]


def write_program(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def fragment_program(root: Path, block: Block, argument: str) -> Path:
    """The base program with the block as one more file; settings it writes replace the base's."""
    data = yaml.safe_load(block.text) if block.text.strip() else None
    assert isinstance(data, dict), f"{block}: a fragment is a mapping of program sections"
    replaced = set(data) & set(SETTINGS)    # rules and events are lists: they add up
    files = {name: text for name, text in BASE.items() if replaced.isdisjoint(yaml.safe_load(text))}
    files[argument or "campaigns/example.yaml"] = block.text
    return write_program(root, files)


def problems(folder: Path) -> list[str]:
    return [str(problem) for problem in check_dir(folder, DOCS_NOW)]


def test_the_pages_exist_and_have_examples():
    for name in PAGES:
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
    kinds = {block.marker[1].split()[0] if block.marker[1] else block.marker[0]
             for block in yaml_blocks() if block.marker}
    assert {"program", "fragment", "invalid", "warns", "config"} <= kinds


def test_the_base_program_loads(tmp_path):
    assert problems(write_program(tmp_path, BASE)) == []


def check_yaml(block: Block, tmp_path: Path) -> None:
    """Fails (AssertionError, or the config's own error) unless the block is what its marker says."""
    assert block.marker is not None and block.marker[0] == "example", (
        f"{block}: a ```yaml block needs a marker on the line above it: <!-- example: program -->, "
        "<!-- example: fragment -->, <!-- example: invalid -->, <!-- example: warns --> or "
        "<!-- example: config --> "
        "(tests/test_docs_examples.py)")
    kind, _, argument = block.marker[1].partition(" ")
    argument = argument.strip()
    if kind == "program":
        found = problems(write_program(tmp_path, {argument or "program.yaml": block.text}))
        assert found == [], f"{block}: the program does not load: {found}"
    elif kind == "fragment":
        found = problems(fragment_program(tmp_path, block, argument))
        assert found == [], f"{block}: the fragment does not load: {found}"
    elif kind in ("invalid", "warns"):
        expected = block.following
        assert expected is not None and expected.lang == "text", (
            f"{block}: an {kind} example is followed by a ```text block with what the checker prints")
        found = problems(fragment_program(tmp_path, block, argument))
        refused = any(": warning: " not in line for line in found)
        if kind == "invalid":
            assert refused, f"{block}: the example is meant to be refused but it loads"
        else:
            assert found and not refused, f"{block}: the example is meant to load with warnings: {found}"
        assert found == expected.text.splitlines(), f"{block}: the checker says {found}"
    elif kind == "config":
        path = tmp_path / "config.yaml"
        path.write_text(block.text, encoding="utf-8")
        load_config(path, environ={})
    elif kind == "prometheus":
        assert "scrape_configs" in yaml.safe_load(block.text), f"{block}: no scrape_configs"
        if shutil.which("promtool"):
            path = tmp_path / "prometheus.yml"
            path.write_text(block.text, encoding="utf-8")
            checked = subprocess.run(["promtool", "check", "config", "--syntax-only", str(path)],
                                     capture_output=True, text=True, timeout=60)
            assert checked.returncode == 0, f"{block}: {checked.stdout}{checked.stderr}"
    else:
        raise AssertionError(f"{block}: unknown example kind '{kind}'")


@pytest.mark.parametrize("block", yaml_blocks(), ids=str)
def test_yaml_example(block: Block, tmp_path: Path):
    check_yaml(block, tmp_path)


SAMPLE_PAGE = """\
A rule without its marker:

```yaml
rules:
  - {id: extra, reward: {points: 5}}
```

<!-- example: invalid -->
```yaml
rules:
  - {id: extra, reward: {points: 5}}
```

```text
nothing
```

<!-- example: fragment -->
```yaml
rules:
  - {id: extra, reward: {percnt: 5}}
```

<!-- example: warns -->
```yaml
rules:
  - {id: extra, reward: {points: 5}}
```

```text
nothing
```
"""


@pytest.mark.parametrize("position, complaint", [
    (0, "needs a marker"),
    (1, "meant to be refused but it loads"),
    (3, "does not load"),
    (4, "meant to load with warnings"),
])
def test_a_wrong_example_fails(position: int, complaint: str, tmp_path: Path):
    sample = tmp_path / "page.md"
    sample.write_text(SAMPLE_PAGE, encoding="utf-8")
    block = parse_blocks("page.md", SAMPLE_PAGE)[position]
    with pytest.raises(AssertionError, match=complaint):
        check_yaml(block, tmp_path / "program")


REQUEST_TYPES = {name: getattr(schema, name) for name in (
    "Receipt", "ReturnRequest", "Enrollment", "MemberPatch", "Adjustment", "TierAssignment", "RulesCheck",
    "PhoneSearch", "CardReplacement", "MemberMerge", "Erasure")}


def json_blocks() -> list[Block]:
    return [block for block in blocks("integrators.md") if block.lang == "json"]


@pytest.mark.parametrize("block", json_blocks(), ids=str)
def test_json_example(block: Block):
    assert block.marker is not None and block.marker[0] in ("request", "answer"), (
        f"{block}: a ```json block needs <!-- request: TYPE --> or <!-- answer --> on the line above it")
    if block.marker[0] == "answer":
        json.loads(block.text)
        return
    kind = REQUEST_TYPES.get(block.marker[1])
    assert kind is not None, f"{block}: unknown request type '{block.marker[1]}' (one of {sorted(REQUEST_TYPES)})"
    schema.decode(block.text.encode(), kind)


def test_integrators_page_shows_requests_of_every_kind_a_register_sends():
    shown = {block.marker[1] for block in json_blocks() if block.marker and block.marker[0] == "request"}
    assert {"Receipt", "ReturnRequest", "Enrollment"} <= shown
