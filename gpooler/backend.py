"""One server connection: connect and log in, pump its output, run gpooler's own statements.

Each connection has one greenlet (the pump) reading the server for as long as the connection lives:
while a client is attached it forwards the output as it came, counting ReadyForQuery messages;
while the connection is idle in its pool it notices at once when the server goes away. Clients
write to the server from their own greenlet, so both directions flow at the same time.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Callable, Protocol

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from gpooler import protocol as p
from gpooler import tls
from gpooler.auth import AuthUnsupported, Credential, ServerAuth
from gpooler.prepared import ServerStatements
from gpooler.sockets import relay_recv, relay_send
from gpooler.tracking import Request, Tracker, TrackingError

if TYPE_CHECKING:
    from gpooler.pool import Pool

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
INTERNAL_QUERY_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024
IDLE = ord("I")


class ServerError(Exception):
    """Postgres refused or could not be reached; carries the ErrorResponse to pass on."""

    def __init__(self, response: bytes, text: str) -> None:
        super().__init__(text)
        self.response = response

    @classmethod
    def from_fields(cls, body: bytes) -> "ServerError":
        fields = p.parse_fields(body)
        return cls(p.message(b"E", body), f"{fields.get('C', '')} {fields.get('M', '')}")

    @classmethod
    def unreachable(cls, text: str) -> "ServerError":
        return cls(p.error_response("08006", text, "FATAL"), f"08006 {text}")


class Owner(Protocol):
    """Whoever currently receives a connection's output: a client, or a Sink for gpooler's own SQL."""

    def forward(self, data: bytes) -> None: ...

    def on_ready(self, server: "Backend", status: int) -> None: ...

    def server_lost(self, server: "Backend") -> None: ...

    def on_server_error(self, body: bytes) -> None: ...


class Backend:
    """A logged-in server connection and the state the pooler must know about it."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], pool: "Pool") -> None:
        self.sock = sock
        self.write = relay_send(sock)  # everything the relay sends, whole
        self.address = address
        self.pool = pool
        self.generation = 0
        self.key: p.CancelKey | None = None
        self.params: dict[str, str] = {}
        self.applied: dict[str, str] = {}  # settings gpooler set on this session
        self.owner: Owner | None = None
        self._forward: Callable[[bytes], None] | None = None
        self.pending = 0  # ReadyForQuery messages still owed
        self.open_batch = False  # extended-protocol messages sent since the last Sync
        self.status = IDLE
        self.broken = False
        # Transaction mode: answers are matched to requests, statements kept across clients.
        self.tracked = False
        self.tracker = Tracker()
        self.tracker.can_send = lambda: not self.write_lock.locked()
        self.tracker.send = self.ask
        self.tracker.on_error = self._answered_error
        self.statements = ServerStatements(pool.max_prepared)
        self.write_lock = Semaphore()
        self.created = self.last_used = time.monotonic()
        self._pump: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        pid = self.key.pid if self.key else "?"
        return f"<server {self.address[0]}:{self.address[1]} pid={pid}>"

    # ---------------------------------------------------------------- login

    @classmethod
    def connect(
        cls,
        address: tuple[str, int],
        user: str,
        password: Credential,
        database: str,
        pool: "Pool",
    ) -> "Backend":
        """Open and log in a connection; raise ServerError with what the client should be told."""
        host, port = address
        try:
            with gevent.Timeout(CONNECT_TIMEOUT, ServerError.unreachable(
                f"timed out connecting to server at {host}:{port}"
            )):
                sock = socket.create_connection(address)
                try:
                    sock = tls.connect_server(sock, pool.target.tls, host)
                    server = cls(sock, address, pool)
                    server._login(user, password, database)
                except BaseException:
                    sock.close()
                    raise
        except OSError as exc:
            raise ServerError.unreachable(
                f"could not connect to server at {host}:{port}: {exc.strerror or exc}"
            ) from exc
        server._pump = gevent.spawn(server._run_pump)
        return server

    def _login(self, user: str, password: Credential, database: str) -> None:
        sock = self.sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(p.startup_message({"user": user, "database": database}))
        answer = ServerAuth(user, password)
        buffer = b""
        while True:
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ServerError.unreachable("server closed the connection during login")
            messages, buffer = p.split_messages(buffer + data)
            for kind, body in messages:
                if kind == ord("R"):
                    code = int.from_bytes(body[:4], "big", signed=True)
                    try:
                        reply = answer.respond(code, bytes(body[4:]))
                    except AuthUnsupported as exc:
                        raise ServerError.unreachable(f"server login failed: {exc}") from exc
                    if reply:
                        sock.sendall(reply)
                elif kind == ord("E"):
                    raise ServerError.from_fields(body)
                elif kind == ord("S"):
                    name, value = p.parse_parameter_status(body)
                    self.params[name] = value
                elif kind == ord("K"):
                    self.key = p.CancelKey(
                        int.from_bytes(body[:4], "big", signed=True),
                        int.from_bytes(body[4:8], "big", signed=True),
                    )
                elif kind == p.READY_FOR_QUERY:
                    return

    # ---------------------------------------------------------------- the pump

    def attach(self, owner: Owner, tracked: bool = False) -> None:
        """Send the output to owner; tracked: match answers to requests (see tracking.py)."""
        self.owner = owner
        self._forward = owner.forward
        self.tracked = tracked

    def detach(self) -> None:
        self.owner = None
        self._forward = None
        self.tracked = False

    def send(self, data: bytes, requests: list[Request]) -> None:
        """Send for the attached client, queueing what the answers must match in the same order.

        Raises ServerError when the connection is gone.
        """
        with self.write_lock:
            if not self._send_queued(data, requests):
                raise ServerError.unreachable("server connection lost")

    def _answered_error(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.on_server_error(body)

    def ask(self, data: bytes, requests: list[Request]) -> bool:
        """Send gpooler's own requests from the pump's side, unless the client is sending now.

        The pump must never wait for the lock: the client's send may be waiting for the server,
        which waits for the pump to read. A busy client comes back to an idle point anyway.
        """
        if self.write_lock.locked():
            return False
        with self.write_lock:
            return self._send_queued(data, requests)

    def _send_queued(self, data: bytes, requests: list[Request]) -> bool:
        """Queue the requests and send their bytes (under the write lock); False: connection lost."""
        self.tracker.extend(requests)
        try:
            self.write(data)
        except OSError:
            self.close()
            return False
        return True

    def _run_pump(self) -> None:
        recv = relay_recv(self.sock)
        walk = p.walk_server
        carry = b""
        pos = 0
        try:
            while True:
                data = recv(RECV_SIZE)
                if not data:
                    break
                if self.tracked:
                    self._tracked_output(data)
                    continue
                if carry:
                    data = carry + data
                    carry = b""
                end, ready, status = walk(data, pos)
                if end < len(data):
                    carry = data[end:]
                    data = data[:end]
                    pos = 0
                else:
                    pos = end - len(data)
                forward = self._forward
                if forward is None:
                    if data:
                        self._idle_output(data)
                    continue
                if ready:
                    self.pending -= ready
                    self.status = status
                if data:
                    forward(data)
                if ready and self.pending <= 0 and not self.open_batch:
                    owner = self.owner
                    if owner is not None:
                        owner.on_ready(self, self.status)
        except OSError as exc:
            if not self.broken:
                log.debug("%r: read failed: %s", self, exc)
        finally:
            self._lost()

    def _tracked_output(self, data: bytes) -> None:
        try:
            pieces, ready, status = self.tracker.feed(data)
        except TrackingError as exc:
            log.error("%r: %s: closing it", self, exc)
            self.close()
            return
        if ready:
            self.pending -= ready
        if status:
            self.status = status
        if pieces:
            self._forward(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if status and self.pending <= 0 and not self.open_batch and not self.tracker.queue:
            owner = self.owner
            if owner is not None:
                owner.on_ready(self, status)

    def _idle_output(self, data: bytes) -> None:
        """Output nobody asked for: notices are dropped, an error means the session is over."""
        messages, _ = p.split_messages(data)
        for kind, body in messages:
            if kind == ord("E"):
                fields = p.parse_fields(body)
                log.info("%r: server sent %s %s while idle", self, fields.get("C"), fields.get("M"))
                self.close()

    def _lost(self) -> None:
        self.close()
        owner = self.owner
        if owner is not None:
            owner.server_lost(self)
        else:
            self.pool.discard(self)

    def hung_up(self) -> bool:
        """Whether an idle connection has output or an end waiting that the pump has not read:
        for an idle server, that is always its goodbye. A peek that does not wait."""
        try:
            self.sock._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            pass
        self.close()
        self.pool.discard(self)
        return True

    def close(self) -> None:
        """Mark broken and close; the pump ends and the pool forgets this connection."""
        if self.broken:
            return
        self.broken = True
        self.sock.settimeout(0)
        try:
            self.sock.send(p.TERMINATE_MESSAGE)
        except OSError:
            pass
        self.sock.close()

    # ---------------------------------------------------------------- gpooler's own statements

    def run(self, sql: str, timeout: float = INTERNAL_QUERY_TIMEOUT) -> "Sink":
        """Run one simple-protocol statement for gpooler itself, outside any client's view.

        The connection must be idle (nothing pending) and owned by the caller; the previous owner is
        restored afterwards. Raises ServerError when the statement fails or the server goes away.
        """
        previous = self.owner
        sink = Sink()
        self.attach(sink)
        try:
            self.pending += 1
            try:
                self.sock.sendall(p.query(sql))
            except OSError as exc:
                self.close()
                raise ServerError.unreachable(f"server connection lost: {exc}") from exc
            if not sink.done.wait(timeout):
                self.close()
                raise ServerError.unreachable("server did not answer in time")
        finally:
            if previous is None:
                self.detach()
            else:
                self.attach(previous)
        if self.broken:
            raise ServerError.unreachable("server connection lost")
        sink.parse()
        self.params.update(sink.params)
        if sink.error is not None:
            raise ServerError.from_fields(sink.error)
        return sink

    def apply_settings(self, wanted: dict[str, str]) -> dict[str, str]:
        """Make this session's settings those a client asked for at startup; return reported values.

        Only the differences are sent, in one round trip: set_config for changed values (it takes
        the same raw string a startup packet carries), RESET for what an earlier client set.
        """
        applied = self.applied
        if wanted == applied:
            return {}  # the usual case in transaction mode: nothing to send
        changes = [
            f"pg_catalog.set_config({p.quote_literal(k)}, {p.quote_literal(v)}, false)"
            for k, v in wanted.items()
            if applied.get(k) != v
        ]
        statements = ["SELECT " + ", ".join(changes)] if changes else []
        statements += [f"RESET {p.quote_ident(k)}" for k in applied if k not in wanted]
        if not statements:
            return {}
        sink = self.run(";".join(statements))
        self.applied = dict(wanted)
        return sink.params


class Sink:
    """The owner of a connection while gpooler runs its own statement: collects the answer."""

    def __init__(self) -> None:
        self.done = Event()
        self._chunks: list[bytes] = []
        self.error: bytes | None = None
        self.params: dict[str, str] = {}
        self.rows: list[list[bytes | None]] = []

    def forward(self, data: bytes) -> None:
        self._chunks.append(data)

    def on_ready(self, server: Backend, status: int) -> None:
        self.done.set()

    def server_lost(self, server: Backend) -> None:
        self.done.set()

    def parse(self) -> None:
        messages, _ = p.split_messages(b"".join(self._chunks))
        for kind, body in messages:
            if kind == ord("E") and self.error is None:
                self.error = bytes(body)
            elif kind == ord("S"):
                name, value = p.parse_parameter_status(body)
                self.params[name] = value
            elif kind == ord("D"):
                self.rows.append(p.parse_data_row(body))
