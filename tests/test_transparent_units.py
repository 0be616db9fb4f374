"""Unit tests for transaction pooling's transparency: no server, no daemon, bytes in and out.

tracking.Tracker pairs a server's answers with the requests sent (forwarded, answered by gpooler,
hidden); prepared.Rewriter maps a client's statement names to shared server-side ones; and
transparent.ClientSession turns what a client sent into what the current server connection needs.
transparent.effects is the cheap pre-filter in front of the classifier: it must never miss a text
the classifier would act on.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpooler import protocol as p
from gpooler.prepared import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    WAKE,
    ClientStatements,
    Rewriter,
    ServerStatements,
    server_name,
)
from gpooler.session_state import PINNED_QUERY, SETTINGS_QUERY
from gpooler.tracking import FORWARD, HIDE, SYNTH, Request, Tracker, TrackingError, plain
from gpooler.transparent import _ABORT as ABORT, ClientSession, _classified, effects, prepare_text

# --------------------------------------------------------------------------------------------------
# messages


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


# server -> client
def parse_complete() -> bytes:
    return msg(b"1")


def bind_complete() -> bytes:
    return msg(b"2")


def close_complete() -> bytes:
    return msg(b"3")


def no_data() -> bytes:
    return msg(b"n")


def row_description(*names: str) -> bytes:
    body = struct.pack("!h", len(names))
    for name in names:
        body += name.encode() + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return msg(b"T", body)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return msg(b"D", body)


def command_complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def error(code: str = "42601", text: str = "syntax error") -> bytes:
    return p.error_response(code, text)


def notice(text: str = "hello") -> bytes:
    return msg(b"N", b"SNOTICE\0C00000\0M" + text.encode() + b"\0\0")


def notification(channel: str = "ch", payload: str = "x") -> bytes:
    return msg(b"A", struct.pack("!i", 42) + channel.encode() + b"\0" + payload.encode() + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


# client -> server
def parse(name: bytes, sql: bytes, oids=()) -> bytes:
    return msg(b"P", name + b"\0" + sql + b"\0" + struct.pack("!h", len(oids))
               + b"".join(struct.pack("!I", o) for o in oids))


def parse_body(name: bytes, sql: bytes, oids=()) -> bytes:
    return parse(name, sql, oids)[5:]


def bind(statement: bytes, portal: bytes = b"") -> bytes:
    return msg(b"B", portal + b"\0" + statement + b"\0" + struct.pack("!hhh", 0, 0, 0))


def bind_body(statement: bytes, portal: bytes = b"") -> bytes:
    return bind(statement, portal)[5:]


def bind_tail() -> bytes:
    return struct.pack("!hhh", 0, 0, 0)


def describe(kind: bytes, name: bytes) -> bytes:
    return msg(b"D", kind + name + b"\0")


def execute(portal: bytes = b"") -> bytes:
    return msg(b"E", portal + b"\0" + struct.pack("!i", 0))


def close(kind: bytes, name: bytes) -> bytes:
    return msg(b"C", kind + name + b"\0")


def query(sql: str | bytes) -> bytes:
    return msg(b"Q", (sql.encode() if isinstance(sql, str) else sql) + b"\0")


SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")


def error_fields(data: bytes) -> dict[str, str]:
    assert data[:1] == b"E", data
    return p.parse_fields(data[5:])


class Log:
    """on_done callbacks that record (label, ok)."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, label: str):
        def done(ok: bool, _request: Request) -> None:
            self.calls.append((label, ok))

        return done


def feed_all(tracker: Tracker, *chunks: bytes) -> tuple[bytes, int, int]:
    out, ready_count, status = [], 0, 0
    for chunk in chunks:
        pieces, r, s = tracker.feed(chunk)
        out += pieces
        ready_count += r
        status = s or status
    return b"".join(out), ready_count, status


# --------------------------------------------------------------------------------------------------
# tracking.Tracker


def test_forwarded_answers_pass_through_unchanged():
    t = Tracker()
    t.extend([plain(p.QUERY)])
    answer = row_description("a") + data_row(b"1") + command_complete("SELECT 1") + ready()
    out, n, status = feed_all(t, answer)
    assert (out, n, status) == (answer, 1, ord("I"))
    assert not t


