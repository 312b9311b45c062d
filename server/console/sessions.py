"""Signed-in console sessions, kept in the server's memory.

The browser holds only a random id (an HttpOnly, SameSite=Strict cookie); the key it was
opened with never leaves the login form. The store is bounded: a session unused for
`idle_timeout_seconds`, or older than `session_max_hours`, is gone, and opening one more
than `sessions_max` pushes out the one idle longest. A restart signs everybody out.

Every form that changes something carries the session's CSRF token; a request from
another site has neither the cookie (SameSite=Strict) nor the token.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from server.auth import Principal

COOKIE = "loyalty_console"
LOGIN_COOKIE = "loyalty_console_login"   # the login form's CSRF token (no session exists yet)
LOGIN_FORM_SECONDS = 600
TOKEN_BYTES = 32


@dataclass
class Session:
    principal: Principal
    csrf: str
    created: float
    seen: float
    # Members looked up in this session: handle -> ("card" | "phone", the number), so pages
    # name a member without the number appearing in a URL (and so in logs and history).
    lookups: OrderedDict[str, tuple[str, str]] = field(default_factory=OrderedDict)


LOOKUPS_PER_SESSION = 32


def _digest(session_id: str) -> str:
    # Kept by digest: the ids themselves are not in memory to be read back.
    return hashlib.sha256(session_id.encode()).hexdigest()


def token_matches(expected: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(expected.encode(), presented.encode())


class SessionStore:
    def __init__(self, sessions_max: int, idle_seconds: float, lifetime_seconds: float,
                 now: Callable[[], float] = time.monotonic):
        self._max = sessions_max
        self._idle = idle_seconds
        self._lifetime = lifetime_seconds
        self._now = now
        self._sessions: OrderedDict[str, Session] = OrderedDict()   # least recently seen first

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, principal: Principal) -> tuple[str, Session]:
        """(the id for the cookie, the session)."""
        self._expire()
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(TOKEN_BYTES)
        now = self._now()
        session = Session(principal, secrets.token_urlsafe(TOKEN_BYTES), now, now)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of that id, marked as used now; None when unknown or expired."""
        if not session_id or len(session_id) > 2 * TOKEN_BYTES:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._now()
        if self._expired(session, now):
            del self._sessions[key]
            return None
        session.seen = now
        self._sessions.move_to_end(key)
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.seen > self._idle or now - session.created > self._lifetime

    def _expire(self) -> None:
        now = self._now()
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]


def remember_lookup(session: Session, kind: str, number: str) -> str:
    """The handle of a member look-up by card or phone (the same one for the same number)."""
    for handle, known in session.lookups.items():
        if known == (kind, number):
            return handle
    handle = secrets.token_urlsafe(12)
    session.lookups[handle] = (kind, number)
    while len(session.lookups) > LOOKUPS_PER_SESSION:
        session.lookups.popitem(last=False)
    return handle
