"""config.yaml, decoded strictly: an unknown key or a wrong type stops start-up.

Every key can be overridden from the environment: LOYALTY_SERVER__PORT=9000 sets
server.port. Relative paths are resolved against the config file's folder, so the
server finds its database and program wherever it is started from.
"""
from __future__ import annotations

import difflib
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml
from msgspec import Meta, Struct

from server.errors import UNKNOWN_FIELD, validation_error

ENV_PREFIX = "LOYALTY_"

Port = Annotated[int, Meta(ge=0, le=65535)]
Positive = Annotated[int, Meta(gt=0)]
Sha256Hex = Annotated[str, Meta(pattern="^[0-9a-f]{64}$", description="64 lowercase hexadecimal digits")]


class ServerConfig(Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: Annotated[int, Meta(gt=0, le=64 * 1024 * 1024)] = 1024 * 1024
    shutdown_timeout_seconds: Annotated[float, Meta(ge=0, le=300)] = 10.0
    # After SIGTERM /readyz answers 503 this long while requests are still served, so a
    # load balancer stops sending new ones before the listener closes.
    drain_seconds: Annotated[float, Meta(ge=0, le=300)] = 0.0
    # Requests being handled at once; above it new ones are shed at once with 503.
    requests_in_flight_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 1_024
    # The same for one key, so one register's stuck or hostile requests leave the others
    # room. Default: an eighth of requests_in_flight_max.
    requests_in_flight_per_key_max: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    # A connection must deliver a whole request header this long after it opens, and after
    # the first byte of each later request on it; otherwise it is closed.
    header_timeout_seconds: Annotated[float, Meta(gt=0, le=300)] = 2.0
    # A request's body must have arrived this long after its header (408 and close otherwise).
    body_timeout_seconds: Annotated[float, Meta(gt=0, le=3_600)] = 10.0
    # An idle keep-alive connection is closed after this long without a new request.
    keepalive_timeout_seconds: Annotated[float, Meta(gt=0, le=3_600)] = 60.0
    # Open connections at once; past it the one that has waited longest for a request
    # header is closed. Default: what RLIMIT_NOFILE leaves after the database, logs and spares.
    connections_max: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    # One line per answered request: `combined` (the Combined Log Format, the key id as its
    # user) or `json` (JSON lines); card numbers are masked, keys never written.
    access_log: Literal["off", "combined", "json"] = "off"
    # The file it is appended to (reopened when rotated); standard output when not set.
    access_log_path: Annotated[str, Meta(min_length=1, max_length=4_096)] | None = None
    # Only 1: kept so a config that states it still starts; any other value stops start-up
    # with the reason (RETIRED below).
    workers: Annotated[int, Meta(ge=1, le=1)] = 1


class DatabaseConfig(Struct, forbid_unknown_fields=True):
    path: str = "data/loyalty.db"
    # PostgreSQL instead of the SQLite file at `path` (docs/postgresql.md): libpq's URL, the
    # password from PGPASSWORD or ~/.pgpass, never from here. Several servers may share it.
    url: Annotated[str, Meta(pattern=r"^postgres(ql)?://", max_length=4_096,
                             description="a libpq URL starting postgresql://")] | None = None
    # On PostgreSQL: connections each server process keeps, one per worker thread.
    connections: Annotated[int, Meta(ge=1, le=64)] = 8
    # On PostgreSQL: a write refused for a conflict with another transaction (a unique key
    # taken meanwhile, a deadlock, a serialization failure) runs again from its start at
    # most this often; 0 runs it once. More than a few means a fault, not a race.
    retries: Annotated[int, Meta(ge=0, le=20)] = 3
    commit_batch_max: Annotated[int, Meta(ge=1, le=10_000)] = 256
    write_queue_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    readers: Annotated[int, Meta(ge=1, le=64)] = 2
    # The write connection's page cache. Every receipt is read and written through it, so
    # sized to the member base (~520 MiB per million members, README) the receipt path never waits
    # on the disk; it is process memory and shows in the server's RSS.
    cache_mib: Annotated[int, Meta(ge=2, le=1_048_576)] = 64
    # Members whose segments the receipt path keeps in memory (~125 bytes each when full),
    # so their receipts read no spans until a segment or the daily job changes; 0: none kept.
    segments_cache_members: Annotated[int, Meta(ge=0, le=100_000_000)] = 500_000
    # Read the members' hot rows into that cache at start; /readyz answers 503 until done.
    preload: bool = False
    # At start, how long to wait while another process holds the database's write lock (on
    # PostgreSQL: while another process applies the migrations).
    start_wait_seconds: Annotated[float, Meta(ge=0, le=3_600)] = 60.0
    # A write waits at most this long (from being queued) for a write lock held by another
    # program, then answers 503 storage_busy.
    busy_wait_seconds: Annotated[float, Meta(ge=0, le=60)] = 2.0
    # Over this size the WAL is copied into the database and restarted from its beginning
    # between two batches of writes, and the file is cut back to it.
    wal_checkpoint_mib: Annotated[int, Meta(ge=1, le=4096)] = 32
    # Below this much free space on the database's disk /readyz answers 503 storage_full.
    min_free_mib: Annotated[int, Meta(ge=0, le=1_048_576)] = 64


class RulesConfig(Struct, forbid_unknown_fields=True):
    dir: str = "rules/programs/market"
    watch: bool = True
    poll_interval_ms: Annotated[int, Meta(ge=50, le=60_000)] = 1_000
    # A change is loaded only after the folder stayed unchanged this long.
    settle_ms: Annotated[int, Meta(ge=0, le=60_000)] = 500


Role = Literal["register", "manager", "support", "monitor"]
# `loyalty keys add` names its keys `person-<n>` (storage/api_keys.py); a config key may not
# take such an id, so the audit log's key ids always say which key acted.
ConfigKeyId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^(?!person-[0-9]+$)",
                                  description="1 to 128 characters, not of the form person-<number>, which "
                                              "`loyalty keys add` gives its keys")]
