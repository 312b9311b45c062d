"""Program versions in the database: what every server on it serves, deploys and roll-backs.

Every program that goes live is recorded (storage/program_versions.py): loaded from the
folder (at start, by the watcher, SIGHUP or a reload), deployed through the API or the
console, or rolled back to. The newest record is the program; each server polls for it
(every `rules.poll_interval_ms`, one indexed read) and loads a newer one that another
server recorded, so all the servers on one database converge on it.

A deploy or a roll-back also writes the program's files into `rules.dir`, each through a
hidden temporary file renamed over the old one, so the folder holds the program that
serves: the watcher reads back the same version (and does not flip to the old one), and a
restart loads it. A folder that does not load at start-up is not fatal while a version is
recorded: the server starts on the newest one and says so (ProgramHolder.serve_recorded).

deploy(), rollback(), list_versions() and version_files() are the operations the HTTP
routes and the console share. Their refusals are domain errors (ProgramError, UnknownVersion,
FolderUnwritable); the HTTP layer maps them to answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from rules import Program, ProgramError
from rules.loader import folder_files, read_directory
from server.keys import DATABASE, PROGRAMS, VERSIONS
from server.programs import ProgramHolder
from server.watcher import signature
from storage import program_versions as store
from storage.db import Database, StorageError
from storage.ledger import iso

log = logging.getLogger("loyalty.rules")

LIST_LIMIT_MAX = 100
LOAD_ID_MAX = 2**63 - 1     # SQLite's largest integer: a larger `before` cannot even be asked
# last_reload's trigger of a deploy, by where it came from.
DEPLOY_TRIGGERS = {"api": "deploy", "console": "console"}
# How long closing waits for records of programs loaded a moment before.
CLOSE_WAIT_SECONDS = 10


class UnknownVersion(Exception):
    """No program with this version is recorded."""

    def __init__(self, version: str):
        super().__init__(f"no program version {version} is recorded")
        self.version = version


class ProgramChanged(Exception):
    """Another program went live since the caller read the one it changed; nothing changed."""

    def __init__(self, expected: str, serving: str):
        super().__init__(f"the program serving is {serving}, no longer {expected}, which this change was made to")
        self.expected, self.serving = expected, serving


class FolderUnwritable(Exception):
    """The program's files could not be written into rules.dir; nothing changed."""


