"""The application factory: everything the server needs, built from one Config."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sqlite3
import time
from typing import TYPE_CHECKING

from aiohttp import web

from rules import ProgramError
from server.auth import KeyRing, keep_keys_fresh, refresh_keys
from server.clock import Clock
from server.config import Config
from server.errors import error_middleware
from server.guards import InFlight, TokenBuckets, in_flight_middleware
from server.jobs import schedule
from server.keys import (CLOCK, CONFIG, DATABASE, EVENTS_SETTLED, IN_FLIGHT, KEYRING, LIMITER, METRICS, OPS, PRIVACY,
                         PROGRAMS, STATE, VERSIONS)
from server.metrics import Metrics, error_code, status_class
from server.privacy import privacy_from_config
from server.program_versions import ProgramVersions
from server.programs import ProgramHolder
from server.ops import Deps
from server.routes import COUNTED_ENDPOINTS, add_routes, audit_middleware
from server.startup import (DatabaseUnreachable, StartupError, check_database_file, lock_holder, still_locked,
                            wait_for_write_lock)
from server.watcher import watch
from server.webhooks import Dispatcher
from storage import api_keys, member_care
from storage.db import Database, StorageBusy, StorageError
from storage.events import Settled
from storage.health import MigrationsBusy, StorageUnavailable, is_busy
from storage.ledger import iso, manual_tiers_outside
from storage.personal import protect_existing
from storage.preload import preload
from storage.schema import migrations
from storage.segments import MembershipCache
from storage.sql import database_errors

if TYPE_CHECKING:
    from storage.pg.database import PgDatabase

# The cyclic collector's thresholds once serving: a youngest-generation collection after
# this many more container objects allocated than freed (CPython's default: 700), an older
# generation's after this many of the one below (10).
GC_YOUNG_ALLOCATIONS = 20_000
GC_OLDER_COLLECTIONS = 20

log = logging.getLogger("loyalty.server")


def create_app(config: Config) -> web.Application:
    """Raises ConfigError when the configuration is unusable (for example no HMAC key)."""
    metrics = Metrics()
    privacy = privacy_from_config(config)
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[in_flight_middleware(IN_FLIGHT), latency_middleware, audit_middleware,
                                       error_middleware])
    app[CONFIG] = config
    app[CLOCK] = Clock(config.clock.start)
    app[METRICS] = metrics
    app[KEYRING] = KeyRing(config.auth.keys)
    app[PROGRAMS] = ProgramHolder(config.resolve(config.rules.dir), metrics, app[CLOCK])
    app[STATE] = {"started": False, "draining": False}
    app[PRIVACY] = privacy
    app[LIMITER] = TokenBuckets(config.limits.requests_per_second_per_key, config.limits.burst)
    app[IN_FLIGHT] = InFlight.from_config(config.server)
    app[EVENTS_SETTLED] = Settled()
    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(start_draining)
    add_routes(app)
    if config.console.enabled:
        from server import console
        console.setup(app)
    return app


async def resources(app: web.Application):
    config = app[CONFIG]
    db, versions = await _open_with_program(app)
    app[OPS] = Deps(db, app[PROGRAMS], app[CLOCK], app[METRICS], app[PRIVACY],
                    MembershipCache(config.database.segments_cache_members))
    await refresh_keys(app[KEYRING], db)     # the database's keys before the first request
    app[PROGRAMS].count_lost_tiers(
        lambda levels, today: db.lookup(lambda conn: manual_tiers_outside(conn, levels, today)))
    hup = _install_sighup(app)
    watcher = None
    if config.rules.watch:
        watcher = asyncio.create_task(watch(app[PROGRAMS], config.rules.poll_interval_ms, config.rules.settle_ms))
    background = [watcher] if watcher else []
    background.append(asyncio.create_task(
        keep_keys_fresh(app[KEYRING], db, config.auth.keys_refresh_seconds)))
    # Another server on the database may record a newer program: follow it, watched folder or not.
    background.append(asyncio.create_task(versions.follow(config.rules.poll_interval_ms)))
    if config.jobs.enabled:
        background.append(asyncio.create_task(
            schedule(db, app[PROGRAMS], app[CLOCK], config.jobs.interval_seconds,
                     config.events.expiring_days_before)))
    dispatcher = Dispatcher(db, config, app[METRICS], app[CLOCK])
    await dispatcher.start()
    background.append(asyncio.create_task(dispatcher.run()))
    if config.database.preload and db.backend == "sqlite":     # PostgreSQL keeps its own cache
        app[STATE]["preloading"] = True
        background.append(asyncio.create_task(_preload(app, db)))
    # Everything loaded so far (modules, the program, the rules engine) lives as long as the
    # process; frozen, a full collection no longer walks it: ~30 ms pauses became p99 latency.
    gc.collect()
    gc.freeze()
    # A request allocates thousands of container objects that die with it: collected every
    # 700, many are walked (and promoted) while still in use. Less often, fewer are
    # (benchmarks/confirm_cpu.py --callgrind --http, 10 at a time: 2.8 and 3.0 % fewer
    # instructions per confirmed receipt in two runs; one at a time, 1.3 %).
    gc.set_threshold(GC_YOUNG_ALLOCATIONS, GC_OLDER_COLLECTIONS, GC_OLDER_COLLECTIONS)
    app[STATE]["started"] = True
    try:
        yield
    finally:
        app[STATE]["started"] = False
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await versions.close()
        db.close()


async def _open_with_program(app: web.Application) -> tuple[Database, ProgramVersions]:
    """The database and the program to serve: the folder's, recorded; if the folder does not
    load, the newest recorded one; if there is none, the folder's ProgramError."""
    try:
        folder = app[PROGRAMS].load_folder()
    except ProgramError as e:
        folder = e
    db = app[DATABASE] = await _open_database(app)
    versions = app[VERSIONS] = ProgramVersions(app[PROGRAMS], db, app[CLOCK], app[KEYRING].name_of)
    try:
        await versions.start(folder)
    except BaseException:
        db.close()
        raise
    return db, versions


