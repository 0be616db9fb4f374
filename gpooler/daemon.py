"""Process lifecycle: listeners, pools, clients, signals, reload and shutdown.

The daemon owns the mutable state that outlives a single connection: the current configuration,
the pools keyed by (tenant, user, database), client counts for max_clients, and cancel keys.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections import Counter
from dataclasses import dataclass, replace

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from gpooler import admin, listener, logs, tls
from gpooler.auth import Credential
from gpooler.auth_query import AuthQueries
from gpooler.cancel import CancelKeys
from gpooler.janitor import Janitor
from gpooler.client import Client
from gpooler.config import (
    Config,
    ConfigError,
    ListenConfig,
    TenantConfig,
    UserConfig,
    find_user,
    load_config,
)
from gpooler.lockout import FailureBook
from gpooler.login import Login, Refusal
from gpooler.pool import Pool, Target
from gpooler.replicas import Member, Topology, make_psycopg2_cooperative
from gpooler.protocol import CancelKey
from gpooler.stats import Stats

log = logging.getLogger(__name__)


def pool_target(tenant: TenantConfig, user: UserConfig, database: str,
                password: Credential) -> Target:
    return Target(tenant.host, tenant.port, user.server_user, password, database,
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
        # Pools a reload removed, while connections or waiting clients remain: the janitor still
        # keeps their waiters' deadlines.
        self.retired: list[Pool] = []
        self.client_counts: Counter[tuple[str, str]] = Counter()
        self.cancel_keys = CancelKeys(worker.index, worker.count, worker.peer_dir)
        self.servers: list[StreamServer] = []
        self.stopping = False
        self.topologies: dict[str, Topology] = {}  # tenants with replicas
        self.janitor = Janitor(self)
        self._done = Event()
        self._idle = Event()
        self.stats = Stats(self)  # counters and the StatsD push (stats.py)
        self.pause = admin.Pause()  # PAUSE/RESUME on the admin console
        self.auth_query = AuthQueries()  # secrets of the roles not listed under users
        # (tenant, role) -> what the last auth_query login of the role proved, for its pools
        self.credentials: dict[tuple[str, str], Credential] = {}
        self.lockout = FailureBook()  # wrong passwords per (tenant, address): lockout.py

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        """Listen, serve until a signal ends it, return the exit code."""
        make_psycopg2_cooperative()
        self.janitor.start()
        self._start_topologies()
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
        self._start_topologies()
        self.auth_query.reconfigure(config)
        for key in list(self.credentials):
            tenant = config.tenants.get(key[0])
            if tenant is None or tenant.auth_user is None or key[1] in tenant.users:
                del self.credentials[key]
        for key, pool in list(self.pools.items()):
            tenant_id, user_name, database = key[:3]
            tenant = config.tenants.get(tenant_id)
            user = find_user(tenant, user_name) if tenant is not None else None
            member = key[3:]
            if user is not None and member:
                known = {(r.host, r.port) for r in tenant.replicas}
                user = user if member in known else None
            if user is None:
                del self.pools[key]
                pool.close()
                self.retired.append(pool)
                log.info("pool %s removed", pool.name)
            else:
                target = self._target(tenant, user, database)
                if member:
                    target = replace(target, host=member[0], port=member[1])
                pool.reconfigure(target, user.pool_size, user.max_prepared_statements)
                pool.lifetime = user.server_lifetime
                pool.backoff.limit = user.server_login_retry

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

    def _start_topologies(self) -> None:
        """One prober per tenant with replicas; a reload adds, changes and drops them."""
        tenants = self.config.tenants
        for tenant_id in list(self.topologies):
            tenant = tenants.get(tenant_id)
            if tenant is None or not tenant.replicas:
                self.topologies.pop(tenant_id).stop()
        for tenant in tenants.values():
            if not tenant.replicas:
                continue
            replicas = [(r.host, r.port) for r in tenant.replicas]
            topology = self.topologies.get(tenant.id)
            if topology is None:
                topology = self.topologies[tenant.id] = Topology(
                    tenant.id, (tenant.host, tenant.port), replicas,
                    self._probe_credentials(tenant.id), tenant.health_check_interval,
                    tenant.max_replica_lag,
                )
                topology.start()
            else:
                topology.reconfigure((tenant.host, tenant.port), replicas,
                                     tenant.health_check_interval, tenant.max_replica_lag)

    def _probe_credentials(self, tenant_id: str):
        """Probes log in as the tenant's first user, as the configuration is now."""

        def credentials() -> tuple[str, str | None, str]:
            tenant = self.config.tenants[tenant_id]
            user = next(iter(tenant.users.values()))
            return user.server_user, user.server_password, tenant.database

        return credentials

    def _stop_listening(self) -> None:
        for server in self.servers:
            server.close()

    def _close_everything(self) -> None:
        self.janitor.stop()
        self.auth_query.close()
        for topology in self.topologies.values():
            topology.stop()
        for client in self.cancel_keys.clients():
            client.shut_down()
        for pool in self.pools.values():
            pool.close()
        self._done.set()

    # ---------------------------------------------------------------- clients and pools

    def pool_for(self, login: Login, member: Member | None = None) -> Pool:
        """The pool of (tenant, user, database), on one member when the tenant has replicas.

        The YAML's primary keeps the plain key, so that tenants without replicas have one pool.
        """
        tenant = login.tenant
        key = (tenant.id, login.user.name, login.database)
        elsewhere = member is not None and member.address != (tenant.host, tenant.port)
        if elsewhere:
            key += member.address
        pool = self.pools.get(key)
        if pool is None:
            name = f"{key[1]}.{key[0]}/{key[2]}"
            target = self._target(tenant, login.user, login.database)
            if elsewhere:
                name += f"@{member}"
                target = replace(target, host=member.host, port=member.port)
            pool = Pool(name, target, login.user.pool_size, login.user.max_prepared_statements)
            pool.verify_idle = member is not None
            pool.lifetime = login.user.server_lifetime
            pool.backoff.limit = login.user.server_login_retry
            self.pools[key] = pool
        return pool

    def _target(self, tenant: TenantConfig, user: UserConfig, database: str) -> Target:
        """A listed user logs in to Postgres with its server_password; a role auth_query let in
        with what its latest client proved."""
        if user.name in tenant.users:
            return pool_target(tenant, user, database, user.server_password)
        return pool_target(tenant, user, database, self.credentials.get((tenant.id, user.name)))

    def use_credential(self, login: Login, credential: Credential) -> None:
        """A client of an unlisted role logged in: its pools open connections with what it proved
        from now on. Open connections stay: Postgres keeps sessions whose password changed."""
        key = (login.tenant.id, login.user.name)
        if self.credentials.get(key) == credential:
            return
        self.credentials[key] = credential
        for pool_key, pool in self.pools.items():
            if pool_key[:2] == key:
                pool.use_password(credential)

    def busy_on(self, tenant_id: str):
        """For load_balance least_busy: server connections in use on a member, over all pools."""

        def busy(member: Member) -> int:
            return sum(
                len(pool.members) - len(pool.idle)
                for key, pool in self.pools.items()
                if key[0] == tenant_id and (pool.target.host, pool.target.port) == member.address
            )

        return busy

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
