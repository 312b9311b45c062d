"""The HTTP listener: deadlines for each request's header and body, a cap on connections.

aiohttp closes a connection only after `keepalive_timeout` of idleness and bounds neither
how long a request header nor how long a body may take to arrive. A thousand connections
that send nothing then hold a thousand file descriptors, accept() fails with EMFILE, and
nothing is served at all. Here each connection
- delivers a whole request header within server.header_timeout_seconds of opening, and of
  the first byte of each later request on a keep-alive connection (of the previous answer
  when that byte came before it, pipelined or in the same packet), or it is closed;
- is closed after server.keepalive_timeout_seconds idle between requests;
- delivers a request's body within server.body_timeout_seconds of its header, or gets
  408 request_timeout and is closed;
and the listener keeps at most `connections_max` connections open: one more closes the
connection that has waited longest for a request header, so a new connection is always
served and accept() never runs out of descriptors.

The server runs on uvloop (server/cli.py), whose listener is libuv's: an accept() that runs
out of descriptors anyway (something else in the process holds them) does not reach the
event loop's exception handler as it does on asyncio's loop; libuv accepts and closes the
waiting connections with a descriptor it keeps in reserve, and the listener goes on. The
handler below still makes room where a loop reports it (asyncio's own).

aiohttp internals used (checked against aiohttp 3.14.5, the version in requirements.txt):
RequestHandler._handle_request (one call per request, from its header to its answer),
RequestHandler._messages (requests parsed but not started), RequestHandler._parser (whose
feed_eof() on the C parser, and _lines/_tail on the pure-Python one, tell a partial header),
web.Server._kwargs and _loop (what web.Server.__call__ builds a RequestHandler with).
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from server.config import ServerConfig
from server.errors import ApiError, error_response

log = logging.getLogger("loyalty.server")

# The listen() backlog, and so the most sockets asyncio accepts in one turn of the event
# loop; they are counted only in the next turn, while the connections closed to make room
# for them let go of their descriptors only in the turn after: two batches in transit.
ACCEPT_BACKLOG = 128
FDS_IN_TRANSIT = 2 * ACCEPT_BACKLOG
# The kernel's queue of connections not accepted yet is set again, deeper, once asyncio has
# listened: a connection waiting there costs this process no descriptor, and a full
# queue drops a new connection's SYN, which its client sends again only after a second.
# (The kernel caps it at net.core.somaxconn.)
LISTEN_QUEUE = 4_096
# Descriptors opened after start: SQLite temporary files, the program's files on a
# reload, rules/check's temporary folder, log files.
SPARE_FDS = 64
# With an unlimited RLIMIT_NOFILE the count of connections is still bounded.
CONNECTIONS_UNLIMITED_MAX = 1_000_000
# Resource errors (and any other error the event loop reports) are logged at most once
# per kind in this interval; the next line says how many were left out.
LOG_INTERVAL_SECONDS = 10.0
LOG_KINDS_MAX = 64
ACCEPT_OUT_OF_RESOURCE = "socket.accept() out of system resource"


class CannotListen(Exception):
    """The address cannot be listened on; the message is the one line to print."""

    def __init__(self, host: str, port: int, e: OSError):
        if isinstance(e, socket.gaierror) or not e.errno:
            reason = e.strerror or str(e)
        else:
            reason = os.strerror(e.errno)
        super().__init__(f"cannot listen on {host}:{port}: {reason.lower()}")


@dataclass(frozen=True)
class Timeouts:
    header_seconds: float
    body_seconds: float


class Connections:
    """Every open connection of one listener; those waiting for a request header, oldest first."""

    def __init__(self, configured_max: int | None, reserved_fds: int, file_limit: int):
        """`file_limit`: RLIMIT_NOFILE's soft limit, read once at start rather than two system
        calls per connection; a limit changed later (prlimit) counts after a restart."""
        by_fds = CONNECTIONS_UNLIMITED_MAX if file_limit == resource.RLIM_INFINITY else file_limit - reserved_fds
        self.limit = max(1, by_fds if configured_max is None else min(configured_max, by_fds))
        self.open: set[Connection] = set()
        self.waiting: dict[Connection, None] = {}      # insertion-ordered: the oldest first
        self.closed_for_room = 0
        self._throttle = ThrottledLog()

    def opened(self, conn: Connection) -> None:
        """Counted from its protocol's creation, a turn of the loop before connection_made."""
        self.open.add(conn)
        self.waiting[conn] = None
        self.check()

    def check(self) -> None:
        excess = len(self.open) - self.limit
        if excess > 0:
            self.make_room(excess)

    def make_room(self, count: int) -> int:
        """Closes up to `count` of the connections that have waited longest for a header
        (not one still without its transport: closing it would close nothing)."""
        victims = []
        for conn in self.waiting:
            if len(victims) == count:
                break
            if conn.transport is not None:
                victims.append(conn)
        for conn in victims:
            self.forget(conn)
            conn.force_close()
        self.closed_for_room += len(victims)
        if victims and self._throttle.allow("room") is not None:
            log.warning("%d connections open, at most %d allowed (server.connections_max, RLIMIT_NOFILE): "
                        "closing the ones waiting longest for a request header (%d so far)",
                        len(self.open) + len(victims), self.limit, self.closed_for_room)
        return len(victims)

    def busy(self, conn: Connection) -> None:
        self.waiting.pop(conn, None)

    def idle(self, conn: Connection) -> None:
        if conn in self.open:
            self.waiting[conn] = None

    def forget(self, conn: Connection) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)


