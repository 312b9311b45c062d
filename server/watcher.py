"""Reload the program when its files change.

Polls the folder's file list (as the loader lists it), sizes and modification times; a
change is acted on only once the folder has stayed the same for a settle period, so an
editor still writing (or a copy of several files in progress) is not loaded half-way. A
program that does not load is refused whole by ProgramHolder and the previous one keeps
serving. The folder as the server itself wrote it (a deploy, a roll-back) is not a change.
A link that points to nothing is seen by the link itself, so adding one is a change (which
the loader refuses, naming it).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from rules.loader import folder_files

log = logging.getLogger("loyalty.rules")


def signature(directory: Path) -> tuple:
    """The files the loader looks at, program files and ignored ones alike (an ignored file
    added or removed changes the reload's warnings); as bounded as the loader's listing."""
    program, other = folder_files(directory)
    entries = []
    for relative in program + other:
        path = directory / relative
        try:
            st = path.stat()
        except OSError:
            # A link to nothing (or to what cannot be looked at) is listed by the loader, which
            # refuses it: seen here by the link itself. Gone altogether: the next poll sees it.
            try:
                st = path.lstat()
            except OSError:
                continue
            entries.append((relative, "unresolved", st.st_mtime_ns))
            continue
        entries.append((relative, st.st_mtime_ns, st.st_size))
    return tuple(entries)


async def watch(holder, poll_interval_ms: int, settle_ms: int) -> None:
    """Runs until cancelled. A look or a reload that fails unexpectedly is logged and counted
    (reported like a refused reload) and the watching goes on: one bad moment must not end
    the reloads for the life of the server."""
    seen: tuple = ()
    with contextlib.suppress(Exception):     # then the first look reloads: the same program, unchanged
        seen = signature(holder.directory)
    failing = None
    while True:
        await asyncio.sleep(poll_interval_ms / 1000)
        try:
            seen = await _look(holder, seen, settle_ms)
            failing = None
        except Exception as e:  # noqa: BLE001 - anything: the task would end silently
            # A look that keeps failing the same way is said once, not at every poll.
            if repr(e) != failing:
                holder.reload_failed("file change", e)
            failing = repr(e)


async def _look(holder, seen: tuple, settle_ms: int) -> tuple:
    """The folder looked at once; a change that settled is reloaded. Returns what was seen."""
    current = signature(holder.directory)
    if current in (seen, holder.written_signature):
        return current
    while True:      # wait for the writer to finish
        await asyncio.sleep(settle_ms / 1000)
        settled = signature(holder.directory)
        if settled == current:
            break
        current = settled
    if current == holder.written_signature:
        return current   # the server wrote it (a deploy): it serves that program already
    try:
        # Loading compiles the engine ruleset, which must stay on the loop's thread.
        ok, program, problems = holder.reload("file change")
    except Exception as e:  # noqa: BLE001 - this change is not tried again until the folder changes
        holder.reload_failed("file change", e)
        return current
    if ok:
        log.info("rules reloaded after a file change: %s", program.version)
    return current