def test_a_whole_plain_answer_and_the_walk_answer_by_answer_agree():
    """A chunk that answers everything queued, all of it plain, is passed on in one piece; cut
    anywhere, the same bytes go through the walk request by request: same output, same books."""
    batch = [plain(p.PARSE), plain(p.BIND), plain(p.DESCRIBE), plain(p.EXECUTE), plain(p.SYNC),
             plain(p.QUERY)]
    answer = (parse_complete() + bind_complete() + row_description("a") + data_row(b"1")
              + command_complete("SELECT 1") + ready(b"T")
              + msg(b"N", b"SNOTICE\0Mhello\0\0") + command_complete("COMMIT") + ready())
    whole = Tracker()
    whole.extend(list(batch))
    assert feed_all(whole, answer) == (answer, 2, ord("I")) and not whole
    for cut in range(1, len(answer)):
        walked = Tracker()
        walked.extend(list(batch))
        assert feed_all(walked, answer[:cut], answer[cut:]) == (answer, 2, ord("I")), cut
        assert not walked and walked.last_status == whole.last_status


def test_an_error_or_a_missing_ready_is_walked_answer_by_answer():
    seen = []
    t = Tracker()
    t.on_error = seen.append
    t.extend([plain(p.PARSE), plain(p.BIND), plain(p.EXECUTE), plain(p.SYNC)])
    failure = error("22012", "division by zero")
    out, n, status = feed_all(t, parse_complete() + bind_complete() + failure + ready())
    assert (n, status) == (1, ord("I")) and len(seen) == 1 and not t
    # a long result: the chunks before the last are not answers to everything queued
    t.extend([plain(p.QUERY)])
    rows = row_description("a") + data_row(b"x" * 100) * 50
    assert feed_all(t, rows) == (rows, 0, 0) and len(t.queue) == 1
    assert feed_all(t, command_complete("SELECT 50") + ready()) == (
        command_complete("SELECT 50") + ready(), 1, ord("I"))
    assert not t


def test_synthetic_answers_are_emitted_in_turn():
    t = Tracker()
    log = Log()
    t.extend([plain(p.PARSE), Request(p.CLOSE, SYNTH, CLOSE_COMPLETE, on_done=log("close")),
              Request(p.PARSE, SYNTH, PARSE_COMPLETE, on_done=log("parse")),
              plain(p.BIND), plain(p.EXECUTE), plain(p.SYNC)])
    server = parse_complete() + bind_complete() + command_complete("SELECT 0") + ready(b"T")
    out, n, status = feed_all(t, server)
    assert out == (parse_complete() + CLOSE_COMPLETE + PARSE_COMPLETE + bind_complete()
                   + command_complete("SELECT 0") + ready(b"T"))
    assert (n, status) == (1, ord("T"))
    assert log.calls == [("close", True), ("parse", True)]


def test_synthetic_answers_at_the_head_come_out_before_any_server_output():
    t = Tracker()
    t.extend([Request(p.PARSE, SYNTH, PARSE_COMPLETE), Request(p.CLOSE, HIDE)])
    out, n, status = feed_all(t, b"")
    assert out == PARSE_COMPLETE
    out, n, status = feed_all(t, close_complete())
    assert (out, n, status) == (b"", 0, 0)
    assert not t


def test_hidden_answers_are_held_back():
    t = Tracker()
    log = Log()
    t.extend([Request(p.PARSE, HIDE, on_done=log("prepare")), plain(p.BIND), plain(p.EXECUTE),
              plain(p.SYNC)])
    rest = bind_complete() + data_row(b"x") + command_complete("SELECT 1") + ready()
    out, n, status = feed_all(t, parse_complete() + rest)
    assert (out, n, status) == (rest, 1, ord("I"))
    assert log.calls == [("prepare", True)]


def test_hidden_query_output_goes_to_its_sink():
    t = Tracker()
    sink = bytearray()
    log = Log()
    t.extend([plain(p.QUERY), Request(p.QUERY, HIDE, sink=sink, on_done=log("inspect"))])
    mine = command_complete("SET") + ready()
    hidden = (row_description("name", "setting") + data_row(b"work_mem", b"8192")
              + command_complete("SELECT 1") + ready())
    out, n, status = feed_all(t, mine + hidden)
    assert (out, n, status) == (mine, 1, ord("I"))
    assert bytes(sink) == hidden
    assert log.calls == [("inspect", True)]


def test_an_error_skips_the_books_to_the_sync():
    t = Tracker()
    log = Log()
    t.extend([Request(p.PARSE, FORWARD, on_done=log("bad")),
              Request(p.PARSE, SYNTH, PARSE_COMPLETE, on_done=log("skipped synthetic")),
              Request(p.PARSE, HIDE, on_done=log("skipped hidden")),
              plain(p.BIND), plain(p.EXECUTE), plain(p.SYNC),
              Request(p.PARSE, FORWARD, on_done=log("after")), plain(p.SYNC)])
    out, n, status = feed_all(t, error() + ready() + parse_complete() + ready())
    # Postgres skipped everything up to the Sync: no synthetic ParseComplete in between
    assert out == error() + ready() + parse_complete() + ready()
    assert n == 2
    assert log.calls == [("bad", False), ("skipped synthetic", False), ("skipped hidden", False),
                         ("after", True)]


