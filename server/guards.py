"""Abuse and overload guards: a token bucket per key and a cap on requests in flight.

Both answer at once, before any work is done, so a flood costs the server little and
one register's flood does not slow another register down.
"""
from __future__ import annotations

import math
import time

from aiohttp import web

from server.errors import ApiError, overloaded_response


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


class InFlight:
    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.shed = 0


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