async def _open_database(app: web.Application) -> Database | PgDatabase:
    """Opened, migrated, and its first write done (_first_write). While another process holds
    the write lock (a `loyalty jobs run`, a sqlite3 shell) this waits up to
    database.start_wait_seconds; StartupError says in one line why it cannot open."""
    config = app[CONFIG]
    if config.database.url is not None:
        return await _open_postgresql(app)
    path = config.resolve(config.database.path)
    deadline = time.monotonic() + config.database.start_wait_seconds
    await asyncio.to_thread(check_database_file, path)
    waiting = _log_waiting_once(path, config.database.start_wait_seconds)
    while True:
        await wait_for_write_lock(path, deadline, waiting)
        db = await _open_once(app, path)
        if db is not None:
            return db
        # Another process took the write lock between the wait and the migrations.
        if time.monotonic() >= deadline:
            raise still_locked(path, lock_holder(path))


async def _open_once(app: web.Application, path) -> Database | None:
    """None when another process holds the write lock."""
    config = app[CONFIG]
    db = Database.from_config(config.database, path, migrations=_Checked(migrations),
                              on_commit=app[METRICS].on_commit, on_checkpoint=app[METRICS].on_checkpoint,
                              on_storage_error=app[METRICS].on_storage_error)
    try:
        try:
            await asyncio.to_thread(db.open)
            await db.write(lambda conn: _first_write(conn, app))
        except BaseException:
            db.close()
            raise
    # RuntimeError: db.open() found a journal mode other than WAL (a file system without it).
    # StorageError: the first write met a full disk or, past database.busy_wait_seconds, a lock.
    except (sqlite3.Error, OSError, RuntimeError, StorageError) as e:
        if is_busy(e) or isinstance(e, StorageBusy):
            return None
        raise StartupError(f"cannot open the database {path}: {e}") from None
    return db


class NewerDatabase(RuntimeError):
    """The SQLite file holds migrations of a newer version than this one."""


class _Checked:
    """SQLite's migrations, saying in the log which ones an upgrade applied: the one trace of
    it an operator has, beside the schema itself. A file a newer version upgraded is refused:
    SQLite's migrations are not all additions (m032 moved rule_totals from triggers to the
    writers), so an earlier version serving it writes rows `audit verify` then fails."""

    def __init__(self, inner):
        self.inner = inner

    def apply(self, db) -> None:
        # sqlite-utils lists only pending and applied migrations publicly, not those it knows.
        known = {m.name for m in self.inner._migrations}
        unknown = [m.name for m in self.inner.applied(db) if m.name not in known]
        if unknown:
            raise NewerDatabase(f"a newer version of the server upgraded it (migration(s) {', '.join(unknown)}, "
                                "which this version does not know); start that version again, or restore the "
                                "backup taken before the upgrade")
        pending = [m.name for m in self.inner.pending(db)]
        started = time.monotonic()
        self.inner.apply(db)
        _log_applied(pending, time.monotonic() - started)


