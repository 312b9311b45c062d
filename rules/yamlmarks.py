"""YAML to plain data that remembers where every key and value was written.

Problems must point at the offending key or value, so the file is composed into
nodes (which carry marks) and converted by hand instead of through yaml.safe_load.

Scalars are resolved with a small, predictable schema rather than YAML 1.1's:
`on`, `yes` and `no` stay words (an event key is literally `on`), `10:30` is not a
base-60 number, dates stay text, and numbers with a fraction become Decimal built
from the written text so `0.5` is exactly one half.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

import yaml

from .problems import Problem

Path = tuple[str | int, ...]

MAX_NODES_PER_FILE = 200_000  # aliases can make a small file expand enormously
MAX_DEPTH = 40

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"

_NULL_RE = re.compile(r"~|null|Null|NULL|")
_BOOL_RE = re.compile(r"true|True|TRUE|false|False|FALSE")
_INT_RE = re.compile(r"[-+]?[0-9][0-9_]*")
_FLOAT_RE = re.compile(r"[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+")


class Mark(NamedTuple):
    line: int  # 1-based
    column: int  # 1-based


class YamlInt(int):
    """An integer scalar that keeps its text: `skus: [0042]` names the SKU '0042', not 42."""

    text: str


def _plain_tag(value: str) -> str:
    if _NULL_RE.fullmatch(value):
        return _NULL
    if _BOOL_RE.fullmatch(value):
        return _BOOL
    if _INT_RE.fullmatch(value):
        return _INT
    if _FLOAT_RE.fullmatch(value) and any(c.isdigit() for c in value):
        return _FLOAT
    if value == "<<":
        return _MERGE
    return _STR


_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    def resolve(self, kind, value, implicit):  # noqa: ANN001, ANN201 - PyYAML's signature
        if kind is yaml.ScalarNode:
            return _plain_tag(value) if implicit[0] else _STR
        return super().resolve(kind, value, implicit)


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


class Document:
    """One file's data with the marks of its keys and values, addressed by path."""

    def __init__(self, file: str):
        self.file = file
        self.data: Any = None
        self.keys: dict[Path, Mark] = {}
        self.values: dict[Path, Mark] = {}

    def mark(self, path: Path, key: bool = False) -> Mark:
        """The mark of the key (or value) at path, else of the nearest enclosing one."""
        table = self.keys if key else self.values
        for end in range(len(path), -1, -1):
            found = table.get(path[:end]) or self.values.get(path[:end])
            if found:
                return found
        return Mark(1, 1)

    def problem(self, path: Path, message: str, key: bool = False, warning: bool = False) -> Problem:
        line, column = self.mark(path, key)
        return Problem(self.file, line, column, message, warning)


class _Converter:
    def __init__(self, doc: Document, problems: list[Problem]):
        self.doc = doc
        self.problems = problems
        self.nodes_left = MAX_NODES_PER_FILE

    def fail(self, node: yaml.Node, message: str) -> None:
        line, column = _mark(node)
        self.problems.append(Problem(self.doc.file, line, column, message))

    def convert(self, node: yaml.Node, path: Path, depth: int) -> Any:
        self.nodes_left -= 1
        if self.nodes_left < 0:
            raise _TooBig
        if depth > MAX_DEPTH:
            self.fail(node, f"nested more than {MAX_DEPTH} levels deep")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return self.sequence(node, path, depth)
        return self.mapping(node, path, depth)

    def scalar(self, node: yaml.ScalarNode) -> Any:
        text, tag = node.value, node.tag
        try:
            if tag == _STR:
                return text
            if tag == _INT:
                number = YamlInt(int(text))
                number.text = text
                return number
            if tag == _FLOAT:
                return Decimal(text.replace("_", ""))
            if tag == _BOOL:
                return text.lower() in ("true", "yes", "on")
            if tag == _NULL:
                return None
        except (ValueError, InvalidOperation):
            self.fail(node, f"'{text}' is not a valid {tag.rsplit(':', 1)[-1]}")
            return None
        if tag == _MERGE:
            self.fail(node, "'<<' can only be used as a key")
            return None
        self.fail(node, f"unsupported tag '{tag}'")
        return None

    def sequence(self, node: yaml.SequenceNode, path: Path, depth: int) -> list:
        out = []
        for index, item in enumerate(node.value):
            here = path + (index,)
            self.doc.values[here] = _mark(item)
            out.append(self.convert(item, here, depth + 1))
        return out

    def mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> dict:
        out: dict[str, Any] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, "a key must be a plain word, not a list or a mapping")
                continue
            key = key_node.value
            if key in out:
                self.fail(key_node, f"duplicate key '{key}'")
                continue
            self.put(out, key, key_node, value_node, path, depth)
        for source in merges:
            self.merge(out, source, path, depth)
        return out

    def put(self, out: dict, key: str, key_node: yaml.Node, value_node: yaml.Node, path: Path, depth: int) -> None:
        here = path + (key,)
        self.doc.keys[here] = _mark(key_node)
        self.doc.values[here] = _mark(value_node)
        out[key] = self.convert(value_node, here, depth + 1)

    def merge(self, out: dict, source: yaml.Node, path: Path, depth: int) -> None:
        # Keys written next to '<<' win over the merged ones, as YAML defines it.
        sources = source.value if isinstance(source, yaml.SequenceNode) else [source]
        for mapping in sources:
            if not isinstance(mapping, yaml.MappingNode):
                self.fail(mapping, "'<<' merges a mapping (or a list of mappings)")
                continue
            for key_node, value_node in mapping.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value not in out:
                    self.put(out, key_node.value, key_node, value_node, path, depth)


class _TooBig(Exception):
    pass


def parse(file: str, raw: bytes) -> tuple[Document, list[Problem]]:
    """Parse one file; on problems the document may be partial (data None when unusable)."""
    doc = Document(file)
    problems: list[Problem] = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        return doc, [Problem(file, line, column, "not valid UTF-8 text")]
    try:
        deep = _too_deep(text)
        if deep is not None:
            return doc, [Problem(file, deep.line, deep.column, f"nested more than {MAX_DEPTH} levels deep")]
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        return doc, [_syntax_problem(file, err)]
    except yaml.YAMLError as err:
        return doc, [Problem(file, 1, 1, f"YAML error: {err}")]
    except RecursionError:
        return doc, [Problem(file, 1, 1, "YAML nested too deeply")]
    if root is None:
        doc.data = {}
        return doc, problems
    doc.values[()] = _mark(root)
    try:
        doc.data = _Converter(doc, problems).convert(root, (), 0)
    except _TooBig:
        return doc, [Problem(file, 1, 1, f"file expands to more than {MAX_NODES_PER_FILE} values (aliases?)")]
    return doc, problems


def _too_deep(text: str) -> Mark | None:
    """Where a collection first nests deeper than the converter accepts, found in the parser's
    events before composing: libyaml's composer recurses in C once per level, so some tens of
    thousands of levels overflow the stack and kill the process (no RecursionError to catch),
    while its parser keeps its own stack on the heap. A file this finds is one the converter
    would refuse with the same words."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, _OPENS):
            depth += 1
            if depth > MAX_DEPTH + 1:       # the root collection is the converter's depth 0
                return Mark(event.start_mark.line + 1, event.start_mark.column + 1)
        elif isinstance(event, _CLOSES):
            depth -= 1
    return None


_OPENS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSES = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _syntax_problem(file: str, err: yaml.MarkedYAMLError) -> Problem:
    mark = err.problem_mark or err.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    what = " ".join(part for part in (err.context, err.problem) if part)
    return Problem(file, line, column, f"YAML syntax error: {what}")
