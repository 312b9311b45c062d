"""Bearer keys, stored only as SHA-256 hashes, each with a role and the name of who holds it.

Keys come from config.yaml (the bootstrap) and from the database, where `loyalty keys add`
puts the keys of people (storage/api_keys.py). A running server reads the database's keys
again when they change (checked every auth.keys_refresh_seconds), so a request's
authentication stays one dict lookup and never a query.

register: receipts and returns at its own stores, enrolment there, member look-up.
manager:  everything under /v1/admin and member management.
support:  member look-up, statement, profile changes, adjustments up to
          auth.support_adjustment_max_points; nothing about the program, keys or reports.
monitor:  /metrics.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING

from msgspec import Struct

from server.config import KeyConfig
from server.errors import ApiError, forbidden
from storage import api_keys

if TYPE_CHECKING:
    from storage.db import Database

KEY_LENGTH_MAX = 512
log = logging.getLogger("loyalty.auth")


class Principal(Struct, frozen=True):
    key_id: str
    role: str
    stores: frozenset[str]
    name: str = ""     # who holds the key, for the audit log and adjustments

    def may_use_store(self, store_id: str) -> bool:
        return self.role == "manager" or store_id in self.stores


class KeyRing:
    """The keys in force: config.yaml's, and the database's once `use_people` has read them."""

    def __init__(self, keys: list[KeyConfig]):
        self._config: dict[str, Principal] = {
            k.sha256: Principal(k.id, k.role, frozenset(k.stores), k.name or k.id) for k in keys}
        self.config_names: dict[str, str] = {k.id: k.name or k.id for k in keys}
        self._by_hash: dict[str, Principal] = dict(self._config)
        self._names: dict[str, str] = dict(self.config_names)
        self.version: tuple[int, int] | None = None    # api_keys.version() of what was read last

    def use_people(self, rows: list[api_keys.KeyRow], version: tuple[int, int]) -> None:
        """Replaces the database's keys with these rows (revoked ones are named, not accepted)."""
        self.swap(self.tables_for(rows), version)

    def tables_for(self, rows: list[api_keys.KeyRow]) -> tuple[dict[str, Principal], dict[str, str]]:
        """The lookup tables with these rows of the database: built apart (on a reader thread
        when refreshing), so thousands of keys never stall the event loop."""
        by_hash = {r.sha256: Principal(r.id, r.role, frozenset(r.stores), r.name)
                   for r in rows if r.revoked_at is None}
        by_hash.update(self._config)     # a config key is never shadowed by the database
        names = {r.id: r.name for r in rows}
        names.update(self.config_names)
        return by_hash, names

    def swap(self, tables: tuple[dict[str, Principal], dict[str, str]], version: tuple[int, int]) -> None:
        # Replaced whole: a request on the event loop sees the old set or the new one.
        self._by_hash, self._names = tables
        self.version = version

    def lookup(self, presented: bytes | str) -> Principal | None:
        """The key's Principal, or None for a key that is unknown or revoked."""
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "surrogateescape")
        if not presented or len(presented) > KEY_LENGTH_MAX:
            return None
        digest = hashlib.sha256(presented).hexdigest()
        # Looking up by the hash reveals nothing about a valid key through timing.
        return self._by_hash.get(digest)

    def name_of(self, key_id: str | None) -> str | None:
        """Who holds (or held: revoked keys keep their name) this key id."""
        return self._names.get(key_id) if key_id else None

    def authenticate(self, header: str | None) -> Principal:
        presented = bearer_credentials(header)
        if presented is None:
            raise ApiError(401, "unauthorized", "an Authorization: Bearer <key> header is required",
                           headers={"WWW-Authenticate": "Bearer"})
        principal = self.lookup(presented)
        if principal is None:
            raise ApiError(401, "unauthorized", "unknown key", headers={"WWW-Authenticate": "Bearer"})
        return principal


async def keep_keys_fresh(keyring: KeyRing, db: Database, interval_seconds: float) -> None:
    """Reads the database's keys whenever they changed, every interval_seconds: a key added
    or revoked with `loyalty keys` takes effect within that long, without a restart."""
    failing = False
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await refresh_keys(keyring, db)
        except Exception:  # noqa: BLE001 - a storage fault: the keys in force stay, try again
            if not failing:     # once per fault, not every few seconds while it lasts
                log.exception("could not read the keys from the database; the keys in force stay")
            failing = True
        else:
            if failing:
                log.info("the keys are read from the database again")
            failing = False


async def refresh_keys(keyring: KeyRing, db: Database) -> bool:
    """True when the keys were read again (they had changed)."""
    def read(conn):
        # One read transaction: the rows are exactly those of the version.
        version = api_keys.version(conn)
        if version == keyring.version:
            return None
        rows = api_keys.all_keys(conn)
        return version, keyring.tables_for(rows), sum(r.revoked_at is not None for r in rows)
    found = await db.read(read)
    if found is None:
        return False
    version, tables, revoked = found
    keyring.swap(tables, version)
    log.info("keys of people read from the database: %d in force, %d revoked", version[0] - revoked, revoked)
    return True


def bearer_credentials(header: str | None) -> bytes | None:
    """The key of an `Authorization: Bearer <key>` header, or None for another scheme.

    RFC 7235: `credentials = auth-scheme 1*SP token68`, the scheme compared without
    regard to case, the field value trimmed of optional whitespace (SP, HTAB)."""
    scheme, _, rest = (header or "").strip(" \t").partition(" ")
    if scheme.lower() != "bearer":
        return None
    # aiohttp keeps bytes that are not UTF-8 as surrogates; such a key is simply unknown.
    return rest.lstrip(" ").encode("utf-8", "surrogateescape")


def require_role(principal: Principal, roles: frozenset[str]) -> None:
    if principal.role not in roles:
        raise forbidden(f"a {principal.role} key may not use this endpoint")


def require_store(principal: Principal, store_id: str) -> None:
    if not principal.may_use_store(store_id):
        raise forbidden(f"key {principal.key_id} is not allowed for store {store_id}",
                        [{"path": "store_id", "message": "not one of this key's stores"}])


def require_adjustment_within(principal: Principal, points: int, support_max_points: int) -> None:
    """A support key adjusts by at most support_max_points either way; larger ones need a manager."""
    if principal.role == "support" and abs(points) > support_max_points:
        raise forbidden(f"a support key may adjust at most {support_max_points} points at once "
                        f"(auth.support_adjustment_max_points); {points} needs a manager",
                        [{"path": "points", "message": f"must be from -{support_max_points} to "
                                                       f"{support_max_points} for a support key"}])