PersonName = Annotated[str, Meta(min_length=1, max_length=128)]


class KeyConfig(Struct, forbid_unknown_fields=True):
    id: ConfigKeyId
    sha256: Sha256Hex
    role: Role
    stores: Annotated[list[str], Meta(max_length=10_000)] = []
    # Who holds the key (shown beside its id in the audit log); default: the id.
    name: PersonName | None = None


class AuthConfig(Struct, forbid_unknown_fields=True):
    keys: Annotated[list[KeyConfig], Meta(max_length=100_000)] = []
    # A support key may adjust a member's points by at most this many, either way.
    support_adjustment_max_points: Annotated[int, Meta(ge=1, le=1_000_000_000)] = 1_000
    # Keys added or revoked with `loyalty keys` take effect within this long, without a restart.
    keys_refresh_seconds: Annotated[float, Meta(ge=0.1, le=300)] = 2.0


class JobsConfig(Struct, forbid_unknown_fields=True):
    # Expiry, release of expired holds, birthday events and (once a local day) RFM scores and
    # segments run inside the server this often; on PostgreSQL each round also writes an anchor.
    enabled: bool = True
    interval_seconds: Annotated[float, Meta(ge=0.05, le=86_400)] = 60.0


class LimitsConfig(Struct, forbid_unknown_fields=True):
    # A token bucket per key: refilled at this rate, holding at most `burst` requests.
    requests_per_second_per_key: Annotated[float, Meta(gt=0, le=1_000_000)] = 1_000.0
    burst: Annotated[int, Meta(ge=1, le=10_000_000)] = 2_000


HmacKeyId = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$",
                                 description="1 to 32 lowercase letters, digits, '_', '.' or '-'")]


class HmacKeyRotation(Struct, forbid_unknown_fields=True):
    """A key that wraps every stored card and phone hash of the key before it (server/privacy.py)."""
    id: HmacKeyId
    # The environment variable holding the key, or the key itself (one of the two).
    key_env: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    key: Annotated[str, Meta(min_length=16, max_length=1024)] | None = None


class PrivacyConfig(Struct, forbid_unknown_fields=True):
    # Card numbers and phones are stored as HMAC-SHA256 under this key (never in the database).
    hmac_key_env: Annotated[str, Meta(min_length=1, max_length=128)] = "LOYALTY_HMAC_KEY"
    hmac_key: Annotated[str, Meta(min_length=16, max_length=1024)] | None = None
    # For demos only: used when neither the environment nor hmac_key gives a key.
    demo_insecure_hmac_key: Annotated[str, Meta(min_length=16, max_length=1024)] | None = None
    # Key rotations, oldest first; the last is in force. Each wraps the hashes of the key before
    # it, so every key listed stays needed; `loyalty privacy rotate-key` wraps the stored rows.
    hmac_key_rotations: Annotated[list[HmacKeyRotation], Meta(max_length=16)] = []


