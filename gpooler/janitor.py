"""The one periodic loop: client timeouts and heartbeats, checkout deadlines, idle and old server
connections, warm pools.

Nothing here runs per message: the relay only notes when a client last spoke and when a server
started working, and this loop, a few times a second, compares those times with the limits.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import gevent

from gpooler import protocol as p
from gpooler.backend import IDLE
from gpooler.cancel import CancelKeys
from gpooler.config import find_user

if TYPE_CHECKING:
    from gpooler.client import Client
    from gpooler.config import UserConfig
    from gpooler.daemon import Daemon
    from gpooler.pool import Pool

log = logging.getLogger(__name__)

TICK = 0.2
# A ParameterStatus that drivers keep and ignore: writing it to a vanished client fails within
# TCP_USER_TIMEOUT, which is what finds clients that left without a word.
HEARTBEAT = p.parameter_status("gpooler.heartbeat", "1")


class Janitor:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self._loop: gevent.Greenlet | None = None

    def start(self) -> None:
        self._loop = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.kill(block=False)

    def _run(self) -> None:
        while True:
            gevent.sleep(TICK)
            now = time.monotonic()
            for client in self.daemon.cancel_keys.clients():
                try:
                    self.check_client(client, now)
                except Exception:
                    log.exception("janitor: checking %s failed", client.describe())
            retired = self.daemon.retired
            retired[:] = [pool for pool in retired if pool.members or pool.waiters]
            for pool in [*self.daemon.pools.values(), *retired]:
                if pool.waiters:
                    pool.expire_waiters(now)
            tenants = self.daemon.config.tenants
            for key, pool in list(self.daemon.pools.items()):
                tenant = tenants.get(key[0])
                user = find_user(tenant, key[1]) if tenant is not None else None
                if user is None:
                    continue
                try:
                    self.check_pool(pool, user, now)
                except Exception:
                    log.exception("janitor: checking pool %s failed", pool.name)

    # ---------------------------------------------------------------- clients

    def check_client(self, client: "Client", now: float) -> None:
        user = client.login.user
        server = client.server
        if client.busy_since:  # a statement is running
            limit = user.query_timeout
            if limit and now - client.busy_since > limit and client.cancelled_at != client.busy_since:
                client.cancelled_at = client.busy_since
                log.info("query timeout (%gs): cancelling the statement of %s", limit,
                         client.describe())
                if server is not None:
                    gevent.spawn(CancelKeys.cancel_server, server)
            return
        quiet = now - client.last_heard
        if server is not None and server.status != IDLE:
            limit = user.idle_transaction_timeout
            if limit and quiet > limit:
                client.kick("idle in transaction timeout", "25P03",
                            "terminating connection due to idle-in-transaction timeout")
            return
        if user.client_idle_timeout and quiet > user.client_idle_timeout:
            client.kick("idle timeout", "57P05", "terminating connection due to idle-session timeout")
            return
        interval = user.client_heartbeat_interval
        if interval and now - max(client.last_heard, client.last_heartbeat) > interval:
            client.last_heartbeat = now
            client.heartbeat(HEARTBEAT)

    # ---------------------------------------------------------------- servers

    def check_pool(self, pool: "Pool", user: "UserConfig", now: float) -> None:
        """Close idle connections past server_lifetime, or idle past server_idle_timeout beyond
        min_pool_size; open connections up to min_pool_size; say which are due a check before
        they serve again (server_check_delay, 0: all)."""
        delay = user.server_check_delay
        pool.check_before = now - delay if delay else math.inf
        keep = user.min_pool_size
        for server in list(pool.idle):  # oldest first
            too_old = user.server_lifetime and now - server.created > user.server_lifetime
            idle_long = (user.server_idle_timeout and pool.total > keep
                         and now - server.last_used > user.server_idle_timeout)
            if too_old or idle_long:
                log.debug("pool %s: closing %r (%s)", pool.name, server,
                          "lifetime" if too_old else "idle timeout")
                server.close()
                pool.discard(server)
        if (keep and pool.total < min(keep, pool.size) and not pool.waiters and not pool.warming
                and not pool.backoff.waiting()):
            pool.warming = True
            gevent.spawn(pool.warm, keep)