def test_an_error_in_a_simple_query_fails_only_that_query():
    t = Tracker()
    log = Log()
    t.extend([Request(p.QUERY, on_done=log("first")), Request(p.QUERY, on_done=log("second"))])
    answer = error() + ready() + command_complete("SELECT 1") + ready()
    out, n, _ = feed_all(t, answer)
    assert (out, n) == (answer, 2)
    assert log.calls == [("first", False), ("second", True)]


def test_a_failed_hidden_preparation_is_shown_to_the_client():
    t = Tracker()
    log = Log()
    t.extend([Request(p.PARSE, HIDE, on_done=log("prepare")), plain(p.BIND), plain(p.EXECUTE),
              plain(p.SYNC)])
    failure = error("42P01", 'relation "gone" does not exist')
    out, n, _ = feed_all(t, failure + ready())
    assert (out, n) == (failure + ready(), 1)
    assert log.calls == [("prepare", False)]


def test_a_failed_hidden_query_stays_hidden():
    t = Tracker()
    log = Log()
    t.extend([Request(p.QUERY, HIDE, on_done=log("hidden")), plain(p.QUERY)])
    mine = command_complete("SELECT 1") + ready()
    out, n, _ = feed_all(t, error("26000", "nope") + ready() + mine)
    assert (out, n) == (mine, 1)
    assert log.calls == [("hidden", False)]


def test_notifications_and_notices_are_never_held_back():
    t = Tracker()
    sink = bytearray()
    t.extend([Request(p.QUERY, HIDE, sink=sink)])
    hidden = command_complete("SELECT 0") + ready()
    loose = notification() + notice() + parameter_status("application_name", "x")
    out, n, _ = feed_all(t, loose[:20] + loose[20:] + hidden)
    assert (out, n) == (loose, 0)
    assert bytes(sink) == hidden


def test_ready_for_query_that_no_request_explains():
    t = Tracker()
    t.extend([plain(p.PARSE)])
    with pytest.raises(TrackingError):
        t.feed(ready())


def scenario():
    """Requests and server output touching every path: (requests, output, expected client view,
    the hidden sink, the callback log)."""
    log = Log()
    sink = bytearray()
    requests = [
        Request(p.PARSE, SYNTH, PARSE_COMPLETE, on_done=log("synthetic parse")),
        Request(p.CLOSE, HIDE, on_done=log("eviction")),
        Request(p.PARSE, HIDE, on_done=log("hidden parse")),
        plain(p.BIND), plain(p.DESCRIBE), plain(p.EXECUTE), plain(p.SYNC),
        Request(p.QUERY, HIDE, sink=sink, on_done=log("inspection")),
        Request(p.PARSE, FORWARD, on_done=log("failing parse")),
        Request(p.PARSE, SYNTH, PARSE_COMPLETE, on_done=log("skipped")),
        plain(p.SYNC),
        Request(p.QUERY, on_done=log("query")),
    ]
    big = bytes(range(256)) * 3
    visible_1 = (bind_complete() + row_description("a", "b") + data_row(big, None)
                 + data_row(b"x", b"y") + command_complete("SELECT 2") + ready())
    hidden = row_description("name", "setting") + data_row(b"DateStyle", b"ISO, DMY") \
        + command_complete("SELECT 1") + ready()
    visible_2 = error() + ready() + notice() + row_description("c") + data_row(big) \
        + command_complete("SELECT 1") + notification() + ready(b"I")
    output = close_complete() + parse_complete() + visible_1 + hidden + visible_2
    expected = PARSE_COMPLETE + visible_1 + visible_2
    return requests, output, expected, sink, log, hidden


def run_scenario(cuts: list[int]):
    requests, output, expected, sink, log, hidden = scenario()
    t = Tracker()
    t.extend(requests)
    bounds = [0, *sorted(set(cuts)), len(output)]
    chunks = [output[a:b] for a, b in zip(bounds, bounds[1:])]
    out, n, status = feed_all(t, *chunks)
    return out, n, status, bytes(sink), log.calls, expected, hidden, t


def test_scenario_in_one_piece():
    out, n, status, sink, calls, expected, hidden, t = run_scenario([])
    assert out == expected
    assert (n, status) == (3, ord("I"))
    assert sink == hidden
    assert calls == [("synthetic parse", True), ("eviction", True), ("hidden parse", True),
                     ("inspection", True), ("failing parse", False), ("skipped", False),
                     ("query", True)]
    assert not t


