"""Loading a program directory: read, validate everything, compile, or refuse whole.

Every problem found is reported (file:line:column: message), not just the first,
so one reload attempt shows the manager the whole list. Warnings (a name the program
does not define, a percent over 100, a period already over, a file that is not read)
are reported the same way and do not refuse the program: the loaded Program carries them.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .conditions import SEGMENT_WHEN_KEYS, Node, WhenCompiler, fields_required_true, group, period_node
from .decode import decode_section
from .engine import RuleEngineError
from .model import (
    LISTS,
    MAX_COUPON_CAMPAIGNS,
    REQUIRED_SETTINGS,
    REWARD_KINDS,
    SETTINGS,
    CouponSpec,
    LineFilter as LineFilterSpec,
    RuleSpec,
    SegmentSpec,
)
from .problems import Problem, ProgramError, suggest
from .program import CompiledRule, LineFilter, Program, Scope
from .records import CouponCampaign, EventRule, Partner, Store
from .segments import Segment
from .yamlmarks import Document, Path, YamlInt, parse

PROGRAM_SUFFIXES = (".yaml", ".yml")
MAX_FILES = 200
MAX_FOLDER_FILES = 1000  # files looked at under a program folder, read or ignored
MAX_FILE_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 32 * 1024 * 1024
MAX_RULES = 2000
MAX_EVENTS = 500
MAX_DECIMAL_PLACES = 6  # keeps exact denominators small
MAX_PERCENT = Decimal(1000)
MAX_PER_UNIT = Decimal(1_000_000)
MAX_MULTIPLIER = Decimal(100)
MAX_HOLDOUT = Decimal("0.5")  # a control group larger than the treated one measures little
PERCENT_WARNING = Decimal(100)


def load_program(directory: pathlib.Path, now: datetime | date | None = None) -> Program:
    """Load every *.yaml and *.yml under directory (in relative path order) as one program.

    `now` is the checker's clock for warnings about dates: an instant, or a date taken as
    the program's local date (default: the system clock).
    """
    files, ignored, problems = read_directory(pathlib.Path(directory))
    if problems:
        raise ProgramError(problems, ignored)
    return load_files(files, now, ignored)


def check_dir(directory: pathlib.Path, now: datetime | date | None = None) -> list[Problem]:
    """Every error and warning of the program in directory, in position order.

    The program would load when none of them is an error (`problem.warning` is False).
    """
    try:
        program = load_program(directory, now)
    except ProgramError as err:
        return sorted(err.problems + err.warnings)
    program.close()
    return list(program.warnings)


def check_files(files: Mapping[str, bytes | str], now: datetime | date | None = None) -> list[Problem]:
    """Like check_dir for a program held in memory as {relative path: content}."""
    try:
        program = load_files(files, now)
    except ProgramError as err:
        return sorted(err.problems + err.warnings)
    program.close()
    return list(program.warnings)


def is_program_file(name: str) -> bool:
    return name.endswith(PROGRAM_SUFFIXES)


def folder_files(directory: pathlib.Path) -> tuple[list[str], list[str]]:
    """Relative posix paths of (program files, other files) under directory, in path order.

    Hidden files and folders (.git, editor swap and lock files) and editor backups
    (`name~`, `#name#`) are skipped without a word: they are never meant as part of the
    program. Listing stops once more than MAX_FOLDER_FILES have been seen.
    """
    program: list[str] = []
    other: list[str] = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(names):
            if name.startswith((".", "#")) or name.endswith("~"):
                continue
            relative = pathlib.Path(root, name).relative_to(directory).as_posix()
            (program if is_program_file(name) else other).append(relative)
        if len(program) + len(other) > MAX_FOLDER_FILES:
            break
    return sorted(program), sorted(other)


def read_directory(directory: pathlib.Path) -> tuple[dict[str, bytes], list[Problem], list[Problem]]:
    """({relative posix path: bytes} of the program's files, warnings for the files not
    read, problems), within the size limits."""
    if not directory.is_dir():
        return {}, [], [Problem(str(directory), 1, 1, "not a directory")]
    names, others = folder_files(directory)
    if len(names) + len(others) > MAX_FOLDER_FILES:
        return {}, [], [Problem(str(directory), 1, 1, f"more than {MAX_FOLDER_FILES} files in the folder")]
    if len(names) > MAX_FILES:
        return {}, [], [Problem(str(directory), 1, 1, f"more than {MAX_FILES} .yaml and .yml files")]
    ignored = [Problem(name, 1, 1, "ignored: only .yaml and .yml files are part of the program", True)
               for name in others]
    files: dict[str, bytes] = {}
    problems: list[Problem] = []
    for relative in names:
        try:
            data = _read_file(directory / relative)
        except OSError as err:
            problems.append(Problem(relative, 1, 1, _unreadable(directory / relative, err)))
            continue
        if data is None:
            problems.append(Problem(relative, 1, 1, "not a regular file (a named pipe or a device)"))
        elif len(data) > MAX_FILE_BYTES:
            problems.append(Problem(relative, 1, 1, f"file larger than {MAX_FILE_BYTES} bytes"))
        else:
            files[relative] = data
    return files, ignored, problems


def _unreadable(path: pathlib.Path, err: OSError) -> str:
    # "No such file" of a file the listing just found is a link to nothing: say where it points.
    if isinstance(err, FileNotFoundError) and path.is_symlink():
        try:
            return f"cannot read: a symbolic link to {os.readlink(path)}, which does not exist"
        except OSError:
            pass
    return f"cannot read: {err.strerror or err}"


def _read_file(path: pathlib.Path) -> bytes | None:
    """Its bytes, at most one past MAX_FILE_BYTES; None when it is not a regular file. Opened
    without waiting: opening a named pipe waits for a writer, and the server reloads on its
    event loop, so every request would wait with it; a device such as /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return stream.read(MAX_FILE_BYTES + 1)


