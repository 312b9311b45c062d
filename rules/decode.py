"""Strict decoding of YAML sections into msgspec types, with every problem located.

msgspec stops at the first error, but a manager fixing a file wants all of them.
So after each error the offending key is dropped and the section decoded again,
a bounded number of times; msgspec's error path (`$.reward.percent`) is mapped
back to the YAML marks of that key or value.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import msgspec.inspect as mi

from .model import decode_hook
from .problems import Problem, suggest
from .yamlmarks import Document, Path

MAX_ERRORS_PER_SECTION = 25

_ERROR_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_PATH_RE = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_TYPE_WORDS = {
    "int": "an integer",
    "str": "text",
    "object": "a mapping",
    "array": "a list",
    "decimal": "a number",
    "float": "a number",
    "bool": "true or false",
    "date": "a date (YYYY-MM-DD)",
    "null": "empty",
}


def decode_section(doc: Document, base: Path, kind: Any, problems: list[Problem]) -> Any | None:
    """Decode doc's data at base as kind; None (with problems added) when it does not fit.

    Offending keys are deleted from doc.data as they are reported: a document with
    problems is never used for anything else.
    """
    data = _get(doc.data, base)
    dropped: dict[Path, str] = {}
    for _ in range(MAX_ERRORS_PER_SECTION):
        try:
            return msgspec.convert(data, kind, dec_hook=decode_hook)
        except msgspec.ValidationError as err:
            message, path = _split(str(err))
        if not _report_and_repair(doc, base, kind, data, message, path, problems, dropped):
            return None
    return None


def _report_and_repair(
    doc: Document,
    base: Path,
    kind: Any,
    data: Any,
    message: str,
    path: Path,
    problems: list[Problem],
    dropped: dict[Path, str],
) -> bool:
    """Add the problem; drop the offending key so the next attempt finds the next one."""
    unknown = re.match(r"Object contains unknown field `(.*)`$", message)
    if unknown:
        key = unknown.group(1)
        valid = _valid_keys(kind, path)
        problems.append(doc.problem(base + path + (key,), f"unknown key '{key}'{suggest(key, valid)}", key=True))
        return _drop(data, path + (key,), dropped)
    missing = re.match(r"Object missing required field `(.*)`$", message)
    if missing:
        key = missing.group(1)
        if dropped.get(path) != key:  # else we removed it ourselves after reporting its value
            problems.append(doc.problem(base + path, f"missing required key '{key}'"))
        return _drop(data, path, dropped)  # the enclosing mapping cannot decode: skip it
    problems.append(doc.problem(base + path, _friendly(message, kind, path, base + path)))
    return _drop(data, path, dropped)


def _friendly(message: str, kind: Any, path: Path, full_path: Path) -> str:
    where = _where(full_path)
    enum = re.match(r"Invalid enum value '(.*)'$", message)
    if enum:
        choices = _choices(kind, path)
        listed = f" (one of: {', '.join(choices)})" if choices and not suggest(enum.group(1), choices) else ""
        return f"unknown value '{enum.group(1)}' for {where}{suggest(enum.group(1), choices)}{listed}"
    typed = re.match(r"Expected `([^`]*)`, got `([^`]*)`$", message)
    if typed:
        return f"{where} should be {_words(typed.group(1))}, not {_words(typed.group(2))}"
    ranged = re.match(r"Expected `([^`]*)` (.*)$", message)
    if ranged:
        return f"{where} must be {ranged.group(2)}"
    if message.startswith("Invalid RFC3339 encoded date"):
        return f"{where} must be a date written YYYY-MM-DD"
    return f"{where}: {message}"


def _words(types: str) -> str:
    parts = [t.strip() for t in types.split("|") if t.strip() != "null"] or ["null"]
    return " or ".join(_TYPE_WORDS.get(t, t) for t in parts)


def _where(path: Path) -> str:
    if not path:
        return "this section"
    last = path[-1]
    if isinstance(last, int):
        owner = next((p for p in reversed(path) if isinstance(p, str)), None)
        return f"item {last + 1} of '{owner}'" if owner else f"item {last + 1}"
    return f"'{last}'"


def _split(text: str) -> tuple[str, Path]:
    match = _ERROR_RE.match(text)
    assert match is not None
    path: list[str | int] = []
    for key, index in _PATH_RE.findall(match.group("path") or ""):
        path.append(int(index) if index else key)
    return match.group("msg"), tuple(path)


def _get(data: Any, path: Path) -> Any:
    for step in path:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _drop(data: Any, path: Path, dropped: dict[Path, str]) -> bool:
    """Remove the nearest mapping key on path; False when there is none to remove."""
    for end in range(len(path), 0, -1):
        key = path[end - 1]
        if isinstance(key, str):
            parent = _get(data, path[: end - 1])
            if not isinstance(parent, dict) or key not in parent:
                return False
            del parent[key]
            dropped[path[: end - 1]] = key
            return True
    return False


def _info(kind: Any, path: Path) -> Any:
    info = mi.type_info(kind)
    for step in path:
        info = _unwrap(info)
        if isinstance(info, mi.StructType):
            field = next((f for f in info.fields if f.encode_name == step), None)
            if field is None:
                return None
            info = field.type
        elif isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType)):
            info = info.item_type
        elif isinstance(info, mi.DictType):
            info = info.value_type
        else:
            return None
    return _unwrap(info)


def _unwrap(info: Any) -> Any:
    while True:
        if isinstance(info, mi.Metadata):
            info = info.type
        elif isinstance(info, mi.UnionType):
            useful = [t for t in info.types if not isinstance(t, mi.NoneType)]
            info = useful[0] if len(useful) == 1 else info
            if info is not useful[0]:
                return info
        else:
            return info


def _valid_keys(kind: Any, path: Path) -> list[str]:
    info = _info(kind, path)
    return [f.encode_name for f in info.fields] if isinstance(info, mi.StructType) else []


def _choices(kind: Any, path: Path) -> list[str]:
    info = _info(kind, path)
    return sorted(str(v) for v in info.values) if isinstance(info, mi.LiteralType) else []
