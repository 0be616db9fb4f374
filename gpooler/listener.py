"""Listening sockets and the first packet of every connection.

Before a client is a Client it may ask for TLS (answered "S" and the handshake done when `tls:` is
configured, "N" otherwise) or GSS encryption (always "N"), open with a TLS handshake at once
(direct TLS), send a CancelRequest (forwarded and closed) or a StartupMessage (handed to a new
Client, on the TLS socket when there is one).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import gevent
from gevent.server import StreamServer

from gpooler import protocol as p
from gpooler import tls
from gpooler.client import STARTUP_TIMEOUT, Client
from gpooler.sockets import ClientGone, close_after, recv_exact
from gpooler.config import ListenConfig

if TYPE_CHECKING:
    from gpooler.daemon import Daemon

log = logging.getLogger(__name__)


def bind(entry: ListenConfig) -> socket.socket:
    """A listening socket for one `listen:` entry; IPv6 sockets stay IPv6-only so both can bind."""
    family, kind, proto, _, address = socket.getaddrinfo(
        entry.host, entry.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(address)
    sock.listen(1024)
    log.info("listening on %s:%d (%s)", entry.host, entry.port, entry.mode)
    return sock


def start(daemon: "Daemon", sock: socket.socket, entry: ListenConfig) -> StreamServer:
    """Serve a bound socket; with several workers each one serves the same inherited socket."""
    server = StreamServer(sock, lambda client, address: accept(daemon, client, address, entry.mode))
    server.start()
    return server


def accept(daemon: "Daemon", sock: socket.socket, address: tuple, mode: str) -> None:
    """Read the connection's first packets and pass it on; refuse anything malformed with 08P01."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    context = daemon.tls.context
    try:
        with gevent.Timeout(STARTUP_TIMEOUT, ClientGone("startup timed out")):
            if context is not None and tls.direct_hello(sock):
                sock = tls.accept(context, sock, address)
                tls.check_direct(sock)
                packet = read_first_packet(sock, encrypted=True)
            else:
                packet = read_first_packet(sock, offer_tls=context is not None)
                if packet == p.SSL_REQUEST:
                    sock = tls.accept(context, sock, address)
                    packet = read_first_packet(sock, encrypted=True)
    except p.ProtocolError as exc:
        log.info("client refused: addr=%s reason=08P01 protocol violation: %s", address[0], exc)
        close_after(sock, p.error_response("08P01", str(exc), "FATAL"))
        return
    except (ClientGone, OSError) as exc:
        log.debug("connection from %s ended before startup: %s", address[0], exc)
        sock.close()
        return
    if isinstance(packet, p.CancelKey):
        sock.close()
        daemon.cancel(packet)
        return
    Client(daemon, sock, address, mode).run(packet)


def read_first_packet(
    sock: socket.socket, offer_tls: bool = False, encrypted: bool = False
) -> p.Startup | p.CancelKey | int:
    """Answer encryption requests until a startup or cancel packet arrives.

    With offer_tls an SSLRequest is answered "S" and returned (the caller does the handshake);
    otherwise it is answered "N", as GSSENCRequest always is. Inside TLS (encrypted) neither may
    come again.
    """
    asked: set[int] = set()
    while True:
        length = int.from_bytes(recv_exact(sock, 4), "big")
        if length < 8 or length > p.MAX_STARTUP_PACKET:
            raise p.ProtocolError(f"invalid length of startup packet: {length}")
        packet = p.parse_startup_packet(recv_exact(sock, length - 4))
        if isinstance(packet, int):
            if encrypted:
                raise p.ProtocolError("encryption request on an encrypted connection")
            if packet in asked:
                raise p.ProtocolError("duplicate encryption request")
            asked.add(packet)
            if packet == p.SSL_REQUEST and offer_tls:
                sock.sendall(b"S")
                return packet
            sock.sendall(b"N")
            continue
        return packet
