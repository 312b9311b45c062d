"""The only module that talks to the durable-rules C engine.

We drive `durable_rules_engine` directly, not `durable.engine.Host`: Host starts
timer threads that call into the engine concurrently with the request path. Here
every call happens on the caller's thread, serialized by one lock, and nothing
here starts threads.

Measured behaviour this module is built around (durable-rules 2.0.28):
- a fact that matches a rule fires it once per matching `$or` branch: names are
  collected into a set;
- a fact reaching more than 64 matches in one ruleset makes assert fail (code 303),
  more than 512 rules in a ruleset hang its creation, and identical first
  comparisons shared by many rules overflow a 128-entry list (code 107). So
  conditions are deduplicated and spread over several small rulesets, each
  bounded in rules and in how many matches one fact can make;
- identical facts are deduplicated by the engine: each fact carries a counter;
- retracting the fact after reading the actions keeps the engine's state empty;
- `delete_ruleset` frees a ruleset but not the session state the first assert
  creates in it (about 90 KB stay behind per ruleset that had matched a fact), and
  `delete_state`, which would free it, frees fields it never initialized and crashes
  the process now and then. So a closed program's rulesets are not deleted: they go
  back to a pool by their source text, empty (every fact is retracted), and the next
  program with the same conditions (a reload, a check, a backtest of an edit that left
  most chunks alone) takes them instead of creating new ones. The pool is bounded;
  what it drops is deleted and leaves its session state behind, so memory stays flat
  while programs repeat and grows by at most that much per dropped ruleset when
  more than POOLED_RULESETS_MAX distinct chunks cycle.
"""

from __future__ import annotations

import collections
import itertools
import threading

import durable_rules_engine as _engine
import msgspec

MAX_RULES_PER_RULESET = 48
MAX_MATCHES_PER_RULESET = 48  # the engine fails above 64 per fact
MAX_RULESETS = 200
POOLED_RULESETS_MAX = 1024  # about 90 KB each once they matched a fact
_FACT_COUNTER_FIELD = "rcpt"
_names = itertools.count()
# Facts are deduplicated by the engine: one counter for every engine, since pooled
# rulesets pass from one engine to the next.
_fact_counter = itertools.count(1)
_pool_lock = threading.Lock()
_pool: collections.OrderedDict[str, list[int]] = collections.OrderedDict()  # source -> free handles
_pooled = 0
_encode = msgspec.json.Encoder().encode  # one canonical encoding for rules and facts


class RuleEngineError(Exception):
    """The rule engine refused a ruleset or failed while matching a fact."""


class Engine:
    """Conditions compiled into durable-rules rulesets; match() says which hold for a fact.

    conditions[i] is the engine JSON of condition i; weights[i] bounds how many
    times it can fire for one fact (its `$or` alternatives that can hold at once).
    """

    def __init__(self, conditions: list[dict], weights: list[int]):
        self._lock = threading.Lock()
        self._chunks = _chunk(weights)
        if len(self._chunks) > MAX_RULESETS:
            raise RuleEngineError(f"too many conditions: {len(self._chunks)} rulesets, at most {MAX_RULESETS}")
        self._sources = [_ruleset_json(conditions, chunk) for chunk in self._chunks]
        self._handles: list[int | None] = []
        self._closed = False
        try:
            for source in self._sources:
                self._handles.append(_take(source))
        except RuleEngineError:
            self.close()
            raise

    def match(self, fact: dict) -> set[int]:
        """Indexes of the conditions that hold for fact (every field they read must be present)."""
        fired: set[int] = set()
        with self._lock:
            if self._closed:
                raise RuleEngineError("the rule engine has been closed")
            fact[_FACT_COUNTER_FIELD] = next(_fact_counter)
            text = _encode(fact).decode()
            for position, handle in enumerate(self._handles):
                try:
                    _fire(handle, text, fired)  # type: ignore[arg-type]
                except RuleEngineError:
                    self._rebuild(position)
                    raise
        return fired

    def close(self) -> None:
        """Give the rulesets back to the pool; safe to call more than once."""
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, [None] * len(self._handles)
        for source, handle in zip(self._sources, handles):
            if handle is not None:
                _give_back(source, handle)

    def _rebuild(self, position: int) -> None:
        # A failed call may leave a half-matched fact behind; a fresh ruleset is clean.
        old = self._handles[position]
        self._handles[position] = None
        if old is not None:
            _delete(old)
        self._handles[position] = _create(self._sources[position])


