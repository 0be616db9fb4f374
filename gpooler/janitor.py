"""The one periodic loop: client timeouts and heartbeats, idle and old server connections, warm pools.

Nothing here runs per message: the relay only notes when a client last spoke and when a server
started working, and this loop, a few times a second, compares those times with the limits.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent

from gpooler import protocol as p
from gpooler.backend import IDLE

if TYPE_CHECKING:
    from gpooler.client import Client
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
            for pool in list(self.daemon.pools.values()):
                try:
                    self.check_pool(pool, now)
                except Exception:
                    log.exception("janitor: checking pool %s failed", pool.name)

    # ---------------------------------------------------------------- clients

    def check_client(self, client: "Client", now: float) -> None:
        user = client.login.user
        server = client.server
        working = server is not None and (server.pending > 0 or server.open_batch)
        in_transaction = server is not None and not working and server.status != IDLE
        quiet = now - client.last_heard
        if working:
            limit = user.query_timeout
            if limit and server.busy_since and now - server.busy_since > limit and not server.cancelled:
                server.cancelled = True
                log.info("query timeout (%gs): cancelling the statement of %s", limit,
                         client.describe())
                gevent.spawn(self.daemon.cancel_keys.cancel_server, server)
            return
        if in_transaction:
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

    def check_pool(self, pool: "Pool", now: float) -> None:
        user = pool.user
        keep = user.min_pool_size
        for server in list(pool.idle):
            if len(pool.members) + pool.opening <= keep and now - server.created <= (
                user.server_lifetime or float("inf")
            ):
                break
            idle_too_long = user.server_idle_timeout and now - server.last_used > user.server_idle_timeout
            too_old = user.server_lifetime and now - server.created > user.server_lifetime
            if idle_too_long or too_old:
                reason = "idle timeout" if idle_too_long else "lifetime"
                log.debug("pool %s: closing %r (%s)", pool.name, server, reason)
                server.close()
                pool.discard(server)
        if keep and pool.total < min(keep, pool.size) and not pool.waiters and not pool.warming:
            pool.warming = True
            gevent.spawn(pool.warm, keep)
