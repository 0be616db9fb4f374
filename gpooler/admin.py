"""The admin console: `psql -h 127.0.0.1 -p 6544 -U admin gpooler`.

A small Postgres server of its own on `admin.host:admin.port`: database `gpooler`, the users of
`admin.users` (SCRAM-SHA-256, or md5 for an md5 secret), the simple query protocol only. Every
result is text columns; an unknown command is an ERROR (42601) and the session goes on.

    SHOW POOLS | CLIENTS | SERVERS | STATS | TENANTS | CONFIG | VERSION | HELP
    RELOAD                 what SIGHUP does; an invalid file is an error, the old config stays
    PAUSE [tenant]         new transactions (of the tenant, or everyone) wait at checkout;
                           answers once the transactions running now are over
    RESUME [tenant]        let them go
    KILL tenant            close the tenant's clients and server connections (it is not paused)
    SHUTDOWN               what SIGTERM does: graceful shutdown, exit 0

The console serves a single-process daemon only: with `workers > 1` every worker has its own
pools and they would compete for the port, so it is not started (a warning says so).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Callable

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from gpooler import __version__, listener, logs
from gpooler import protocol as p
from gpooler.auth import client_auth
from gpooler.client import authenticate
from gpooler.backend import IDLE
from gpooler.config import REQUIRED, SETTINGS, Config, Derived, ListenConfig, password_kind
from gpooler.login import Refusal
from gpooler.sockets import ClientGone, close_after, read_message
from gpooler.stats import active_clients, pool_gauges

if TYPE_CHECKING:
    from gpooler.client import Client
    from gpooler.daemon import Daemon

log = logging.getLogger(__name__)

DATABASE = "gpooler"
STARTUP_TIMEOUT = 60.0
MAX_MESSAGE = 1 << 20
KILL_WAIT = 5.0
POLL = 0.02
_TEXT_OID = 25
_EXTENDED = frozenset(b"PBDECH")


class AdminError(Exception):
    """A command failed: an ERROR with this SQLSTATE; the session continues."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


# ------------------------------------------------------------------------------- PAUSE


class Pause:
    """Which tenants are paused; clients of those wait in `wait` before every checkout."""

    def __init__(self) -> None:
        self.active = False  # checked by every checkout: anything paused at all?
        self.everyone = False
        self.tenants: set[str] = set()
        self._changed = Event()

    def holds(self, tenant: str) -> bool:
        return self.everyone or tenant in self.tenants

    def hold(self, tenant: str | None) -> None:
        if tenant is None:
            self.everyone = True
        else:
            self.tenants.add(tenant)
        self.active = True

    def release(self, tenant: str | None) -> None:
        if tenant is None:
            self.everyone = False
            self.tenants.clear()
        else:
            self.tenants.discard(tenant)
        self.active = self.everyone or bool(self.tenants)
        self.wake()

    def wake(self) -> None:
        """Let every waiting client look again (resumed, killed or shutting down)."""
        changed, self._changed = self._changed, Event()
        changed.set()

    def wait(self, client: "Client") -> None:
        """Block a client's checkout while its tenant is paused; a client closed meanwhile
        (KILL, SIGTERM) leaves with ClientGone."""
        tenant = client.login.tenant.id
        while self.holds(tenant) and not client.closing:
            self._changed.wait()
        if client.closing:
            raise ClientGone(client.hangup_reason or "client closed while paused")


# ------------------------------------------------------------------------------- the server


def start(daemon: "Daemon") -> list[StreamServer]:
    """Listen on admin.host:admin.port when configured (single-process daemons only)."""
    config = daemon.config.admin
    if config is None:
        return []
    if daemon.worker.count > 1:
        if daemon.worker.index == 0:
            log.warning("admin console not started: it needs workers: 1 (with %d workers each "
                        "has its own pools)", daemon.worker.count)
        return []
    sock = listener.bind(ListenConfig(config.host, config.port, "admin"))
    server = StreamServer(sock, lambda conn, address: AdminSession(daemon, conn, address).run())
    server.start()
    return [server]


def _row_description(columns: list[str]) -> bytes:
    body = [struct.pack("!h", len(columns))]
    for name in columns:
        body.append(p.cstr(name) + struct.pack("!ihihih", 0, 0, _TEXT_OID, -1, -1, 0))
    return p.message(b"T", b"".join(body))


