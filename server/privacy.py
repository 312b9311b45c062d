"""Card numbers and phones are kept as keyed HMAC-SHA256 plus their last four digits.

The key comes from the environment (privacy.hmac_key_env, LOYALTY_HMAC_KEY by default) or
privacy.hmac_key; it is never written to the database, so a copy of the database alone
does not give the numbers back, not even by trying every possible card number. Look-ups
compute the HMAC of the number presented and search for that.

Key rotation. An HMAC cannot be recomputed under a new key without the number, which is
never stored, so a new key wraps the old hashes instead: under rotation `k2` a card's hash
is `~k2~` + HMAC(k2, its hash under the key before). The id in front says which key a
stored hash is under (a bare hash is under the first key); `loyalty privacy rotate-key`
wraps every stored card and phone hash up to the key in force, beside the serving server.
Meanwhile look-ups try the hash under the key in force, then under each earlier key. A
copy of the database together with an earlier key (a leaked one) no longer gives the
numbers back: every key listed is needed, and none alone is enough.
"""
from __future__ import annotations

import hmac
import logging
import os

from server.config import Config, ConfigError

log = logging.getLogger("loyalty.privacy")

# A server whose config sets clock.start is a test or demo server (the API contract says
# so); with no key configured it uses this one, and says so in its log.
TEST_CLOCK_KEY = "test-clock-only-not-a-secret-key"


ROTATED_MARK = "~"   # sorts after every hex digit: the hashes under one key are one range of an index


class Digest(str):
    """A hash under the key in force that also carries the hashes of the same number under
    the earlier keys, newest first (`older`): rows the rotation has not wrapped yet."""
    older: tuple[str, ...] = ()


def candidates(digest: str) -> tuple[str, ...]:
    """The hashes to look a number up by, the key in force first."""
    return (digest, *getattr(digest, "older", ()))


class Privacy:
    def __init__(self, key: bytes, rotations: list[tuple[str, bytes]] | tuple = ()):
        """rotations: (id, key) of each key rotation, oldest first; the last is in force."""
        for k in (key, *(k for _, k in rotations)):
            if len(k) < 16:
                raise ValueError("the HMAC key must be at least 16 bytes")
        self._first = key
        self._rotations = list(rotations)
        self._key = self._rotations[-1][1] if self._rotations else key
        self.key_ids = ["", *(i for i, _ in self._rotations)]   # "" names the first key

    @property
    def key_in_force(self) -> str:
        return self.key_ids[-1]

    def _wrap(self, kind: bytes, digest: str, rotation: int) -> str:
        key_id, key = self._rotations[rotation]
        return f"{ROTATED_MARK}{key_id}{ROTATED_MARK}" + hmac.digest(key, kind + b"\0" + digest.encode(), "sha256").hex()

    def _mac(self, kind: bytes, value: str) -> str:
        digest = hmac.digest(self._first, kind + b"\0" + value.encode(), "sha256").hex()
        if not self._rotations:
            return digest
        chain = [digest]
        for i in range(len(self._rotations)):
            chain.append(self._wrap(kind, chain[-1], i))
        out = Digest(chain[-1])
        out.older = tuple(reversed(chain[:-1]))
        return out

    def key_of(self, stored: str) -> int | None:
        """The position in key_ids of the key a stored hash is under; None for a key not listed."""
        if not stored.startswith(ROTATED_MARK):
            return 0
        key_id = stored[1:stored.find(ROTATED_MARK, 1)]
        return self.key_ids.index(key_id) if key_id and key_id in self.key_ids else None

    def rewrap(self, kind: str, stored: str) -> str | None:
        """A stored card or phone hash wrapped up to the key in force; None when it is under
        a key not listed (it cannot be found any more, nor wrapped)."""
        position = self.key_of(stored)
        if position is None:
            return None
        for rotation in range(position, len(self._rotations)):
            stored = self._wrap(kind.encode(), stored, rotation)
        return stored

    def in_force_range(self) -> tuple[str, str] | None:
        """[low, high) holding exactly the hashes under the key in force, when it is a rotation."""
        if not self._rotations:
            return None
        key_id = self.key_in_force
        return f"{ROTATED_MARK}{key_id}{ROTATED_MARK}", f"{ROTATED_MARK}{key_id}\x7f"

    def card(self, card: str) -> str:
        return self._mac(b"card", card)

    def phone(self, phone: str) -> str:
        return self._mac(b"phone", normalize_phone(phone))

    def body_digest(self, body: bytes) -> str:
        """A keyed digest of a request body: bodies with card numbers in them cannot be guessed back."""
        return hmac.digest(self._key, b"body\0" + body, "sha256").hex()

    @staticmethod
    def card_last4(card: str) -> str:
        return card[-4:]

    @staticmethod
    def phone_last4(phone: str) -> str:
        return normalize_phone(phone)[-4:]


def normalize_phone(phone: str) -> str:
    """`+380 (50) 123-45-67` and `+380501234567` are the same phone."""
    digits = "".join(ch for ch in phone if ch.isdigit())
    return digits or phone


def privacy_from_config(config: Config, environ=None) -> Privacy:
    environ = os.environ if environ is None else environ
    p = config.privacy
    source, key = None, environ.get(p.hmac_key_env) or None
    if key:
        source = f"environment variable {p.hmac_key_env}"
    elif p.hmac_key:
        source, key = "privacy.hmac_key", p.hmac_key
    elif p.demo_insecure_hmac_key:
        source, key = "privacy.demo_insecure_hmac_key (a demo key: set a real one in production)", \
            p.demo_insecure_hmac_key
    elif config.clock.start is not None:
        source, key = "the built-in test key (clock.start marks a test or demo server)", TEST_CLOCK_KEY
    if key is None:
        raise ConfigError("config", "privacy", f"no HMAC key for card numbers and phones: set the environment "
                          f"variable {p.hmac_key_env} (at least 16 characters) or privacy.hmac_key")
    if len(key.encode()) < 16:
        raise ConfigError("config", "privacy", f"the HMAC key from {source} is shorter than 16 bytes")
    if "demo" in source or "test" in source:
        log.warning("card numbers and phones are protected with %s", source)
    return Privacy(key.encode(), _rotations(p.hmac_key_rotations, environ))


def _rotations(listed, environ) -> list[tuple[str, bytes]]:
    out, seen = [], set()
    for i, r in enumerate(listed):
        where = f"privacy.hmac_key_rotations[{i}]"
        if r.id in seen:
            raise ConfigError("config", where, f"id {r.id} is listed twice")
        if (r.key_env is None) == (r.key is None):
            raise ConfigError("config", where, "give the key in exactly one of key_env and key")
        key = environ.get(r.key_env) if r.key_env else r.key
        if not key:
            raise ConfigError("config", where, f"the environment variable {r.key_env} is not set: without "
                              f"key {r.id} no card or phone hashed under it can be found")
        if len(key.encode()) < 16:
            raise ConfigError("config", where, f"key {r.id} is shorter than 16 bytes")
        seen.add(r.id)
        out.append((r.id, key.encode()))
    return out
