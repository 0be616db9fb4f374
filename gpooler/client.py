"""One client connection on its own greenlet: startup, authentication, then the relay loop.

The relay reads whatever the client sends, frames it just enough to count the ReadyForQuery
messages it will earn, and forwards it to the server connection it holds, fetching one from the
pool first in transaction mode. Replies flow back on the server connection's own greenlet, which
hands the connection back through `on_ready` once the client's transaction is over.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
import time
from typing import TYPE_CHECKING

import gevent
from gevent.exceptions import ConcurrentObjectUseError

from gpooler import logs, tls
from gpooler import protocol as p
from gpooler.auth import AuthFailed, ClientAuth, client_auth
from gpooler.backend import IDLE, Backend, ServerError
from gpooler.login import Login, Refusal, check_address, resolve
from gpooler.pool import Pool, PoolTimeout
from gpooler.replicas import Topology
from gpooler.session_state import Inspection
from gpooler.sockets import (
    ClientGone,
    close_after,
    read_message,
    relay_recv,
    relay_send,
    send_at_once,
    writing,
)
from gpooler.transparent import ClientSession, target_statement

if TYPE_CHECKING:
    from gpooler.daemon import Daemon

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
AUTH_FAILURE_DELAY = 0.25
FAREWELL_TIMEOUT = 1.0
MAX_AUTH_MESSAGE = 10000
RECV_SIZE = 256 * 1024
_READY_IDLE = p.ready_for_query(b"I")


def authenticate(sock: socket.socket, exchange: ClientAuth, login_name: str) -> None:
    """Run a password exchange to its end; a wrong answer costs AUTH_FAILURE_DELAY, then 28P01."""
    sock.sendall(exchange.first())
    while True:
        kind, body = read_message(sock, MAX_AUTH_MESSAGE)
        if kind != p.PASSWORD:
            raise p.ProtocolError(f"expected a password message, got message type {kind}")
        try:
            reply, done = exchange.step(body)
        except AuthFailed:
            gevent.sleep(AUTH_FAILURE_DELAY)
            raise Refusal(
                "28P01", f'password authentication failed for user "{login_name}"'
            ) from None
        if reply:
            sock.sendall(reply)
        if done:
            return


class Client:
    """A connected client and the server connection it holds, if any."""

    def __init__(self, daemon: "Daemon", sock: socket.socket, address: tuple, mode: str) -> None:
        self.daemon = daemon
        self.sock = sock
        self._write = relay_send(sock)  # what the relay forwards, whole
        self.address = address
        self.mode = mode
        self.transaction_mode = mode == "transaction"
        self.login: Login | None = None
        self.pool: Pool | None = None
        self.server: Backend | None = None
        self.key: p.CancelKey | None = None
        self.connected_at = time.monotonic()
        self.counted = False
        self.closing = False
        self.hangup_reason = ""
        self.partial = False  # a message was forwarded in part: the server must not be reused
        self.session: ClientSession | None = None  # transaction mode: the session gpooler keeps
        self.login_name = ""  # the user name as sent, for the log
        self.busy_since = self.xact_start = self.last_request = 0.0  # stats.py: monotonic times
        self.topology: Topology | None = None  # the tenant's primary and replicas, if it has any
        self.resend: list[bytes] | None = None  # a replica read's messages, while it may move
        self.forwarded = False  # something of the current replica read reached the client
        self.moving: gevent.Greenlet | None = None  # a read being moved to the primary
        self.misrouted = False  # a write met a server in recovery: run it on the real primary
        # janitor.py: when the client last sent something, was last probed, got its last cancel
        self.last_heard = self.last_heartbeat = self.connected_at
        self.cancelled_at = 0.0

    @property
    def peer(self) -> str:
        host, port = self.address[0], self.address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def describe(self) -> str:
        if self.login is None:
            name = f"user={logs.safe(self.login_name)} " if self.login_name else ""
            return f"{name}addr={self.peer}"
        return (
            f"tenant={self.login.tenant.id} user={logs.safe(self.login.user.name)} "
            f"addr={self.peer} db={self.login.database} mode={self.mode}"
        )

    # ---------------------------------------------------------------- lifecycle

    def run(self, first_packet: p.Startup) -> None:
        """Serve the client until it leaves; every outcome is logged once, on one line."""
        reason = "client closed the connection"
        self.login_name = first_packet.params.get("user", "")
        try:
            with gevent.Timeout(STARTUP_TIMEOUT, Refusal("08P01", "startup timed out")):
                self._startup(first_packet)
            log.info("client connected: %s", self.describe(), extra=logs.client_fields(self))
            self.daemon.stats.logged_in(self)
            if self.session is not None:
                self._relay_transactions()
            else:
                self._relay()
        except Refusal as refusal:
            reason = f"refused: {refusal.sqlstate} {refusal.text}"
            self._send_quietly(refusal.response())
        except ServerError as exc:
            reason = f"{'refused' if self.key is None else 'server error'}: {exc}"
            self._send_quietly(exc.response)
        except p.ProtocolError as exc:
            reason = f"{'refused: ' if self.key is None else ''}08P01 protocol violation: {exc}"
            self._send_quietly(p.error_response("08P01", str(exc), "FATAL"))
        except ClientGone as exc:
            reason = str(exc) or reason
        except OSError as exc:
            reason = self.hangup_reason or f"connection error: {exc.strerror or exc}"
        except Exception:
            log.exception("client %s failed", self.describe())
            reason = "internal error"
            self._send_quietly(p.error_response("XX000", "internal error in gpooler", "FATAL"))
        finally:
            self._finish()
            self.daemon.stats.client_done(self, reason)
            duration = time.monotonic() - self.connected_at
            level = logging.INFO if self.login is not None or "refused" in reason else logging.DEBUG
            log.log(level, "client disconnected: %s duration=%.1fs reason=%s",
                    self.describe(), duration, reason,
                    extra=logs.client_fields(self, duration, reason))

    def _finish(self) -> None:
        self.closing = True
        server, self.server = self.server, None
        if server is not None:
            self._give_back(server)
        if self.key is not None:
            self.daemon.unregister(self)
        if self.counted:
            self.daemon.client_left(self)
        close_after(self.sock)

    def _give_back(self, server: Backend) -> None:
        """Return a server connection clean, or close it: never hand on a dirty session."""
        server.detach()
        pool = server.pool
        if not server.broken:
            session = self.session
            if (
                server.pending > 0
                or server.open_batch
                or self.partial
                or server.tracker
                or (session is not None and session.loaded)
            ):
                server.close()
            else:
                try:
                    if server.status != IDLE:
                        server.run("ROLLBACK")
                    self._reset(server)
                except ServerError as exc:
                    log.info("closing %r: reset failed: %s", server, exc)
                    server.close()
        pool.checkin(server)

    def _reset(self, server: Backend) -> None:
        """Leave nothing of this client's session on the server for the next one."""
        session = self.session
        if session is None or session.pinned or session.pins_changed:
            server.run("DISCARD ALL")
            server.applied = {}
            server.statements.clear()
        elif session.session_changed:
            server.run("RESET ALL")
            server.applied = {}

    def _send_quietly(self, data: bytes) -> None:
        """The client's last word from its own greenlet (an error before closing). The server's
        output stops reaching the client first; not while the relay is in the middle of writing
        to it; given up on after FAREWELL_TIMEOUT if the client reads nothing."""
        if self.server is not None:
            self.server.detach()
        if writing(self.sock):
            return
        try:
            with gevent.Timeout(FAREWELL_TIMEOUT, False):
                self.sock.sendall(data)
        except OSError:
            pass

    # ---------------------------------------------------------------- startup

    def _startup(self, startup: p.Startup) -> None:
        daemon = self.daemon
        with gevent.Timeout(STARTUP_TIMEOUT, Refusal("08P01", "authentication timed out")):
            login = resolve(daemon.config, startup.params, tls.sni_host(self.sock))
            tls.check_required(login.tenant, self.sock)
            check_address(login.tenant, self.address[0])
            self.login = login
            if startup.minor > 0 or any(k.startswith("_pq_.") for k in startup.params):
                unsupported = [k for k in startup.params if k.startswith("_pq_.")]
                self.sock.sendall(p.negotiate_protocol_version(0, unsupported))
            with daemon.lockout.guard(login.tenant, self.address[0]):
                self._authenticate(login)
        if daemon.stopping:
            raise Refusal("57P01", "gpooler is shutting down")
        daemon.client_joined(self)
        self.counted = True
        pool = self.pool = daemon.pool_for(login)
        if self.transaction_mode:
            self.session = ClientSession(login.settings, login.tenant.session_features == "error")
        self.topology = daemon.topologies.get(login.tenant.id)
        self.keep_alive(login.user.client_heartbeat_interval)
        if not self.transaction_mode:
            self.server = self._acquire(self._primary_pool(), learn=True)
        elif pool.server_params is None or any(
            item not in pool.reported for item in login.settings.items()
        ):
            pool.checkin(self._acquire(pool, learn=True))
        self.key = daemon.register(self)
        reply = [p.auth_request(p.AUTH_OK)]
        reply += [p.parameter_status(k, v) for k, v in self._reported(pool).items()]
        reply += [p.backend_key_data(self.key), _READY_IDLE]
        self.sock.sendall(b"".join(reply))

    def _authenticate(self, login: Login) -> None:
        user = login.user
        if user.name not in login.tenant.users:  # a role auth_query vouches for
            self.daemon.use_credential(login, self.daemon.auth_query.login(self.sock, login))
            return
        exchange = client_auth(user.auth_type, user.password, login.login_name)
        authenticate(self.sock, exchange, login.login_name)

    def _reported(self, pool: Pool) -> dict[str, str]:
        params = dict(pool.server_params or {})
        names = {k.lower(): k for k in params}
        for name, value in self.login.settings.items():
            canonical = names.get(name)
            if canonical is not None:
                params[canonical] = pool.reported.get((name, value), (name, value))[1]
        return params

    # ---------------------------------------------------------------- server connections

    def _checkout(self, pool: Pool) -> Backend:
        if not self.daemon.pause.active:
            server = pool.idle_server()
            if server is not None:  # no wait: nothing to time
                pool.stats.wait_count += 1
                return server
        pool.stats.waiting[self] = start = time.monotonic()
        try:
            if self.daemon.pause.active:
                self.daemon.pause.wait(self)
            return pool.checkout(self.login.user.pool_checkout_timeout)
        except PoolTimeout as exc:
            raise Refusal("53300", str(exc)) from None
        finally:
            pool.stats.waited(self, start)

    def _primary_pool(self) -> Pool:
        """Where writes go: the tenant's current primary, which may not be the YAML's host."""
        if self.topology is None:
            return self.pool
        return self.daemon.pool_for(self.login, self.topology.primary())

    def _route(self, items: list) -> Backend:
        """A server connection for what the client just sent: a replica when it may read there.

        A replica that cannot be reached is taken out of rotation and the primary is used: nothing
        was sent yet, so the client never notices.
        """
        topology = self.topology
        session = self.session
        if topology is None:
            return self._acquire(self.pool)
        reader = session.wants_reader(items)
        if reader:
            tenant = self.login.tenant
            min_lsn = session.min_lsn if tenant.read_your_writes else 0
            member = topology.choose_reader(tenant.load_balance, min_lsn, reader == "replica",
                                            self.daemon.busy_on(tenant.id))
            if member is not topology.primary():
                try:
                    server = self._acquire(self.daemon.pool_for(self.login, member))
                except ServerError as exc:
                    topology.mark_down(member, str(exc))
                else:
                    member.routed += 1
                    self.resend = []  # a read on a replica can move if the replica goes away
                    self.forwarded = False
                    return server
        primary = topology.primary()
        server = self._acquire(self.daemon.pool_for(self.login, primary))
        primary.routed += 1
        session.wrote = True
        self.resend = []  # a write that meets a server in recovery can move to the real primary
        self.forwarded = False
        return server

    def _acquire(self, pool: Pool, learn: bool = False) -> Backend:
        """Check out a server connection and bring it to this client's session settings.

        With learn, what Postgres reports back for the settings is remembered in the pool: it
        validates them as Postgres would at startup, and it spells them as a direct connection
        would tell the client (`utf-8` becomes `UTF8`).
        """
        server = self._checkout(pool)
        settings = self.session.settings if self.session is not None else self.login.settings
        try:
            reported = server.apply_settings(settings)
        except ServerError:
            pool.checkin(server)
            raise
        if learn:
            by_name = {k.lower(): (k, v) for k, v in reported.items()}
            for name, value in settings.items():
                key = (name, value)
                pool.reported[key] = by_name.get(name, pool.reported.get(key, key))
        server.attach(self, tracked=self.session is not None)
        return server

    # Called on the server connection's greenlet.
    def forward(self, data: bytes) -> None:
        if self.resend is not None and not self.forwarded:
            if self.misrouted or _is_goodbye(data):
                return  # the server is going away, or is no primary: run this elsewhere
            if _is_in_recovery(data):
                self.misrouted = True
                return
            self.forwarded = True
        self.pool.stats.bytes_out += len(data)
        try:
            self._write(data)
        except OSError:
            self._hang_up("client connection lost")

    def on_ready(self, server: Backend, status: int) -> None:
        if self.busy_since:
            self.pool.stats.ready(self, status)
        if status != IDLE:
            return
        session = self.session
        if self.daemon.stopping:
            self.shut_down()
        elif session is not None and self.server is server:
            wal = session.wrote and self.topology is not None and self.login.tenant.read_your_writes
            question = None
            if wal or session.session_changed or session.pins_changed:
                question = session.inspection(lambda found: self._inspected(server, found), wal)
            if question is not None:
                if not server.ask(question[0], [question[1]]):
                    session.session_changed = session.pins_changed = True
                    session.wrote = wal
                return
            notice = session.take_notice()
            if notice:
                self.forward(notice)
            if self.misrouted:
                self.misrouted = False
                self.server = None
                server.detach()
                server.pool.checkin(server)
                resend, self.resend = self.resend, None
                self.moving = gevent.spawn(self._write_elsewhere, b"".join(resend))
                return
            if not session.pinned:
                self.resend = None
                self.server = None
                server.detach()
                server.pool.checkin(server)

    def on_server_error(self, body: bytes) -> None:
        """A write met a server in recovery: the primary moved, find it now."""
        if self.topology is not None and p.parse_fields(body).get("C") == "25006":
            self.topology.reprobe()

    def _inspected(self, server: Backend, found: Inspection) -> None:
        if found.settings is not None:
            server.applied = dict(found.settings)

    def server_lost(self, server: Backend) -> None:
        if self.server is server:
            self.server = None
            server.pool.checkin(server)
            resend, self.resend = self.resend, None
            if resend is not None and not self.forwarded:
                self.moving = gevent.spawn(self._read_elsewhere, b"".join(resend), server)
                return
            # Part of an answer already reached the client (a replica stopping between a result
            # and its ReadyForQuery): running it again could answer twice, so the client is told.
            reason = "server connection lost" + (" during an answer" if resend is not None else "")
            self._hang_up(reason, p.error_response("08006", "server connection lost", "FATAL"))

    def kick(self, reason: str, sqlstate: str, text: str) -> None:
        """End the session with a FATAL the client can read (timeouts)."""
        self._hang_up(reason, p.error_response(sqlstate, text, "FATAL"))

    def heartbeat(self, message: bytes) -> None:
        """Write a harmless message to an idle client: to a vanished one, it goes unacknowledged,
        and TCP_USER_TIMEOUT ends the connection in time."""
        self._say(message)

    def _say(self, message: bytes) -> None:
        """Write a short message from another greenlet (janitor, shutdown) only when it goes at
        once and whole: the send buffer at most half full, no write of the relay's unfinished. So
        it never waits for a client that reads nothing, nor lands inside another message."""
        sock = self.sock
        try:
            room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
            if _queued(sock) <= room and not writing(sock):
                send_at_once(sock, message)
        except OSError:
            self._hang_up("client connection lost")
        except ConcurrentObjectUseError:
            pass  # TLS wanted to read while the relay reads: not now

    def keep_alive(self, interval: float) -> None:
        """TCP keepalive and TCP_USER_TIMEOUT, so a client gone without a FIN is noticed."""
        if not interval:
            return
        sock = self.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(interval)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(interval / 3)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(interval * 1000))
        except (OSError, AttributeError) as exc:
            log.debug("keepalive options not set for %s: %s", self.describe(), exc)

    def shut_down(self) -> None:
        self._hang_up(
            "gpooler shutting down",
            p.error_response("57P01", "terminating connection: gpooler is shutting down", "FATAL"),
        )

    def _hang_up(self, reason: str, farewell: bytes = b"") -> None:
        """End this client from another greenlet: its relay loop wakes up and cleans up."""
        if self.closing:
            return
        self.closing = True
        self.hangup_reason = reason
        if farewell:
            self._say(farewell)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---------------------------------------------------------------- the relay

    def _expect(self, server: Backend, syncs: int, open_batch: bool | None) -> None:
        """Book what is about to be sent: the ReadyForQuery messages it will earn, whether an
        extended-protocol batch stays open, and the start of a round trip for the stats."""
        server.pending += syncs
        stats = self.pool.stats
        stats.query_count += syncs
        if not self.busy_since:
            stats.busy(self)
        if open_batch is not None:
            server.open_batch = open_batch

    def _relay(self) -> None:
        recv = relay_recv(self.sock)
        clock = time.monotonic
        walk = p.walk_client
        stats = self.pool.stats
        carry = b""
        pos = 0
        while True:
            data = recv(RECV_SIZE)
            if not data or self.closing:
                raise ClientGone(self.hangup_reason)
            self.last_heard = clock()
            stats.bytes_in += len(data)
            if carry:
                data = carry + data
                carry = b""
            end, syncs, open_batch, terminate, only_sync_flush = walk(data, pos)
            if terminate >= 0:
                data = data[:terminate]
                pos = 0
            elif end < len(data):
                carry = data[end:]
                data = data[:end]
                pos = 0
            else:
                pos = end - len(data)
            if data:
                server = self.server
                if server is None:
                    if only_sync_flush and not pos:
                        if syncs:
                            self.sock.sendall(_READY_IDLE * syncs)
                        data = b""
                    else:
                        server = self.server = self._acquire()
                if data:
                    self._expect(server, syncs, open_batch)
                    self.partial = pos > 0
                    try:
                        server.write(data)
                    except OSError:
                        raise ServerError.unreachable("server connection lost") from None
            if terminate >= 0:
                raise ClientGone("client terminated the session")

    def _relay_transactions(self) -> None:
        """The relay for transaction mode: whole messages, translated for the current server."""
        recv = relay_recv(self.sock)
        clock = time.monotonic
        reader = p.MessageReader()
        session = self.session
        stats = self.pool.stats
        while True:
            data = recv(RECV_SIZE)
            if not data or self.closing:
                raise ClientGone(self.hangup_reason)
            self.last_heard = clock()
            stats.bytes_in += len(data)
            items = reader.feed(data)
            if not items:
                continue
            if self.moving is not None:
                self.moving.join()
                self.moving = None
            server = self.server
            if server is None:
                answer = self._answer_locally(items)
                if answer is not None:
                    if answer:
                        self.sock.sendall(answer)
                    continue
                if items[0][0] == p.TERMINATE:
                    raise ClientGone("client terminated the session")
                server = self.server = self._route(items)
            if self.resend is not None:
                self._keep_for_resend(items)
            pieces, requests, syncs, open_batch = session.translate(items, server.statements)
            self._expect(server, syncs, open_batch)
            self.partial = reader.streaming
            if pieces:
                server.send(pieces[0] if len(pieces) == 1 else b"".join(pieces), requests)
            if items[-1][0] == p.TERMINATE:
                raise ClientGone("client terminated the session")

    def _keep_for_resend(self, items: list) -> None:
        """Keep what a read on a replica sent, unless it changes statement books (named Parse or
        Close) or streams COPY data: those cannot simply be sent again."""
        for kind, buffer, start, end in items:
            if kind == p.COPY_PART or (
                kind in (p.PARSE, p.CLOSE) and buffer[start + 5] not in (0, ord("P"))
            ):
                self.resend = None
                return
            self.resend.append(buffer[start:end])

    def _write_elsewhere(self, data: bytes) -> None:
        """A write met a server in recovery (25006) before anything reached the client, outside an
        explicit transaction: find the primary now and run it there, once."""
        topology = self.topology
        topology.probed.clear()
        topology.reprobe()
        topology.probed.wait(PRIMARY_SEARCH_TIMEOUT)
        log.info("a write of %s met a server in recovery: running it on %s", self.describe(),
                 topology.primary())
        self._send_on_primary(data)

    def _read_elsewhere(self, data: bytes, lost: Backend) -> None:
        """A replica went away under a read that had not answered yet: run it on the primary.

        Only reads move (nothing they did can be lost) and only before any answer reached the
        client; the relay waits for this before it handles anything the client sends next.
        """
        topology = self.topology
        address = (lost.pool.target.host, lost.pool.target.port)
        for member in topology.members:
            if member.address == address:
                topology.mark_down(member, "connection lost")
        log.info("replica %s:%d went away under a read of %s: running it on the primary",
                 *address, self.describe())
        self._send_on_primary(data)

    def _send_on_primary(self, data: bytes) -> None:
        """Send again, on the primary, what the client sent since its last transaction began."""
        try:
            server = self.server = self._acquire(self._primary_pool())
            items = p.MessageReader().feed(data)
            pieces, requests, syncs, open_batch = self.session.translate(items, server.statements)
            server.pending += syncs
            if open_batch is not None:
                server.open_batch = open_batch
            server.send(b"".join(pieces), requests)
        except (ServerError, Refusal) as exc:
            response = exc.response if isinstance(exc, ServerError) else exc.response()
            self._hang_up("server connection lost", response)

    def _answer_locally(self, items: list) -> bytes | None:
        """What gpooler answers without a server: Sync, Flush and gpooler.target; else None."""
        answer = []
        for kind, buffer, start, end in items:
            if kind == p.QUERY:
                statement = target_statement(buffer[start + 5 : end - 1])
                if statement is None:
                    return None
                answer.append(self.session.answer_target(statement) + _READY_IDLE)
            elif kind == p.SYNC:
                answer.append(_READY_IDLE)
            elif kind != p.FLUSH:
                return None
        return b"".join(answer)


def _queued(sock: socket.socket) -> int:
    """Bytes in the socket's send queue: not yet sent, or sent and not yet acknowledged."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


_GOODBYES = frozenset(("57P01", "57P02", "57P03"))
PRIMARY_SEARCH_TIMEOUT = 5.0


def _is_in_recovery(data: bytes) -> bool:
    """The first answer is 25006: a write reached a server that is (now) a replica."""
    if data[:1] != b"E":
        return False
    messages, _ = p.split_messages(data)
    return bool(messages) and p.parse_fields(messages[0][1]).get("C") == "25006"


def _is_goodbye(data: bytes) -> bool:
    """A server's FATAL on shutting down, as the first thing it answers."""
    if data[:1] != b"E":
        return False
    messages, _ = p.split_messages(data)
    fields = p.parse_fields(messages[0][1]) if messages else {}
    return fields.get("S") == "FATAL" and fields.get("C") in _GOODBYES
