"""Short-lived cache of ingest authorization, so a frame costs no token or run query.

Positive answers only: a bearer secret's project (none: a server-wide token) and role (kept
``ttl_seconds``, keyed by the secret's SHA-256, never the secret) and a run's project and
``uid`` (kept until evicted or the run is deleted here: runs never change project or
``uid``). A token revoked by ``spectrawatch token revoke`` (another process) thus stops ingest
within ``ttl_seconds``; every other endpoint checks the database each time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from spectrawatch_server.api.deps import Principal, Role, authenticate, find_run, project_name
from spectrawatch_server.storage.repository import hash_secret

_K = TypeVar("_K")
_V = TypeVar("_V")

MAX_ENTRIES = 10_000  # per map; cleared when full (a cache, not a registry)


class AuthCache:
    """``check`` answers from memory; ``authorize`` asks the database and remembers."""

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl_seconds
        self.clock = clock
        # sha256(secret) -> project, role, expiry
        self._tokens: dict[str, tuple[int | None, Role, float]] = {}
        self._runs: dict[int, tuple[int, str]] = {}  # run id -> project id, uid

    def check(
        self,
        require_auth: bool,
        header: str | None,
        run_id: int,
        uid: str | None = None,
        role: Role = "write",
    ) -> bool:
        """True when memory alone shows the caller (of ``role`` or above) may post to
        ``run_id`` (of ``uid`` when given) (no I/O)."""
        if self.ttl <= 0:
            return False
        principal = self._cached_principal(require_auth, header)
        run = self._runs.get(run_id)
        return (
            principal is not None
            and run is not None
            and principal.can_access(run[0])
            and principal.allows(role)
            and uid in (None, run[1])
        )

    def authorize(
        self,
        sessions: sessionmaker[Session],
        require_auth: bool,
        header: str | None,
        run_id: int,
        uid: str | None = None,
        role: Role = "write",
    ) -> None:
        """Check token and run in the database (401/404 as :func:`find_run`, then 403
        ``insufficient_role`` below ``role``); cache success."""
        with sessions() as session:
            principal = authenticate(session, require_auth, header)
            run = find_run(session, principal, run_id, uid)
            if not principal.allows(role):
                principal.require(role, project_name(session, run.project_id))
        if self.ttl <= 0:
            return
        if header is not None:  # a token's (project None: a server-wide token)
            _bounded(self._tokens)[_token_key(header)] = (
                principal.project_id,
                principal.role,
                self.clock() + self.ttl,
            )
        _bounded(self._runs)[run_id] = (run.project_id, run.uid)

    def forget_run(self, run_id: int) -> None:
        """Drop ``run_id`` (deleted); other API processes learn it from the database's 404."""
        self._runs.pop(run_id, None)

    def _cached_principal(self, require_auth: bool, header: str | None) -> Principal | None:
        if header is None:
            return None if require_auth else Principal(project_id=None)
        entry = self._tokens.get(_token_key(header))
        if entry is None or entry[2] < self.clock():
            return None
        return Principal(project_id=entry[0], role=entry[1])


def _token_key(header: str) -> str:
    return hash_secret(header)


def _bounded(cache: dict[_K, _V]) -> dict[_K, _V]:
    if len(cache) >= MAX_ENTRIES:
        cache.clear()
    return cache
