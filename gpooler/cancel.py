"""Cancel keys: each client gets its own BackendKeyData, and a CancelRequest carrying it reaches the
server connection that client is using at that moment, and only that one.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
from typing import TYPE_CHECKING

import gevent

from gpooler import protocol as p

if TYPE_CHECKING:
    from gpooler.client import Client

log = logging.getLogger(__name__)

CANCEL_TIMEOUT = 5.0


class CancelKeys:
    """Issues cancel keys and looks clients up by them."""

    def __init__(self) -> None:
        self._clients: dict[int, "Client"] = {}

    def issue(self, client: "Client") -> p.CancelKey:
        while True:
            pid = secrets.randbelow(2**31 - 1) + 1
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
        client = self.find(key)
        server = client.server if client is not None else None
        if server is None or server.key is None:
            log.debug("cancel request for pid %d ignored: nothing to cancel", key.pid)
            return
        log.info("cancel request: %s -> %r", client.describe(), server)
        try:
            with gevent.Timeout(CANCEL_TIMEOUT):
                with socket.create_connection(server.address) as sock:
                    sock.sendall(p.cancel_request(server.key))
                    sock.recv(1)
        except (OSError, gevent.Timeout) as exc:
            log.warning("cancel request to %r failed: %s", server, exc)
