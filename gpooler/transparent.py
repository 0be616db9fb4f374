"""What makes transaction pooling transparent: one client's view of its session, kept by gpooler.

A client on the transaction port believes it has one session. Its named prepared statements (both
protocol-level and SQL PREPARE), its session settings and its session-only features are kept here
and brought to whichever server connection serves it. `translate` turns the messages the client
sent into what the current server connection needs, plus the requests the response tracker must
expect; the caller sends both.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, TypeVar

from gpooler import protocol as p
from gpooler import router
from gpooler.replicas import parse_lsn
from gpooler.prepared import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    WAKE,
    ClientStatements,
    Rewriter,
    ServerStatements,
    already_exists,
)
from gpooler.session_state import (
    Inspection,
    inspection_query,
    pinned_notice,
    read_inspection,
    refused_feature,
    refusing_statement,
)
from gpooler.tracking import HIDE, SYNTH, Request, Retry, plain

_EXTENDED = frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE, p.CLOSE))


class Effects:
    """What a statement text means to the pooler, reduced from the router's classification."""

    __slots__ = ("session", "pins", "unpins", "prepared", "resets_books", "single", "resets")

    def __init__(self, classification: router.Classification, may_unpin: bool) -> None:
        statements = classification.statements
        self.single = len(statements) == 1
        pins = frozenset().union(*(s.pins for s in statements))
        # set_config with a computed value: the session changed in a way only the server knows.
        self.session = "set_config" in pins or any(s.session or s.discard for s in statements)
        self.pins = pins - {"set_config"}
        # DROP may remove the last temporary table, CLOSE the last held cursor: ask again.
        self.unpins = may_unpin or any(s.unpins or s.discard in ("all", "temp") for s in statements)
        self.prepared = tuple(s.prepared for s in statements if s.prepared)
        self.resets_books = any(
            s.discard == "all" or (s.prepared and s.prepared[0] == "deallocate_all")
            for s in statements
        )
        # RESET names, "*" for RESET ALL / DISCARD ALL: startup parameters come back after them.
        self.resets = frozenset(
            effect[1] if effect[0] == "reset" else "*"
            for s in statements
            for effect in s.session + ((("reset_all",),) if s.discard == "all" else ())
            if effect[0] in ("reset", "reset_all")
        )


# Every statement the pooler must notice starts with one of these words, or calls one of the
# functions below: any other text is passed on without parsing. (Texts that embed their values are
# all different, so the classifier's cache cannot help them; this test must be cheap.)
_TRIGGER_WORDS = frozenset(
    b"set reset prepare execute deallocate discard listen unlisten load declare close create drop"
    b" explain".split()
)
_FIRST_WORD = re.compile(rb"\s*([a-z_]+)")  # no match (a comment, a parenthesis): classify
# calls, temporary relations, or a second statement
_ANYWHERE = re.compile(rb"set_config|advisory|pg_temp|\btemp(?:orary)?\b|;\s*\S")
# A looser _ANYWHERE that the regex engine scans several times faster (no word boundary in front):
# most statements match neither, and only those that match this one need the exact test.
_ANYWHERE_LOOSELY = re.compile(rb"set_config|advisory|temp|;\s*\S")
_MAY_UNPIN = re.compile(rb"(?i)(?:^|;)\s*(?:drop|close)\b")
# gpooler's own session setting: where this client's statements go. Answered by gpooler, never
# sent to Postgres.
_TARGET = re.compile(
    rb"(?is)\s*(?:(set)\s+(?:session\s+)?gpooler\.target\s*(?:=|\bto\b)\s*'?([a-z_]*)'?"
    rb"|(reset)\s+gpooler\.target|(show)\s+gpooler\.target)\s*;?\s*\Z"
)
TARGETS = ("primary", "replica", "any")


def bad_target(value: str) -> str:
    return f'invalid value for parameter "gpooler.target": "{value}" (primary, replica or any)'