class Connection(RequestHandler):
    """aiohttp's protocol with a deadline for each request's header and body."""

    __slots__ = ("_table", "_timeouts", "_header_timer", "_header_at", "_header_maybe", "_body_timer",
                 "_body_late", "_in_request")

    def __init__(self, table: Connections, timeouts: Timeouts, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._table, self._timeouts = table, timeouts
        # The header's deadline (loop time), None while no header is awaited. Its timer is not
        # re-armed when the deadline moves: a keep-alive connection moves it twice a request
        # (after the answer, at the next request's first byte), and a call_later with a cancel
        # each time cost more than one timer that, firing early, re-arms for what is left.
        self._header_at: float | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        # The header timer runs from an answer, for bytes of the next request that may have come
        # before it: at its deadline only a partial header closes the connection, not idleness.
        self._header_maybe = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_late = False
        self._in_request = False
        table.opened(self)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """What aiohttp answers by itself (a request it cannot parse: a header line or URL over
        8 KiB, a bad Content-Length or chunk), in the one error shape rather than plain text."""
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs it; raises if an answer was begun
            code, words = "internal_error", "internal error; it has been logged"
        else:
            if request.writer.output_size > 0:
                raise ConnectionError("an answer was begun; the connection is closed without another")
            code = "bad_request" if status == 400 else "http_error"
            # aiohttp's reason without the bytes it quotes: a URL may carry a card number.
            reason = (message or "").strip().split(":")[0].strip()
            words = "the request is not valid HTTP" + (f": {reason}" if reason else "")
            # The client's mistake, not the server's: one line, never aiohttp's traceback
            # quoting the URL or header it could not read.
            log.info("%s from %s", words, request.remote)
        response = error_response(status, code, words)
        response.force_close()
        return response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_timer()
        self._table.check()       # the excess this one's creation could not close yet

    def connection_lost(self, exc: BaseException | None) -> None:
        self._table.forget(self)
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The first byte of a later request on a keep-alive connection starts its header's clock.
        if data and not self._in_request and (self._header_at is None or self._header_maybe):
            self._start_header_timer()
        super().data_received(data)

    async def _handle_request(self, request: web.BaseRequest, *args):
        self._in_request = True
        self._table.busy(self)
        self._header_at = None          # its timer, if it fires before the next header, does nothing
        if not request.content.is_eof():        # most bodies came whole with their header: no timer
            self._body_timer = self._loop.call_later(self._timeouts.body_seconds, self._body_deadline, request)
        try:
            return await super()._handle_request(request, *args)
        finally:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            self._in_request = False
            if self._body_late:
                # The rest of that body is not worth waiting for: no lingering read.
                self.force_close()
            else:
                self._table.idle(self)
                if request.content.is_eof():    # else aiohttp lingers on the body; its bytes start the timer
                    # Bytes of the next request that came with or during this one were parsed
                    # already: no data_received will start their header's clock.
                    self._start_header_timer(maybe=True)

    def _start_header_timer(self, maybe: bool = False) -> None:
        self._header_maybe = maybe
        self._header_at = self._loop.time() + self._timeouts.header_seconds
        if self._header_timer is None:      # else it fires no later than this deadline, and re-arms
            self._header_timer = self._loop.call_later(self._timeouts.header_seconds, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._header_at is None:                  # no header awaited since it was armed
            return
        left = self._header_at - self._loop.time()
        if left > 0:                                 # the deadline moved since it was armed
            self._header_timer = self._loop.call_later(left, self._header_deadline)
            return
        self._header_at = None
        if self._in_request or self._messages:       # a request parsed and waiting to start
            return
        if self._header_maybe and not self._partial_header():
            return                                  # idle: the keep-alive timeout applies
        self._table.forget(self)
        self.force_close()

    def _partial_header(self) -> bool:
        """Whether the parser holds part of a request header. Asked only where a yes closes the
        connection: the C parser's feed_eof() changes its state only when it holds something."""
        parser = self._parser
        if parser is None:
            return False
        if hasattr(parser, "_lines"):                # aiohttp's pure-Python parser
            return bool(parser._lines or parser._tail)
        try:
            return parser.feed_eof() is not None     # a message made of what it holds
        except Exception:                            # what it holds is not even that
            return True

    def _body_deadline(self, request: web.BaseRequest) -> None:
        self._body_timer = None
        if request.content.is_eof():
            return
        self._body_late = True
        # Whoever reads the body (the route, the audit log) gets this as the read's error.
        request.content.set_exception(ApiError(
            408, "request_timeout",
            f"the request body did not arrive within {self._timeouts.body_seconds:g}s; the connection is closed",
            headers={"Connection": "close"}))

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        self._header_at = None


class ThrottledLog:
    """At most one line per kind of event per LOG_INTERVAL_SECONDS, then how many were left out."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS, clock=time.monotonic):
        self.interval, self._clock = interval, clock
        self._kinds: dict[object, list] = {}      # kind -> [last logged at, left out since]

    def allow(self, kind: object) -> int | None:
        """None: leave this one out; otherwise log it, with the number left out before it."""
        now = self._clock()
        entry = self._kinds.get(kind)
        if entry is None:
            if len(self._kinds) >= LOG_KINDS_MAX:
                kind = "other"
                entry = self._kinds.get(kind)
            if entry is None:
                self._kinds[kind] = [now, 0]
                return 0
        if now - entry[0] < self.interval:
            entry[1] += 1
            return None
        left_out, entry[0], entry[1] = entry[1], now, 0
        return left_out


def exception_handler(throttle: ThrottledLog, table: Connections | None):
    """The event loop's error reports, throttled. When accept() runs out of descriptors anyway
    (something else holds them), connections waiting for a header make room."""
    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        message = context.get("message", "")
        if table is not None and message == ACCEPT_OUT_OF_RESOURCE:
            table.make_room(ACCEPT_BACKLOG)
        left_out = throttle.allow((message, type(exc).__name__, getattr(exc, "errno", None)))
        if left_out is None:
            return
        if left_out:
            context = {**context, "message": f"{message} ({left_out} more like it in the last "
                                             f"{throttle.interval:g}s not logged)"}
        loop.default_exception_handler(context)
    return handle


def install_exception_handler(table: Connections | None = None) -> None:
    asyncio.get_running_loop().set_exception_handler(exception_handler(ThrottledLog(), table))


class Site(web.TCPSite):
    """TCPSite whose connections are `Connection`s."""

    def __init__(self, runner: web.BaseRunner, config: ServerConfig, **kwargs):
        super().__init__(runner, config.host, config.port, backlog=ACCEPT_BACKLOG, **kwargs)
        self._file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.connections = Connections(config.connections_max, open_fds() + FDS_IN_TRANSIT + SPARE_FDS,
                                       self._file_limit)
        self._timeouts = Timeouts(config.header_timeout_seconds, config.body_timeout_seconds)

    def _connection(self) -> Connection:
        server = self._runner.server
        return Connection(self.connections, self._timeouts, server, loop=server._loop, **server._kwargs)

    async def start(self) -> None:
        await web.BaseSite.start(self)      # registers the site with its runner
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._connection, self._host, self._port, backlog=self._backlog,
                reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        except OSError as e:
            raise CannotListen(self._host, self._port, e) from None
        self._bound_port = self._server.sockets[0].getsockname()[1]
        for listening in self._server.sockets:
            with socket.fromfd(listening.fileno(), listening.family, listening.type) as same:
                same.listen(LISTEN_QUEUE)       # a duplicate descriptor of the same socket
        install_exception_handler(self.connections)
        log.info("at most %d connections at once (RLIMIT_NOFILE %s at start; a new limit needs a restart)",
                 self.connections.limit, self._file_limit)


def new_runner(app: web.Application, config: ServerConfig, **access_log) -> web.AppRunner:
    """The app's runner; aiohttp's own keep-alive timer closes idle connections. Without
    `access_log` arguments (server/access_log.py) there is no access log."""
    return web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown_timeout_seconds,
                         keepalive_timeout=config.keepalive_timeout_seconds, **({"access_log": None} | access_log))


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:       # no /proc: a generous guess at what the database and logs hold
        return SPARE_FDS

