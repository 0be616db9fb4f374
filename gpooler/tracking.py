"""Pairing a server's responses with the requests that caused them.

Transaction pooling rewrites what clients send: a Parse the server already has is answered by
gpooler (a synthetic ParseComplete), a statement the server lacks is prepared first (a hidden
Parse whose answer the client must not see), and gpooler asks the server about session state
between transactions (a hidden Query). So the answers have to be matched to the requests in order:
each request sent is queued here, and `feed` walks the server's output, completing requests as their
answers arrive, emitting synthetic answers at the right place and holding back hidden ones.

Pure: bytes in, pieces of bytes out. The relay queues requests in the order it sends them.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Callable

from gpooler import protocol as p

FORWARD = 0  # the client's own request: its answer goes to the client
SYNTH = 1  # answered by gpooler: `payload` is the answer, emitted in turn, never sent to the server
HIDE = 2  # gpooler's own request: its answer goes to `sink` (a bytearray) or nowhere

_U32 = struct.Struct("!I")
_ERROR = ord("E")
_READY = p.READY_FOR_QUERY
_ASYNC = frozenset(b"NSA")  # notices, parameter changes, notifications: part of no answer
_SYNC_POINTS = frozenset((p.QUERY, p.SYNC, p.FUNCTION_CALL))
# The message that completes the answer to each extended-protocol request.
_COMPLETES = {
    p.PARSE: frozenset(b"1"),
    p.BIND: frozenset(b"2"),
    p.CLOSE: frozenset(b"3"),
    p.DESCRIBE: frozenset(b"Tn"),
    p.EXECUTE: frozenset(b"CIs"),
}
# For a forwarded request that many messages answer, the messages that matter to the books: its
# completion, an error, a ReadyForQuery. Everything else passes straight to the client.
_STOPS = {
    p.QUERY: frozenset(b"EZ"),
    p.EXECUTE: frozenset(b"EZ") | _COMPLETES[p.EXECUTE],
}
_DROP = bytearray()  # a sink that is never read
_READY_HEAD = b"Z\0\0\0\x05"  # a ReadyForQuery up to its status byte


class TrackingError(Exception):
    """The server answered something no request explains; the connection cannot be trusted."""


class Request:
    """One request on the wire, or a synthetic answer standing in for one."""

    __slots__ = ("kind", "action", "payload", "sink", "on_done", "failed", "retry", "rename")

    def __init__(
        self,
        kind: int,
        action: int = FORWARD,
        payload: bytes = b"",
        sink: bytearray | None = None,
        on_done: Callable[[bool, "Request"], None] | None = None,
        retry: "Retry | None" = None,
        rename: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.kind = kind
        self.action = action
        self.payload = payload
        self.sink = sink
        self.on_done = on_done
        self.failed = False
        self.retry = retry
        self.rename = rename  # (server name, client name) of the statement, for its errors


    def finish(self, ok: bool) -> None:
        if self.on_done is not None:
            self.on_done(ok and not self.failed, self)

    def __repr__(self) -> str:
        return f"<Request {chr(self.kind)} {('forward', 'synth', 'hide')[self.action]}>"


class Retry:
    """How to run a request again after Postgres found its cached plan stale after DDL.

    `prepare` re-creates the statement; `replay` is what was sent from this request up to and
    including the Sync (or the Query itself), appended to by the relay as it sends more.
    """

    __slots__ = ("prepare", "prepare_kinds", "replay")

    def __init__(self, prepare: bytes, prepare_kinds: bytes, replay: list[bytes]) -> None:
        self.prepare = prepare
        self.prepare_kinds = prepare_kinds  # the request kind of each message in `prepare`
        self.replay = replay


def is_stale_plan(body: bytes) -> bool:
    fields = p.parse_fields(body)
    return fields.get("C") == "0A000" and fields.get("M") == "cached plan must not change result type"


def plain(kind: int) -> Request:
    """The shared request for a message that is forwarded and needs nothing done on its answer."""
    return _PLAIN[kind]


_PLAIN = {kind: Request(kind) for kind in b"PBDECSQF"}


class Tracker:
    """The requests a server connection still owes answers for, and the walk over its output."""

    def __init__(self) -> None:
        self.queue: deque[Request] = deque()
        self._carry = b""
        self._rest = 0  # bytes of a message body still to come in the next chunk
        self._rest_sink: bytearray | None = None  # where they go: None = the client
        self.last_status = ord("I")  # of the last ReadyForQuery: idle means no explicit transaction
        self._executed = False  # an Execute completed since the last ReadyForQuery
        # For retries, set by the connection: whether it may send now, and the send itself (which
        # queues the requests too).
        self.can_send: Callable[[], bool] = lambda: False
        self.send: Callable[[bytes, list[Request]], object] = lambda data, requests: None
        self.on_error: Callable[[bytes], None] | None = None  # sees each error answering a request

    def __bool__(self) -> bool:
        return bool(self.queue)

    def extend(self, requests: list[Request]) -> None:
        self.queue.extend(requests)

    def feed(self, data: bytes) -> tuple[list[bytes], int, int]:
        """Walk a chunk of server output; return (pieces for the client, ready count, status).

        ready counts the client's ReadyForQuery messages in the chunk (hidden ones excluded);
        status is the last ReadyForQuery status seen, hidden or not, or 0.
        """
        if self._carry:
            data = self._carry + data
            self._carry = b""
        elif not self._rest:
            ready = self._plain_answer(data)
            if ready:
                self.queue.clear()  # plain requests need nothing done when they complete
                self._executed = False
                status = self.last_status = data[-1]
                return [data], ready, status
        n = len(data)
        out: list[bytes] = []
        ready = 0
        status = 0
        queue = self.queue
        i = run = 0  # data[run:i] is still to be forwarded
        if self._rest:
            take = min(self._rest, n)
            sink = self._rest_sink
            if sink is not None:
                if sink is not _DROP:
                    sink.extend(data[:take])
                run = take
            i = take
            self._rest -= take
            if self._rest:
                if run < i:
                    out.append(data[run:i])
                return out, ready, status
        unpack = _U32.unpack_from
        while True:
            if queue and queue[0].action == SYNTH:
                if run < i:
                    out.append(data[run:i])
                run = i
                while queue and queue[0].action == SYNTH:
                    request = queue.popleft()
                    out.append(request.payload)
                    if request.kind == p.QUERY:
                        # A Query gpooler answered itself ends as any Query does.
                        out.append(p.ready_for_query(bytes((self.last_status,))))
                        ready += 1
                        status = self.last_status
                    request.finish(True)
            if queue and queue[0].action == FORWARD:
                # Rows and the like change nothing in the books: step over them to what does.
                stops = _STOPS.get(queue[0].kind)
                if stops is not None:
                    while i + 5 <= n and data[i] not in stops:
                        end = i + 1 + unpack(data, i + 1)[0]
                        if end > n:
                            break
                        i = end
            if i + 5 > n:
                break
            kind = data[i]
            end = i + 1 + unpack(data, i + 1)[0]
            if kind == _READY and i + 6 > n:
                break
            sink = None
            if kind not in _ASYNC and queue:
                request = queue[0]
                action = request.action
                if action == HIDE:
                    sink = _DROP if request.sink is None else request.sink
                if kind == _READY:
                    if request.kind not in _SYNC_POINTS:
                        raise TrackingError(f"ReadyForQuery while {request!r} is unanswered")
                    queue.popleft()
                    status = self.last_status = data[i + 5]
                    self._executed = False
                    if action != HIDE:
                        ready += 1
                    request.finish(True)
                elif kind == _ERROR and self._retried(request, data, i, end):
                    sink = _DROP
                elif kind == _ERROR:
                    request.failed = True
                    if self.on_error is not None and end <= n:
                        self.on_error(data[i + 5 : end])
                    if request.rename is not None and end <= n and sink is None:
                        # Postgres names the statement as gpooler called it: say the client's name.
                        if run < i:
                            out.append(data[run:i])
                        server_name, client_name = request.rename
                        body = data[i + 5 : end].replace(b'"' + server_name + b'"',
                                                         b'"' + client_name + b'"')
                        out.append(p.message(b"E", body))
                        run = end
                    if request.kind not in _SYNC_POINTS:
                        # The server skips everything up to the next Sync: so do the books.
                        if action == HIDE and request.sink is None:
                            sink = None  # our own preparation failed: the client must know why
                        queue.popleft()
                        request.finish(False)
                        while queue and queue[0].kind != p.SYNC:
                            queue.popleft().finish(False)
                elif kind in _COMPLETES.get(request.kind, ()):
                    queue.popleft()
                    if request.kind == p.EXECUTE:
                        self._executed = True
                    request.finish(True)
            if sink is not None:
                if run < i:
                    out.append(data[run:i])
                if sink is not _DROP:
                    sink.extend(data[i : min(end, n)])
                run = min(end, n)
            if end > n:
                self._rest = end - n
                self._rest_sink = sink
                i = n
                break
            i = end
        if i < n:
            self._carry = data[i:]
        if run < i:
            out.append(data[run:i])
        return out, ready, status

    def _plain_answer(self, data: bytes) -> int:
        """The ReadyForQuery count when data is exactly the whole answer to what is queued, every
        request plain (forwarded, nothing to do on completion) and no error among the answers:
        the usual round trip, passed on as it came without matching answer by answer. 0 when not.
        """
        queue = self.queue
        # Cheap tests first: a chunk of a long result, which does not end in a ReadyForQuery,
        # must not be walked twice.
        if data[-6:-1] != _READY_HEAD or not queue or queue[-1].kind not in _SYNC_POINTS:
            return 0
        syncs = 0
        for request in queue:
            if request is not _PLAIN.get(request.kind):
                return 0
            if request.kind in _SYNC_POINTS:
                syncs += 1
        unpack = _U32.unpack_from
        n = len(data)
        i = ready = 0
        kind = 0
        while i + 5 <= n:
            kind = data[i]
            if kind == _ERROR:
                return 0
            if kind == _READY:
                ready += 1
            i += 1 + unpack(data, i + 1)[0]
        if i != n or kind != _READY or ready != syncs:
            return 0
        return ready

    def _retried(self, request: Request, data: bytes, start: int, end: int) -> bool:
        """Run a request again, transparently, when only a stale cached plan made it fail.

        Only outside an explicit transaction, only when nothing the client sent later is queued
        behind it (the retry must run before that), and only when the relay is not sending.
        """
        retry = request.retry
        if (
            retry is None
            or self.last_status != ord("I")
            or end > len(data)
            or not is_stale_plan(data[start + 5 : end])
        ):
            return False
        queue = self.queue
        if request.kind in _SYNC_POINTS:
            if len(queue) != 1:
                return False
            stale = [request]
        elif self._executed:
            return False  # the implicit transaction already ran something: it is lost
        else:
            stale = list(queue)
            if stale[-1].kind != p.SYNC or sum(r.kind == p.SYNC for r in stale) != 1:
                return False
        if not self.can_send():
            return False
        for _ in stale:
            queue.popleft()
        request.retry = None  # once
        # What the server still sends for the failed attempt, up to its ReadyForQuery, is hidden.
        queue.appendleft(Request(p.SYNC if request.kind not in _SYNC_POINTS else request.kind, HIDE))
        again = [Request(kind, HIDE) for kind in retry.prepare_kinds] + stale
        self.send(retry.prepare + b"".join(retry.replay), again)
        return True
