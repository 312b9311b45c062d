"""server.workers > 1: worker processes speak HTTP, one core process owns the data.

core (the process `loyalty serve` starts in): the Database and its single writer, the
  Service (member locks, budgets, idempotency), the program holder (reloads, SIGHUP),
  jobs and metrics. It answers the workers' calls over a Unix socket in a private folder
  and starts a worker again when one dies.
workers (N): listen on server.host:port together (SO_REUSEPORT) and do HTTP, keys,
  roles, rate limits (1/N of the configured rate each), body limits and decoding; each
  call goes to the core as one frame and the core's reply is the HTTP answer.

A request is answered only after the core's reply, which comes after its commit, so
kill -9 of any of the processes loses nothing acknowledged. A worker stops when the core
goes away (its connection or the parent pipe closes): no worker outlives the core.

Frames: a 4-byte big-endian length, then msgpack. Many calls are in flight on one
connection at once, matched by id.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from server.auth import KeyRing, Principal
from server.config import Config
from server.errors import ApiError, HangUp, error_answer, error_middleware
from server.guards import InFlight, TokenBuckets, in_flight_middleware
from server.keys import BACKEND, CONFIG, IN_FLIGHT, KEYRING, LIMITER, METRICS, PRIVACY, STATE
from server.listen import CannotListen, Site, install_exception_handler, new_runner
from server.metrics import error_code, status_class
from server.privacy import privacy_from_config
from server.routes import COUNTED_ENDPOINTS, JSON_TYPE, ROUTES_BY_NAME, Call, LocalBackend, Reply, Route, add_routes, audit_middleware, readyz

log = logging.getLogger("loyalty.workers")

LENGTH = struct.Struct(">I")
# A request frame carries at most one body of server.max_body_bytes, re-encoded; msgpack
# is rarely larger than the JSON it came from, so twice that plus headroom is generous.
REQUEST_FRAME_OVERHEAD_BYTES = 64 * 1024
REPLY_FRAME_BYTES_MAX = 64 * 1024 * 1024
# The workers cap their own requests in flight; this bounds what one connection can ask
# of the core even so (the core stops reading the connection until calls finish).
CALLS_IN_FLIGHT_PER_CONNECTION_MAX = 4_096
WORKER_START_SECONDS_MAX = 30.0
WORKER_POLL_SECONDS = 0.1
RESTART_DELAY_SECONDS_MIN, RESTART_DELAY_SECONDS_MAX = 0.1, 5.0
# A worker that dies sooner than this after its start is restarted after a growing delay.
WORKER_STABLE_SECONDS = 5.0
# After shutdown_timeout_seconds a worker still draining is killed after this much more.
STOP_GRACE_SECONDS = 5.0
# A worker's exit code when it cannot listen on server.host:port.
EXIT_CANNOT_LISTEN = 2


# ------------------------------------------------------------------ frames

class CallFrame(msgspec.Struct, array_like=True, tag="c"):
    id: int
    route: str                  # the route's handler name, as in ROUTES_BY_NAME
    principal: Principal | None
    path: dict[str, str]
    query: dict[str, str]
    body: bytes                 # the decoded body again as msgpack; empty when the route takes none


class AuditFrame(msgspec.Struct, array_like=True, tag="a"):
    id: int
    row: dict[str, Any]


class HelloFrame(msgspec.Struct, array_like=True, tag="h"):
    """A worker listens on the port now."""
    pid: int


class ReplyFrame(msgspec.Struct, array_like=True):
    id: int
    status: int
    content_type: str
    headers: dict[str, str] | None
    body: bytes


ENCODER = msgspec.msgpack.Encoder()
TO_CORE = msgspec.msgpack.Decoder(CallFrame | AuditFrame | HelloFrame)
TO_WORKER = msgspec.msgpack.Decoder(ReplyFrame)
BODY_DECODERS = {route.body: msgspec.msgpack.Decoder(route.body) for route in ROUTES_BY_NAME.values() if route.body}


class FrameTooLarge(Exception):
    pass


async def read_frame(reader: asyncio.StreamReader, bytes_max: int) -> bytes:
    (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if size > bytes_max:
        raise FrameTooLarge(f"a frame of {size} bytes; at most {bytes_max}")
    return await reader.readexactly(size)


class Outbox:
    """Frames put in one turn of the event loop leave in one write: a group commit answers
    many calls at once, and waking the other process once for all of them costs less than
    once for each."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self._parts: list[bytes] = []

    def put(self, payload: bytes) -> None:
        if not self._parts:
            asyncio.get_running_loop().call_soon(self._flush)
        self._parts += (LENGTH.pack(len(payload)), payload)

    async def send(self, payload: bytes) -> None:
        self.put(payload)
        await self.writer.drain()       # waits only while the other side is not reading

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if not self.writer.is_closing():
            self.writer.write(b"".join(parts))


