"""Cancel keys: each client gets its own BackendKeyData, and a CancelRequest carrying it reaches the
server connection that client is using at that moment, and only that one.

With several worker processes a CancelRequest lands on whichever worker the kernel picks, so the
key's pid also says which worker issued it (pid modulo the worker count), and a worker that gets
a request for another passes the packet on over that worker's unix socket.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING

import gevent
from gevent.server import StreamServer

from gpooler import protocol as p
from gpooler.sockets import ClientGone, recv_exact

if TYPE_CHECKING:
    from gpooler.backend import Backend
    from gpooler.client import Client

log = logging.getLogger(__name__)

CANCEL_TIMEOUT = 5.0
_PID_LIMIT = 2**31 - 1


def peer_path(peer_dir: str, worker: int) -> str:
    return os.path.join(peer_dir, f"cancel-{worker}.sock")


class CancelKeys:
    """Issues cancel keys, looks clients up by them, and routes requests between workers."""

    def __init__(self, worker: int = 0, workers: int = 1, peer_dir: str | None = None) -> None:
        self._clients: dict[int, "Client"] = {}
        self._worker = worker
        self._workers = workers
        self._peer_dir = peer_dir
        self._peer_server: StreamServer | None = None

    def issue(self, client: "Client") -> p.CancelKey:
        while True:
            slot = secrets.randbelow(_PID_LIMIT // self._workers - 1) + 1
            pid = slot * self._workers + self._worker
            if pid not in self._clients:
                break
        self._clients[pid] = client
        return p.CancelKey(pid, secrets.randbits(32) - 2**31)

    def revoke(self, client: "Client") -> None:
        if client.key is not None and self._clients.get(client.key.pid) is client:
            del self._clients[client.key.pid]

    def clients(self) -> list["Client"]:
        return list(self._clients.values())

    def find(self, key: p.CancelKey) -> "Client | None":
        client = self._clients.get(key.pid)
        if client is None or client.key is None:
            return None
        given = key.secret.to_bytes(4, "big", signed=True)
        if not hmac.compare_digest(given, client.key.secret.to_bytes(4, "big", signed=True)):
            return None
        return client

    def cancel(self, key: p.CancelKey) -> None:
        """Forward a CancelRequest to the server the client is using; ignore unknown keys quietly."""
        owner = key.pid % self._workers
        if owner != self._worker and self._peer_dir is not None:
            self._pass_on(owner, key)
            return
        client = self.find(key)
        server = client.server if client is not None else None
        if server is None or server.key is None:
            log.debug("cancel request for pid %d ignored: nothing to cancel", key.pid)
            return
        log.info("cancel request: %s -> %r", client.describe(), server)
        self.cancel_server(server)

    @staticmethod
    def cancel_server(server: "Backend") -> None:
        """Ask Postgres to cancel what a server connection is running (query_timeout too)."""
        try:
            with gevent.Timeout(CANCEL_TIMEOUT):
                with socket.create_connection(server.address) as sock:
                    sock.sendall(p.cancel_request(server.key))
                    sock.recv(1)
        except (OSError, gevent.Timeout) as exc:
            log.warning("cancel request to %r failed: %s", server, exc)

    def _pass_on(self, worker: int, key: p.CancelKey) -> None:
        log.debug("passing a cancel request to worker %d", worker + 1)
        try:
            with gevent.Timeout(CANCEL_TIMEOUT):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(peer_path(self._peer_dir, worker))
                    sock.sendall(p.cancel_request(key))
        except (OSError, gevent.Timeout) as exc:
            log.warning("passing a cancel request to worker %d failed: %s", worker, exc)

    def listen_for_peers(self) -> None:
        """Accept the cancel requests other workers pass on (only with several workers)."""
        if self._peer_dir is None:
            return
        path = peer_path(self._peer_dir, self._worker)
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        self._peer_server = StreamServer(sock, self._from_peer)
        self._peer_server.start()

    def _from_peer(self, sock: socket.socket, _address: object) -> None:
        try:
            packet = p.parse_startup_packet(recv_exact(sock, 16)[4:])
        except (ClientGone, p.ProtocolError, OSError) as exc:
            log.warning("bad cancel request from a peer worker: %s", exc)
        else:
            if isinstance(packet, p.CancelKey):
                self.cancel(packet)
        finally:
            sock.close()