class ConsoleConfig(Struct, forbid_unknown_fields=True):
    # The manager's console at /console (server/console/).
    enabled: bool = True
    # Signed-in sessions kept at once; one more pushes out the one idle longest.
    sessions_max: Annotated[int, Meta(ge=1, le=10_000)] = 64
    # A session unused this long is gone; so is any session this old.
    idle_timeout_seconds: Annotated[float, Meta(ge=10, le=86_400)] = 900.0
    session_max_hours: Annotated[float, Meta(gt=0, le=168)] = 12.0
    # Set when the console is reached through TLS: the browser then sends the cookie over it only.
    secure_cookie: bool = False
    # A program file edited in the browser, at most.
    file_max_bytes: Annotated[int, Meta(ge=1_024, le=4 * 1024 * 1024)] = 256 * 1024
    # A backtest replays at most this many stored receipts, over at most this many days.
    backtest_receipts_max: Annotated[int, Meta(ge=1, le=100_000_000)] = 2_000_000
    backtest_days_max: Annotated[int, Meta(ge=1, le=3_660)] = 400
    # Finished backtests kept for their pages; the oldest goes first.
    backtests_kept: Annotated[int, Meta(ge=1, le=100)] = 8


EventType = Literal["member.enrolled", "receipt.confirmed", "receipt.cancelled", "return.accepted",
                    "referral.rewarded", "referral.reversed", "tier.changed", "points.expiring", "points.expired",
                    "birthday", "offer.assigned", "card.replaced", "member.merged", "member.erased", "member.updated"]


class WebhookConfig(Struct, forbid_unknown_fields=True):
    id: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="1 to 64 letters, digits, '_', '.' or '-'")]
    url: Annotated[str, Meta(min_length=8, max_length=2_048, pattern=r"^https?://",
                             description="an http:// or https:// URL")]
    # Signs each body: X-Loyalty-Signature: sha256=<hex HMAC-SHA256 of the body under it>.
    secret: Annotated[str, Meta(min_length=16, max_length=1_024)]
    events: Annotated[list[EventType], Meta(min_length=1, max_length=64)]


class EventsConfig(Struct, forbid_unknown_fields=True):
    # Events are kept this long after they were written and delivered (or when no webhook wants them).
    retention_days: Annotated[int, Meta(ge=1, le=3_650)] = 30
    # points.expiring is sent this many days before a lot's points expire, once per lot.
    expiring_days_before: Annotated[int, Meta(ge=1, le=365)] = 7
    # One delivery (connect, send, answer) at most this long, else it counts as failed.
    timeout_seconds: Annotated[float, Meta(gt=0, le=120)] = 10.0
    # Retries wait 1 s, 2, 4 ... up to retry_max_seconds (each with up to 20 % jitter), for
    # retry_for_seconds from the first attempt; then the delivery is dead (`loyalty events retry`).
    retry_initial_seconds: Annotated[float, Meta(gt=0, le=3_600)] = 1.0
    retry_max_seconds: Annotated[float, Meta(gt=0, le=3_600)] = 60.0
    retry_for_seconds: Annotated[float, Meta(gt=0, le=30 * 86_400)] = 86_400.0
    # Deliveries in flight at once, over all webhooks.
    concurrency_max: Annotated[int, Meta(ge=1, le=1_000)] = 16
    # How often the outbox is looked at when nothing is due.
    poll_interval_seconds: Annotated[float, Meta(ge=0.01, le=60)] = 0.25
    # Events taken from the outbox per round and webhook.
    batch_max: Annotated[int, Meta(ge=1, le=10_000)] = 256


class ClockConfig(Struct, forbid_unknown_fields=True):
    # The server's clock starts at this instant and runs forward in real time.
    start: datetime | None = None