def target_statement(text: bytes) -> tuple[str, str] | None:
    """("set", value) / ("reset", "") / ("show", "") for a gpooler.target statement, else None."""
    found = _TARGET.match(text)
    if found is None:
        return None
    if found.group(1):
        return "set", found.group(2).decode().lower()
    return ("reset", "") if found.group(3) else ("show", "")


T = TypeVar("T")

# Texts longer than this are worked out each time: the caches hold at most 4096 texts of this
# size each (16 MB), not 4096 bulk INSERTs with their values written in.
CACHED_TEXT = 4096


def _remembered_when_short(function: Callable[[bytes], T]) -> Callable[[bytes], T]:
    """An LRU cache of function's answers for texts up to CACHED_TEXT bytes."""
    cached = functools.lru_cache(maxsize=4096)(function)

    def call(text: bytes) -> T:
        return cached(text) if len(text) <= CACHED_TEXT else function(text)

    call.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return call


def effects(text: bytes) -> Effects | None:
    """None for the common statement that changes nothing the pooler keeps."""
    lowered = text.lower()
    first = _FIRST_WORD.match(lowered)
    if first is not None and first.group(1) not in _TRIGGER_WORDS:
        if _ANYWHERE_LOOSELY.search(lowered) is None or _ANYWHERE.search(lowered) is None:
            return None
    return _classified(text)


@_remembered_when_short
def screened(text: bytes) -> tuple[tuple[str, str] | None, Effects | None]:
    """target_statement and effects of a Parse's text, remembered: extended-protocol clients send
    the same few texts again and again, with the values apart."""
    statement = target_statement(text)
    return statement, None if statement is not None else effects(text)


@_remembered_when_short
def _classified(text: bytes) -> Effects | None:
    may_unpin = _MAY_UNPIN.search(text) is not None
    found = Effects(router.classify(text.decode("utf-8", "replace")), may_unpin)
    if found.session or found.pins or found.unpins or found.prepared:
        return found
    return None


