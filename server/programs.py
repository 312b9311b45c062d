"""The loaded rules program and its reloads.

A request takes `holder.current` once and uses that object to the end, so a reload in
the middle of a receipt never mixes two versions. A program that fails to load is
refused whole and the previous one keeps serving. Warnings (values that load but are
probably wrong, members holding a manual tier the program no longer defines) never
refuse a program; each load logs them and `last_reload` lists them. Each problem and
warning is a log record of its own, `file:line:column: [warning: ]message`, so a log
reader that keeps lines apart (journald, a collector) keeps each one whole and leveled.

The holder only keeps the program in memory. What is recorded in the database, and the
start on a recorded program when the folder is broken, is server/program_versions.py:
it sets `on_folder_load`, called with every program this holder loads from the folder.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from collections.abc import Iterable
from typing import Awaitable, Callable

from rules import Problem, Program, ProgramError, load_files
from rules.loader import read_directory
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
        # Awaited, never run on the loop's thread: on PostgreSQL it goes over the network.
        self._census: Callable[[list[str], str], Awaitable[dict[str, int]]] | None = None
        self._counting: set[asyncio.Task] = set()
        # (program, its files, the key that asked or None): a program loaded from the folder.
        self.on_folder_load: Callable[[Program, dict[str, bytes], str | None], None] | None = None
        # The folder as the server itself last wrote it (a deploy): the watcher does not
        # read that back as a change of its own.
        self.written_signature: tuple | None = None

    def count_lost_tiers(self, census: Callable[[list[str], str], Awaitable[dict[str, int]]]) -> None:
        """From now on every load counts the members holding a manual tier the program does
        not define, into its last_reload once counted (lost_tiers_counted()); the current
        program is counted at once. Called on the event loop."""
        self._census = census
        if self.current is not None:
            self._warn_lost_tiers(self.current)

    def load_folder(self) -> tuple[Program, dict[str, bytes]]:
        """The folder's program and its files, or ProgramError; nothing is installed."""
        files, ignored, problems = read_directory(self.directory)
        if problems:
            raise ProgramError(problems, ignored)
        return self.compile(files, ignored), files

    def compile(self, files: dict[str, bytes], ignored: Iterable[Problem] = ()) -> Program:
        # The server's clock judges "a period already over", as it judges receipts.
        return load_files(files, self._clock.now(), ignored)

    def reload(self, trigger: str, who: str | None = None) -> tuple[bool, Program | None, list]:
        """Load the folder now; `who` is the key that asked, if one did."""
        with self._lock:
            try:
                program, files = self.load_folder()
            except ProgramError as e:
                self._refused(trigger, e)
                return False, None, e.problems
            if self.current is not None and program.version == self.current.version:
                # Same files, but the warnings may differ (a period just ended, a file ignored).
                self.unchanged(trigger, program.warnings)
                program.close()
                return True, self.current, []
            self.install(program, trigger)
            if self.on_folder_load is not None:
                self.on_folder_load(program, files, who)
            return True, program, []

    def serve_recorded(self, program: Program, folder: ProgramError, loaded_at: str) -> None:
        """At start-up, a folder that does not load: serve the newest recorded program instead,
        and say so everywhere a refused reload is seen (log, metric, last_reload)."""
        self.current = program
        self._metrics.rules_info.info({"version": program.version, "program": program.id})
        self._refused("startup", folder, f"the database (the program recorded on {loaded_at})")
        log.warning("STARTED ON A RECORDED PROGRAM: the program folder %s does not load, so the server serves "
                    "%s, the newest program recorded in the database (loaded %s). Fix the folder; the next "
                    "change to it is loaded as usual.", self.directory, program.version, loaded_at)

    def _refused(self, trigger: str, error: ProgramError, served_from: str | None = None) -> None:
        problems = [str(p) for p in error.problems]
        kept = self.current.version if self.current else None
        self.last_reload = {"at": self._clock.now().isoformat(), "ok": False, "trigger": trigger,
                            "errors": problems, "warnings": [str(w) for w in error.warnings],
                            "kept_version": kept}
        if served_from:
            self.last_reload["served_from"] = served_from
        self._metrics.rules_reloads.labels("refused").inc()
        self._metrics.rules_last_reload_ok.set(0)
        log.error("rules reload (%s) refused, still serving %s: %d problem(s), %d warning(s):", trigger,
                  kept or "nothing", len(error.problems), len(error.warnings))
        for problem in sorted(error.problems + error.warnings):
            log.log(logging.WARNING if problem.warning else logging.ERROR, "%s", problem)

    def reload_failed(self, trigger: str, error: Exception) -> None:
        """A reload that raised instead of loading or refusing (a bug, a fault of the machine):
        said everywhere a refused one is, with the reason, in one log line."""
        reason = " ".join(f"{type(error).__name__}: {error}".split()).removesuffix(":")
        kept = self.current.version if self.current else None
        self.last_reload = {"at": self._clock.now().isoformat(), "ok": False, "trigger": trigger,
                            "errors": [f"the reload failed: {reason}"], "warnings": [], "kept_version": kept}
        self._metrics.rules_reloads.labels("failed").inc()
        self._metrics.rules_last_reload_ok.set(0)
        log.error("rules reload (%s) failed, still serving %s: %s", trigger, kept or "nothing", reason)

    def install(self, program: Program, trigger: str, source: str | None = None) -> None:
        """Serve `program` from now on; `source` says where it came from when not the folder."""
        # The old program is freed by the garbage collector once the last request that
        # took it has finished (Program frees its engine ruleset when collected).
        previous, self.current = self.current, program
        self._metrics.rules_info.info({"version": program.version, "program": program.id})
        self._record_ok(trigger, program, changed=True,
                        warnings=[*program.warnings, *replacement_warnings(previous, program)])
        log.info("rules %s loaded from %s (%s)", program.version, source or self.directory, trigger)

    def unchanged(self, trigger: str, warnings: list[Problem]) -> None:
        """A load that found the program serving already (a deploy of the same files)."""
        self._record_ok(trigger, self.current, changed=False, warnings=warnings)

    async def lost_tiers_counted(self) -> None:
        """Until the loads so far have their lost tiers in their last_reload (a reload's answer)."""
        if self._counting:
            await asyncio.gather(*self._counting, return_exceptions=True)

    def _warn_lost_tiers(self, program: Program) -> None:
        if self._census is None:
            return
        today = self._clock.now().astimezone(program.timezone).date().isoformat()
        counted = self._census([level for level, _ in program.tiers], today)
        # What the count's answer names, taken now: the program may be closed by then.
        about = (program.id, program.version, program.tier_metric)
        task = asyncio.ensure_future(self._note_lost_tiers(counted, about, self.last_reload))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    async def _note_lost_tiers(self, counted: Awaitable[dict[str, int]], about: tuple[str, str, str],
                               record: dict) -> None:
        """Into `record`, the last_reload of the load that installed the program: a later
        load's has counts of its own."""
        program_id, version, metric = about
        try:
            lost = await counted
        except Exception:  # noqa: BLE001 - the program is loaded either way; only the count is missing
            log.exception("could not count the members holding tiers program %s does not define", program_id)
            return
        warnings = [f"{members} member(s) hold manual tier {tier!r}, which program {program_id} does not define: "
                    f"they get the tier their {metric} reaches meanwhile"
                    for tier, members in sorted(lost.items())]
        record["lost_tiers"] = lost
        record.setdefault("warnings", []).extend(warnings)
        for warning in warnings:
            log.warning("rules %s: %s", version, warning)

    def _record_ok(self, trigger: str, program: Program, changed: bool, warnings: list[Problem | str]) -> None:
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