def _data_row(values: list[Any]) -> bytes:
    body = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            body.append(struct.pack("!i", -1))
        else:
            data = str(value).encode("utf-8")
            body.append(struct.pack("!i", len(data)) + data)
    return p.message(b"D", b"".join(body))


def _complete(tag: str) -> bytes:
    return p.message(b"C", p.cstr(tag))


def result(columns: list[str], rows: list[list[Any]], tag: str = "SHOW") -> bytes:
    return (_row_description(columns) + b"".join(_data_row(r) for r in rows) + _complete(tag))


def _wall(monotonic: float) -> str:
    """A monotonic instant as PgBouncer prints times: `2024-05-01 12:00:00 UTC`."""
    if not monotonic:
        return ""
    when = time.time() - (time.monotonic() - monotonic)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _ptr(obj: object | None) -> str:
    return f"{id(obj):x}" if obj is not None else ""


def _sockname(sock: socket.socket) -> tuple[str, Any]:
    try:
        address = sock.getsockname()
        return address[0], address[1]
    except OSError:
        return "", ""


class AdminSession:
    """One admin connection: startup and authentication, then one command after another."""

    def __init__(self, daemon: "Daemon", sock: socket.socket, address: tuple) -> None:
        self.daemon = daemon
        self.sock = sock
        self.address = address
        self.user = ""
        self.connected_at = time.monotonic()

    @property
    def peer(self) -> str:
        host, port = self.address[0], self.address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _fields(self, **more: Any) -> dict:
        return {"user": self.user, "addr": self.peer, "db": DATABASE, "mode": "admin", **more}

    def run(self) -> None:
        sock = self.sock
        reason = "client closed the connection"
        logged_in = False
        farewell = b""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with gevent.Timeout(STARTUP_TIMEOUT, Refusal("08P01", "startup timed out")):
                packet = listener.read_first_packet(sock)
                if isinstance(packet, p.CancelKey):
                    return  # nothing on the console can be cancelled
                self._login(packet)
            logged_in = True
            log.info("admin connected: user=%s addr=%s", logs.safe(self.user), self.peer,
                     extra=self._fields())
            self._serve()
        except Refusal as refusal:
            reason = f"refused: {refusal.sqlstate} {refusal.text}"
            farewell = refusal.response()
        except p.ProtocolError as exc:
            reason = f"refused: 08P01 protocol violation: {exc}"
            farewell = p.error_response("08P01", str(exc), "FATAL")
        except ClientGone as exc:
            reason = str(exc) or reason
        except OSError as exc:
            reason = f"connection error: {exc.strerror or exc}"
        except Exception:
            log.exception("admin session %s failed", self.peer)
            reason = "internal error"
            farewell = p.error_response("XX000", "internal error in gpooler", "FATAL")
        finally:
            close_after(sock, farewell)
        if logged_in or reason.startswith("refused"):
            duration = time.monotonic() - self.connected_at
            log.info("admin disconnected: user=%s addr=%s duration=%.1fs reason=%s",
                     logs.safe(self.user), self.peer, duration, reason,
                     extra=self._fields(duration=round(duration, 3), reason=reason))

    # ------------------------------------------------------------ startup

    def _login(self, startup: p.Startup) -> None:
        params = startup.params
        self.user = user = params.get("user", "")
        database = params.get("database") or user
        if startup.minor > 0 or any(k.startswith("_pq_.") for k in params):
            unsupported = [k for k in params if k.startswith("_pq_.")]
            self.sock.sendall(p.negotiate_protocol_version(0, unsupported))
        if database != DATABASE:
            raise Refusal("3D000", f'database "{database}" does not exist: the admin console\'s '
                                   f'database is "{DATABASE}"')
        admin = self.daemon.config.admin
        secret = admin.users.get(user) if admin is not None else None
        if secret is None:
            raise Refusal("28000", f'"{user}" is not an admin user')
        auth_type = "md5" if password_kind(secret) == "md5" else "scram-sha-256"
        authenticate(self.sock, client_auth(auth_type, secret, user), user)
        reply = [p.auth_request(p.AUTH_OK)]
        for name, value in (("server_version", f"{__version__}/gpooler"),
                            ("server_encoding", "UTF8"), ("client_encoding", "UTF8"),
                            ("DateStyle", "ISO"), ("integer_datetimes", "on"),
                            ("standard_conforming_strings", "on"),
                            ("application_name", params.get("application_name", ""))):
            reply.append(p.parameter_status(name, value))
        reply.append(p.backend_key_data(p.CancelKey(0, int.from_bytes(os.urandom(4), "big") >> 1)))
        reply.append(p.ready_for_query(b"I"))
        self.sock.sendall(b"".join(reply))

    # ------------------------------------------------------------ commands

    def _serve(self) -> None:
        failed_batch = False
        while True:
            try:
                kind, body = read_message(self.sock, MAX_MESSAGE)
            except ClientGone:
                raise ClientGone("client closed the connection") from None
            if kind == p.QUERY:
                text = body[:-1].decode("utf-8", "replace")
                self.sock.sendall(self.execute(text) + p.ready_for_query(b"I"))
            elif kind == p.TERMINATE:
                raise ClientGone("client terminated the session")
            elif kind in _EXTENDED or kind == p.FUNCTION_CALL:
                if not failed_batch:
                    self.sock.sendall(p.error_response(
                        "0A000", "the admin console speaks only the simple query protocol"))
                    failed_batch = kind != p.FUNCTION_CALL
                if kind == p.FUNCTION_CALL:
                    self.sock.sendall(p.ready_for_query(b"I"))
            elif kind == p.SYNC:
                failed_batch = False
                self.sock.sendall(p.ready_for_query(b"I"))
            else:
                raise p.ProtocolError(f"unexpected message type {kind}")

    def execute(self, text: str) -> bytes:
        """Run every statement of a Query message; stop at the first error, as Postgres does."""
        statements = [s.strip() for s in text.split(";") if s.strip()]
        if not statements:
            return p.message(b"I")
        out = []
        for statement in statements:
            log.info("admin command: user=%s addr=%s command=%s", logs.safe(self.user), self.peer,
                     logs.safe(statement), extra=self._fields(command=statement))
            try:
                out.append(self.command(statement))
            except AdminError as exc:
                out.append(p.error_response(exc.sqlstate, str(exc)))
                break
        return b"".join(out)

    def command(self, statement: str) -> bytes:
        words = statement.split()
        verb = words[0].upper()
        args = [w.strip('"\'') for w in words[1:]]
        if verb == "SHOW":
            if len(args) != 1 or args[0].upper() not in SHOW:
                raise AdminError("42601", "usage: SHOW " + " | ".join(SHOW))
            columns, rows = SHOW[args[0].upper()](self.daemon)
            return result(columns, rows)
        action = ACTIONS.get(verb)
        if action is None:
            raise AdminError("42601", f'unknown command "{words[0]}": try SHOW HELP')
        handler, usage, arity = action
        if len(args) not in arity:
            raise AdminError("42601", f"usage: {usage}")
        tag = handler(self, args[0] if args else None)
        return _complete(tag)

    # ------------------------------------------------------------ actions

    def _tenant(self, name: str) -> str:
        daemon = self.daemon
        if name in daemon.config.tenants or any(k[0] == name for k in daemon.pools):
            return name
        raise AdminError("42704", f'unknown tenant "{name}"')

    def _reload(self, _arg: None) -> str:
        problem = self.daemon.reload()
        if problem:
            raise AdminError("F0000", f"configuration reload failed, the old configuration "
                                      f"stays: {problem}")
        return "RELOAD"

    def _pause(self, tenant: str | None) -> str:
        if tenant is not None:
            tenant = self._tenant(tenant)
        daemon = self.daemon
        daemon.pause.hold(tenant)
        log.info("paused %s", f"tenant {tenant}" if tenant else "every tenant")
        while any(_running(c) for c in daemon.cancel_keys.clients()
                  if tenant is None or c.login.tenant.id == tenant):
            gevent.sleep(POLL)
        return "PAUSE"

    def _resume(self, tenant: str | None) -> str:
        pause = self.daemon.pause
        if tenant is not None:
            tenant = self._tenant(tenant)
            if pause.everyone:
                raise AdminError("55000", "every tenant is paused: RESUME without a tenant")
        pause.release(tenant)
        log.info("resumed %s", f"tenant {tenant}" if tenant else "every tenant")
        return "RESUME"

    def _kill(self, tenant: str) -> str:
        tenant = self._tenant(tenant)
        daemon = self.daemon
        farewell = p.error_response(
            "57P01", f'terminating connection: tenant "{tenant}" killed by the administrator',
            "FATAL")
        for client in daemon.cancel_keys.clients():
            if client.login.tenant.id == tenant:
                client._hang_up("killed by the administrator", farewell)
        for key, pool in list(daemon.pools.items()):
            if key[0] == tenant:
                pool.close()
        daemon.pause.wake()
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline and any(
                c.login.tenant.id == tenant for c in daemon.cancel_keys.clients()):
            gevent.sleep(POLL)
        log.info("killed tenant %s", tenant)
        return "KILL"

    def _shutdown(self, _arg: None) -> str:
        log.info("shutdown requested on the admin console")
        gevent.spawn(self.daemon.terminate)
        return "SHUTDOWN"