class FolderClash(FolderUnwritable):
    """A file of the program where rules.dir has a folder, or inside what it has as a file:
    no retry can write it, so it is the caller's to resolve; nothing changed."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} {reason}")
        self.name, self.reason = name, reason


class ProgramVersions:
    """One server's side of the recorded programs: records what it loads, follows what others record."""

    def __init__(self, holder: ProgramHolder, db: Database, clock,
                 name_of: Callable[[str | None], str | None] = lambda key_id: None):
        self.holder, self.db, self.clock = holder, db, clock
        # Who holds a key (KeyRing.name_of): each load is recorded with the person's name as it is now.
        self.name_of = name_of
        # Installing a program and recording it are one step for the poller: it must never
        # see a program installed here but not yet recorded, and take it for an old one.
        self._lock = asyncio.Lock()
        self._seen_load = 0          # the newest load row this server has acted on
        self._pending: set[asyncio.Task] = set()
        holder.on_folder_load = self._folder_loaded

    # ------------------------------------------------------------ start-up

    async def start(self, folder: tuple[Program, dict[str, bytes]] | ProgramError) -> None:
        """Serve the folder's program and record it; a folder that does not load, the newest
        recorded program; neither, the folder's ProgramError (nothing to serve)."""
        if isinstance(folder, ProgramError):
            await self._start_recorded(folder)
            return
        program, files = folder
        self.holder.install(program, "startup")
        try:
            await self._record(program, files, "directory", None, None)
        except (StorageError, sqlite3.Error):
            # It serves either way, like a reload that could not be recorded; a record that is
            # already there must not replace it at the first poll.
            log.exception("could not record program %s in the database", program.version)
            with contextlib.suppress(StorageError, sqlite3.Error):
                newest = await self.db.read(store.newest_load)
                self._seen_load = newest[0] if newest else 0

    async def _start_recorded(self, folder: ProgramError) -> None:
        def newest(conn: sqlite3.Connection) -> tuple[dict, dict[str, str]] | None:
            last = store.loads(conn, 1)
            return (last[0], store.files(conn, last[0]["version"])) if last else None

        found = await self.db.read(newest)
        if found is None:
            raise folder
        load, files = found
        try:
            program = self.holder.compile(_encoded(files))
        except ProgramError as recorded:
            log.error("the newest recorded program %s does not load either:\n  %s", load["version"],
                      "\n  ".join(str(p) for p in recorded.problems))
            raise folder from None
        self.holder.serve_recorded(program, folder, load["loaded_at"])
        self._seen_load = load["id"]

    # ------------------------------------------------------------ loads from the folder

    def _folder_loaded(self, program: Program, files: dict[str, bytes], who: str | None) -> None:
        """Called by the holder on the loop's thread; recorded in the background."""
        task = asyncio.get_running_loop().create_task(self._record_if_current(program, files, who))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record_if_current(self, program: Program, files: dict[str, bytes], who: str | None) -> None:
        async with self._lock:
            if self.holder.current is not program:
                return      # replaced meanwhile (a deploy, a newer record): that one is recorded
            try:
                await self._record(program, files, "directory", who, None, locked=True)
            except Exception:  # noqa: BLE001 - it serves either way; the next poll may replace it
                log.exception("could not record program %s in the database", program.version)

    async def settled(self) -> None:
        """Returns once every program loaded so far is recorded (or failed to be)."""
        while self._pending:
            await asyncio.wait(set(self._pending))

    async def _record(self, program: Program, files: Mapping[str, bytes], source: store.Source,
                      who: str | None, reason: str | None, locked: bool = False) -> int:
        at = iso(self.clock.now())
        text = {name: bytes(raw).decode("utf-8") for name, raw in files.items()}

        name = self.name_of(who)

        def write(conn: sqlite3.Connection) -> int:
            return store.record(conn, version=program.version, program_id=program.id, files=text, at=at,
                                source=source, deployed_by=who, deployed_by_name=name, reason=reason)

        async with contextlib.nullcontext() if locked else self._lock:
            load_id = await self.db.write(write)
            self._seen_load = max(self._seen_load, load_id)
        return load_id

    # ------------------------------------------------------------ following the database

    async def follow(self, poll_interval_ms: int) -> None:
        """Poll for a program another server recorded; runs until cancelled."""
        failing = False
        while True:
            await asyncio.sleep(poll_interval_ms / 1000)
            try:
                await self.catch_up()
            except Exception:  # noqa: BLE001 - a storage fault is logged where it happens; try again
                # Once per fault: a traceback every poll (each second) while it lasts buries the
                # storage's own lines that say what to do.
                if not failing:
                    log.exception("could not look for a newer recorded program; still serving the one in force")
                failing = True
            else:
                if failing:
                    log.info("looking for newer recorded programs again")
                failing = False

    async def catch_up(self) -> bool:
        """Load the newest recorded program if another server recorded it; True if one was installed."""
        async with self._lock:
            newest = await self.db.lookup(store.newest_load)
            if newest is None or newest[0] <= self._seen_load:
                return False
            load_id, version = newest
            if self.holder.current is not None and version == self.holder.current.version:
                self._seen_load = load_id
                return False
            files = _encoded(await self.db.lookup(lambda conn: store.files(conn, version)))
            try:
                program = self.holder.compile(files)
            except ProgramError as e:
                log.error("program %s recorded in the database does not load here; still serving %s:\n  %s",
                          version, self.holder.current.version, "\n  ".join(str(p) for p in e.problems))
                self._seen_load = load_id
                return False
            await self._write_folder_if_other(files)
            # Read before installing: nothing may run between the install and its note, or a
            # request could see the new program with a last reload that does not say who deployed it.
            recorded = await self.db.lookup(lambda conn: store.loads(conn, 1, load_id + 1))
            before = self.holder.current
            self.holder.install(program, "database", "the database")
            self._seen_load = load_id
            self._note_recorded(recorded, before)
            return True

    def _note_recorded(self, rows: list[dict], before: Program | None) -> None:
        """A deploy or roll-back recorded by another server: this one's last reload tells it too."""
        if rows and rows[0]["source"] != "directory":
            row = rows[0]
            self.holder.last_reload["recorded"] = {
                "load_id": row["id"], "source": row["source"], "by": row["deployed_by"],
                "by_name": row["deployed_by_name"], "reason": row["reason"],
                "previous_version": before.version if before else None}

    async def _write_folder_if_other(self, files: dict[str, bytes]) -> None:
        """So a restart of this server loads what it serves; a folder it cannot write is logged."""
        on_disk, _, problems = await asyncio.to_thread(read_directory, self.holder.directory)
        if not problems and on_disk == files:
            return
        try:
            await write_folder(self.holder, files)
        except FolderUnwritable as e:
            log.error("%s; a restart of this server would load the folder as it is", e)

    # ------------------------------------------------------------ deploy and roll back

    async def put_live(self, files: dict[str, bytes], source: store.Source, who: str, reason: str,
                       trigger: str, base_version: str | None = None) -> dict:
        """Validate, record, serve and write into the folder. ProgramError, or FolderUnwritable
        while staging the files, leave everything as it was; once recorded, a folder that cannot
        be written is logged and said in the answer (`folder_error`): the program serves anyway.
        base_version: the program these files were edited from; ProgramChanged if another serves."""
        async with self._lock:
            serving = self.holder.current.version if self.holder.current else None
            if base_version is not None and serving != base_version:
                raise ProgramChanged(base_version, serving)
            program = self.holder.compile(files)
            before = self.holder.current
            try:
                staged = await _stage(self.holder.directory, files)
                try:
                    load_id = await self._record(program, files, source, who, reason, locked=True)
                except BaseException:
                    _discard(staged)
                    raise
            except BaseException:
                program.close()
                raise
            # Recorded: from here on it is the program, whatever happens to the folder.
            changed = before is None or before.version != program.version
            if changed:
                self.holder.install(program, trigger, "the recorded files" if source == "rollback" else "the request")
            else:
                self.holder.unchanged(trigger, program.warnings)
                program.close()
            # What the last-reload panels and answers say: this deploy, not just "a load".
            self.holder.last_reload["recorded"] = {
                "load_id": load_id, "source": source, "by": who, "by_name": self.name_of(who), "reason": reason,
                "previous_version": before.version if before else None}
            answer = {"version": self.holder.current.version, "changed": changed, "load_id": load_id,
                      "last_reload": self.holder.last_reload}
            try:
                _swap(self.holder, staged, files)
            except FolderUnwritable as e:   # staged beside the targets, so renaming hardly ever fails
                log.error("%s; a restart would load the folder as it is", e)
                answer["folder_error"] = str(e)
        log.info("program %s put live by %s (%s): %s", program.version, who, source, reason)
        return answer

    async def close(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.settled(), CLOSE_WAIT_SECONDS)