def replacement_warnings(previous: Program | None, program: Program) -> list[str]:
    """Warnings about what the program changes in the one it replaces that no check of its
    files can see. Another id or currency is most likely the wrong folder deployed: a new id
    draws every control group anew (they are drawn from it), a new currency reads every
    amount already stored in another money. A rule that keeps its id but gets another holdout
    share moves members between its groups, so its campaign effect would compare groups
    some of whose receipts were served under the other share. None refuses the program."""
    if previous is None:
        return []
    changes = []
    if program.id != previous.id:
        changes.append(f"program id is now {program.id!r}, was {previous.id!r}: every holdout's control group "
                       "is drawn anew; if this is not the program meant, roll back")
    if program.currency != previous.currency:
        changes.append(f"currency is now {program.currency}, was {previous.currency}: amounts already stored "
                       f"(receipts, returns, tier spend) were in {previous.currency}; if this is not the program "
                       "meant, roll back")
    if program.id == previous.id:   # another id redraws every group: said above
        rules_before = {rule.id for rule in previous.rules}
        for rule_id, share in program.holdout_rules.items():
            before = previous.holdout_rules.get(rule_id)
            if rule_id in rules_before and before != share:
                changes.append(f"rule {rule_id}: holdout is now {share}, was {before or 'none'}: members move "
                               "between its groups, so its campaign effect over receipts served before compares "
                               "groups they were not in; to measure a new share, give the rule a new id")
    return changes