class ClientSession:
    """The session one transaction-mode client believes it has."""

    def __init__(self, startup_settings: dict[str, str], refuse_pins: bool) -> None:
        self.startup = dict(startup_settings)
        self.settings = dict(startup_settings)  # brought to every server connection it uses
        self.statements = ClientStatements()
        self.refuse_pins = refuse_pins
        self.session_changed = False  # ask the server what the session holds before letting go
        self.pins_changed = False  # ask whether session-only state is still there
        self.pinned = False
        self.loaded = False  # LOAD cannot be undone: the connection is closed afterwards
        self.features: set[str] = set()
        self.notice_due = False
        self.skipping = False  # after an error gpooler answered, drop messages until Sync
        self.replay: list[bytes] | None = None  # what to send again if a stale plan fails a Bind
        self.unnamed: Effects | None = None  # effects of the statement last Parse'd unnamed
        self.in_segment = False  # extended-protocol messages were sent since the last sync point
        self.target = "any"  # SET gpooler.target: primary | replica | any
        self.local: dict[bytes, tuple[str, str]] = {}  # b"S"+statement / b"P"+portal of gpooler.target
        self.min_lsn = 0  # read-your-writes: reads go where this WAL position is replayed
        self.wrote = False  # the current server was chosen for writing: learn its WAL position

    # ---------------------------------------------------------------- client -> server

    def translate(
        self, items: list[tuple[int, bytes, int, int]], server: ServerStatements
    ) -> tuple[list[bytes], list[Request], int, bool | None]:
        """Returns (pieces to send, requests to expect, sync points, open batch or None)."""
        if len(items) == 1 and items[0][0] == p.QUERY and not self.skipping:
            # The simple-protocol round trip, by far the most common: no rewriting to do.
            _, buffer, start, end = items[0]
            self.in_segment = False
            requests = []
            replacement = self._query(buffer[start + 5 : end - 1], server, requests)
            if replacement is None:
                replacement = buffer if start == 0 and end == len(buffer) else buffer[start:end]
            out = [replacement]
            _wake_if_needed(out, requests)
            return out, requests, 1, False
        out: list[bytes] = []
        requests: list[Request] = []
        rewriter = Rewriter(self.statements, server)
        syncs = 0
        open_batch = None
        run_buffer = None
        run_start = run_end = 0
        for kind, buffer, start, end in items:
            if kind == p.TERMINATE:
                break
            if self.skipping and kind != p.SYNC:
                continue
            replacement = None
            if kind == p.QUERY:
                syncs += 1
                open_batch = False
                self.in_segment = False
                replacement = self._query(buffer[start + 5 : end - 1], server, requests)
            elif kind == p.SYNC:
                syncs += 1
                open_batch = False
                self.skipping = False
                self.in_segment = False
                requests.append(plain(p.SYNC))
            elif kind == p.FUNCTION_CALL:
                syncs += 1
                open_batch = False
                self.in_segment = False
                requests.append(plain(p.FUNCTION_CALL))
            elif kind in _EXTENDED:
                open_batch = True
                body = buffer[start + 5 : end]
                if self.local and (local := self._local_message(kind, body, requests)) is not None:
                    replacement = local
                elif kind == p.PARSE:
                    replacement = self._parse(body, rewriter, requests)
                elif kind == p.BIND:
                    replacement = rewriter.bind(body, requests)
                elif kind == p.DESCRIBE:
                    replacement = rewriter.describe(body, requests)
                elif kind == p.CLOSE:
                    replacement = rewriter.close(body, requests)
                else:
                    found = self.unnamed
                    if found is not None and (found.prepared or found.resets_books):
                        requests.append(Request(p.EXECUTE, on_done=self._sql_done(found, server)))
                    else:
                        requests.append(plain(p.EXECUTE))
                self.in_segment = True
            replay = self.replay
            if replay is not None:
                if kind == p.BIND and requests and requests[-1].retry is not None:
                    replay = self.replay = requests[-1].retry.replay  # starts a new one
                else:
                    replay.append(buffer[start:end] if replacement is None else replacement)
                if kind == p.SYNC:
                    self.replay = None
            elif kind == p.BIND and requests and requests[-1].retry is not None:
                self.replay = requests[-1].retry.replay
            if replacement is None:
                if buffer is run_buffer and start == run_end:
                    run_end = end
                    continue
                if run_buffer is not None:
                    out.append(run_buffer[run_start:run_end])
                run_buffer, run_start, run_end = buffer, start, end
            else:
                if run_buffer is not None:
                    out.append(run_buffer[run_start:run_end])
                    run_buffer = None
                out.append(replacement)
        if run_buffer is not None:
            out.append(run_buffer[run_start:run_end])
        _wake_if_needed(out, requests)
        return out, requests, syncs, open_batch

    def _parse(self, body: bytes, rewriter: Rewriter, requests: list[Request]) -> bytes | None:
        name_end = body.find(b"\0")
        query_end = body.find(b"\0", name_end + 1)
        if name_end < 0 or query_end < 0:
            raise p.ProtocolError("malformed Parse message")
        statement, found = screened(body[name_end + 1 : query_end])
        if statement is not None:
            # SET gpooler.target by Parse/Bind/Execute: answered by gpooler message by message.
            self.local[b"S" + body[:name_end]] = statement
            requests.append(Request(p.PARSE, SYNTH, PARSE_COMPLETE))
            return b""
        if rewriter.in_use(body[:name_end]):
            return self._fail(already_exists(body[:name_end]), requests)
        if name_end == 0:
            self.unnamed = found  # what the next Execute of the unnamed statement will do
        ensure = b""
        if found is not None:
            refusal = self._note(found)
            if refusal is not None:
                return self._fail(p.error_response("0A000", refusal), requests)
            if found.prepared and not self.in_segment:
                # SQL EXECUTE/DEALLOCATE by Parse: the hidden PREPARE replay is a Query, which
                # may only go where it cannot end an implicit transaction early.
                ensure = self._ensure_all(found.prepared, rewriter.server, requests)
        message = rewriter.parse(body, requests)
        if message is None and not ensure:
            return None
        return ensure + (p.message(b"P", body) if message is None else message)

    def _local_message(self, kind: int, body: bytes, requests: list[Request]) -> bytes | None:
        """Answer Bind/Describe/Execute/Close of a gpooler.target statement or its portal:
        the bytes to send instead (usually none), or None when the message is not one of those."""
        local = self.local
        if kind == p.PARSE:
            local.pop(b"S" + body[: body.find(b"\0")], None)  # the name now means something else
            return None
        if kind == p.BIND:
            portal, statement = body.split(b"\0", 2)[:2]
            found = local.get(b"S" + statement)
            if found is None:
                local.pop(b"P" + portal, None)
                return None
            local[b"P" + portal] = found
            requests.append(Request(p.BIND, SYNTH, p.message(b"2")))
            return b""
        if kind == p.EXECUTE:
            key = b"P" + body.split(b"\0", 1)[0]
        else:
            key = body[:1] + body[1:].split(b"\0", 1)[0]
        found = local.get(key)
        if found is None:
            return None
        if kind == p.EXECUTE and found[0] == "set" and found[1] not in TARGETS:
            return self._fail(p.error_response("22023", bad_target(found[1])), requests)
        if kind == p.DESCRIBE:
            answer = (p.message(b"t", b"\0\0") if key[:1] == b"S" else b"") + p.message(b"n")
        elif kind == p.CLOSE:
            del local[key]
            answer = CLOSE_COMPLETE
        else:
            answer = self.answer_target(found)
        requests.append(Request(kind, SYNTH, answer))
        return b""

    def _fail(self, error: bytes, requests: list[Request]) -> bytes:
        """Answer an error gpooler found itself, with the consequences Postgres would give it.

        The error is synthetic, but the transaction (explicit or implicit) must fail as it would on
        a direct connection: a hidden statement that fails does that, and the messages up to the
        client's Sync are dropped, as the server would skip them.
        """
        self.skipping = True
        requests.append(Request(p.PARSE, SYNTH, error))
        sink = bytearray()  # the hidden failure's own error is not the client's news
        requests.extend(Request(kind, HIDE, sink=sink) for kind in (p.PARSE, p.BIND, p.EXECUTE))
        return _ABORT

    def answer_target(self, statement: tuple[str, str]) -> bytes:
        """gpooler's answer to SET/RESET/SHOW gpooler.target, without its ReadyForQuery."""
        action, value = statement
        if action == "show":
            return (p.message(b"T", b"\0\1" + p.cstr("gpooler.target") + b"\0" * 6
                              + b"\0\0\0\x19" + b"\xff\xff" + b"\xff\xff\xff\xff" + b"\0\0")
                    + p.message(b"D", b"\0\1" + len(self.target).to_bytes(4, "big")
                                + self.target.encode())
                    + p.message(b"C", p.cstr("SHOW")))
        if action == "set" and value not in TARGETS:
            return p.error_response("22023", bad_target(value))
        self.target = value if action == "set" else "any"
        return p.message(b"C", p.cstr(action.upper()))

    def _query(self, text: bytes, server: ServerStatements, requests: list[Request]) -> bytes | None:
        statement = target_statement(text)
        if statement is not None:
            if statement[0] == "set" and statement[1] not in TARGETS:
                # Inside a transaction the error must fail it: let Postgres raise it.
                requests.append(plain(p.QUERY))
                return p.query(refusing_statement(bad_target(statement[1]), "22023"))
            requests.append(Request(p.QUERY, SYNTH, self.answer_target(statement)))
            return b""
        found = effects(text)
        if found is None:
            requests.append(plain(p.QUERY))
            return None
        refusal = self._note(found)
        if refusal is not None:
            requests.append(plain(p.QUERY))
            return p.query(refusing_statement(refusal))
        prepare = self._ensure_all(found.prepared, server, requests)
        message = p.message(b"Q", text + b"\0")
        retry = None
        if len(found.prepared) == 1 and found.prepared[0][0] == "execute" and found.single:
            name = found.prepared[0][1]
            mine = self.statements.sql.get(name)
            if mine is not None:
                again = p.query(f"DEALLOCATE {p.quote_ident(name)};{mine}")
                retry = Retry(again, b"Q", [message])
        requests.append(Request(p.QUERY, on_done=self._sql_done(found, server), retry=retry))
        return prepare + message + self._restore_startup(found, requests)

    def _restore_startup(self, found: Effects, requests: list[Request]) -> bytes:
        """After RESET of a startup parameter, set it again, as a direct connection keeps it.

        Hidden, but its ParameterStatus reaches the client, which a direct connection would send.
        """
        names = self.startup if "*" in found.resets else {
            k: v for k, v in self.startup.items() if k in found.resets
        }
        if not names:
            return b""
        calls = ", ".join(
            f"pg_catalog.set_config({p.quote_literal(k)}, {p.quote_literal(v)}, false)"
            for k, v in names.items()
        )
        requests.append(Request(p.QUERY, HIDE))
        return p.query("SELECT " + calls)
    def _note(self, found: Effects) -> str | None:
        """Record what a statement does to the session; the refusal text if it must not run."""
        if found.pins:
            if self.refuse_pins:
                return refused_feature(set(found.pins))
            self.features |= found.pins
            self.pins_changed = True
            if "load" in found.pins:
                self.loaded = True
        if found.unpins:
            self.pins_changed = True
        if found.session:
            self.session_changed = True
        if "*" in found.resets:
            self.target = "any"
        return None

    # ---------------------------------------------------------------- routing

    def wants_reader(self, items: list[tuple[int, bytes, int, int]]) -> str:
        """May what the client sent (the start of a transaction) run on a replica?

        "" for no, "any" for any member fit for reads, "replica" for a replica if one is fit.

        A leading `/* gpooler:primary|replica|any */` comment on the first statement, then
        SET gpooler.target, choose among the members a read may go to; writes always go to the
        primary.
        """
        target = self.target
        reads = True
        first = True
        for kind, buffer, start, end in items:
            if kind == p.QUERY:
                text = buffer[start + 5 : end - 1]
            elif kind == p.PARSE:
                text = buffer[start + 5 : end].split(b"\0", 2)[1]
            elif kind == p.BIND:
                statement = buffer[start + 5 : end].split(b"\0", 2)[1]
                known = self.statements.parsed.get(statement) if statement else None
                if known is None:
                    continue
                text = known[1][5:].split(b"\0", 2)[1]
            else:
                continue
            if first:
                first = False
                hinted = router.hint(text.decode("utf-8", "replace"))
                if hinted is not None:
                    target = hinted
                if target == "primary":
                    break
            if not router.routes_to_reader(text, target == "replica"):
                reads = False
                break
        if target == "primary" or not reads or first:
            return ""  # a write can only succeed on the primary, whatever the client prefers
        return "replica" if target == "replica" else "any"

    # ---------------------------------------------------------------- SQL PREPARE / EXECUTE

    def _ensure_all(self, entries: tuple, server: ServerStatements, requests: list[Request]) -> bytes:
        """Ensure each named statement, except those the same text PREPAREs before using them."""
        prepared_here: set[str] = set()
        pieces = []
        for entry in entries:
            if entry[0] != "deallocate_all" and entry[1] in prepared_here:
                continue
            pieces.append(self._ensure_sql(entry, server, requests))
            if entry[0] == "prepare":
                prepared_here.add(entry[1])
        return b"".join(pieces)

    def _ensure_sql(self, entry: tuple, server: ServerStatements, requests: list[Request]) -> bytes:
        """Before a statement names a SQL prepared statement, make the server's copy the client's.

        The server may hold another client's statement under that name, or none: it must hold
        exactly this client's (or none, when the client has none), so that EXECUTE, DEALLOCATE and
        a repeated PREPARE succeed or fail as they would on the client's own session.
        """
        if entry[0] == "deallocate_all":
            return b""
        name = entry[1]
        mine = self.statements.sql.get(name)
        theirs = server.sql.get(name)
        if theirs == mine:
            return b""
        statements = [f"DEALLOCATE {p.quote_ident(name)}"] if theirs is not None else []
        if mine is not None:
            statements.append(mine)

        def done(ok: bool) -> None:
            if ok and mine is not None:
                server.sql[name] = mine
            else:
                server.sql.pop(name, None)

        return self._hidden(";".join(statements), requests, done)

    @staticmethod
    def _hidden(sql: str, requests: list[Request], done) -> bytes:
        requests.append(Request(p.QUERY, HIDE, on_done=lambda ok, _r: done(ok)))
        return p.query(sql)

    def _sql_done(self, found: Effects, server: ServerStatements):
        def done(ok: bool, _request: Request) -> None:
            if found.resets_books and ok:
                self.statements.clear()
                server.clear()
            for entry in found.prepared:
                if entry[0] == "prepare" and ok:
                    self.statements.sql[entry[1]] = prepare_text(entry)
                    server.sql[entry[1]] = prepare_text(entry)
                elif entry[0] == "deallocate" and ok:
                    self.statements.sql.pop(entry[1], None)
                    server.sql.pop(entry[1], None)

        return done

    # ---------------------------------------------------------------- between transactions

    def inspection(self, on_read, wal: bool = False) -> tuple[bytes, Request] | None:
        """The hidden question to ask before letting go of the server, if anything changed.

        wal: also ask the primary's WAL position, for read-your-writes after a write.
        """
        settings, pins = self.session_changed, self.pins_changed
        if not (settings or pins or wal):
            return None
        self.session_changed = self.pins_changed = False
        self.wrote = False
        sink = bytearray()

        def done(ok: bool, _request: Request) -> None:
            if ok:
                on_read(self._learn(read_inspection(bytes(sink), settings, pins)))

        query = inspection_query(settings, pins, wal)
        return p.query(query), Request(p.QUERY, HIDE, sink=sink, on_done=done)

    def _learn(self, found: Inspection) -> Inspection:
        if found.wal_position is not None:
            self.min_lsn = max(self.min_lsn, parse_lsn(found.wal_position))
        if found.settings is not None:
            # A direct connection keeps its startup parameters through RESET: so do we.
            self.settings = {**self.startup, **found.settings}
        if found.pinned_objects is not None:
            pinned = found.pinned_objects > 0 or self.loaded
            if pinned and not self.pinned:
                self.notice_due = True
            elif not pinned:
                self.features.clear()
            self.pinned = pinned
        return found

    def take_notice(self) -> bytes:
        if not self.notice_due:
            return b""
        self.notice_due = False
        return pinned_notice(self.features)


def _wake_if_needed(out: list[bytes], requests: list[Request]) -> None:
    """A synthetic answer is due after everything the server still owes, and the tracker emits it
    when the next real answer comes: when nothing real follows it, ask for something harmless."""
    if requests and requests[-1].action == SYNTH:
        requests.append(Request(p.CLOSE, HIDE))
        out.append(WAKE)


_ABORT = (
    p.message(b"P", b"\0" + p.cstr("DO $$BEGIN RAISE EXCEPTION 'gpooler: refused'; END$$") + b"\0\0")
    + p.message(b"B", b"\0\0\0\0\0\0\0\0")
    + p.message(b"E", b"\0\0\0\0\0")
)
"""An unnamed statement that fails when executed: it makes the transaction fail for real."""


def prepare_text(entry: tuple) -> str:
    """The PREPARE statement that re-creates a SQL prepared statement on another connection."""
    _, name, types, body = entry
    params = f" ({types})" if types else ""
    return f"PREPARE {p.quote_ident(name)}{params} AS {body}"
