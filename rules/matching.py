"""Which rule conditions hold for a receipt: the engine, asked as rarely as possible.

A condition only compares fields with the constants written in the program, so
two facts on the same side of every constant get the same answer. Facts are
reduced to that "class" (which constant interval each number falls in, whether a
name is one the program mentions) and the engine's answer is remembered per
class in a bounded cache.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import msgspec

from .conditions import Node, constants, max_paths, to_engine
from .engine import Engine

DEFAULT_CACHE_ENTRIES = 4096
NUMERIC_FIELDS = frozenset(
    {"total", "items", "receipt_number", "minute", "date", "birthday_days", "enrolled_days"}
)


class Matcher:
    """conditions[i] holds or not; match() answers with the set of i that hold."""

    def __init__(self, conditions: list[Node], cache_entries: int = DEFAULT_CACHE_ENTRIES):
        self.conditions = list(conditions)
        unique: dict[bytes, int] = {}
        self._slot: list[int] = []  # condition index -> engine condition index
        engine_conditions: list[dict] = []
        weights: list[int] = []
        for node in conditions:
            source = to_engine(node)
            key = msgspec.json.encode(source)
            if key not in unique:
                unique[key] = len(engine_conditions)
                engine_conditions.append(source)
                weights.append(max_paths(node))
            self._slot.append(unique[key])
        values: dict[str, set] = {}
        for node in conditions:
            constants(node, values)
        self.fields: tuple[str, ...] = tuple(sorted(values))
        self._classifiers = tuple((field, _classifier(field, values[field])) for field in self.fields)
        self._engine = Engine(engine_conditions, weights) if engine_conditions else None
        self._cache: dict[tuple, frozenset[int]] = {}
        self._cache_entries = cache_entries
        self.engine_calls = 0  # for benchmarks and tests

    def match(self, fact: dict[str, Any]) -> frozenset[int]:
        if self._engine is None:
            return frozenset()
        key = tuple([classify(fact[field]) for field, classify in self._classifiers])
        found = self._cache.get(key)
        if found is None:
            found = self.ask_engine(fact)
            if self._cache_entries:
                if len(self._cache) >= self._cache_entries:
                    self._evict_oldest()
                self._cache[key] = found
        return found

    def _evict_oldest(self) -> None:
        try:
            del self._cache[next(iter(self._cache))]
        except (KeyError, RuntimeError, StopIteration):
            self._cache.clear()  # another thread got there first: starting over is still correct

    def ask_engine(self, fact: dict[str, Any]) -> frozenset[int]:
        assert self._engine is not None
        self.engine_calls += 1
        held = self._engine.match({field: fact[field] for field in self.fields})
        return frozenset(index for index, slot in enumerate(self._slot) if slot in held)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def _classifier(field: str, values: set):
    if field in NUMERIC_FIELDS:
        cuts = sorted(values)

        def numeric(value: int) -> int:
            at = bisect_left(cuts, value)
            return 2 * at + (at < len(cuts) and cuts[at] == value)

        return numeric
    if all(isinstance(value, bool) for value in values):
        return bool
    named = frozenset(values)
    return lambda value: value if value in named else None
