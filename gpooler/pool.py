"""Server connections for one (tenant, user, database): checkout, checkin, waiters, sizing.

Connections are opened lazily up to `pool_size` and reused last-in first-out, so the warmest ones
serve and the rest can age out. Clients that find the pool full queue in arrival order; a returned
connection is handed straight to the first of them, so nobody overtakes a waiting client.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace

from gevent.hub import Waiter, get_hub

from gpooler.auth import Credential
from gpooler.backend import Backend, ServerError
from gpooler.backoff import LoginBackoff
from gpooler.stats import PoolStats
from gpooler.tls import ServerTls

log = logging.getLogger(__name__)

# server_check_delay: an empty query (the cheapest round trip), worded so that pg_stat_activity
# says who sent it; a server that does not answer it in time is taken for dead.
SERVER_CHECK = "-- gpooler server check"
SERVER_CHECK_TIMEOUT = 5.0


class PoolTimeout(Exception):
    """No server connection came free within pool_checkout_timeout (53300)."""


@dataclass(frozen=True)
class Target:
    """Where and as whom a pool logs in; a change of any of it retires the open connections."""

    host: str
    port: int
    user: str
    password: Credential  # a password, an md5 hash, or SCRAM keys (auth_query)
    database: str
    tls: ServerTls = ServerTls()


class Wait:
    """A client waiting at checkout: answered with a connection, None (a free slot to open a
    connection in) or a PoolTimeout. gevent's bare Waiter, woken from the event loop, costs about
    half of what an AsyncResult does, and most checkouts under load wait."""

    __slots__ = ("deadline", "timeout", "waiter", "answer")

    def __init__(self, deadline: float, timeout: float) -> None:
        self.deadline = deadline
        self.timeout = timeout
        self.waiter = Waiter()
        self.answer: Backend | PoolTimeout | None = None

    def answer_with(self, answer: Backend | PoolTimeout | None) -> None:
        self.answer = answer
        get_hub().loop.run_callback(self.waiter.switch, answer)


class Pool:
    def __init__(self, name: str, target: Target, size: int, max_prepared: int) -> None:
        self.name = name
        self.target = target
        self.size = size
        self.max_prepared = max_prepared
        # Replica pools: members go down in normal operation (restarts, failover), so an idle
        # connection is checked for a goodbye the pump has not read yet before it is handed out.
        self.verify_idle = False
        self.warming = False  # the janitor is opening connections up to min_pool_size
        self.lifetime = 0.0  # server_lifetime, checked as connections come back
        self.closed = False  # close(): whatever comes back is closed
        # server_check_delay: idle since before this (monotonic), a connection is checked before
        # it serves again; the janitor moves it on every tick, so checkout needs no clock.
        self.check_before = 0.0
        self.testing = 0  # connections being checked now
        self.backoff = LoginBackoff(name)  # server_login_retry: see backoff.py
        self.generation = 0
        self.idle: list[Backend] = []
        self.members: set[Backend] = set()
        self.opening = 0
        # Clients waiting for a connection, first come first served: (deadline, waiter, timeout).
        self.waiters: deque[Wait] = deque()
        self.server_params: dict[str, str] | None = None
        self.reported: dict[tuple[str, str], dict[str, str]] = {}  # setting -> ParameterStatus seen
        self.stats = PoolStats()

    @property
    def total(self) -> int:
        return len(self.members) + self.opening

    def checkout(self, timeout: float) -> Backend:
        """A logged-in, idle connection; raises PoolTimeout or ServerError."""
        server = self.idle_server()
        if server is not None:
            return server
        if self.total < self.size and not self.waiters:
            self.opening += 1
            return self._open()
        wait = Wait(time.monotonic() + timeout if timeout else math.inf, timeout)
        self.waiters.append(wait)
        try:
            answer = wait.waiter.get()
        except BaseException:
            if wait in self.waiters:
                self.waiters.remove(wait)
            elif not isinstance(wait.answer, Exception):
                self._pass_on(wait.answer)  # handed something, then interrupted: pass it on
            raise
        if isinstance(answer, PoolTimeout):
            raise answer
        return answer if answer is not None else self._open()

    def idle_server(self) -> Backend | None:
        """The most recently used idle connection that is still good, if any: one idle longer
        than server_check_delay is checked first."""
        while self.idle:
            server = self.idle.pop()
            if server.broken or (self.verify_idle and server.hung_up()):
                continue
            if server.last_used >= self.check_before or self._check(server):
                return server
        return None

    def expire_waiters(self, now: float) -> None:
        """Turn away clients that waited past their deadline (the janitor calls this): one timer
        for all waiters instead of one per checkout."""
        for wait in [wait for wait in self.waiters if wait.deadline <= now]:
            self.waiters.remove(wait)
            wait.answer_with(PoolTimeout(
                f"no server connection available within {wait.timeout:g}s (pool {self.name} "
                f"has {self.size} connections, all busy)"
            ))

    def _pass_on(self, server: Backend | None) -> None:
        """A waiter left with what it was handed: a connection goes back, a reserved slot frees."""
        if server is not None:
            self.checkin(server)
        else:
            self.opening -= 1
            self._wake()

    def _check(self, server: Backend) -> bool:
        """Whether a connection idle past server_check_delay still answers. One that does not is
        closed, and so are the others idle as long: they most likely went the same way (a network
        cut, a host gone), and each would cost the client another SERVER_CHECK_TIMEOUT."""
        idle = time.monotonic() - server.last_used
        self.testing += 1
        try:
            server.run(SERVER_CHECK, SERVER_CHECK_TIMEOUT)
        except ServerError as exc:
            dead = [server] + [s for s in self.idle if s.last_used < self.check_before]
            log.warning("pool %s: %r failed its check after %.1fs idle (%s): closing %d idle "
                        "server connection(s)", self.name, server, idle, exc, len(dead))
            for other in dead:
                other.close()
                self.discard(other)
            return False
        except BaseException:  # the checking client went away mid-check: the answer is unread
            server.close()
            self.discard(server)
            raise
        finally:
            self.testing -= 1
        log.debug("pool %s: %r answered its check after %.1fs idle", self.name, server, idle)
        return True

    def _open(self) -> Backend:
        """Open a connection into a slot the caller reserved by counting it in `opening`; while
        Postgres refuses logins, raise its last refusal instead (backoff.py)."""
        try:
            started = self.backoff.start()
            target = self.target
            try:
                server = Backend.connect(
                    (target.host, target.port), target.user, target.password, target.database, self
                )
            except ServerError as exc:
                if target is self.target:  # not a login with what was replaced meanwhile
                    self.backoff.failed(exc, started)
                raise
        except BaseException:
            self.opening -= 1
            self._wake()
            raise
        self.backoff.succeeded()
        self.opening -= 1
        server.generation = self.generation
        self.members.add(server)
        if self.server_params is None:
            self.server_params = dict(server.params)
        log.debug("pool %s: opened %r (%d/%d)", self.name, server, self.total, self.size)
        return server

    def checkin(self, server: Backend) -> None:
        """Take a connection back: to the first waiter, onto the idle stack, or closed."""
        if (
            server.broken
            or self.closed
            or server.generation != self.generation
            or self.total > self.size
            or server not in self.members
        ):
            server.close()
            self.discard(server)
            return
        now = server.last_used = time.monotonic()
        if self.lifetime and now - server.created > self.lifetime:
            server.close()  # old enough: replaced between transactions, never during one
            self.discard(server)
            return
        if self.waiters:
            self.waiters.popleft().answer_with(server)
        else:
            self.idle.append(server)

    def warm(self, count: int) -> None:
        """Open connections until count are open (min_pool_size), unless clients are waiting."""
        try:
            while self.total < min(count, self.size) and not self.waiters:
                self.opening += 1
                self.checkin(self._open())
        except ServerError as exc:
            log.warning("pool %s: could not keep %d connections open: %s", self.name, count, exc)
        finally:
            self.warming = False

    def discard(self, server: Backend) -> None:
        """Forget a closed connection and let a waiter open a replacement."""
        if server not in self.members:
            return
        self.members.discard(server)
        if server in self.idle:
            self.idle.remove(server)
        log.debug("pool %s: closed %r (%d/%d)", self.name, server, self.total, self.size)
        self._wake()

    def _wake(self) -> None:
        """Give free slots to waiters, reserving each so no newcomer takes it first."""
        while self.waiters and self.total < self.size:
            self.opening += 1
            self.waiters.popleft().answer_with(None)

    def reconfigure(self, target: Target, size: int, max_prepared: int) -> None:
        """Apply a reload in place: new size at once, new target for every future connection."""
        self.max_prepared = max_prepared
        for server in self.members:
            server.statements.limit = max_prepared
        if target != self.target:
            self.target = target
            self.generation += 1
            self.server_params = None
            self.reported.clear()
            self.backoff.reset()
            for server in list(self.idle):
                server.close()
                self.discard(server)
        self.size = size
        while self.total > self.size and self.idle:
            server = self.idle.pop(0)
            server.close()
            self.discard(server)
        self._wake()

    def use_password(self, password: Credential) -> None:
        """Log in with this from now on (auth_query: a client proved the role's new password);
        the open connections stay; a login refused with the old one is no reason to wait."""
        self.target = replace(self.target, password=password)
        self.backoff.reset()

    def close(self) -> None:
        """Close what is idle; busy connections are closed as they come back, and so are those
        opened later for the clients still using the pool (a reload removed its user)."""
        self.closed = True
        self.generation += 1
        for server in list(self.idle):
            server.close()
            self.discard(server)