def encode_body(body) -> bytes:
    # Through builtins: msgpack would carry a datetime as UTC and lose the offset the
    # receipt was sent with, which is part of its fingerprint.
    return b"" if body is None else ENCODER.encode(msgspec.to_builtins(body))


def request_frame_bytes_max(config: Config) -> int:
    return 2 * config.server.max_body_bytes + REQUEST_FRAME_OVERHEAD_BYTES


# ------------------------------------------------------------------ the core's end

class Core:
    """Answers the workers' frames with the same service half a single process runs."""

    def __init__(self, app: web.Application, frame_bytes_max: int):
        self.app, self.local, self.frame_bytes_max = app, LocalBackend(app), frame_bytes_max
        self.listening: set[int] = set()      # pids of workers that said hello
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._connection, path)
        os.chmod(path, 0o600)

    async def close(self, timeout: float) -> None:
        """After the workers stopped: finish calls still running (so their commits land), then hang up."""
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for writer in list(self._writers):
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        outbox = Outbox(writer)
        slots = asyncio.Semaphore(CALLS_IN_FLIGHT_PER_CONNECTION_MAX)
        try:
            while True:
                frame = TO_CORE.decode(await read_frame(reader, self.frame_bytes_max))
                if isinstance(frame, HelloFrame):
                    self.listening.add(frame.pid)
                    continue
                await slots.acquire()
                task = asyncio.create_task(self._answer(frame, outbox))
                self._tasks.add(task)
                task.add_done_callback(lambda t: (self._tasks.discard(t), slots.release()))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass            # the worker went away; its calls still finish and commit
        except (FrameTooLarge, msgspec.DecodeError) as e:
            log.error("closing a worker connection: %s", e)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, frame: CallFrame | AuditFrame, outbox: Outbox) -> None:
        reply = await (self._audit(frame.row) if isinstance(frame, AuditFrame) else self._call(frame))
        payload = ENCODER.encode(ReplyFrame(frame.id, reply.status, reply.content_type, reply.headers, reply.body))
        if len(payload) > REPLY_FRAME_BYTES_MAX:
            log.error("an answer of %d bytes is over the frame limit", len(payload))
            reply = error_reply(ApiError(500, "internal_error", "the answer is too large to send"), "", "")
            payload = ENCODER.encode(ReplyFrame(frame.id, reply.status, reply.content_type, None, reply.body))
        if outbox.writer.is_closing():
            return
        with contextlib.suppress(ConnectionError):
            await outbox.send(payload)

    async def _call(self, frame: CallFrame) -> Reply:
        route = ROUTES_BY_NAME.get(frame.route)
        if route is None:
            return error_reply(ApiError(500, "internal_error", f"no route {frame.route}"), "", "")
        started = time.perf_counter()
        reply = None
        try:
            body = BODY_DECODERS[route.body].decode(frame.body) if route.body else None
            reply = await self.local.call(route, Call(frame.principal, frame.path, frame.query, body))
        except Exception as e:
            reply = error_reply(e, route.method, route.path)
        finally:
            status = reply.status if reply is not None else 500
            metrics = self.app[METRICS]
            metrics.request_latency.labels(route.path, route.method, status_class(status)).observe(
                time.perf_counter() - started)
            endpoint = COUNTED_ENDPOINTS.get(route.handler.__name__)
            if endpoint is not None and status >= 400:
                metrics.receipts.labels(endpoint, error_code(reply.body if reply else None)).inc()
        return reply

    async def _audit(self, row: dict) -> Reply:
        try:
            await self.local.audit(row)
        except Exception:
            log.exception("could not write the audit row for %s by %s", row.get("method"), row.get("key_id"))
            return Reply(500, b"")
        return Reply(204, b"")


def error_reply(e: Exception, method: str, route: str) -> Reply:
    answer = error_answer(e, method, route)
    if answer is None:      # a redirect: no service call answers with one
        answer = error_answer(RuntimeError(f"a redirect from {route}"), method, route)
    status, body, headers = answer
    return Reply(status, body, JSON_TYPE, headers)


# ------------------------------------------------------------------ the worker's end

