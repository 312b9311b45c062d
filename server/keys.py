"""Typed application keys: everything the handlers find on the app, declared in one place."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from server.auth import KeyRing
    from server.clock import Clock
    from server.config import Config
    from server.console import Console
    from server.guards import InFlight, TokenBuckets
    from server.metrics import Metrics
    from server.ops import Deps
    from server.privacy import Privacy
    from server.program_versions import ProgramVersions
    from server.programs import ProgramHolder
    from storage.db import Database
    from storage.events import Settled

CONFIG = web.AppKey("config", "Config")
CLOCK = web.AppKey("clock", "Clock")
KEYRING = web.AppKey("keyring", "KeyRing")
METRICS = web.AppKey("metrics", "Metrics")
PROGRAMS = web.AppKey("programs", "ProgramHolder")
VERSIONS = web.AppKey("versions", "ProgramVersions")
DATABASE = web.AppKey("database", "Database")
OPS = web.AppKey("ops", "Deps")
STATE = web.AppKey("state", dict)
EVENTS_SETTLED = web.AppKey("events_settled", "Settled")
LIMITER = web.AppKey("limiter", "TokenBuckets")
IN_FLIGHT = web.AppKey("in_flight", "InFlight")
PRIVACY = web.AppKey("privacy", "Privacy")
CONSOLE = web.AppKey("console", "Console")
