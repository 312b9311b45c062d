"""A program file edited in the browser, checked as the server checks a program.

An edit replaces one file of the live program (its files as recorded in the database,
server/program_versions.live_files); every other file stays as it is in that program, so
what is checked, replayed and deployed is the whole program the server would serve. The
deploy itself is program_versions.deploy (recorded, served by every server on the database,
written into rules.dir): this module only builds and checks the files it is given.
"""
from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from rules import Problem, check_files
from rules.loader import read_directory
from server.errors import ApiError, conflict, field_error


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_text(files: dict[str, bytes], name: str) -> str:
    if name not in files:
        raise field_error("file", "is not a file of the live program")
    try:
        return files[name].decode("utf-8")
    except UnicodeDecodeError:
        raise field_error("file", "is not UTF-8 text") from None


def edited(files: dict[str, bytes], name: str, text: str, max_bytes: int) -> dict[str, bytes]:
    """The program's files with `name` replaced by `text`; only an existing file may be edited."""
    if name not in files:
        raise field_error("file", "is not a file of the live program")
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        raise field_error("text", f"must be at most {max_bytes} bytes (console.file_max_bytes)")
    return {**files, name: data}


def check(files: dict[str, bytes], name: str, text: str, max_bytes: int, now: datetime) -> list[Problem]:
    """Every error and warning of the program with this edit, as `loyalty rules check` finds them."""
    return check_files(edited(files, name, text, max_bytes), now)


def invalid(problems: list[Problem]) -> ApiError:
    return ApiError(422, "rules_invalid", "the edited program does not load; nothing was changed",
                    [{"path": f"{p.file}:{p.line}:{p.column}", "message": p.message} for p in problems])


def refuse_if_changed(name: str, base_sha256: str, live: dict[str, bytes], directory: Path) -> None:
    """409 when the file is no longer the text the edit began from, in the live program or in
    rules.dir (a hand edit the watcher has not loaded yet): deploying would undo that change."""
    on_disk, _ignored, _problems = read_directory(directory)
    for files in (live, on_disk):
        raw = files.get(name)
        if raw is not None and hashlib.sha256(raw).hexdigest() != base_sha256:
            raise conflict("program_changed", f"{name} changed on the server since this edit began; "
                                              "open it again and redo the change")
    if name not in live:
        raise conflict("program_changed", f"{name} is no longer a file of the live program")