def test_chunking_at_every_byte_boundary_gives_the_same_result():
    whole = run_scenario([])[:5]
    length = len(scenario()[1])
    for cut in range(1, length):
        assert run_scenario([cut])[:5] == whole, f"cut at {cut}"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_chunking_anywhere_gives_the_same_result(data):
    length = len(scenario()[1])
    cuts = data.draw(st.lists(st.integers(1, length - 1), max_size=30))
    assert run_scenario(cuts)[:5] == run_scenario([])[:5]


# --------------------------------------------------------------------------------------------------
# prepared.Rewriter


def books(limit: int = 200):
    client, server = ClientStatements(), ServerStatements(limit)
    return client, server, Rewriter(client, server)


DEF_1 = b"select $1::int\0" + struct.pack("!h", 0)
DEF_2 = b"select 2\0" + struct.pack("!h", 0)


def test_a_named_parse_goes_to_the_server_under_a_shared_name():
    client, server, rw = books()
    requests = []
    out = rw.parse(b"s1\0" + DEF_1, requests)
    sname = server_name(DEF_1)
    assert re.fullmatch(rb"gp_[0-9a-f]{24}", sname)
    assert out == msg(b"P", sname + b"\0" + DEF_1)
    assert [(r.kind, r.action) for r in requests] == [(p.PARSE, FORWARD)]
    assert client.parsed[b"s1"][0] == sname and sname in server.parsed
    # the same text and types from another client: answered without the server
    other = ClientStatements()
    requests = []
    assert Rewriter(other, server).parse(b"theirs\0" + DEF_1, requests) == b""
    assert [(r.kind, r.action, r.payload) for r in requests] == [(p.PARSE, SYNTH, PARSE_COMPLETE)]
    assert other.parsed[b"theirs"][0] == sname
    # other parameter types: another statement
    typed = b"select $1::int\0" + struct.pack("!hI", 1, 20)
    assert server_name(typed) != sname


def test_parse_of_a_name_in_use_and_unnamed_parse():
    client, server, rw = books()
    assert not rw.in_use(b"s1")
    rw.parse(b"s1\0" + DEF_1, [])
    assert rw.in_use(b"s1") and not rw.in_use(b"")
    requests = []
    assert rw.parse(b"\0" + DEF_2, requests) is None  # goes as the client sent it
    assert [(r.kind, r.action) for r in requests] == [(p.PARSE, FORWARD)]
    assert b"" not in client.parsed


def test_bind_and_describe_prepare_first_where_needed():
    client, server, rw = books()
    rw.parse(b"s1\0" + DEF_1, [])
    sname, parse_message = client.parsed[b"s1"]
    elsewhere = ServerStatements(200)
    rw2 = Rewriter(client, elsewhere)
    requests = []
    out = rw2.bind(bind_body(b"s1"), requests)
    assert out == parse_message + msg(b"B", b"\0" + sname + b"\0" + bind_tail())
    assert [(r.kind, r.action) for r in requests] == [(p.PARSE, HIDE), (p.BIND, FORWARD)]
    # now it is there: no second Parse, for Bind or Describe
    requests = []
    assert rw2.describe(b"S" + b"s1\0", requests) == msg(b"D", b"S" + sname + b"\0")
    assert [(r.kind, r.action) for r in requests] == [(p.DESCRIBE, FORWARD)]
    # a standalone Describe on a third server prepares first too
    third = Rewriter(client, ServerStatements(200))
    requests = []
    assert third.describe(b"Ss1\0", requests) == parse_message + msg(b"D", b"S" + sname + b"\0")
    assert [(r.kind, r.action) for r in requests] == [(p.PARSE, HIDE), (p.DESCRIBE, FORWARD)]
    # portals and unknown statement names go through untouched (None: as the client sent them)
    requests = []
    assert rw.describe(b"Pportal\0", requests) is None
    assert rw.bind(bind_body(b"nope", b"p1"), requests) is None
    assert rw.describe(b"Snope\0", requests) is None
    assert all(r.action == FORWARD for r in requests)


def test_close_of_a_statement_is_answered_locally():
    client, server, rw = books()
    rw.parse(b"s1\0" + DEF_1, [])
    sname = client.parsed[b"s1"][0]
    requests = []
    assert rw.close(b"Ss1\0", requests) == b""
    assert [(r.kind, r.action, r.payload) for r in requests] == [(p.CLOSE, SYNTH, CLOSE_COMPLETE)]
    assert b"s1" not in client.parsed and sname in server.parsed
    requests = []
    assert rw.close(b"Pportal\0", requests) is None
    assert rw.close(b"S\0", requests) is None
    assert [(r.kind, r.action) for r in requests] == [(p.CLOSE, FORWARD)] * 2


