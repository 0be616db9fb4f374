"""Backing off while Postgres refuses new server connections (`server_login_retry`).

When a pool cannot open a server connection (Postgres down, too many connections, a wrong
server_password, a database that does not exist), one attempt per client only hammers Postgres,
and making every client wait for an attempt of its own turns a clear error into a hang. So the pool
remembers the error, and for a while clients that need a new connection get that same error at
once: Postgres's own ErrorResponse, or 08006 when it could not be reached. One of them tries again
when the period is over; the period starts at FIRST_RETRY, doubles after each failed retry up to
`server_login_retry`, and a success ends it. Idle connections keep serving all along.

No I/O and the clock passed in, so the rules are unit-tested without sleeping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from gpooler.backend import ServerError

log = logging.getLogger(__name__)

FIRST_RETRY = 0.5


class LoginBackoff:
    """One pool's last login failure and when to try again."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limit = 0.0  # server_login_retry: the longest period; 0 = no backoff
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget the failure: the next client tries (a success, or a reload changed the target)."""
        self.error: ServerError | None = None
        self.delay = 0.0
        self.failed_at = -math.inf
        self.retry_at = 0.0

    def waiting(self) -> bool:
        """Whether a retry is not due yet (the janitor does not warm such a pool)."""
        return bool(self.limit) and self.error is not None and self._clock() < self.retry_at

    def start(self) -> float:
        """Before a login: raise the remembered error while backing off, else return the start
        time to give failed(). The caller that finds a retry due makes it, and the period is
        renewed at once, so the others keep getting the error: one attempt per period."""
        now = self._clock()
        error = self.error
        if error is not None and self.limit:
            if now < self.retry_at:
                raise ServerError(error.response, str(error))
            self.retry_at = now + self.delay
        return now

    def failed(self, error: ServerError, started: float) -> None:
        """A login begun at `started` failed: back off, longer after each failed retry."""
        if not self.limit or started < self.failed_at:
            return  # begun before the failure already booked: the same trouble, not a retry
        now = self._clock()
        self.delay = min(self.limit, self.delay * 2 if self.error is not None else FIRST_RETRY)
        self.error, self.failed_at, self.retry_at = error, now, now + self.delay
        log.warning("pool %s: server login failed: %s; clients that need a new server "
                    "connection get this error for the next %gs", self.name, error, self.delay)

    def succeeded(self) -> None:
        if self.error is not None:
            log.info("pool %s: server login works again", self.name)
            self.reset()
