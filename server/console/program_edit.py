"""A program file edited in the browser: checked as the server checks a program, written
into rules.dir in one step, loaded through the same ProgramHolder as any reload.

The edit replaces one file of the program folder as it is on disk now; every other file
is read from the folder, so what is checked, replayed and deployed is the whole program
the server would load.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from datetime import datetime
from pathlib import Path

from rules import Problem, Program, ProgramError, check_files, load_files
from rules.loader import read_directory
from server.errors import ApiError, conflict, field_error


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def program_files(directory: Path) -> dict[str, bytes]:
    """The program's files as they are on disk now, {relative path: bytes}."""
    files, _ignored, problems = read_directory(directory)
    if problems:
        raise ApiError(422, "rules_invalid", "the program folder cannot be read",
                       [{"path": f"{p.file}:{p.line}:{p.column}", "message": p.message} for p in problems])
    return files


def file_text(directory: Path, name: str) -> str:
    files = program_files(directory)
    if name not in files:
        raise field_error("file", f"is not a file of the program in {directory}")
    try:
        return files[name].decode("utf-8")
    except UnicodeDecodeError:
        raise field_error("file", "is not UTF-8 text") from None


def edited(directory: Path, name: str, text: str, max_bytes: int) -> dict[str, bytes]:
    """The program's files with `name` replaced by `text`; only an existing file may be edited."""
    files = program_files(directory)
    if name not in files:
        raise field_error("file", f"is not a file of the program in {directory}")
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        raise field_error("text", f"must be at most {max_bytes} bytes (console.file_max_bytes)")
    files[name] = data
    return files


def check(directory: Path, name: str, text: str, max_bytes: int, now: datetime) -> list[Problem]:
    """Every error and warning of the program with this edit, as `loyalty rules check` finds them."""
    return check_files(edited(directory, name, text, max_bytes), now)


def load(directory: Path, name: str, text: str, max_bytes: int, now: datetime | None) -> Program:
    """The program with this edit, compiled (the caller closes it); ApiError when it does not load."""
    try:
        return load_files(edited(directory, name, text, max_bytes), now)
    except ProgramError as e:
        raise invalid(e.problems) from None


def invalid(problems: list[Problem]) -> ApiError:
    return ApiError(422, "rules_invalid", "the edited program does not load; nothing was changed",
                    [{"path": f"{p.file}:{p.line}:{p.column}", "message": p.message} for p in problems])


def write_atomically(path: Path, text: str) -> None:
    """Readers (the watcher, a reload) see the old file or the new one, never a part: the text
    goes to a temporary file beside it (a name the program does not read), is synced, and
    replaces the file in one rename, which is synced too."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def deploy(holder, name: str, text: str, base_sha256: str, max_bytes: int, trigger: str,
           now: datetime) -> Program:
    """Writes the edit over the live file and reloads. Refused (nothing written) when the file
    changed since the edit began (base_sha256) or the edited program does not load. Runs
    without awaiting, so two deploys cannot interleave on the event loop."""
    directory = holder.directory
    current = file_text(directory, name)
    if sha256_text(current) != base_sha256:
        raise conflict("program_changed", f"{name} changed on the server since this edit began; "
                                          "open it again and redo the change")
    load(directory, name, text, max_bytes, now).close()
    target = directory / name
    write_atomically(target, text)
    ok, program, problems = holder.reload(trigger)
    if not ok:
        # Another file changed between the check and the reload: put the old text back.
        write_atomically(target, current)
        raise invalid(problems)
    return program
