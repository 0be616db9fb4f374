"""Socket helpers for the slow paths: reading the startup phase and closing politely."""

from __future__ import annotations

import socket

import gevent

from gpooler.protocol import ProtocolError

LINGER_TIMEOUT = 1.0


class ClientGone(Exception):
    """The client closed its socket or sent Terminate."""


def send_all(sock: socket.socket, data: bytes) -> None:
    """sendall for the relay: gevent's own asks the kernel for the buffer size on every call,
    which costs a system call per message forwarded."""
    sent = sock.send(data)
    if sent < len(data):
        view = memoryview(data)
        while sent < len(view):
            sent += sock.send(view[sent:])


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly size bytes, for the startup phase where messages are read one at a time."""
    chunks = []
    while size:
        data = sock.recv(size)
        if not data:
            raise ClientGone("client closed the connection during startup")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def read_message(sock: socket.socket, limit: int) -> tuple[int, bytes]:
    """One whole message (type, body) of at most limit bytes, for the slow paths (login, admin)."""
    header = recv_exact(sock, 5)
    length = int.from_bytes(header[1:], "big")
    if length < 4 or length > limit:
        raise ProtocolError(f"invalid message length {length}")
    return header[0], recv_exact(sock, length - 4)


def close_after(sock: socket.socket, farewell: bytes = b"") -> None:
    """Send a last message and close so that the peer gets to read it.

    Closing with unread input makes the kernel send a reset, which can destroy the message in
    flight, so the input is drained briefly first.
    """
    try:
        if farewell:
            sock.sendall(farewell)
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(LINGER_TIMEOUT, False):
            while sock.recv(65536):
                pass
    except OSError:
        pass
    sock.close()