def _running(client: "Client") -> bool:
    """Is the client inside a transaction (or a round trip) on a server connection?"""
    server = client.server
    return server is not None and (server.pending > 0 or server.open_batch
                                   or server.status != IDLE)


ACTIONS: dict[str, tuple[Callable[[AdminSession, Any], str], str, tuple[int, ...]]] = {
    "RELOAD": (AdminSession._reload, "RELOAD", (0,)),
    "PAUSE": (AdminSession._pause, "PAUSE [tenant]", (0, 1)),
    "RESUME": (AdminSession._resume, "RESUME [tenant]", (0, 1)),
    "KILL": (AdminSession._kill, "KILL tenant", (1,)),
    "SHUTDOWN": (AdminSession._shutdown, "SHUTDOWN", (0,)),
}


# ------------------------------------------------------------------------------- SHOW


def _pool_mode(daemon: "Daemon", pool: Any) -> str:
    modes = {c.mode for c in daemon.cancel_keys.clients() if c.pool is pool}
    return ",".join(sorted(modes))


def show_pools(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    columns = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
               "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode", "tenant"]
    now = time.monotonic()
    active = active_clients(daemon)
    rows = []
    for (tenant, user, database, *_member), pool in sorted(daemon.pools.items()):
        g = pool_gauges(pool, active[pool], now)
        wait_us = int(g["maxwait"] * 1e6)
        rows.append([database, user, g["cl_active"], g["cl_waiting"], g["sv_active"],
                     g["sv_idle"], g["sv_used"], g["sv_tested"], g["sv_login"],
                     wait_us // 1_000_000, wait_us % 1_000_000, _pool_mode(daemon, pool), tenant])
    return columns, rows


_CONNECTION_COLUMNS = ["type", "user", "database", "state", "addr", "port", "local_addr",
                       "local_port", "connect_time", "request_time", "wait", "wait_us",
                       "close_needed", "ptr", "link"]


def show_clients(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    columns = _CONNECTION_COLUMNS + ["tls", "application_name", "tenant", "mode"]
    now = time.monotonic()
    rows = []
    for c in daemon.cancel_keys.clients():
        login, pool = c.login, c.pool
        since = pool.stats.waiting.get(c) if pool is not None else None
        wait_us = int((now - since) * 1e6) if since else 0
        local_addr, local_port = _sockname(c.sock)
        rows.append(["C", login.user.name, login.database,
                     "waiting" if since else "active", c.address[0], c.address[1], local_addr,
                     local_port, _wall(c.connected_at), _wall(c.last_request or c.connected_at),
                     wait_us // 1_000_000, wait_us % 1_000_000, int(c.closing), _ptr(c),
                     _ptr(c.server), "", login.settings.get("application_name", ""),
                     login.tenant.id, c.mode])
    return columns, rows


def show_servers(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    columns = _CONNECTION_COLUMNS + ["remote_pid", "tls", "application_name",
                                     "prepared_statements", "tenant"]
    rows = []
    for (tenant, _user, database, *_member), pool in sorted(daemon.pools.items()):
        for server in sorted(pool.members, key=lambda s: s.created):
            owner = server.owner
            client = owner if owner is not None and hasattr(owner, "login") else None
            idle = server in pool.idle
            local_addr, local_port = _sockname(server.sock)
            rows.append(["S", pool.target.user, database, "idle" if idle else "active",
                         server.address[0], server.address[1], local_addr, local_port,
                         _wall(server.created), _wall(client.last_request) if client else "",
                         0, 0, int(server.generation != pool.generation or server.broken),
                         _ptr(server), _ptr(client), server.key.pid if server.key else "", "",
                         server.applied.get("application_name", ""),
                         len(server.statements.parsed), tenant])
    return columns, rows


def show_stats(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    columns = ["database", "user", "total_server_assignment_count", "total_xact_count",
               "total_query_count", "total_received", "total_sent", "total_xact_time",
               "total_query_time", "total_wait_time", "avg_server_assignment_count",
               "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time",
               "avg_query_time", "avg_wait_time", "tenant"]
    now = time.monotonic()
    rows = []
    for (tenant, user, database, *_member), pool in sorted(daemon.pools.items()):
        s = pool.stats
        age = max(now - s.created, 1e-3)
        rows.append([database, user, s.wait_count, s.xact_count, s.query_count, s.bytes_in,
                     s.bytes_out, s.xact_time, s.query_time, s.wait_time,
                     round(s.wait_count / age), round(s.xact_count / age),
                     round(s.query_count / age), round(s.bytes_in / age),
                     round(s.bytes_out / age), s.xact_time // max(s.xact_count, 1),
                     s.query_time // max(s.query_count, 1), s.wait_time // max(s.wait_count, 1),
                     tenant])
    return columns, rows


def show_tenants(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    columns = ["tenant", "host", "port", "database", "users", "pools", "clients", "servers",
               "paused", "replicas"]
    clients: dict[str, int] = {}
    for c in daemon.cancel_keys.clients():
        clients[c.login.tenant.id] = clients.get(c.login.tenant.id, 0) + 1
    rows = []
    for tenant in daemon.config.tenants.values():
        pools = [pool for key, pool in daemon.pools.items() if key[0] == tenant.id]
        rows.append([tenant.id, tenant.host, tenant.port, tenant.database, len(tenant.users),
                     len(pools), clients.get(tenant.id, 0), sum(len(p.members) for p in pools),
                     "yes" if daemon.pause.holds(tenant.id) else "no",
                     ", ".join(f"{r.host}:{r.port}" for r in tenant.replicas)])
    return columns, rows


# Global settings that take effect on RELOAD; the rest are read at start only.
_CHANGEABLE = {"shutdown_timeout", "log_level", "log_format", "statsd", "tenants", "admin.users"}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _default(setting: Any) -> str:
    if setting.default is REQUIRED or isinstance(setting.default, Derived):
        return ""
    if isinstance(setting.default, (dict, tuple)) or hasattr(setting.default, "items"):
        return ""
    return _text(setting.default)


def show_config(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    """The process-wide settings in force; passwords are never shown (admin.users: names)."""
    config: Config = daemon.config
    rows = []
    for s in SETTINGS:
        if s.level != "global" or s.name == "defaults":
            continue
        value = getattr(config, s.name)
        if s.name in ("admin", "statsd", "tls"):
            inner = [x for x in SETTINGS if x.level == s.name]
            for x in inner:
                key = f"{s.name}.{x.name}"
                shown = "" if value is None else getattr(value, x.name)
                if key == "admin.users" and value is not None:
                    shown = ", ".join(value.users)
                changeable = key in _CHANGEABLE or (s.name == "statsd")
                rows.append([key, _text(shown), _default(x), "yes" if changeable else "no"])
            continue
        if s.name == "listen":
            shown = ", ".join(f"{e.host}:{e.port} {e.mode}" for e in value)
        elif s.name == "tenants":
            shown = ", ".join(value)
        else:
            shown = _text(value)
        rows.append([s.name, shown, _default(s), "yes" if s.name in _CHANGEABLE else "no"])
    return ["key", "value", "default", "changeable"], rows


def show_replicas(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    """Every member of the tenants with replicas, as the probes last saw it."""
    columns = ["tenant", "host", "port", "role", "healthy", "lag", "lsn", "routed"]
    rows = []
    for tenant_id, topology in sorted(daemon.topologies.items()):
        for member in topology.members:
            lag = member.lag if member.role == "replica" else 0.0
            rows.append([tenant_id, member.host, member.port, member.role, member.healthy,
                         "inf" if lag == float("inf") else f"{lag:.3f}",
                         f"{member.lsn >> 32:X}/{member.lsn & 0xFFFFFFFF:X}", member.routed])
    return columns, rows


def show_version(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    return ["version"], [[f"gpooler {__version__}"]]


def show_help(daemon: "Daemon") -> tuple[list[str], list[list[Any]]]:
    rows = [[f"SHOW {name}"] for name in SHOW] + [[usage] for _, usage, _ in ACTIONS.values()]
    return ["command"], rows


SHOW: dict[str, Callable[["Daemon"], tuple[list[str], list[list[Any]]]]] = {
    "POOLS": show_pools,
    "CLIENTS": show_clients,
    "SERVERS": show_servers,
    "STATS": show_stats,
    "TENANTS": show_tenants,
    "REPLICAS": show_replicas,
    "CONFIG": show_config,
    "VERSION": show_version,
    "HELP": show_help,
}
