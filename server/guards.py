"""Abuse and overload guards: a token bucket per key and caps on requests in flight, in
total and per key.

All answer at once, before any work is done, so a flood costs the server little and
one register's flood does not slow another register down.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from aiohttp import web

from server.errors import RETRY_SOON, ApiError, overloaded_response

if TYPE_CHECKING:
    from server.config import ServerConfig


class TokenBuckets:
    """One bucket per key id, refilled at `rate` tokens a second, holding at most `burst`.

    Memory is bounded by the number of configured keys: only authenticated key ids get a
    bucket."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, list[float]] = {}       # key id -> [tokens, last refill]

    def take(self, key: str) -> float:
        """0 when a request may go ahead, otherwise the seconds until it may."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.burst), now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return 0.0
        bucket[0] = tokens
        return (1 - tokens) / self.rate

    def check(self, key: str) -> None:
        wait = self.take(key)
        if wait:
            raise ApiError(429, "rate_limited", f"too many requests for key {key}; retry after {wait:.3f}s",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})


# Probes and scrapes stay answerable while the server sheds load.
UNCAPPED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


# Without server.requests_in_flight_per_key_max, one key may hold this share of the total.
PER_KEY_SHARE_DEFAULT = 8


class InFlight:
    """Requests being handled, in total (counted before auth) and per key (after it)."""

    def __init__(self, limit: int, per_key_limit: int | None = None):
        self.limit = limit
        self.per_key_limit = per_key_limit or limit
        self.count = 0
        self.shed = 0
        self.by_key: dict[str, int] = {}        # only keys with requests in flight: bounded by the keys

    @classmethod
    def from_config(cls, server: ServerConfig) -> InFlight:
        per_key = (server.requests_in_flight_per_key_max
                   or max(1, math.ceil(server.requests_in_flight_max / PER_KEY_SHARE_DEFAULT)))
        return cls(server.requests_in_flight_max, per_key)

    def enter_key(self, key: str, path: str) -> str | None:
        """Takes one of the key's slots (None for the paths never shed); 503 when it has none left."""
        if path in UNCAPPED_PATHS:
            return None
        held = self.by_key.get(key, 0)
        if held >= self.per_key_limit:
            self.shed += 1
            raise ApiError(503, "overloaded", f"{self.per_key_limit} requests of key {key} in flight; "
                           "retry shortly", headers=dict(RETRY_SOON))
        self.by_key[key] = held + 1
        return key

    def leave_key(self, key: str | None) -> None:
        if key is None:
            return
        held = self.by_key[key] - 1
        if held:
            self.by_key[key] = held
        else:
            del self.by_key[key]


def in_flight_middleware(key: web.AppKey):
    @web.middleware
    async def cap(request: web.Request, handler):
        state: InFlight = request.app[key]
        if state.count >= state.limit and request.path not in UNCAPPED_PATHS:
            state.shed += 1
            return overloaded_response(f"{state.limit} requests in flight; retry shortly")
        state.count += 1
        try:
            return await handler(request)
        finally:
            state.count -= 1
    return cap