# ---------------------------------------------------------------- the operations

async def deploy(app: web.Application, files: Mapping[str, str], who: str, reason: str,
                 source: store.Source = "api", base_version: str | None = None) -> dict:
    """Put a program given as {relative path: text} live; `who` is the key id, `reason` why,
    `source` where from ("api", "console"). ProgramError (every problem), FolderUnwritable,
    ProgramChanged (base_version: the program the files were edited from no longer serves)."""
    encoded = {name: text.encode("utf-8") for name, text in files.items()}
    return await app[VERSIONS].put_live(encoded, source, who, reason, f"{DEPLOY_TRIGGERS[source]}:{who}",
                                        base_version)


async def rollback(app: web.Application, version: str, who: str, reason: str) -> dict:
    """Put a recorded version live again (recorded with source "rollback", whether asked
    through the API or the console). UnknownVersion, ProgramError, FolderUnwritable."""
    files = await app[DATABASE].read(lambda conn: store.files(conn, version))
    if files is None:
        raise UnknownVersion(version)
    return await app[VERSIONS].put_live(_encoded(files), "rollback", who, reason, f"rollback:{who}")


def list_versions(conn: sqlite3.Connection, limit: int = 20, before: int | None = None) -> list[dict]:
    """Newest first, each time a version went live: id, version, program, loaded_at, source,
    deployed_by (the key id), deployed_by_name (its holder), reason. `before`: only loads with
    a smaller id (the next page)."""
    return store.loads(conn, max(1, min(limit, LIST_LIMIT_MAX)), before)


async def live_files(app: web.Application) -> dict[str, bytes]:
    """The files of the program serving now, as recorded; the folder's when it was never
    recorded (recording at start-up failed), ProgramError when those do not load either."""
    holder = app[PROGRAMS]
    version = holder.current.version
    files = await app[DATABASE].read(lambda conn: store.files(conn, version))
    if files is not None:
        return _encoded(files)
    return holder.load_folder()[1]


def version_files(conn: sqlite3.Connection, version: str) -> dict:
    """{"version", "program", "recorded_at", "files": {path: text}}; UnknownVersion."""
    info = store.version_info(conn, version)
    if info is None:
        raise UnknownVersion(version)
    return info


# ---------------------------------------------------------------- the folder

async def write_folder(holder: ProgramHolder, files: dict[str, bytes]) -> None:
    """Make the folder hold exactly this program (its other .yaml/.yml files are removed,
    anything else is left); FolderUnwritable if it cannot, the folder unchanged."""
    _swap(holder, await _stage(holder.directory, files), files)


async def _stage(directory: Path, files: dict[str, bytes]) -> list[tuple[Path, Path]]:
    return await asyncio.to_thread(stage_files, directory, files)


