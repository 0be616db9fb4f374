"""Process lifecycle: listeners, pools, clients, signals, reload and shutdown.

The daemon owns the mutable state that outlives a single connection: the current configuration,
the pools keyed by (tenant, user, database), client counts for max_clients, and cancel keys.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections import Counter
from dataclasses import dataclass

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from gpooler import admin, listener, logs, tls
from gpooler.cancel import CancelKeys
from gpooler.client import Client
from gpooler.config import (
    Config,
    ConfigError,
    ListenConfig,
    TenantConfig,
    UserConfig,
    load_config,
)
from gpooler.login import Login, Refusal
from gpooler.pool import Pool, Target
from gpooler.protocol import CancelKey
from gpooler.stats import Stats

log = logging.getLogger(__name__)


def pool_target(tenant: TenantConfig, user: UserConfig, database: str) -> Target:
    return Target(tenant.host, tenant.port, user.server_user, user.server_password, database,
                  tls.server_tls(tenant))


@dataclass(frozen=True)
class WorkerSlot:
    """Which of the worker processes this is; peer_dir holds their cancel sockets."""

    index: int = 0
    count: int = 1
    peer_dir: str | None = None


class Daemon:
    """One serving process: with `workers: 1` the whole daemon, else one of the workers."""

    def __init__(
        self,
        config_path: str,
        config: Config,
        sockets: list[tuple[socket.socket, ListenConfig]] | None = None,
        worker: WorkerSlot = WorkerSlot(),
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.tls = tls.Tls(config)
        self.worker = worker
        self._sockets = sockets
        self.pools: dict[tuple[str, str, str], Pool] = {}
        self.client_counts: Counter[tuple[str, str]] = Counter()
        self.cancel_keys = CancelKeys(worker.index, worker.count, worker.peer_dir)
        self.servers: list[StreamServer] = []
        self.stopping = False
        self._done = Event()
        self._idle = Event()
        self.stats = Stats(self)  # counters and the StatsD push (stats.py)
        self.pause = admin.Pause()  # PAUSE/RESUME on the admin console

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        """Listen, serve until a signal ends it, return the exit code."""
        sockets = self._sockets or [(listener.bind(e), e) for e in self.config.listen]
        for sock, entry in sockets:
            self.servers.append(listener.start(self, sock, entry))
        self.servers += admin.start(self)
        self.stats.configure(self.config.statsd)
        self.cancel_keys.listen_for_peers()
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.terminate))
        gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(self.interrupt))
        if self.worker.count > 1:
            log.info("worker %d of %d ready", self.worker.index + 1, self.worker.count)
        else:
            log.info("gpooler ready")
        self._done.wait()
        return 0

    def reload(self) -> str | None:
        """Re-read the YAML; keep the old configuration when the new one is not valid (and
        return what is wrong with it)."""
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("configuration reload failed: %s", str(exc).replace("\n", "; "))
            return str(exc).replace("\n", "; ")
        self.apply(config)
        logs.apply(config)
        self.stats.configure(config.statsd)
        self.tls.reload(config)
        log.info("configuration reloaded from %s", self.config_path)

    def apply(self, config: Config) -> None:
        """Move pools to a new configuration in place; drop the pools of removed tenants/users.

        Clients already connected keep their pool; the pools of removed users close what is idle
        and every connection that comes back, and nobody new can log in to them.
        """
        self.config = config
        for key, pool in list(self.pools.items()):
            tenant_id, user_name, database = key
            tenant = config.tenants.get(tenant_id)
            user = tenant.users.get(user_name) if tenant is not None else None
            if user is None:
                del self.pools[key]
                pool.close()
                log.info("pool %s removed", pool.name)
            else:
                pool.reconfigure(
                    pool_target(tenant, user, database), user.pool_size, user.max_prepared_statements
                )

    def terminate(self) -> None:
        """SIGTERM: stop accepting, let transactions finish within shutdown_timeout, then exit."""
        if self.stopping:
            return
        self.stopping = True
        timeout = self.config.shutdown_timeout
        log.info("shutting down: waiting up to %gs for running transactions", timeout)
        self._stop_listening()
        for client in self.cancel_keys.clients():
            server = client.server
            if server is None or (server.pending <= 0 and server.status == ord("I")):
                client.shut_down()
        self.pause.wake()  # paused clients were just shut down: let them leave
        if self.cancel_keys.clients() and not self._idle.wait(timeout or None):
            log.info("shutdown timeout reached: closing remaining clients")
        self._close_everything()

    def interrupt(self) -> None:
        """SIGINT: close every connection and exit at once."""
        log.info("interrupted: closing all connections")
        self.stopping = True
        self._stop_listening()
        self._close_everything()

    def _stop_listening(self) -> None:
        for server in self.servers:
            server.close()

    def _close_everything(self) -> None:
        for client in self.cancel_keys.clients():
            client.shut_down()
        for pool in self.pools.values():
            pool.close()
        self._done.set()

    # ---------------------------------------------------------------- clients and pools

    def pool_for(self, login: Login) -> Pool:
        key = (login.tenant.id, login.user.name, login.database)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(
                f"{key[1]}.{key[0]}/{key[2]}",
                pool_target(login.tenant, login.user, login.database),
                login.user.pool_size,
                login.user.max_prepared_statements,
            )
            self.pools[key] = pool
        return pool

    def client_joined(self, client: Client) -> None:
        """Count a logged-in client against max_clients, or refuse it with 53300."""
        login = client.login
        key = (login.tenant.id, login.user.name)
        if self.client_counts[key] >= login.user.max_clients:
            raise Refusal(
                "53300",
                f'too many clients for user "{login.user.name}" in tenant "{login.tenant.id}" '
                f"(max_clients {login.user.max_clients})",
            )
        self.client_counts[key] += 1

    def client_left(self, client: Client) -> None:
        key = (client.login.tenant.id, client.login.user.name)
        self.client_counts[key] -= 1
        if self.client_counts[key] <= 0:
            del self.client_counts[key]

    def register(self, client: Client) -> CancelKey:
        return self.cancel_keys.issue(client)

    def unregister(self, client: Client) -> None:
        self.cancel_keys.revoke(client)
        if self.stopping and not self.cancel_keys.clients():
            self._idle.set()

    def cancel(self, key: CancelKey) -> None:
        self.cancel_keys.cancel(key)
