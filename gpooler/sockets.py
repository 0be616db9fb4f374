"""Socket helpers: the relay's reads and writes, reading the startup phase, closing politely."""

from __future__ import annotations

import errno
import socket
from typing import Callable

import gevent
import gevent.socket
import gevent.ssl

from gpooler.protocol import ProtocolError

LINGER_TIMEOUT = 1.0


class ClientGone(Exception):
    """The client closed its socket or sent Terminate."""


def _plain(sock: socket.socket) -> bool:
    """A gevent socket without TLS: one whose kernel socket the relay may use directly."""
    return isinstance(sock, gevent.socket.socket) and not isinstance(sock, gevent.ssl.SSLSocket)


def relay_recv(sock: socket.socket) -> Callable[[int], bytes]:
    """recv for the relay loops: wait until the socket is readable, then read the kernel socket.

    gevent's own recv reads first and, when nothing is there yet (the usual case between a request
    and its answer), pays a failed system call and an exception before it waits; its Python wrapper
    costs a few microseconds per transaction on top. A TLS socket keeps gevent's recv: decrypted
    bytes can sit in the TLS object where the poller cannot see them.
    """
    if not _plain(sock):
        return sock.recv
    wait, raw_recv = sock._wait, sock._sock.recv

    def recv(size: int) -> bytes:
        while True:
            # Looked up each time: closing the socket (from any greenlet) drops its watchers, and
            # waiting on a dropped one would poll a file descriptor that may be gone.
            readable = sock._read_event
            if readable is None:
                raise OSError(errno.EBADF, "socket closed")
            wait(readable)
            try:
                return raw_recv(size)
            except BlockingIOError:
                pass  # woken without data: wait again

    return recv


def relay_send(sock: socket.socket) -> Callable[[bytes], None]:
    """sendall for the relay: one direct kernel send when the buffer has room, which it nearly
    always has; gevent's sendall (which also asks the kernel for the buffer size on every call)
    only for the rest of what did not fit."""
    if not _plain(sock):
        return sock.sendall
    raw_send = sock._sock.send

    def send(data: bytes) -> None:
        try:
            sent = raw_send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            if writing(sock):  # a farewell is stuck on this socket: the client is being let go
                raise OSError(errno.EBUSY, "another write to the client is unfinished")
            sock.sendall(memoryview(data)[sent:])

    return send


def send_at_once(sock: socket.socket, data: bytes) -> bool:
    """Write a short message only if it can go now, without waiting: whether it went. A message
    the kernel takes only in part breaks the stream: OSError, and the caller lets the client go."""
    if not _plain(sock):
        return sock.send(data) == len(data)  # a TLS record is written whole or not at all
    try:
        sent = sock._sock.send(data)
    except BlockingIOError:
        return False
    if sent < len(data):
        raise OSError(errno.EIO, "a message to the client was cut short")
    return True


def writing(sock: socket.socket) -> bool:
    """Whether a greenlet waits to finish a write on this socket: anything written now would land
    inside its message, and gevent refuses a second waiting writer."""
    event = getattr(sock, "_write_event", None)
    return event is not None and event.active


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