class RemoteBackend:
    """Sends each call to the core over one connection and waits for its reply."""

    def __init__(self):
        self.app: web.Application | None = None
        self.lost = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: Outbox | None = None
        self._reading: asyncio.Task | None = None

    async def connect(self, path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        self._outbox = Outbox(writer)
        self._reading = asyncio.create_task(self._read_replies(reader))

    def hello(self) -> None:
        self._outbox.put(ENCODER.encode(HelloFrame(os.getpid())))

    async def call(self, route: Route, call: Call) -> Reply:
        if not route.core:
            return await route.handler(self.app, call)
        if route.handler is readyz:
            return await self._ready(call)
        body = encode_body(call.body)
        return await self._send(lambda i: CallFrame(i, route.handler.__name__, call.principal, call.path,
                                                    call.query, body))

    async def _ready(self, call: Call) -> Reply:
        if self.app[STATE]["draining"]:
            raise ApiError(503, "unavailable", "starting or draining")
        try:
            return await self._send(lambda i: CallFrame(i, readyz.__name__, None, call.path, call.query, b""))
        except HangUp:
            raise ApiError(503, "unavailable", "the core process is unreachable") from None

    async def audit(self, row: dict) -> None:
        reply = await self._send(lambda i: AuditFrame(i, row))
        if reply.status >= 400:
            raise RuntimeError(f"the core answered {reply.status}")

    async def _send(self, frame) -> Reply:
        """The core's reply; HangUp when the core went away, before or after it got the call."""
        if self.lost.is_set():
            raise HangUp()
        i = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[i] = future
        try:
            await self._outbox.send(ENCODER.encode(frame(i)))
            return await future
        except ConnectionError:
            raise HangUp() from None
        finally:
            self._pending.pop(i, None)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = TO_WORKER.decode(await read_frame(reader, REPLY_FRAME_BYTES_MAX))
                future = self._pending.get(frame.id)
                if future is not None and not future.done():
                    future.set_result(Reply(frame.status, frame.body, frame.content_type, frame.headers))
        except (asyncio.IncompleteReadError, ConnectionError):
            log.error("the core process closed the connection")
        except (FrameTooLarge, msgspec.DecodeError) as e:
            log.error("bad frame from the core: %s", e)
        finally:
            self.lost.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(HangUp())


def worker_app(config: Config, backend: RemoteBackend, workers: int) -> web.Application:
    """The HTTP half only: no database, no program, no service."""
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[in_flight_middleware(IN_FLIGHT), audit_middleware, error_middleware])
    app[CONFIG] = config
    app[KEYRING] = KeyRing(config.auth.keys)
    app[PRIVACY] = privacy_from_config(config)      # card HMACs in audit paths
    app[STATE] = {"started": True, "draining": False}
    # Each worker keeps its own buckets: 1/N of the rate each keeps the total at the configured rate.
    app[LIMITER] = TokenBuckets(config.limits.requests_per_second_per_key / workers,
                                max(1, math.ceil(config.limits.burst / workers)))
    app[IN_FLIGHT] = InFlight.from_config(config.server, workers)
    app[BACKEND] = backend
    backend.app = app
    app.on_shutdown.append(_draining)
    add_routes(app)
    return app


async def _draining(app: web.Application) -> None:
    app[STATE]["draining"] = True