def load_files(files: Mapping[str, bytes | str], now: datetime | date | None = None,
               warnings: Iterable[Problem] = ()) -> Program:  # fmt: skip
    """Validate and compile a program given as {relative path: content}; ProgramError if it fails.

    `warnings` (about files that were not read) are reported with the program's own.
    """
    contents = {name: (data.encode() if isinstance(data, str) else bytes(data)) for name, data in files.items()}
    builder = _Builder(contents, now or datetime.now(timezone.utc))
    builder.warnings.extend(warnings)
    program = builder.build()
    if builder.problems:
        raise ProgramError(sorted(set(builder.problems)), sorted(set(builder.warnings)))
    assert program is not None
    return program


class _Builder:
    def __init__(self, contents: dict[str, bytes], now: datetime | date):
        self.contents = dict(sorted(contents.items()))
        self.now = now
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []  # reported, but the program loads
        self.docs: list[Document] = []
        self.settings: dict[str, tuple[Document, Path]] = {}
        self.items: dict[str, list[tuple[Document, Path]]] = {name: [] for name in LISTS}
        self.first_file = next(iter(self.contents), "(program)")
        self.events: list[tuple[Document, Path, Any]] = []
        self.unreadable = False
        self.damaged: set[tuple[str, Path]] = set()  # rules and segments that decoded only after dropping keys
        # None: a segment or coupon campaign did not decode, so names cannot be judged.
        self.segment_ids: set[str] | None = set()
        self.coupon_ids: set[str] | None = set()

    def fail(self, doc: Document, path: Path, message: str, key: bool = False) -> None:
        self.problems.append(doc.problem(path, message, key))

    def warn(self, doc: Document, path: Path, message: str) -> None:
        self.warnings.append(doc.problem(path, message, warning=True))

    def build(self) -> Program | None:
        if not self._within_size_limits():
            return None
        for name, raw in self.contents.items():
            doc, problems = parse(name, raw)
            self.problems.extend(problems)
            if doc.data is not None:
                self._collect(doc)
            elif problems:
                self.unreadable = True  # its sections are unknown: don't call them missing
            # else an empty document (or a bare `null`): it adds nothing
        specs = self._settings()
        segments = self._segments(specs)
        coupons = self._coupons(specs)
        events = self.events = self._events()
        rules, conditions, compiler = self._rules(specs)
        if self.problems or any(specs.get(name) is None for name in REQUIRED_SETTINGS):
            return None
        return self._program(specs, rules, conditions, compiler, events, segments, coupons)

    def _within_size_limits(self) -> bool:
        if len(self.contents) > MAX_FILES:
            self.problems.append(Problem(self.first_file, 1, 1, f"more than {MAX_FILES} files"))
        for name, raw in self.contents.items():
            if len(raw) > MAX_FILE_BYTES:
                self.problems.append(Problem(name, 1, 1, f"file larger than {MAX_FILE_BYTES} bytes"))
        if sum(len(raw) for raw in self.contents.values()) > MAX_TOTAL_BYTES:
            self.problems.append(Problem(self.first_file, 1, 1, f"program larger than {MAX_TOTAL_BYTES} bytes"))
        return not self.problems

    def _collect(self, doc: Document) -> None:
        """Note where each setting and each rule/event is written; flag what does not belong."""
        if not isinstance(doc.data, dict):
            self.fail(doc, (), "a program file is a mapping of sections (program, points, rules, ...)")
            return
        known = tuple(SETTINGS) + tuple(LISTS)
        for key, value in doc.data.items():
            if key in SETTINGS:
                if key in self.settings:
                    first = self.settings[key][0]
                    line, column = first.mark((key,), key=True)
                    self.fail(doc, (key,), f"'{key}' is already set in {first.file}:{line}:{column}", key=True)
                else:
                    self.settings[key] = (doc, (key,))
            elif key in LISTS:
                if not isinstance(value, list):
                    self.fail(doc, (key,), f"'{key}' should be a list")
                    continue
                self.items[key].extend((doc, (key, index)) for index in range(len(value)))
            else:
                self.fail(doc, (key,), f"unknown key '{key}'{suggest(key, known)}", key=True)
        self.docs.append(doc)

    # Settings ---------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        """The sections that decoded (a failed or missing one is absent, its problems reported)."""
        specs: dict[str, Any] = {}
        for name, kind in SETTINGS.items():
            if name in self.settings:
                doc, path = self.settings[name]
                specs[name] = decode_section(doc, path, kind, self.problems)
            elif name in REQUIRED_SETTINGS and not self.unreadable:
                self.problems.append(Problem(self.first_file, 1, 1, f"missing required section '{name}'"))
        # Check what did decode even when another section failed: all problems at once.
        if specs.get("program") is not None:
            self._check_program(specs["program"])
        self._check_redemption(specs.get("redemption"))
        self._check_tiers(specs.get("tiers"))
        self._check_partners_and_stores(specs.get("partners") or [], specs.get("stores") or [])
        return specs

    def _at(self, name: str) -> tuple[Document, Path]:
        return self.settings[name]

    def _check_program(self, info: Any) -> None:
        doc, path = self._at("program")
        if not (len(info.currency) == 3 and info.currency.isascii() and info.currency.isupper()):
            self.fail(doc, path + ("currency",), f"currency '{info.currency}' should be a 3-letter code in capitals, e.g. UAH")
        try:
            ZoneInfo(info.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            self.fail(doc, path + ("timezone",), f"unknown timezone '{info.timezone}' (e.g. Europe/Kyiv)")

    def _check_redemption(self, redemption: Any) -> None:
        if redemption is None:
            return
        doc, path = self._at("redemption")
        self._check_decimal(doc, path + ("max_share",), redemption.max_share, Decimal(0), Decimal(1), "max_share")

    def _check_decimal(self, doc: Document, path: Path, value: Decimal, low: Decimal, high: Decimal, name: str,
                       low_inclusive: bool = True) -> bool:  # fmt: skip
        if not value.is_finite():
            self.fail(doc, path, f"'{name}' must be a number")
            return False
        if value < low or (value == low and not low_inclusive) or value > high:
            bound = ">=" if low_inclusive else ">"
            self.fail(doc, path, f"'{name}' must be {bound} {low} and <= {high}, got {value}")
            return False
        if value.as_tuple().exponent < -MAX_DECIMAL_PLACES:  # type: ignore[operator]
            self.fail(doc, path, f"'{name}' has more than {MAX_DECIMAL_PLACES} decimal places")
            return False
        return True

    def _check_tiers(self, tiers: Any) -> None:
        if tiers is None:
            return
        doc, path = self._at("tiers")
        seen: set[str] = set()
        previous = None
        for index, level in enumerate(tiers.levels):
            here = path + ("levels", index)
            if level.id in seen:
                self.fail(doc, here + ("id",), f"duplicate tier '{level.id}'")
            seen.add(level.id)
            if index == 0 and level.from_ != 0:
                self.fail(doc, here + ("from",), "the first tier must start 'from: 0'")
            if previous is not None and level.from_ <= previous:
                self.fail(doc, here + ("from",), f"tiers must ascend: {level.from_} is not above {previous}")
            previous = level.from_

    def _check_partners_and_stores(self, partners: list, stores: list) -> None:
        partner_ids: set[str] = set()
        for index, partner in enumerate(partners):
            doc, path = self._at("partners")
            if partner.id in partner_ids:
                self.fail(doc, path + (index, "id"), f"duplicate partner '{partner.id}'")
            partner_ids.add(partner.id)
            share = path + (index, "funding_share")
            self._check_decimal(doc, share, partner.funding_share, Decimal(0), Decimal(1), "funding_share")
        store_ids: set[str] = set()
        for index, store in enumerate(stores):
            doc, path = self._at("stores")
            if store.id in store_ids:
                self.fail(doc, path + (index, "id"), f"duplicate store '{store.id}'")
            store_ids.add(store.id)
            if store.partner is not None and store.partner not in partner_ids:
                message = f"unknown partner '{store.partner}'{suggest(store.partner, partner_ids)}"
                self.fail(doc, path + (index, "partner"), message + " (add it under 'partners')")

    # Segments and coupon campaigns -------------------------------------------

    def _segments(self, specs: dict[str, Any]) -> list[Segment]:
        spec = specs.get("segments")
        if spec is None:
            return []
        doc, base = self._at("segments")
        compiler = WhenCompiler(self.problems, self.warnings, self._defined(specs), SEGMENT_WHEN_KEYS)
        segments: list[Segment] = []
        seen: dict[str, Path] = {}
        for index in range(len(spec.define)):
            path = base + ("define", index)
            before = len(self.problems)
            item = decode_section(doc, path, SegmentSpec, self.problems)
            if item is None:
                self.segment_ids = None
                continue
            if len(self.problems) > before:
                self.damaged.add((doc.file, path))
            if item.id in seen:
                line, column = doc.mark(seen[item.id] + ("id",))
                first = f"{doc.file}:{line}:{column}"
                self.fail(doc, path + ("id",), f"duplicate segment '{item.id}' (first defined at {first})")
            seen.setdefault(item.id, path)
            if self.segment_ids is not None:
                self.segment_ids.add(str(item.id))
            segment = self._segment(doc, path, item, compiler)
            if segment is not None:
                segments.append(segment)
        return segments

    def _segment(self, doc: Document, path: Path, spec: Any, compiler: WhenCompiler) -> Segment | None:
        kinds = [kind for kind, given in (("rfm", spec.rfm), ("when", spec.when), ("list", spec.list_)) if given]
        damaged = (doc.file, path) in self.damaged  # a key dropped for a problem already reported
        if spec.when == {} and not kinds:
            self.fail(doc, path + ("when",), "'when' is empty: a segment needs at least one condition")
            return None
        if len(kinds) != 1 and not (damaged and not kinds):
            given = f" ({', '.join(kinds)} given)" if kinds else ""
            self.fail(doc, path, f"a segment needs exactly one of: rfm, when, list: true{given}")
            return None
        line = doc.mark(path).line
        if spec.rfm is not None:
            ranges = self._rfm_ranges(doc, path + ("rfm",), spec.rfm, damaged)
            return Segment(str(spec.id), "rfm", rfm=ranges, file=doc.file, line=line)
        if spec.when is not None:
            compiler.member_tags = {}  # each segment reads its own tags
            node = compiler.compile(doc, path + ("when",), _raw(doc, path + ("when",)))
            return Segment(str(spec.id), "when", condition=node, tag_fields=dict(compiler.member_tags),
                           file=doc.file, line=line)  # fmt: skip
        return Segment(str(spec.id), "list", file=doc.file, line=line)

    def _rfm_ranges(self, doc: Document, path: Path, spec: Any, damaged: bool) -> dict[str, tuple[int, int]]:
        ranges = {letter: tuple(getattr(spec, letter)) for letter in "rfm" if getattr(spec, letter)}
        if not ranges and not damaged:
            self.fail(doc, path, "'rfm' needs at least one of r, f, m: [low, high] (scores 1 to 5)")
        for letter, (low, high) in ranges.items():
            if high < low:
                self.fail(doc, path + (letter,), f"'{letter}' ends ({high}) before it starts ({low})")
        return ranges  # type: ignore[return-value]

    def _coupons(self, specs: dict[str, Any]) -> list[CouponCampaign]:
        today = self._today(specs)
        campaigns: list[CouponCampaign] = []
        seen: dict[str, tuple[Document, Path]] = {}
        for position, (doc, path) in enumerate(self.items["coupons"]):
            if position == MAX_COUPON_CAMPAIGNS:
                self.fail(doc, path, f"more than {MAX_COUPON_CAMPAIGNS} coupon campaigns")
                break
            spec = decode_section(doc, path, CouponSpec, self.problems)
            if spec is None:
                self.coupon_ids = None
                continue
            if spec.id in seen:
                first_doc, first_path = seen[spec.id]
                line, column = first_doc.mark(first_path + ("id",))
                first = f"{first_doc.file}:{line}:{column}"
                self.fail(doc, path + ("id",), f"duplicate coupon campaign '{spec.id}' (first defined at {first})")
            seen.setdefault(spec.id, (doc, path))
            if self.coupon_ids is not None:
                self.coupon_ids.add(str(spec.id))
            self._check_valid(doc, path, spec.valid, today)
            campaigns.append(CouponCampaign(str(spec.id), spec.uses_per_code, spec.valid.from_ if spec.valid else None,
                                            spec.valid.to if spec.valid else None))  # fmt: skip
        return campaigns

    def _check_valid(self, doc: Document, path: Path, valid: Any, today: date | None) -> None:
        if valid is None:
            return
        if valid.to < valid.from_:
            self.fail(doc, path + ("valid", "to"), f"'valid' ends ({valid.to}) before it starts ({valid.from_})")
        elif today is not None and valid.to < today:
            message = f"coupon campaign ended on {valid.to}, before today ({today}): its codes no longer apply"
            self.warn(doc, path + ("valid", "to"), message)

    # Events and rules -------------------------------------------------------

    def _events(self) -> list[tuple[Document, Path, Any]]:
        found = []
        for position, (doc, path) in enumerate(self.items["events"]):
            if position == MAX_EVENTS:
                self.fail(doc, path, f"more than {MAX_EVENTS} events")
                break
            spec = decode_section(doc, path, LISTS["events"], self.problems)
            if spec is not None:
                found.append((doc, path, spec))
        return found

    def _rules(self, specs: dict[str, Any]) -> tuple[list[CompiledRule], list[Node], WhenCompiler]:
        compiler = WhenCompiler(self.problems, self.warnings, self._defined(specs))
        decoded = []
        for position, (doc, path) in enumerate(self.items["rules"]):
            if position == MAX_RULES:
                self.fail(doc, path, f"more than {MAX_RULES} rules")
                break
            before = len(self.problems)
            spec = decode_section(doc, path, RuleSpec, self.problems)
            if len(self.problems) > before:
                self.damaged.add((doc.file, path))
            if spec is not None:
                decoded.append((doc, path, spec))
        self._check_ids(decoded)
        groups = _group_kinds(spec for _, _, spec in decoded)
        delay = specs["points"].activation_delay_days if specs.get("points") else 0
        today = self._today(specs)
        rules: list[CompiledRule] = []
        conditions: list[Node] = []
        for doc, path, spec in decoded:
            self._check_rule(doc, path, spec, groups, delay, today)
            node = self._condition(compiler, doc, path, spec)
            if node is not None:
                conditions.append(node)
            condition = len(conditions) - 1 if node is not None else None
            coupons = _named_coupons(node, compiler.coupons) if node is not None else ()
            rules.append(self._compile(doc, path, spec, len(rules), condition, specs, coupons))
        return rules, conditions, compiler

    def _defined(self, specs: dict[str, Any]) -> dict[str, set[str] | None]:
        """What the program defines that a condition may name, by condition field.

        None when its section did not decode (it cannot be judged).
        """
        def ids(section: str, found: Any) -> set[str] | None:
            return None if section in self.settings and specs.get(section) is None else found

        tiers = specs.get("tiers")
        stores = specs.get("stores") or []
        return {
            "tier": ids("tiers", {str(level.id) for level in tiers.levels} if tiers else {"base"}),
            "partner": ids("partners", {str(partner.id) for partner in specs.get("partners") or []}),
            "store": ids("stores", {str(store.id) for store in stores}),
            "store_tags": ids("stores", {str(tag) for store in stores for tag in store.tags}),
            "segment": ids("segments", self.segment_ids),
            "coupon": self.coupon_ids,
        }

    def _today(self, specs: dict[str, Any]) -> date | None:
        """The checker's date in the program's timezone; None when that is not known."""
        if not isinstance(self.now, datetime):
            return self.now
        info = specs.get("program")
        try:
            return self.now.astimezone(ZoneInfo(info.timezone)).date() if info is not None else None
        except (ZoneInfoNotFoundError, ValueError):
            return None

    def _check_ids(self, decoded: list[tuple[Document, Path, Any]]) -> None:
        seen: dict[str, tuple[Document, Path]] = {}
        entries = [(doc, path, spec.id) for doc, path, spec in decoded]
        entries += [(doc, path, spec.id) for doc, path, spec in self.events]
        entries.sort(key=lambda entry: (entry[0].file, entry[0].mark(entry[1])))  # "first" as a reader sees it
        for doc, path, ident in entries:
            if ident in seen:
                first_doc, first_path = seen[ident]
                line, column = first_doc.mark(first_path + ("id",))
                self.fail(doc, path + ("id",), f"duplicate id '{ident}' (first defined at {first_doc.file}:{line}:{column})")
            else:
                seen[ident] = (doc, path)

    def _check_rule(self, doc: Document, path: Path, spec: RuleSpec, groups: dict[str, bool], delay: int,
                    today: date | None) -> None:  # fmt: skip
        self._check_reward(doc, path + ("reward",), spec, groups)
        if spec.holdout is not None:
            self._check_decimal(doc, path + ("holdout",), spec.holdout, Decimal(0), MAX_HOLDOUT, "holdout", False)
        if spec.period is not None and spec.period.to < spec.period.from_:
            self.fail(doc, path + ("period", "to"), f"period ends ({spec.period.to}) before it starts ({spec.period.from_})")
        elif spec.period is not None and today is not None and spec.period.to < today:
            message = f"period ended on {spec.period.to}, before today ({today}): the rule no longer applies"
            self.warn(doc, path + ("period", "to"), message)
        if spec.expires_in_days is not None and spec.expires_in_days <= delay:
            self.fail(
                doc,
                path + ("expires_in_days",),
                f"points that expire after {spec.expires_in_days} days would never become available "
                f"(points.activation_delay_days is {delay})",
            )

    def _check_reward(self, doc: Document, path: Path, spec: RuleSpec, groups: dict[str, bool]) -> None:
        reward = spec.reward
        kinds = [kind for kind in REWARD_KINDS if getattr(reward, kind) is not None]
        if not kinds and (doc.file, path[:-1]) in self.damaged:
            return  # its reward was dropped for a problem already reported: don't pile on
        if len(kinds) != 1:
            given = f" ({', '.join(kinds)} given)" if kinds else ""
            self.fail(doc, path, f"a reward needs exactly one of: {', '.join(REWARD_KINDS)}{given}")
            return
        if reward.percent is not None:
            where = path + ("percent",)
            valid = self._check_decimal(doc, where, reward.percent, Decimal(0), MAX_PERCENT, "percent", False)
            if valid and reward.percent > PERCENT_WARNING:
                self.warn(doc, where, f"percent {reward.percent} is over 100: more points than the amount paid is worth")
        if reward.per_unit is not None:
            self._check_decimal(doc, path + ("per_unit",), reward.per_unit, Decimal(0), MAX_PER_UNIT, "per_unit", False)
        if (reward.by is not None) != (reward.multiply is not None):
            where = path + ("by",) if reward.by is not None else path + ("multiply",)
            self.fail(doc, where, "'multiply: <group>' and 'by: <factor>' go together")
            return
        if reward.multiply is not None:
            self._check_multiply(doc, path, reward, groups)

    def _check_multiply(self, doc: Document, path: Path, reward: Any, groups: dict[str, bool]) -> None:
        self._check_decimal(doc, path + ("by",), reward.by, Decimal(1), MAX_MULTIPLIER, "by", False)
        if reward.multiply not in groups:
            hint = suggest(reward.multiply, groups)
            self.fail(doc, path + ("multiply",), f"no rule has group '{reward.multiply}'{hint}")
        elif groups[reward.multiply]:
            self.fail(doc, path + ("multiply",), f"group '{reward.multiply}' has multiply rules itself; multiply a group of plain rewards")

    def _condition(self, compiler: WhenCompiler, doc: Document, path: Path, spec: RuleSpec) -> Node | None:
        parts: list[Node] = []
        if spec.when:
            node = compiler.compile(doc, path + ("when",), _raw(doc, path + ("when",)))
            if node is None:
                return None
            parts.append(node)
        elif spec.when is not None:
            self.fail(doc, path + ("when",), "'when' is empty: leave it out for a rule that always applies")
        if spec.period is not None:
            parts.append(period_node(spec.period.from_, spec.period.to))
        return group("and", parts) if parts else None

    def _compile(self, doc: Document, path: Path, spec: RuleSpec, index: int, condition: int | None,
                 specs: dict[str, Any], coupons: tuple[str, ...]) -> CompiledRule:  # fmt: skip
        reward = spec.reward
        kind = next((kind for kind in REWARD_KINDS if getattr(reward, kind) is not None), "points")
        value = specs["points"].value if specs.get("points") else 1
        ratio_num, ratio_den = 1, 1
        if kind == "percent" and reward.percent is not None and reward.percent.is_finite():
            ratio_num, ratio_den = reward.percent.as_integer_ratio()
            ratio_den *= 100 * value  # points = paid * percent / 100 / value
        elif kind == "per_unit" and reward.per_unit is not None and reward.per_unit.is_finite():
            ratio_num, ratio_den = reward.per_unit.as_integer_ratio()
        elif kind == "multiply" and reward.by is not None and reward.by.is_finite():
            ratio_num, ratio_den = reward.by.as_integer_ratio()
        scope = spec.scope
        limit = spec.limit.per_member if spec.limit else None
        return CompiledRule(
            index=index,
            id=str(spec.id),
            group=str(spec.group) if spec.group else None,
            priority=spec.priority,
            condition=condition,
            period=(spec.period.from_, spec.period.to) if spec.period else None,
            scope=_scope(scope),
            kind=kind,
            ratio_num=ratio_num,
            ratio_den=ratio_den,
            points=reward.points if kind == "points" else (reward.per_amount.points if reward.per_amount else None),
            every=reward.per_amount.every if reward.per_amount else None,
            multiply=str(reward.multiply) if reward.multiply else None,
            limit_count=limit.count if limit else None,
            limit_per=limit.per if limit else None,
            budget=spec.budget.points if spec.budget else None,
            expires_in_days=spec.expires_in_days,
            personal=spec.personal,
            holdout=spec.holdout,
            coupons=coupons,
            file=doc.file,
            line=doc.mark(path).line,
            summary=_summary(doc, path, spec, kind),
            when=_raw(doc, path + ("when",)) if spec.when else None,  # as written, for explain()
        )

    # The program ------------------------------------------------------------

    def _program(self, specs: dict[str, Any], rules: list[CompiledRule], conditions: list[Node],
                 compiler: WhenCompiler, events: list[tuple[Document, Path, Any]], segments: list[Segment],
                 coupons: list[CouponCampaign]) -> Program | None:  # fmt: skip
        try:
            return Program(
                settings=_settings(specs),
                rules=rules,
                conditions=conditions,
                member_tag_fields=dict(compiler.member_tags),
                store_tag_fields=dict(compiler.store_tags),
                segment_fields=dict(compiler.segments),
                coupon_fields=dict(compiler.coupons),
                segments=segments,
                coupons=coupons,
                events=[_event(spec) for _, _, spec in events],
                files=[(name, hashlib.sha256(raw).hexdigest()) for name, raw in self.contents.items()],
                version=_version(self.contents),
                warnings=sorted(set(self.warnings)),
            )
        except RuleEngineError as err:
            self.problems.append(Problem(self.first_file, 1, 1, str(err)))
            return None


def _group_kinds(specs: Any) -> dict[str, bool]:
    """group -> whether any of its rules is a multiply rule."""
    groups: dict[str, bool] = {}
    for spec in specs:
        if spec.group is not None:
            groups[spec.group] = groups.get(spec.group, False) or spec.reward.multiply is not None
    return groups


def _named_coupons(node: Node, fields: dict[str, str]) -> tuple[str, ...]:
    """The coupon campaigns a condition can need, in the order it names them (negated ones
    never need a code)."""
    campaign_of = {field: campaign for campaign, field in fields.items()}
    named = (campaign_of[field] for field in fields_required_true(node) if field in campaign_of)
    return tuple(dict.fromkeys(named))


def _raw(doc: Document, path: Path) -> Any:
    data = doc.data
    for step in path:
        data = data[step]
    return data


def _plain(value: Any) -> Any:
    """YAML data as JSON-friendly values, numbers with a fraction kept as their text."""
    if isinstance(value, YamlInt):
        return int(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _summary(doc: Document, path: Path, spec: RuleSpec, kind: str) -> dict[str, Any]:
    raw = _raw(doc, path)
    line, column = doc.mark(path)
    summary = {
        "id": str(spec.id),
        "group": str(spec.group) if spec.group is not None else None,
        "priority": spec.priority,
        "file": doc.file,
        "line": line,
        "reward_kind": kind,
    }
    for key in ("reward", "when", "period", "scope", "limit", "budget", "expires_in_days", "personal", "holdout"):
        if key in raw:
            summary[key] = _plain(raw[key])
    return summary


def _scope(scope: Any) -> Scope:
    if scope is None:
        return Scope()
    exclude = LineFilter(scope.exclude_categories, scope.exclude_skus, scope.exclude_brands, scope.exclude_flags)
    return Scope(scope.categories, scope.skus, scope.brands, exclude)


def _filter(spec: LineFilterSpec | None) -> LineFilter:
    if spec is None:
        return LineFilter()
    return LineFilter(spec.categories, spec.skus, spec.brands, spec.flags)


def _settings(specs: dict[str, Any]) -> dict[str, Any]:
    info, points = specs["program"], specs["points"]
    redemption, holds, tiers = specs.get("redemption"), specs.get("holds"), specs.get("tiers")
    partners = {
        str(p.id): Partner(str(p.id), p.name or str(p.id), p.funding_share) for p in specs.get("partners") or []
    }
    stores = {
        str(s.id): Store(str(s.id), tuple(str(tag) for tag in s.tags), str(s.partner) if s.partner else None)
        for s in specs.get("stores") or []
    }
    return {
        "id": str(info.id),
        "name": info.name or str(info.id),
        "currency": info.currency,
        "timezone": info.timezone,
        "point_value": points.value,
        "rounding": points.rounding,
        "activation_delay_days": points.activation_delay_days,
        "expiry_days": points.expiry_days,
        "hold_ttl_minutes": holds.ttl_minutes if holds else 15,
        "returns_cross_store": specs["returns"].cross_store if specs.get("returns") else False,
        "min_points": redemption.min_points if redemption else 0,
        "max_share": redemption.max_share if redemption else Decimal(1),
        "redemption_exclusions": _filter(redemption.exclude if redemption else None),
        "exclusions": _filter(specs.get("exclusions")),
        "tier_metric": tiers.metric if tiers else "spend",
        "tier_window_days": tiers.window_days if tiers else 365,
        "tiers": [(str(level.id), level.from_) for level in tiers.levels] if tiers else [("base", 0)],
        "segment_window_days": specs["segments"].rfm.window_days if specs.get("segments") else 365,
        "stores": stores,
        "partners": partners,
    }


def _event(spec: Any) -> EventRule:
    return EventRule(str(spec.id), spec.on, spec.reward.points, spec.expires_in_days)


def _version(contents: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name, raw in sorted(contents.items()):
        encoded = name.encode()
        # Length prefixes keep (path, content) boundaries unambiguous.
        digest.update(len(encoded).to_bytes(8, "big") + encoded + len(raw).to_bytes(8, "big") + raw)
    return "sha256:" + digest.hexdigest()
