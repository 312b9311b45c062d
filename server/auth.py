"""Bearer keys, stored only as SHA-256 hashes in config, each with a role.

register: receipts and returns at its own stores, enrolment there, member look-up.
manager:  everything under /v1/admin and member management.
monitor:  /metrics.
"""
from __future__ import annotations

import hashlib
import hmac

from msgspec import Struct

from server.config import KeyConfig
from server.errors import ApiError

KEY_LENGTH_MAX = 512


class Principal(Struct, frozen=True):
    key_id: str
    role: str
    stores: frozenset[str]

    def may_use_store(self, store_id: str) -> bool:
        return self.role == "manager" or store_id in self.stores


class KeyRing:
    def __init__(self, keys: list[KeyConfig]):
        self._by_hash: dict[str, tuple[str, Principal]] = {
            k.sha256: (k.sha256, Principal(k.id, k.role, frozenset(k.stores))) for k in keys}

    def authenticate(self, header: str | None) -> Principal:
        presented = bearer_credentials(header)
        if presented is None:
            raise ApiError(401, "unauthorized", "an Authorization: Bearer <key> header is required",
                           headers={"WWW-Authenticate": "Bearer"})
        if not presented or len(presented) > KEY_LENGTH_MAX:
            raise ApiError(401, "unauthorized", "unknown key", headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(presented).hexdigest()
        # Looking up by the hash reveals nothing about a valid key through timing; the
        # digest comparison stays constant-time as well.
        entry = self._by_hash.get(digest)
        if entry is None or not hmac.compare_digest(digest, entry[0]):
            raise ApiError(401, "unauthorized", "unknown key", headers={"WWW-Authenticate": "Bearer"})
        return entry[1]


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
        raise ApiError(403, "forbidden", f"a {principal.role} key may not use this endpoint")


def require_store(principal: Principal, store_id: str) -> None:
    if not principal.may_use_store(store_id):
        raise ApiError(403, "forbidden", f"key {principal.key_id} is not allowed for store {store_id}",
                       [{"path": "store_id", "message": "not one of this key's stores"}])