async def run_worker(config: Config, socket_path: str, workers: int, parent_fd: int) -> int:
    loop = asyncio.get_running_loop()
    backend = RemoteBackend()
    await backend.connect(socket_path)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def core_gone() -> None:        # the pipe is readable only at EOF: the core has exited
        loop.remove_reader(parent_fd)
        backend.lost.set()
        # A core killed with -9 could not remove its socket folder; whichever worker is first does.
        shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)
    loop.add_reader(parent_fd, core_gone)
    app = worker_app(config, backend, workers)
    runner = new_runner(app, config.server)
    await runner.setup()
    try:
        try:
            await Site(runner, config.server, workers, reuse_port=True).start()
        except CannotListen as e:
            print(e, file=sys.stderr)       # the core checked the port; something took it since
            return EXIT_CANNOT_LISTEN
        backend.hello()
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(backend.lost.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
    finally:
        await runner.cleanup()
    if backend.lost.is_set() and not stop.is_set():
        log.error("the core process is gone; stopping")
        return 1
    return 0


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.workers")
    parser.add_argument("--config", required=True, help="the core's decoded config, as JSON")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--of", type=int, required=True)
    parser.add_argument("--parent-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s worker-{args.index} %(name)s: %(message)s")
    # Only the core stops workers (a terminal's Ctrl-C reaches the whole group) and only
    # the core reloads the program.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = msgspec.json.decode(Path(args.config).read_bytes(), type=Config)
    return asyncio.run(run_worker(config, args.socket, args.of, args.parent_fd))


# ------------------------------------------------------------------ the core process

class WorkerStartError(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Supervisor:
    """Starts the workers, starts one again when it dies, stops them all."""

    def __init__(self, config: Config, folder: str, socket_path: str, core: Core):
        self.config, self.socket_path, self.core = config, socket_path, core
        # The config exactly as the core decoded it (environment overrides applied), so a
        # worker started again later serves the same keys and limits even if the file changed.
        self.config_path = os.path.join(folder, "config.json")
        with open(os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(msgspec.json.encode(config))
        self.count = config.server.workers
        self.procs: dict[int, subprocess.Popen] = {}
        self._started_at: dict[int, float] = {}
        self._delay: dict[int, float] = {}
        self._due: dict[int, float] = {}           # index -> when to start it again
        self._restarted: dict[int, int] = {}       # pid -> index, until it listens
        self._monitor: asyncio.Task | None = None
        # The workers hold the read end; it reads EOF once the core has exited, however it exited.
        self._pipe_read, self._pipe_write = os.pipe()

    async def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)
        deadline = time.monotonic() + WORKER_START_SECONDS_MAX
        while not all(p.pid in self.core.listening for p in self.procs.values()):
            for index, proc in self.procs.items():
                if proc.poll() is not None:
                    # A worker that could not listen said why in its one line; the core exits as one process would.
                    raise WorkerStartError(f"worker {index} exited with {proc.returncode} before it listened",
                                           EXIT_CANNOT_LISTEN if proc.returncode == EXIT_CANNOT_LISTEN else 1)
            if time.monotonic() > deadline:
                raise WorkerStartError(f"the workers did not listen within {WORKER_START_SECONDS_MAX:.0f}s")
            await asyncio.sleep(0.02)
        self._monitor = asyncio.create_task(self._watch())

    def _spawn(self, index: int) -> None:
        code_root = str(Path(__file__).resolve().parent.parent)     # the workers run this same code
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
        argv = [sys.executable, "-m", "server.workers", "--config", self.config_path, "--socket", self.socket_path,
                "--index", str(index), "--of", str(self.count), "--parent-fd", str(self._pipe_read)]
        self.procs[index] = subprocess.Popen(argv, env=env, pass_fds=(self._pipe_read,))
        self._started_at[index] = time.monotonic()

    async def _watch(self) -> None:
        while True:
            now = time.monotonic()
            for index, proc in self.procs.items():
                if index not in self._due and proc.poll() is not None:
                    self._died(index, proc, now)
            for index, due in list(self._due.items()):
                if now >= due:
                    del self._due[index]
                    self._spawn(index)
                    self._restarted[self.procs[index].pid] = index
            for pid in self.core.listening & self._restarted.keys():
                log.info("worker %d listens again, as pid %d", self._restarted.pop(pid), pid)
            await asyncio.sleep(WORKER_POLL_SECONDS)

    def _died(self, index: int, proc: subprocess.Popen, now: float) -> None:
        lived = now - self._started_at[index]
        delay = RESTART_DELAY_SECONDS_MIN
        if lived < WORKER_STABLE_SECONDS:
            delay = min(RESTART_DELAY_SECONDS_MAX, 2 * self._delay.get(index, RESTART_DELAY_SECONDS_MIN / 2))
        self._delay[index] = delay
        self._due[index] = now + delay
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        log.warning("worker %d (pid %d) died (%s) after %.1fs; starting it again in %.1fs",
                    index, proc.pid, how, lived, delay)

    async def stop(self, timeout: float) -> None:
        """SIGTERM to every worker: each closes its listener and finishes its requests in flight."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for index, proc in self.procs.items():
            if proc.poll() is None:
                log.error("worker %d (pid %d) did not stop in %.0fs; killing it", index, proc.pid, timeout)
                proc.kill()
                proc.wait()
            elif proc.returncode != 0 and proc.pid in self.core.listening:
                # (one still starting dies of the SIGTERM itself: it had no requests yet)
                log.warning("worker %d (pid %d) stopped with %s", index, proc.pid, proc.returncode)
        os.close(self._pipe_read)
        os.close(self._pipe_write)


async def serve_core(app: web.Application, config: Config) -> None:
    """Like cli.serve, with the HTTP in worker processes: on SIGTERM or SIGINT /readyz answers
    503 for server.drain_seconds, then the workers close their listeners and finish their
    requests, then the database closes after its last commit."""
    from server.app import stop_on_signals, wait_then_drain  # the core only: workers need not load the service
    install_exception_handler()
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()            # opens the database, loads the program, starts the jobs
    folder = tempfile.mkdtemp(prefix="loyalty-core-")     # mode 0700: only this user reaches the socket
    core = Core(app, request_frame_bytes_max(config))
    supervisor = None
    stop = stop_on_signals()
    try:
        socket_path = os.path.join(folder, "core.sock")
        await core.start(socket_path)
        supervisor = Supervisor(config, folder, socket_path, core)
        await supervisor.start()
        log.info("serving on http://%s:%s with %d worker processes", config.server.host, config.server.port,
                 config.server.workers)
        await wait_then_drain(app, stop, config.server.drain_seconds, "the workers finish requests in flight")
    finally:
        if supervisor is not None:
            await supervisor.stop(config.server.shutdown_timeout_seconds + STOP_GRACE_SECONDS)
        await core.close(config.server.shutdown_timeout_seconds)
        shutil.rmtree(folder, ignore_errors=True)
        await runner.cleanup()
    log.info("stopped: every answered request is committed")


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
