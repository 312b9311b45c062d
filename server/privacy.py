"""Card numbers and phones are kept as keyed HMAC-SHA256 plus their last four digits.

The key comes from the environment (privacy.hmac_key_env, LOYALTY_HMAC_KEY by default) or
privacy.hmac_key; it is never written to the database, so a copy of the database alone
does not give the numbers back, not even by trying every possible card number. Look-ups
compute the HMAC of the number presented and search for that.
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


class Privacy:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the HMAC key must be at least 16 bytes")
        self._key = key

    def _mac(self, kind: bytes, value: str) -> str:
        return hmac.digest(self._key, kind + b"\0" + value.encode(), "sha256").hex()

    def card(self, card: str) -> str:
        return self._mac(b"card", card)

    def coupon(self, code: str) -> str:
        """code: as storage/coupons.normalize gives it."""
        return self._mac(b"coupon", code)

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
    return Privacy(key.encode())