def test_least_recently_used_statement_is_closed_for_room():
    client, server, rw = books(limit=2)
    defs = {name: f"select '{name}'".encode() + b"\0\0\0" for name in (b"a", b"b", b"c", b"d")}
    for name in (b"a", b"b"):
        rw.parse(name + b"\0" + defs[name], [])
    rw.bind(bind_body(b"a"), [])  # a is now the most recently used
    requests = []
    out = rw.parse(b"c\0" + defs[b"c"], requests)
    evicted = server_name(defs[b"b"])
    assert out == msg(b"C", b"S" + evicted + b"\0") + msg(b"P", server_name(defs[b"c"]) + b"\0"
                                                         + defs[b"c"])
    assert [(r.kind, r.action) for r in requests] == [(p.CLOSE, HIDE), (p.PARSE, FORWARD)]
    assert list(server.parsed) == [server_name(defs[b"a"]), server_name(defs[b"c"])]
    # b is still the client's: a Bind prepares it again, evicting a
    requests = []
    out = rw.bind(bind_body(b"b"), requests)
    assert out.startswith(msg(b"C", b"S" + server_name(defs[b"a"]) + b"\0"))
    assert [(r.kind, r.action) for r in requests] == [(p.CLOSE, HIDE), (p.PARSE, HIDE),
                                                       (p.BIND, FORWARD)]
    assert len(server.parsed) == 2


def test_a_failed_parse_is_undone():
    client, server, rw = books()
    requests = []
    rw.parse(b"s1\0" + DEF_1, requests)
    t = Tracker()
    t.extend(requests + [plain(p.SYNC)])
    feed_all(t, error() + ready())
    assert b"s1" not in client.parsed
    assert server_name(DEF_1) not in server.parsed
    assert not rw.in_use(b"s1")  # the name is free again


def test_a_failed_hidden_preparation_is_forgotten_for_the_server_only():
    client, server, rw = books()
    rw.parse(b"s1\0" + DEF_1, [])
    other_server = ServerStatements(200)
    requests = []
    Rewriter(client, other_server).bind(bind_body(b"s1"), requests)
    t = Tracker()
    t.extend(requests + [plain(p.SYNC)])
    feed_all(t, error() + ready())
    assert b"s1" in client.parsed
    assert server_name(DEF_1) not in other_server.parsed


def test_a_skipped_synthetic_parse_leaves_the_servers_statement_in_the_books():
    """The server holds gp_x (parsed for client A). Client B's batch fails before its own Parse of
    the same text, which gpooler answered itself: Postgres skipped nothing of gp_x, so gpooler's
    books must still say the server has it (else the next Parse of gp_x fails with 42P05)."""
    server = ServerStatements(200)
    Rewriter(ClientStatements(), server).parse(b"a\0" + DEF_1, [])
    b_books = ClientStatements()
    rw = Rewriter(b_books, server)
    requests = [plain(p.PARSE)]  # B's first Parse: it will fail
    rw.parse(b"b\0" + DEF_1, requests)
    t = Tracker()
    t.extend(requests + [plain(p.SYNC)])
    feed_all(t, error() + ready())
    assert b"b" not in b_books.parsed
    assert server_name(DEF_1) in server.parsed


def test_a_skipped_eviction_leaves_the_evicted_statement_in_the_books():
    """Limit 1: a Parse that must evict comes after an error in its batch, so Postgres skips the
    Close gpooler put before it. The evicted statement is still on the server."""
    client, server, rw = books(limit=1)
    rw.parse(b"a\0" + DEF_1, [])
    requests = [plain(p.PARSE)]  # fails
    rw.parse(b"b\0" + DEF_2, requests)
    t = Tracker()
    t.extend(requests + [plain(p.SYNC)])
    feed_all(t, error() + ready())
    assert list(server.parsed) == [server_name(DEF_1)]


# --------------------------------------------------------------------------------------------------
# transparent.ClientSession.translate


def items(*messages: bytes):
    reader = p.MessageReader()
    return reader.feed(b"".join(messages))


def translate(session: ClientSession, server: ServerStatements, *messages: bytes):
    pieces, requests, syncs, open_batch = session.translate(items(*messages), server)
    return b"".join(pieces), requests, syncs, open_batch


def fresh(settings: dict | None = None, refuse: bool = False):
    return ClientSession(settings or {}, refuse), ServerStatements(200)


def finish(requests, ok: bool = True):
    for r in requests:
        r.finish(ok)


