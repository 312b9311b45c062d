"""The access log (`server.access_log`, off by default): one line per answered request, in
the Combined Log Format or as JSON lines, on standard output or appended to a file.

A line names the caller by its key id, never by the key; the Authorization header is not
read. Card numbers, which `/v1/members/{card}` paths carry, are cut to their last four
characters (`/v1/members/*********0001`), and in a path that matched no route, and in
query strings, every run of six or more digits is cut the same way, since a register may
send a card where it does not belong.

Lines are handed from the event loop to a writer thread through a bounded queue: a slow
destination (a full pipe to journald, a slow disk) never stalls the requests. When the
queue is full the line is dropped and counted, and the writer says how many in the server's
log once it catches up.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import re
import sys
import threading
import time
from datetime import datetime, timezone

import msgspec
from aiohttp.abc import AbstractAccessLogger

from server.routes import PRINCIPAL

log = logging.getLogger("loyalty.server")

# Lines waiting for the writer thread; past it lines are dropped (and counted).
QUEUE_LINES_MAX = 10_000
# A line that cannot be built is logged at most this often.
FAILURE_LOG_INTERVAL_SECONDS = 60.0
# At exit, how long the lines still queued may take to be written.
STOP_WAIT_SECONDS = 5.0
# A request target or user agent is cut to this many characters in the log.
FIELD_CHARS_MAX = 1_024
# Digits kept at the end of a masked card number (answers show as many: card_last4).
CARD_DIGITS_SHOWN = 4
_LONG_DIGITS = re.compile(r"\d{6,}")
# What the Combined Log Format cannot hold unescaped inside its quoted fields.
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')
_STOP = object()


def mask(card: str) -> str:
    shown = card[-CARD_DIGITS_SHOWN:] if len(card) > CARD_DIGITS_SHOWN else ""
    return "*" * (len(card) - len(shown)) + shown


def target(request) -> str:
    """The request's path and query as logged: no card number in them."""
    match = getattr(request, "match_info", None)
    resource = match.route.resource if match is not None else None
    if resource is not None:
        values = dict(match)
        if "card" in values:
            values["card"] = mask(values["card"])
        path = resource.canonical.format_map(values) if values else request.path
    else:
        path = _LONG_DIGITS.sub(lambda m: mask(m.group()), request.path)
    query = request.query_string
    if query:
        path += "?" + _LONG_DIGITS.sub(lambda m: mask(m.group()), query)
    return path[:FIELD_CHARS_MAX]


def key_id(request) -> str | None:
    principal = request.get(PRINCIPAL)
    return principal.key_id if principal is not None else None


def route_name(request) -> str | None:
    match = getattr(request, "match_info", None)
    resource = match.route.resource if match is not None else None
    return resource.canonical if resource is not None else None


def combined(request, response, seconds: float, now: float) -> str:
    """Apache's and nginx's `combined`, the key id in the user field."""
    started = datetime.fromtimestamp(now - seconds).astimezone().strftime("%d/%b/%Y:%H:%M:%S %z")
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    return (f'{request.remote or "-"} - {_quoted(key_id(request)) or "-"} [{started}] '
            f'"{request.method} {_quoted(target(request))} {version}" {response.status} '
            f'{response.body_length or "-"} "{_quoted(request.headers.get("Referer")) or "-"}" '
            f'"{_quoted(request.headers.get("User-Agent")) or "-"}"')


def json_line(request, response, seconds: float, now: float) -> str:
    started = datetime.fromtimestamp(now - seconds, timezone.utc).isoformat(timespec="milliseconds")
    return msgspec.json.encode({
        "time": started, "remote": request.remote, "key_id": key_id(request), "method": request.method,
        "path": target(request), "route": route_name(request), "status": response.status,
        "bytes": response.body_length, "duration_ms": round(seconds * 1000, 3),
        "user_agent": (request.headers.get("User-Agent") or "")[:FIELD_CHARS_MAX] or None,
    }).decode()


FORMATS = {"combined": combined, "json": json_line}


def _quoted(value: str | None) -> str:
    if not value:
        return ""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", value[:FIELD_CHARS_MAX])


class AccessLogger(AbstractAccessLogger):
    """What aiohttp calls once per answered request (one instance per connection);
    `logger` is an AccessLogWriter."""

    def log(self, request, response, time_: float) -> None:
        try:
            line = FORMATS[self.log_format](request, response, time_, time.time())
        except Exception:  # noqa: BLE001 - a line that cannot be built must not fail the answer
            _FAILURES.failed(getattr(request, "path", "?"))
            return
        self.logger.put(line)


class _Failures:
    """A line that cannot be built is logged with its traceback at most once a minute, with
    how many failed since: the same fault on every request must not flood the log."""

    def __init__(self):
        self.count, self.logged_at = 0, float("-inf")

    def failed(self, path: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= FAILURE_LOG_INTERVAL_SECONDS:
            log.exception("could not build the access log line for %s (%d line(s) lost since the last "
                          "such message)", path, self.count)
            self.count, self.logged_at = 0, now


_FAILURES = _Failures()


class AccessLogWriter:
    """The queue the event loop puts lines on and the thread that writes them."""

    def __init__(self, handler: logging.Handler, lines_max: int = QUEUE_LINES_MAX):
        self._handler = handler
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.Queue = queue.Queue(lines_max)
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="access-log", daemon=True)

    def put(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            with self._dropped_lock:
                self._dropped += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Writes what is queued, then closes the destination; gives up after
        STOP_WAIT_SECONDS (a destination that accepts nothing must not keep the process)."""
        try:
            self._queue.put(_STOP, timeout=STOP_WAIT_SECONDS)
        except queue.Full:
            return
        self._thread.join(STOP_WAIT_SECONDS)
        if not self._thread.is_alive():
            self._handler.close()

    def _main(self) -> None:
        while True:
            line = self._queue.get()
            if line is _STOP:
                self._report_dropped()
                return
            self._handler.emit(logging.makeLogRecord({"msg": line}))
            if self._queue.empty():
                self._report_dropped()

    def _report_dropped(self) -> None:
        with self._dropped_lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("access log: %d line(s) dropped: its destination was slower than the requests", dropped)


@contextlib.contextmanager
def access_logging(config):
    """The AppRunner arguments for the configured access log ({} when it is off), its writer
    running while the context lasts."""
    if config.server.access_log == "off":
        yield {}
        return
    path = config.server.access_log_path
    # A file is reopened when logrotate moves it away (WatchedFileHandler checks its inode).
    try:
        handler = (logging.handlers.WatchedFileHandler(config.resolve(path), encoding="utf-8") if path
                   else logging.StreamHandler(sys.stdout))
    except OSError as e:
        from server.startup import StartupError
        raise StartupError(f"cannot open the access log {config.resolve(path)}: {e.strerror} "
                           "(server.access_log_path)") from None
    writer = AccessLogWriter(handler)
    writer.start()
    try:
        yield {"access_log": writer, "access_log_class": AccessLogger, "access_log_format": config.server.access_log}
    finally:
        writer.stop()