def _chunk(weights: list[int]) -> list[list[int]]:
    chunks: list[list[int]] = []
    current: list[int] = []
    load = 0
    for index, weight in enumerate(weights):
        if weight > MAX_MATCHES_PER_RULESET:
            raise RuleEngineError(f"condition {index} can fire {weight} times for one fact")
        if current and (len(current) >= MAX_RULES_PER_RULESET or load + weight > MAX_MATCHES_PER_RULESET):
            chunks.append(current)
            current, load = [], 0
        current.append(index)
        load += weight
    if current:
        chunks.append(current)
    return chunks


def _ruleset_json(conditions: list[dict], chunk: list[int]) -> str:
    return _encode({f"c{index}": {"all": [{"m": conditions[index]}]} for index in chunk}).decode()


def _create(source: str) -> int:
    try:
        return _engine.create_ruleset(f"loyalty{next(_names)}", source)
    except _engine.error as err:
        raise RuleEngineError(f"the rule engine refused the conditions: {err}") from err


def _take(source: str) -> int:
    """A free ruleset compiled from source, from the pool or new."""
    global _pooled
    with _pool_lock:
        free = _pool.get(source)
        if free:
            _pooled -= 1
            handle = free.pop()
            if not free:
                del _pool[source]
            return handle
    return _create(source)


def _give_back(source: str, handle: int) -> None:
    global _pooled
    dropped: list[int] = []
    with _pool_lock:
        _pool.setdefault(source, []).append(handle)
        _pool.move_to_end(source)
        _pooled += 1
        while _pooled > POOLED_RULESETS_MAX:
            oldest, free = next(iter(_pool.items()))
            dropped.append(free.pop(0))
            _pooled -= 1
            if not free:
                del _pool[oldest]
    for old in dropped:
        _delete(old)


def _delete(handle: int) -> None:
    try:
        _engine.delete_ruleset(handle)
    except _engine.error:
        pass  # nothing more can be done for a ruleset that will not go away


def _fire(handle: int, fact: str, fired: set[int]) -> None:
    try:
        code, state = _engine.assert_fact(handle, fact)
    except _engine.error as err:
        raise RuleEngineError(f"the rule engine failed to match a receipt: {err}") from err
    try:
        if code == 0:
            _collect(handle, state, fired)
        elif code not in (1, 2):  # 1: no rule matched, 2: observed without a complete match
            raise RuleEngineError(f"unexpected rule engine result {code}")
    finally:
        try:
            _engine.retract_fact(handle, fact)
        except _engine.error as err:
            raise RuleEngineError(f"the rule engine failed to forget a receipt: {err}") from err


def _collect(handle: int, state: int, fired: set[int]) -> None:
    try:
        result = _engine.start_action_for_state(handle, state)
        actions = result[1] if result else None
        while actions:
            for name in _decode_names(actions):
                fired.add(int(name[1:]))
            actions = _engine.complete_and_start_action(handle, state)
    except _engine.error as err:
        raise RuleEngineError(f"the rule engine failed while reporting matches: {err}") from err


def _decode_names(actions: str) -> list[str]:
    # The engine writes {"<rule name>":{...}}; our names never need escaping.
    if actions.startswith('{"'):
        end = actions.find('"', 2)
        if end > 2:
            return [actions[2:end]]
    return list(msgspec.json.decode(actions.encode()))