def _log_applied(names: list[str], seconds: float) -> None:
    if names:
        span = names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}"
        log.info("database schema upgraded: %d migration(s) applied (%s) in %.1f s", len(names), span, seconds)


async def _open_postgresql(app: web.Application) -> PgDatabase:
    """Opened and migrated (processes starting together take turns on the migrations'
    advisory lock), and its first write done. Several servers may share the database."""
    from storage.pg.database import PgDatabase      # psycopg: imported only for PostgreSQL
    db = PgDatabase.from_config(app[CONFIG].database, on_commit=app[METRICS].on_commit,
                                on_storage_error=app[METRICS].on_storage_error)
    try:
        try:
            started = time.monotonic()
            applied = await asyncio.to_thread(db.open)
            _log_applied(applied, time.monotonic() - started)
            await db.write(lambda conn: _first_write(conn, app))
        except BaseException:
            db.close()
            raise
    except StorageUnavailable as e:
        raise DatabaseUnreachable(f"cannot open the PostgreSQL database: {e}") from None
    except (*database_errors(), StorageError, MigrationsBusy) as e:
        raise StartupError(f"cannot open the PostgreSQL database: {e}") from None
    return db


def _first_write(conn, app: web.Application) -> None:
    """Old plain card numbers protected, config.yaml's names for its keys where the
    adjustments' records take the name of their key from, and the HMAC keys checked against
    the ones the stored hashes were made with."""
    protect_existing(conn, app[PRIVACY])
    api_keys.write_config_names(conn, app[KEYRING].config_names)
    refused = member_care.record_keys(conn, app[PRIVACY].key_checks(), iso(app[CLOCK].now()))
    if refused:
        raise StartupError(refused)


def _log_waiting_once(path, wait_seconds: float):
    told = False

    def waiting(holder: str) -> None:
        nonlocal told
        if not told:
            told = True
            log.warning("the database %s is locked by %s; waiting up to %gs for it (database.start_wait_seconds)",
                        path, holder, wait_seconds)
    return waiting


async def _preload(app: web.Application, db: Database) -> None:
    """Receipts are served meanwhile (from the disk); /readyz says ready once it is done."""
    try:
        seconds = await preload(db)
        log.info("cache preloaded in %.1fs", seconds)
    except Exception:  # noqa: BLE001 - a cold cache is slower, not wrong
        log.exception("preloading the cache failed; serving with what it holds")
    finally:
        app[STATE]["preloading"] = False


def _install_sighup(app: web.Application) -> bool:
    """SIGHUP reloads the program, as daemons conventionally do."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload_on_signal, app[PROGRAMS])
        return True
    except (NotImplementedError, RuntimeError, ValueError):
        return False


def _reload_on_signal(holder) -> None:
    try:
        holder.reload("SIGHUP")
    except Exception as e:  # noqa: BLE001 - else only the loop's traceback says it, and no metric or last_reload
        holder.reload_failed("SIGHUP", e)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_then_drain(app: web.Application, stop: asyncio.Event, drain_seconds: float, then: str) -> None:
    """Once stopped: /readyz answers 503 for drain_seconds while requests are still served,
    so a load balancer moves away before the listener closes."""
    await stop.wait()
    app[STATE]["draining"] = True
    log.info("stopping: /readyz answers 503; serving %.1fs more, then %s", drain_seconds, then)
    await asyncio.sleep(drain_seconds)


async def start_draining(app: web.Application) -> None:
    app[STATE]["draining"] = True
    log.info("draining: finishing requests in flight")


@web.middleware
async def latency_middleware(request: web.Request, handler):
    """Request latency by route, method and status class, and refused receipt requests by
    their error code: measured on the answer itself, once per request, whatever refused it
    (authentication, decoding, the operation)."""
    started = time.perf_counter()
    response = None
    try:
        response = await handler(request)
        return response
    finally:
        route = request.match_info.route
        name = route.resource.canonical if route.resource is not None else "unmatched"
        status = response.status if response is not None else 500   # no answer: cancelled or a bug
        metrics = request.app[METRICS]
        metrics.request_latency_of(name, request.method, status_class(status)).observe(
            time.perf_counter() - started)
        endpoint = COUNTED_ENDPOINTS.get(route.name)
        if endpoint is not None and status >= 400:
            metrics.receipts_of(endpoint, error_code(getattr(response, "body", None))).inc()
