"""The loaded rules program and its reloads.

A request takes `holder.current` once and uses that object to the end, so a reload in
the middle of a receipt never mixes two versions. A program that fails to load is
refused whole and the previous one keeps serving. Warnings (values that load but are
probably wrong, members holding a manual tier the program no longer defines) never
refuse a program; each load logs them and `last_reload` lists them. Each problem and
warning is a log record of its own, `file:line:column: [warning: ]message`, so a log
reader that keeps lines apart (journald, a collector) keeps each one whole and leveled.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from rules import Problem, Program, ProgramError, load_program
from server.metrics import Metrics

log = logging.getLogger("loyalty.rules")


class ProgramHolder:
    def __init__(self, directory: Path, metrics: Metrics, clock):
        self.directory = directory
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self.current: Program | None = None
        self.last_reload: dict = {}
        # (tier levels, local date) -> {lost tier: members}; set once the database is open.
        self._census: Callable[[list[str], str], dict[str, int]] | None = None

    def count_lost_tiers(self, census: Callable[[list[str], str], dict[str, int]]) -> None:
        """From now on every load counts the members holding a manual tier the program does
        not define; the current program is counted at once."""
        self._census = census
        if self.current is not None:
            self._warn_lost_tiers(self.current)

    def load_initial(self) -> Program:
        """At start-up a broken program stops the server: there is nothing older to keep."""
        program = self._load()
        self._install(program, "startup")
        return program

    def _load(self) -> Program:
        # The server's clock judges "a period already over", as it judges receipts.
        return load_program(self.directory, self._clock.now())

    def reload(self, trigger: str) -> tuple[bool, Program | None, list]:
        with self._lock:
            try:
                program = self._load()
            except ProgramError as e:
                self._refused(trigger, e)
                return False, None, e.problems
            if self.current is not None and program.version == self.current.version:
                # Same files, but the warnings may differ (a period just ended, a file ignored).
                self._record_ok(trigger, self.current, changed=False, warnings=program.warnings)
                program.close()
                return True, self.current, []
            self._install(program, trigger)
            return True, program, []

    def _refused(self, trigger: str, error: ProgramError) -> None:
        problems = [str(p) for p in error.problems]
        kept = self.current.version if self.current else None
        self.last_reload = {"at": self._clock.now().isoformat(), "ok": False, "trigger": trigger,
                            "errors": problems, "warnings": [str(w) for w in error.warnings],
                            "kept_version": kept}
        self._metrics.rules_reloads.labels("refused").inc()
        self._metrics.rules_last_reload_ok.set(0)
        log.error("rules reload (%s) refused, still serving %s: %d problem(s), %d warning(s):", trigger,
                  kept or "nothing", len(error.problems), len(error.warnings))
        for problem in sorted(error.problems + error.warnings):
            log.log(logging.WARNING if problem.warning else logging.ERROR, "%s", problem)

    def _install(self, program: Program, trigger: str) -> None:
        # The old program is freed by the garbage collector once the last request that
        # took it has finished (Program frees its engine ruleset when collected).
        self.current = program
        self._metrics.rules_info.info({"version": program.version, "program": program.id})
        log.info("rules %s loaded from %s (%s)", program.version, self.directory, trigger)
        self._record_ok(trigger, program, changed=True, warnings=program.warnings)

    def _warn_lost_tiers(self, program: Program) -> None:
        if self._census is None:
            return
        today = self._clock.now().astimezone(program.timezone).date().isoformat()
        try:
            lost = self._census([level for level, _ in program.tiers], today)
        except Exception:  # noqa: BLE001 - the program is loaded either way; only the count is missing
            log.exception("could not count the members holding tiers program %s does not define", program.id)
            return
        warnings = [f"{members} member(s) hold manual tier {tier!r}, which program {program.id} does not define: "
                    f"they get the tier their {program.tier_metric} reaches meanwhile"
                    for tier, members in sorted(lost.items())]
        self.last_reload["lost_tiers"] = lost
        self.last_reload.setdefault("warnings", []).extend(warnings)
        for warning in warnings:
            log.warning("rules %s: %s", program.version, warning)

    def _record_ok(self, trigger: str, program: Program, changed: bool, warnings: list[Problem]) -> None:
        self.last_reload = {"at": self._clock.now().isoformat(), "ok": True, "trigger": trigger,
                            "version": program.version, "changed": changed, "errors": [],
                            "warnings": [str(w) for w in warnings]}
        self._metrics.rules_reloads.labels("loaded" if changed else "unchanged").inc()
        self._metrics.rules_last_reload_ok.set(1)
        if warnings:
            log.warning("rules %s (%s): %d warning(s):", program.version, trigger, len(warnings))
            for warning in warnings:
                log.warning("%s", warning)
        self._warn_lost_tiers(program)