def stage_files(directory: Path, files: dict[str, bytes]) -> list[tuple[Path, Path]]:
    """Each file written and flushed to disk under a hidden name beside its target (hidden:
    the loader and the watcher skip it); [(temporary, target)]. FolderUnwritable, nothing left;
    FolderClash, before anything is written."""
    targets = {name: _inside(directory, name) for name in sorted(files)}
    for name in targets:
        _refuse_clash(directory, name)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, target in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
            staged.append((temporary, target))
            with open(temporary, "wb") as out:
                out.write(files[name])
                out.flush()
                os.fsync(out.fileno())
    except OSError as e:
        _discard(staged)
        raise FolderUnwritable(f"cannot write the program into {directory}: {e.strerror or e}") from None
    return staged


def replace_files(directory: Path, staged: list[tuple[Path, Path]], files: Mapping[str, bytes]) -> None:
    """Rename the staged files over their targets and remove the program files not in `files`."""
    for temporary, target in staged:
        os.replace(temporary, target)
    program, _ = folder_files(directory)
    for stale in set(program) - set(files):
        with contextlib.suppress(FileNotFoundError):
            (directory / stale).unlink()
    for folder in {target.parent for _, target in staged} | {directory}:
        _sync_folder(folder)


def _swap(holder: ProgramHolder, staged: list[tuple[Path, Path]], files: Mapping[str, bytes]) -> None:
    # On the loop's thread, with no await: the watcher (a task on the same loop) sees the
    # folder before or after, never half-way.
    try:
        replace_files(holder.directory, staged, files)
    except OSError as e:
        _discard(staged)
        raise FolderUnwritable(f"cannot write the program into {holder.directory}: {e.strerror or e}") from None
    holder.written_signature = signature(holder.directory)


def _inside(directory: Path, name: str) -> Path:
    target = (directory / name).resolve()
    if directory.resolve() not in target.parents or name.startswith(".") or "/." in name:
        raise FolderUnwritable(f"{name!r} is not a relative path inside {directory}")
    return directory / name


def folders_above(name: str) -> list[str]:
    """The folders a program file's name puts it in, outermost first ("a/b/c.yaml": "a", "a/b")."""
    parts = name.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def _refuse_clash(directory: Path, name: str) -> None:
    # Found before anything is written: renaming over a folder fails only after the files
    # before it in the list were already renamed, which would leave the folder half-way.
    for ancestor in folders_above(name):
        path = directory / ancestor
        if not os.path.lexists(path):
            return
        if not path.is_dir():
            raise FolderClash(name, f"is inside {ancestor}, which is a file in {directory}, not a folder")
    target = directory / name
    if target.is_dir() and not target.is_symlink():     # a link is replaced, not what it names
        raise FolderClash(name, f"is a folder in {directory}, which a file of the program cannot replace")


def _discard(staged: list[tuple[Path, Path]]) -> None:
    for temporary, _ in staged:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass        # some file systems cannot sync a folder; the renames are still atomic
    finally:
        os.close(fd)


def _encoded(files: Mapping[str, str]) -> dict[str, bytes]:
    return {name: text.encode("utf-8") for name, text in files.items()}


# ---------------------------------------------------------------- loyalty rules export

def export_command(config_path: str, version: str, directory: Path, force: bool) -> int:
    """`loyalty rules export VERSION DIR`: a recorded version's files into DIR, which must be
    empty or absent unless --force (then its other .yaml/.yml files are removed, so DIR holds
    exactly that program). VERSION may be shortened to a unique prefix of its hex digits."""
    import sys

    from server.databases import CannotOpen, config_for_command, read_existing
    try:
        conn = read_existing(config_for_command(config_path))
    except CannotOpen as e:
        print(e, file=sys.stderr)
        return 2
    with contextlib.closing(conn):
        found = _recorded(conn, version)
        if isinstance(found, str):
            print(found, file=sys.stderr)
            return 2
        info = found
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not force)):
        what = "is not a folder" if not directory.is_dir() else "is not empty (--force replaces its program files)"
        print(f"{directory} {what}", file=sys.stderr)
        return 2
    files = _encoded(info["files"])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        replace_files(directory, stage_files(directory, files), files)
    except (OSError, FolderUnwritable) as e:
        print(f"cannot write {directory}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    print(f"{directory}: {len(files)} file(s) of {info['version']} (program {info['program']})")
    return 0


def _recorded(conn: sqlite3.Connection, version: str) -> dict | str:
    """The version's info, or why it cannot be told apart."""
    try:
        candidates = store.matching(conn, version)
    except sqlite3.OperationalError:            # a database from before versions were recorded
        candidates = []
    if not candidates:
        return f"no program version {version} is recorded"
    if len(candidates) > 1:
        return f"{version} names more than one version ({', '.join(candidates)}, ...): give more of it"
    return store.version_info(conn, candidates[0])