def test_a_plain_query_goes_through_untouched():
    session, server = fresh()
    sent, requests, syncs, open_batch = translate(session, server, query("select 1"))
    assert (sent, syncs, open_batch) == (query("select 1"), 1, False)
    assert [(r.kind, r.action) for r in requests] == [(p.QUERY, FORWARD)]
    assert session.inspection(lambda found: None) is None


@pytest.mark.parametrize("text, settings_asked, pins_asked", [
    ("set work_mem = '8MB'", True, False),
    ("reset all", True, False),
    ("select set_config('work_mem', '8MB', false)", True, False),
    ("listen ch", False, True),
    ("select pg_advisory_unlock(1)", False, True),
    ("discard all", True, True),
])
def test_what_is_asked_after_a_statement(text, settings_asked, pins_asked):
    session, server = fresh()
    sent, requests, _, _ = translate(session, server, query(text))
    assert sent == query(text)
    question, request = session.inspection(lambda found: None)
    assert question[:1] == b"Q" and request.action == HIDE and request.sink is not None
    assert (SETTINGS_QUERY.encode() in question, PINNED_QUERY.encode() in question) == (
        settings_asked, pins_asked)
    assert session.inspection(lambda found: None) is None  # asked once


@pytest.mark.parametrize("how", ["query", "parse"])
def test_a_set_config_without_literals_makes_gpooler_read_the_settings(how):
    """set_config('work_mem', $1, false): the value is not in the text, but the setting changes
    all the same, so it must be read back from the server (else it stays on the server for the
    next client, and this client loses it on another server)."""
    session, server = fresh()
    text = b"select set_config('work_mem', $1, false)"
    if how == "query":
        text = b"select set_config('work_mem', '1' || '3MB', false)"
        translate(session, server, query(text))
    else:
        translate(session, server, parse(b"", text), bind(b""), execute(), SYNC)
    asked = session.inspection(lambda found: None)
    assert asked is not None and SETTINGS_QUERY.encode() in asked[0]


def test_learning_the_settings_keeps_startup_parameters():
    session, server = fresh({"application_name": "app", "datestyle": "ISO, DMY"})
    translate(session, server, query("set work_mem = '8MB'"))
    question, request = session.inspection(lambda found: None)
    request.sink.extend(row_description("name", "setting") + data_row(b"work_mem", b"8192")
                        + data_row(b"DateStyle", b"German, DMY")
                        + command_complete("SELECT 2") + ready())
    request.finish(True)
    assert session.settings["work_mem"] == "8192"
    assert session.settings["application_name"] == "app"
    # one name per setting, whatever case pg_settings spells it in (DateStyle, TimeZone ...)
    assert {k.lower() for k in session.settings} == {"work_mem", "application_name", "datestyle"}
    assert len(session.settings) == 3
    assert "German, DMY" in session.settings.values()


def test_sql_prepare_is_booked_when_it_succeeds():
    session, server = fresh()
    _, requests, _, _ = translate(session, server, query("PREPARE q (int) AS select $1"))
    finish(requests, ok=False)
    assert session.statements.sql == {} and server.sql == {}
    _, requests, _, _ = translate(session, server, query("PREPARE q (int) AS select $1"))
    finish(requests)
    assert session.statements.sql == {"q": prepare_text(("prepare", "q", "int", "select $1"))}
    assert server.sql == session.statements.sql


def test_execute_brings_the_clients_statement_to_the_server():
    session, server = fresh()
    _, requests, _, _ = translate(session, server, query("prepare q as select 1"))
    finish(requests)
    mine = session.statements.sql["q"]
    # a server without q: prepared first, hidden
    other = ServerStatements(200)
    sent, requests, syncs, _ = translate(session, other, query("execute q"))
    assert sent == query(mine) + query("execute q")
    assert [(r.kind, r.action) for r in requests] == [(p.QUERY, HIDE), (p.QUERY, FORWARD)]
    assert syncs == 1
    finish(requests)
    assert other.sql == {"q": mine}
    # a server holding another client's q: theirs goes first
    theirs = ServerStatements(200)
    theirs.sql["q"] = "PREPARE q AS select 'theirs'"
    sent, requests, _, _ = translate(session, theirs, query("execute q"))
    assert sent == query(f"DEALLOCATE {p.quote_ident('q')};{mine}") + query("execute q")
    # a client without q, on that server: only theirs is removed, so Postgres says 26000
    stranger, _ = fresh()
    sent, requests, _, _ = translate(stranger, theirs, query("execute q"))
    assert sent == query(f"DEALLOCATE {p.quote_ident('q')}") + query("execute q")