class Config(Struct, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    rules: RulesConfig = msgspec.field(default_factory=RulesConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    clock: ClockConfig = msgspec.field(default_factory=ClockConfig)
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    privacy: PrivacyConfig = msgspec.field(default_factory=PrivacyConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    # Receivers of events (server/webhooks.py); ids must differ.
    webhooks: Annotated[list[WebhookConfig], Meta(max_length=100)] = []
    # Folder the relative paths above are resolved against (not a YAML key).
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p


WHOLE_FILE = ""     # the key of a problem with the file itself, which no key names


class ConfigError(Exception):
    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line (PyYAML's own message spans several, quoting the text): the problem and where."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(e).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(str(path), WHOLE_FILE, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), WHOLE_FILE, f"not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), WHOLE_FILE, f"not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(str(path), WHOLE_FILE, "not a configuration: nested too deeply to read") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), WHOLE_FILE, "expected a mapping at the top level")
    # A section whose every key is commented out is null in YAML: it means its defaults.
    raw = {section: value for section, value in raw.items() if value is not None}
    raw.pop("base_dir", None)
    from_env = apply_env_overrides(raw, os.environ if environ is None else environ)
    raw["base_dir"] = str(path.resolve().parent)
    try:
        return config_from_dict(raw, source=str(path))
    except ConfigError as e:
        # A value the environment set is not in the file the message names: say where it came from,
        # or the operator reads a correct config.yaml and finds nothing to fix.
        name = from_env.get(e.key)
        if name is None:
            raise
        raise ConfigError(e.source, e.key, f"{e.reason} (set by the environment variable {name})") from None


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    try:
        config = msgspec.convert(_yaml_switches(raw), Config, strict=False)
    except msgspec.ValidationError as e:
        detail = validation_error(e, Config).details[0]
        key = detail["path"] if detail["path"] != "$" else WHOLE_FILE
        raise ConfigError(source, key, _with_hint(detail["message"], key)) from None
    database = raw.get("database")
    if isinstance(database, dict) and database.get("url") is not None and database.get("path") is not None:
        # Which one a server opened would depend on reading this file carefully: refuse both.
        raise ConfigError(source, "database", "has both path (SQLite) and url (PostgreSQL); keep the one to use")
    if config.database.url is not None and (problem := _url_problem(config.database.url)):
        # Read here, once: otherwise each command meets it in its own way (serve in one line,
        # audit verify and jobs run with a traceback).
        raise ConfigError(source, "database.url", f"not a libpq connection URL: {problem}")
    seen: set[str] = set()
    for i, hook in enumerate(config.webhooks):
        # The id names the webhook's deliveries in the database: two would share them.
        if hook.id in seen:
            raise ConfigError(source, f"webhooks[{i}].id", f"repeats the webhook id '{hook.id}'")
        seen.add(hook.id)
    return config


def _url_problem(url: str) -> str | None:
    try:
        from psycopg.conninfo import conninfo_to_dict     # psycopg: imported only for PostgreSQL
    except ImportError:
        return None
    try:
        conninfo_to_dict(url)
    except Exception as e:  # noqa: BLE001 - psycopg's ProgrammingError, whatever libpq's parser says
        return " ".join(str(e).split())
    return None


def _yaml_switches(raw: dict) -> dict:
    """YAML reads a bare `off` (or `no`, `false`) as false and `on` as true: server.access_log
    written so means its word, so `access_log: off` is off and `on` is refused naming the choices."""
    server = raw.get("server")
    if isinstance(server, dict) and isinstance(server.get("access_log"), bool):
        return {**raw, "server": {**server, "access_log": "on" if server["access_log"] else "off"}}
    return raw


def apply_env_overrides(raw: dict, environ) -> dict[str, str]:
    """LOYALTY_A__B=v sets raw[a][b] = v, the value parsed as a YAML scalar. Returns the keys set
    (`a.b`) with the variable that set each."""
    applied: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"environment variable {name}", ".".join(parts),
                              f"not a YAML value: {_yaml_problem(e)}") from None
        applied[".".join(parts)] = name
    return applied


_SECTIONS: dict[str, type] = {
    "": Config, "server": ServerConfig, "database": DatabaseConfig, "rules": RulesConfig,
    "auth": AuthConfig, "clock": ClockConfig, "jobs": JobsConfig, "limits": LimitsConfig,
    "privacy": PrivacyConfig, "console": ConsoleConfig, "events": EventsConfig, "webhooks": WebhookConfig,
}


# Keys that accept one value only: why, in place of msgspec's bound.
RETIRED = {
    "server.workers": "must be 1: one process serves, as the database's single writer is the limit "
                      "(worker processes in front of it served fewer receipts a second, not more); for several "
                      "processes, run several `loyalty serve` on a PostgreSQL database (database.url)",
}


def _with_hint(reason: str, key: str) -> str:
    if key in RETIRED:
        return RETIRED[key]
    if reason != UNKNOWN_FIELD:
        return reason
    parent, _, leaf = key.rpartition(".")
    struct = _SECTIONS.get(re.sub(r"\[\d+\]", "", parent))
    if struct is None:
        return reason
    choices = [f for f in struct.__struct_fields__ if f != "base_dir"]
    near = difflib.get_close_matches(leaf, choices, n=1)
    return f"unknown key '{leaf}'" + (f", did you mean '{near[0]}'?" if near else
                                      f" (valid: {', '.join(choices)})")
