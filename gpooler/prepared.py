"""Named prepared statements across server connections (protocol-level and SQL-level).

A client's statement names are its own; on the servers, a statement lives under a name derived
from its text and parameter types (`gp_<hash>`), so identical statements from many clients share
one server-side statement, and any server connection can be brought to the client's view on
demand: prepared lazily before the Bind or Describe that needs it, skipped when already there
(gpooler answers the client's ParseComplete itself). Each server keeps at most
`max_prepared_statements` of them, least recently used closed first.

SQL-level PREPARE/EXECUTE/DEALLOCATE keep the client's own names (they appear in SQL text), so a
server gets the client's PREPARE replayed when it lacks that statement or holds another client's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from gpooler import protocol as p
from gpooler.tracking import FORWARD, HIDE, SYNTH, Request, Retry, plain

PARSE_COMPLETE = p.message(b"1")
CLOSE_COMPLETE = p.message(b"3")
_PREFIX = b"gp_"


def server_name(definition: bytes) -> bytes:
    """The shared server-side name for a Parse body after its statement name (text + types)."""
    return _PREFIX + hashlib.blake2b(definition, digest_size=12).hexdigest().encode()


def _split_name(body: bytes) -> tuple[bytes, bytes]:
    end = body.find(b"\0")
    if end < 0:
        raise p.ProtocolError("malformed message: unterminated name")
    return body[:end], body[end + 1 :]


@dataclass
class ClientStatements:
    """One client's prepared statements: its names mapped to what re-creates them anywhere."""

    parsed: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)  # name -> (sname, Parse)
    sql: dict[str, str] = field(default_factory=dict)  # SQL PREPARE name -> its statement text

    def clear(self) -> None:
        self.parsed.clear()
        self.sql.clear()


class ServerStatements:
    """What one server connection has prepared, bounded in size, least recently used first out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parsed: OrderedDict[bytes, None] = OrderedDict()
        self.sql: dict[str, str] = {}

    def clear(self) -> None:
        self.parsed.clear()
        self.sql.clear()


class Rewriter:
    """Turns one client's extended-protocol messages into what one server connection needs.

    Each method returns the bytes to send, or None when the client's message goes as it is, and
    appends to `requests` what the tracker must expect, in the same order as the bytes.
    """

    def __init__(self, client: ClientStatements, server: ServerStatements) -> None:
        self.client = client
        self.server = server

    def in_use(self, name: bytes) -> bool:
        """Whether the client already has a statement of this name: a Parse of it fails (42P05)."""
        return bool(name) and name in self.client.parsed

    def parse(self, body: bytes, requests: list[Request]) -> bytes | None:
        """A Parse of a name not in use (see in_use)."""
        name, definition = _split_name(body)
        if not name:
            requests.append(plain(p.PARSE))
            return None
        sname = server_name(definition)
        message = p.message(b"P", sname + b"\0" + definition)
        self.client.parsed[name] = (sname, message)
        if sname in self.server.parsed:
            self.server.parsed.move_to_end(sname)
            undo = self._forget(name, sname, server_too=False)
            requests.append(Request(p.PARSE, SYNTH, PARSE_COMPLETE, on_done=undo))
            return b""
        evicted = self._make_room(requests)
        self.server.parsed[sname] = None
        requests.append(Request(p.PARSE, FORWARD, on_done=self._forget(name, sname, True)))
        return evicted + message

    def bind(self, body: bytes, requests: list[Request]) -> bytes | None:
        """A Bind of a known statement can be retried once if DDL made its cached plan stale."""
        portal, rest = _split_name(body)
        statement, tail = _split_name(rest)
        known = self.client.parsed.get(statement) if statement else None
        if known is None:
            requests.append(plain(p.BIND))
            return None
        prepare, sname = self._ensure(known, requests)
        message = p.message(b"B", portal + b"\0" + sname + b"\0" + tail)
        again = p.message(b"C", b"S" + sname + b"\0") + known[1]
        requests.append(Request(p.BIND, retry=Retry(again, b"CP", [message]),
                                rename=(sname, statement)))
        return prepare + message

    def describe(self, body: bytes, requests: list[Request]) -> bytes | None:
        statement = _split_name(body[1:])[0] if body[:1] == b"S" else b""
        known = self.client.parsed.get(statement) if statement else None
        if known is None:  # a portal, or a name Postgres will report as unknown
            requests.append(plain(p.DESCRIBE))
            return None
        prepare, sname = self._ensure(known, requests)
        requests.append(Request(p.DESCRIBE, rename=(sname, statement)))
        return prepare + p.message(b"D", b"S" + sname + b"\0")

    def close(self, body: bytes, requests: list[Request]) -> bytes | None:
        """Closing a named statement only forgets the client's name: others may share it."""
        if body[:1] == b"S":
            statement, _ = _split_name(body[1:])
            if statement:
                self.client.parsed.pop(statement, None)
                requests.append(Request(p.CLOSE, SYNTH, CLOSE_COMPLETE))
                return b""
        requests.append(plain(p.CLOSE))
        return None

    def _ensure(self, known: tuple[bytes, bytes], requests: list[Request]) -> tuple[bytes, bytes]:
        """Prepare a client statement on this server if needed: (bytes to send first, its name).

        Names the client never prepared go through unchanged, so Postgres reports them exactly as
        it would.
        """
        sname, parse = known
        server = self.server.parsed
        if sname in server:
            server.move_to_end(sname)
            return b"", sname
        evicted = self._make_room(requests)
        server[sname] = None
        requests.append(Request(p.PARSE, HIDE, on_done=self._unprepare(sname)))
        return evicted + parse, sname

    def _make_room(self, requests: list[Request]) -> bytes:
        server = self.server.parsed
        closes = []
        while len(server) >= self.server.limit:
            sname, _ = server.popitem(last=False)
            requests.append(Request(p.CLOSE, HIDE, on_done=self._keep(sname)))
            closes.append(p.message(b"C", b"S" + sname + b"\0"))
        return b"".join(closes)

    def _keep(self, sname: bytes):
        """A Close skipped after an error left the statement on the server: keep it in the books."""

        def undo(ok: bool, _request: Request) -> None:
            if not ok and sname not in self.server.parsed:
                self.server.parsed[sname] = None
                self.server.parsed.move_to_end(sname, last=False)

        return undo

    def _forget(self, name: bytes, sname: bytes, server_too: bool):
        """A Parse that failed or was skipped: the client's name goes, and the server's statement
        too when it was this Parse that was to create it."""

        def undo(ok: bool, _request: Request) -> None:
            if not ok:
                if self.client.parsed.get(name, (None,))[0] == sname:
                    del self.client.parsed[name]
                if server_too:
                    self.server.parsed.pop(sname, None)

        return undo

    def _unprepare(self, sname: bytes):
        def undo(ok: bool, _request: Request) -> None:
            if not ok:
                self.server.parsed.pop(sname, None)

        return undo


def already_exists(name: bytes) -> bytes:
    """What Postgres says to a Parse that reuses a statement name."""
    text = name.decode("utf-8", "replace")
    return p.error_response("42P05", f'prepared statement "{text}" already exists')


WAKE = p.message(b"C", b"Pgpooler.wake\0") + p.message(b"H")
"""Closing a portal nobody opened: a harmless request whose answer shows up at once, so that
synthetic answers queued behind nothing real are emitted without waiting for the client."""