def test_deallocate_all_and_discard_all_clear_the_books():
    for text in ("deallocate all", "discard all"):
        session, server = fresh()
        _, requests, _, _ = translate(session, server, query("prepare q as select 1"))
        finish(requests)
        translate(session, server, parse(b"s", b"select 1"), SYNC)
        _, requests, _, _ = translate(session, server, query(text))
        finish(requests)
        assert session.statements.sql == {} and session.statements.parsed == {}, text
        assert server.sql == {} and not server.parsed, text


def test_an_extended_batch_is_rewritten():
    session, server = fresh()
    sent, requests, syncs, open_batch = translate(
        session, server, parse(b"s", b"select $1::int"), bind(b"s"), describe(b"P", b""),
        execute(), SYNC)
    sname = server_name(b"select $1::int\0\0\0")
    assert sent == (parse(sname, b"select $1::int") + bind(sname) + describe(b"P", b"")
                    + execute() + SYNC)
    assert [r.kind for r in requests] == [p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE, p.SYNC]
    assert (syncs, open_batch) == (1, False)
    # without a Sync the batch stays open
    sent, requests, syncs, open_batch = translate(session, server, bind(b"s"), execute(), FLUSH)
    assert sent == bind(sname) + execute() + FLUSH
    assert (syncs, open_batch) == (0, True)


def test_a_parse_of_a_name_in_use_fails_until_the_sync():
    session, server = fresh()
    translate(session, server, parse(b"s", b"select 1"), SYNC)
    sent, requests, syncs, _ = translate(session, server, parse(b"s", b"select 2"), bind(b"s"),
                                         execute(), SYNC)
    # the synthetic error, then a hidden statement that fails so the transaction fails for real
    assert sent == ABORT + SYNC
    assert [(r.kind, r.action) for r in requests] == [
        (p.PARSE, SYNTH), (p.PARSE, HIDE), (p.BIND, HIDE), (p.EXECUTE, HIDE), (p.SYNC, FORWARD)]
    found = error_fields(requests[0].payload)
    assert (found["C"], found["M"]) == ("42P05", 'prepared statement "s" already exists')
    assert syncs == 1
    # the skipping ends at the Sync, also when the Sync comes in a later read
    sent, requests, _, _ = translate(session, server, parse(b"s", b"select 2"), bind(b"s"))
    assert sent == ABORT
    sent, requests, _, _ = translate(session, server, execute(), SYNC, query("select 1"))
    assert sent == SYNC + query("select 1")


def test_a_parse_of_a_name_in_use_prepares_nothing_first():
    """Even when its text would need a SQL statement prepared first (EXECUTE of one the server
    lacks): the Parse fails, so nothing may be sent for it, or a hidden answer goes missing."""
    session, server = fresh()
    translate(session, server, parse(b"s", b"select 1"), SYNC)
    finish(translate(session, fresh()[1], query("prepare q as select 1"))[1])
    sent, requests, _, _ = translate(session, server, parse(b"s", b"execute q"), SYNC)
    assert sent == ABORT + SYNC
    t = Tracker()
    t.extend(requests)
    out, readies, _ = feed_all(t, parse_complete() + bind_complete() + error() + ready())
    assert [kind for kind, _ in p.split_messages(out)[0]] == [ord("E"), ord("Z")]
    assert readies == 1 and not t


def test_a_close_answered_locally_before_a_flush_wakes_the_server():
    session, server = fresh()
    translate(session, server, parse(b"s", b"select 1"), SYNC)
    sent, requests, syncs, _ = translate(session, server, close(b"S", b"s"), FLUSH)
    assert sent.endswith(WAKE)
    assert [(r.kind, r.action) for r in requests] == [(p.CLOSE, SYNTH), (p.CLOSE, HIDE)]
    t = Tracker()
    t.extend(requests)
    out, _, _ = feed_all(t, close_complete())
    assert out == CLOSE_COMPLETE


def test_a_terminate_ends_the_translation():
    session, server = fresh()
    sent, requests, syncs, _ = translate(session, server, query("select 1"), TERMINATE)
    assert sent == query("select 1") and syncs == 1


@pytest.mark.parametrize("text", ["listen ch", "select pg_advisory_lock(1)",
                                  "create temp table t (x int)",
                                  "declare c cursor with hold for select 1", "load 'x'"])
def test_refused_session_features(text):
    session, server = fresh(refuse=True)
    sent, requests, _, _ = translate(session, server, query(text))
    assert sent[:1] == b"Q" and sent != query(text) and b"0A000" in sent
    sent, requests, syncs, _ = translate(session, server, parse(b"", text.encode()), bind(b""),
                                         execute(), SYNC)
    assert sent == ABORT + SYNC
    assert requests[0].action == SYNTH and error_fields(requests[0].payload)["C"] == "0A000"
    assert not session.pinned and session.features == set()


# --------------------------------------------------------------------------------------------------
# transparent.effects: the pre-filter


EFFECTFUL = [
    "set work_mem = '8MB'",
    "set search_path to a, b",
    "set time zone 'UTC'",
    "set role none",
    "reset work_mem",
    "reset all",
    "select set_config('work_mem', '8MB', false)",
    "select pg_catalog.set_config('work_mem', $1, false)",
    "values (set_config('a.b', 'c', false))",
    "select pg_advisory_lock(1)",
    "select pg_try_advisory_lock(1, 2)",
    "select pg_advisory_unlock(1)",
    "select pg_advisory_unlock_all()",
    "with x as (select pg_advisory_lock(1)) select * from x",
    "(select pg_advisory_lock(1))",
    "copy (select pg_advisory_lock(1)) to stdout",
    "prepare q as select 1",
    "prepare q (int) as select $1",
    "execute q",
    "execute q (1)",
    "explain execute q",
    "explain analyze execute q",
    "deallocate q",
    "deallocate all",
    "discard all",
    "discard temp",
    "listen ch",
    "unlisten ch",
    "unlisten *",
    "load 'auto_explain'",
    "declare c cursor with hold for select 1",
    "close all",
    "create temp table t (x int)",
    "create temporary table t as select 1",
    "create table pg_temp.t (x int)",
    "select 1 into temp t",
    "select * into temporary table t from generate_series(1, 2)",
    "select 1; set work_mem = '1MB'",
    "begin; listen ch; commit",
]
NOTHING = [
    "select 1",
    "select * from t where x = 1",
    "insert into t values (1)",
    "update t set x = 2 where y = 3",
    "delete from t",
    "with a as (select 1) select * from a",
    "select 'set work_mem = 1'",
    "begin",
    "commit",
    "show work_mem",
    "set local work_mem = '1MB'",
    "select pg_advisory_xact_lock(1)",
    "select 1;",
]


def decorated(text: str):
    """Random leading whitespace and comments, random letter case, an optional semicolon."""
    lead = st.lists(st.sampled_from([" ", "\n", "\t", "\r\n", "/* c */", "/* a /* nested */ b */ ",
                                     "-- line\n"]), max_size=4).map("".join)
    case = st.sampled_from(["same", "upper", "lower", "mixed"])
    semicolon = st.sampled_from(["", ";", " ; "])

    def build(parts):
        lead_text, how, end, flips = parts
        body = text
        if how == "upper":
            body = body.upper()
        elif how == "lower":
            body = body.lower()
        elif how == "mixed":
            body = "".join(c.upper() if flips[i % len(flips)] else c for i, c in enumerate(body))
        if body.rstrip().endswith(";"):
            end = ""
        return lead_text + body + end

    flips = st.lists(st.booleans(), min_size=1, max_size=7)
    return st.tuples(lead, case, semicolon, flips).map(build)


@pytest.mark.parametrize("text", EFFECTFUL)
def test_effectful_texts_are_never_missed(text):
    assert _classified(text.encode()) is not None, "the classifier itself must act on this"

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(decorated(text))
    def check(variant):
        assert effects(variant.encode()) is not None, variant

    check()


@pytest.mark.parametrize("text", NOTHING)
def test_plain_texts_have_no_effects(text):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(decorated(text))
    def check(variant):
        assert effects(variant.encode()) is None, variant

    check()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(EFFECTFUL + NOTHING), min_size=1, max_size=3),
       st.sampled_from(["", " ", "\n", "/* x */ "]))
def test_the_prefilter_agrees_with_the_classifier(statements, lead):
    text = (lead + "; ".join(statements)).encode()
    if _classified(text) is not None:
        assert effects(text) is not None, text


def test_only_short_texts_are_remembered():
    """Bulk INSERTs with their values written in would fill the caches with megabytes."""
    from gpooler.transparent import CACHED_TEXT, _classified, screened

    long_insert = b"insert into t values " + b",".join(b"(%d)" % i for i in range(CACHED_TEXT))
    long_set = b"set application_name = 'x'; " + long_insert
    before = (screened.cache_info().currsize, _classified.cache_info().currsize)
    assert screened(long_insert) == (None, None)
    assert screened(long_set)[1].session
    assert (screened.cache_info().currsize, _classified.cache_info().currsize) == before
    screened(b"set application_name = 'only-short-texts-are-remembered'")
    assert screened.cache_info().currsize == before[0] + 1
