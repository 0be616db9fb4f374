"""Unit tests for gpooler.protocol: pure byte-level checks, no sockets and no Postgres.

Expected values are derived independently of the module under test: messages are framed by hand
with struct as the Postgres v3 protocol documentation describes them ("Message Formats"), and
stream totals are computed from the list of messages that went into the stream.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import time
import tracemalloc
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpooler import protocol as p

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------ helpers


def frame(kind: bytes, body: bytes = b"") -> bytes:
    """A typed message per the protocol docs: Byte1 type, Int32 length (self-inclusive), body."""
    assert len(kind) == 1
    return kind + struct.pack("!I", len(body) + 4) + body


def cs(text: str) -> bytes:
    return text.encode() + b"\0"


def header(kind: bytes, length: int) -> bytes:
    return kind + struct.pack("!I", length)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (rather than hang) if the body loops forever. Main-thread only, like pytest."""

    def boom(signum, frame):  # pragma: no cover - only on a hang
        raise TimeoutError(f"did not finish within {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# Frontend messages, built by hand. Types from the docs: Q Query, P Parse, B Bind, D Describe,
# E Execute, C Close, S Sync, H Flush, F FunctionCall, d CopyData, c CopyDone, f CopyFail,
# p PasswordMessage, X Terminate.
SYNC_POINT_KINDS = b"QSF"
BATCH_KINDS = b"PBDEC"
NEUTRAL_KINDS = b"Hdcfp"

Q_SELECT = frame(b"Q", cs("SELECT 1"))
PARSE = frame(b"P", cs("s1") + cs("SELECT $1::int") + struct.pack("!h", 1) + struct.pack("!i", 23))
BIND = frame(
    b"B",
    cs("")
    + cs("s1")
    + struct.pack("!h", 0)
    + struct.pack("!h", 1)
    + struct.pack("!i", 1)
    + b"7"
    + struct.pack("!h", 0),
)
DESCRIBE = frame(b"D", b"P" + cs(""))
EXECUTE = frame(b"E", cs("") + struct.pack("!i", 0))
CLOSE = frame(b"C", b"S" + cs("s1"))
SYNC = frame(b"S")
FLUSH = frame(b"H")
TERMINATE = frame(b"X")
FUNCTION_CALL = frame(b"F", struct.pack("!ihhh", 1598, 0, 0, 0))
COPY_DATA_BIG = frame(b"d", bytes(range(256)) * 3)  # longer than many chunks
COPY_DONE = frame(b"c")


def client_totals(kinds: list[bytes]) -> tuple[int, bool | None]:
    """Expected (syncs, open_batch) for a list of frontend message types, from the brief's rules."""
    syncs = 0
    open_batch = None
    for k in kinds:
        if k in SYNC_POINT_KINDS:
            syncs += 1
            open_batch = False
        elif k in BATCH_KINDS:
            open_batch = True
    return syncs, open_batch


@dataclass
class RelayTotals:
    syncs: int
    open_batch: bool | None
    terminated: bool
    forwarded: bytes
    pos: int
    carry: bytes


def relay_client(chunks: list[bytes]) -> RelayTotals:
    """The driver loop of gpooler.client.Client._relay, minus the sockets.

    end/pos/carry are threaded between chunks exactly as the relay does it.
    """
    carry = b""
    pos = 0
    syncs = 0
    open_batch = None
    forwarded = bytearray()
    for data in chunks:
        if not data:  # recv() returning b"" means EOF, so the relay never walks an empty chunk
            continue
        if carry:
            data = carry + data
            carry = b""
        found = p.walk_client(data, pos)
        end = found.end
        if found.terminate >= 0:
            assert data[found.terminate] == ord("X")
            data = data[: found.terminate]
            pos = 0
        elif end < len(data):
            carry = data[end:]
            data = data[:end]
            pos = 0
        else:
            pos = end - len(data)
        syncs += found.syncs
        if found.open_batch is not None:
            open_batch = found.open_batch
        forwarded += data
        if found.terminate >= 0:
            return RelayTotals(syncs, open_batch, True, bytes(forwarded), pos, carry)
    return RelayTotals(syncs, open_batch, False, bytes(forwarded), pos, carry)


@dataclass
class PumpTotals:
    ready: int
    status: int
    forwarded: bytes
    pos: int
    carry: bytes


def pump_server(chunks: list[bytes]) -> PumpTotals:
    """The driver loop of gpooler.backend.Backend._run_pump, minus the sockets."""
    carry = b""
    pos = 0
    ready_total = 0
    last_status = 0
    forwarded = bytearray()
    for data in chunks:
        if not data:
            continue
        if carry:
            data = carry + data
            carry = b""
        end, ready, status = p.walk_server(data, pos)
        if end < len(data):
            carry = data[end:]
            data = data[:end]
            pos = 0
        else:
            pos = end - len(data)
        if ready:
            ready_total += ready
            last_status = status
        forwarded += data
    return PumpTotals(ready_total, last_status, bytes(forwarded), pos, carry)


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    points = sorted(set(x for x in points if 0 < x < len(stream)))
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


# A fixed, varied client stream: simple query, a pipelined extended batch, a function call,
# copy data longer than most chunks, flushes, and finally an open (unsynced) batch.
CLIENT_MESSAGES = [
    (b"Q", Q_SELECT),
    (b"P", PARSE),
    (b"B", BIND),
    (b"D", DESCRIBE),
    (b"E", EXECUTE),
    (b"H", FLUSH),
    (b"S", SYNC),
    (b"F", FUNCTION_CALL),
    (b"d", COPY_DATA_BIG),
    (b"c", COPY_DONE),
    (b"S", SYNC),
    (b"S", SYNC),
    (b"C", CLOSE),
    (b"B", BIND),
    (b"E", EXECUTE),
]
CLIENT_STREAM = b"".join(m for _, m in CLIENT_MESSAGES)


# Backend messages built by hand: ParameterStatus S, RowDescription T, DataRow D,
# CommandComplete C, ReadyForQuery Z (one status byte I/T/E), NoticeResponse N, ErrorResponse E,
# ParseComplete 1, BindComplete 2, NotificationResponse A, CopyOutResponse H, CopyData d.
def ready(status: bytes) -> bytes:
    return frame(b"Z", status)


def row_description() -> bytes:
    field = cs("x") + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)
    return frame(b"T", struct.pack("!h", 1) + field)


def data_row(value: bytes | None) -> bytes:
    if value is None:
        return frame(b"D", struct.pack("!hi", 1, -1))
    return frame(b"D", struct.pack("!hi", 1, len(value)) + value)


SERVER_MESSAGES = [
    (None, frame(b"1")),
    (None, frame(b"2")),
    (None, row_description()),
    (None, data_row(b"1")),
    (None, frame(b"C", cs("SELECT 1"))),
    (b"I", ready(b"I")),
    (None, frame(b"S", cs("TimeZone") + cs("UTC"))),
    (None, data_row(b"x" * 700)),
    (b"T", ready(b"T")),
    (None, frame(b"N", b"SNOTICE\0Mhello\0\0")),
    (None, frame(b"E", b"SERROR\0C42601\0Msyntax\0\0")),
    (b"E", ready(b"E")),
    (None, frame(b"A", struct.pack("!i", 42) + cs("chan") + cs("payload"))),
    (b"I", ready(b"I")),
    (None, data_row(None)),
    (b"T", ready(b"T")),
]
SERVER_STREAM = b"".join(m for _, m in SERVER_MESSAGES)


def server_totals(statuses: list[bytes | None]) -> tuple[int, int]:
    seen = [s for s in statuses if s is not None]
    return len(seen), (seen[-1][0] if seen else 0)


# ------------------------------------------------------------------------------------ walk_client


def test_walk_client_whole_stream_matches_hand_counts():
    kinds = [k for k, _ in CLIENT_MESSAGES]
    syncs, open_batch = client_totals(kinds)
    assert (syncs, open_batch) == (5, True)  # sanity of the hand-made fixture itself
    found = p.walk_client(CLIENT_STREAM, 0)
    assert found.end == len(CLIENT_STREAM)
    assert found.syncs == syncs
    assert found.open_batch is open_batch
    assert found.terminate == -1
    assert found.only_sync_flush is False


def test_walk_client_every_two_chunk_split_gives_same_totals():
    whole = relay_client([CLIENT_STREAM])
    expected = client_totals([k for k, _ in CLIENT_MESSAGES])
    assert (whole.syncs, whole.open_batch) == expected
    for i in range(1, len(CLIENT_STREAM)):
        got = relay_client([CLIENT_STREAM[:i], CLIENT_STREAM[i:]])
        assert (got.syncs, got.open_batch) == expected, f"split at {i}"
        assert got.forwarded == CLIENT_STREAM, f"split at {i}"
        assert (got.pos, got.carry, got.terminated) == (0, b"", False), f"split at {i}"


def test_walk_client_every_split_with_terminate_at_the_end():
    stream = CLIENT_STREAM + SYNC + TERMINATE + Q_SELECT  # bytes after X are never forwarded
    expected_syncs = client_totals([k for k, _ in CLIENT_MESSAGES])[0] + 1
    for i in range(1, len(stream)):
        got = relay_client([stream[:i], stream[i:]])
        assert got.terminated, f"split at {i}"
        assert got.syncs == expected_syncs, f"split at {i}"
        assert got.open_batch is False, f"split at {i}"
        assert got.forwarded == CLIENT_STREAM + SYNC, f"split at {i}"


def test_walk_client_one_byte_at_a_time():
    got = relay_client([CLIENT_STREAM[i : i + 1] for i in range(len(CLIENT_STREAM))])
    assert (got.syncs, got.open_batch) == client_totals([k for k, _ in CLIENT_MESSAGES])
    assert got.forwarded == CLIENT_STREAM


client_message = st.one_of(
    st.tuples(st.sampled_from(list(b"QSFPBDECHdcfp")), st.binary(max_size=300)).map(
        lambda t: (bytes([t[0]]), frame(bytes([t[0]]), t[1]))
    ),
)


@FUZZ
@given(
    messages=st.lists(client_message, min_size=1, max_size=25),
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    terminate=st.booleans(),
)
def test_walk_client_random_chunkings_match_whole(messages, points, terminate):
    stream = b"".join(m for _, m in messages)
    if terminate:
        stream += TERMINATE + Q_SELECT
    syncs, open_batch = client_totals([k for k, _ in messages])
    whole = relay_client([stream])
    chunked = relay_client(cut(stream, points))
    for got in (whole, chunked):
        assert got.syncs == syncs
        assert got.open_batch is open_batch
        assert got.terminated is terminate
        assert got.forwarded == b"".join(m for _, m in messages)
        assert (got.pos, got.carry) == (0, b"")


def test_walk_client_partial_body_carries_position():
    # A chunk ending inside a body: end points past the chunk and the relay keeps end - len.
    found = p.walk_client(COPY_DATA_BIG[:100], 0)
    assert found.end == len(COPY_DATA_BIG)
    assert found.end > 100
    found2 = p.walk_client(COPY_DATA_BIG[100:] + SYNC, found.end - 100)
    assert found2.end == len(COPY_DATA_BIG) - 100 + len(SYNC)
    assert found2.syncs == 1
    # pos beyond the chunk: nothing framed, the position just moves on
    found3 = p.walk_client(b"abc", 10)
    assert (found3.end, found3.syncs, found3.open_batch, found3.terminate) == (10, 0, None, -1)


def test_walk_client_incomplete_header_stops_before_it():
    data = SYNC + Q_SELECT[:4]
    found = p.walk_client(data, 0)
    assert found.end == len(SYNC)
    assert found.syncs == 1


def test_walk_client_terminate_offset():
    data = Q_SELECT + SYNC + TERMINATE + SYNC
    found = p.walk_client(data, 0)
    assert found.terminate == len(Q_SELECT) + len(SYNC)
    assert found.end == found.terminate
    assert found.syncs == 2  # the Sync after Terminate does not count
    assert p.walk_client(TERMINATE, 0).terminate == 0
    # from a carried position
    data = b"\xff" * 7 + TERMINATE
    assert p.walk_client(data, 7).terminate == 7
    assert p.walk_client(SYNC + SYNC, 0).terminate == -1


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], True),
        ([SYNC], True),
        ([FLUSH], True),
        ([SYNC, FLUSH, SYNC], True),
        ([SYNC, TERMINATE], True),
        ([SYNC, Q_SELECT], False),
        ([PARSE, SYNC], False),
        ([FLUSH, COPY_DONE], False),
        ([FUNCTION_CALL], False),
    ],
)
def test_walk_client_only_sync_flush(messages, expected):
    assert p.walk_client(b"".join(messages), 0).only_sync_flush is expected


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([PARSE, BIND, EXECUTE, SYNC], False),
        ([PARSE, BIND, EXECUTE, SYNC, PARSE], True),
        ([Q_SELECT, BIND], True),
        ([BIND, DESCRIBE, EXECUTE, FLUSH], True),
        ([DESCRIBE], True),
        ([CLOSE], True),
        ([EXECUTE, Q_SELECT], False),
        ([EXECUTE, FUNCTION_CALL], False),
        ([SYNC], False),
        ([FLUSH], None),
        ([COPY_DATA_BIG, COPY_DONE], None),
        ([frame(b"p", cs("secret"))], None),
        ([], None),
    ],
)
def test_walk_client_open_batch(messages, expected):
    assert p.walk_client(b"".join(messages), 0).open_batch is expected


@pytest.mark.parametrize("kind", [b"Z", b"T", b"A", b"\0", b"\xff", b"q", b"s"])
def test_walk_client_rejects_unknown_types(kind):
    with pytest.raises(p.ProtocolError):
        p.walk_client(SYNC + frame(kind, b"abc"), 0)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 2**30, 2**30 + 1, 2**31, 2**32 - 1])
def test_walk_client_rejects_bad_lengths(length):
    with pytest.raises(p.ProtocolError):
        p.walk_client(SYNC + header(b"Q", length) + b"SELECT 1\0", 0)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 2**30, 2**30 + 1, 2**31, 2**32 - 1])
def test_split_messages_rejects_bad_lengths(length):
    with pytest.raises(p.ProtocolError):
        p.split_messages(frame(b"Z", b"I") + header(b"D", length) + b"xx")


def test_large_but_legal_length_is_accepted():
    found = p.walk_client(header(b"d", 2**20) + b"x" * 10, 0)
    assert found.end == 1 + 2**20
    msgs, rest = p.split_messages(header(b"d", 2**20) + b"x" * 10)
    assert msgs == [] and rest == header(b"d", 2**20) + b"x" * 10


def test_two_gigabyte_length_fails_fast_without_allocating():
    data = header(b"Q", 2**31) + b"SELECT"
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(p.ProtocolError):
            p.walk_client(data, 0)
        with pytest.raises(p.ProtocolError):
            p.split_messages(data)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1 << 20


@FUZZ
@given(data=st.binary(max_size=400), pos=st.integers(min_value=0, max_value=450))
def test_walk_client_fuzz_returns_or_protocol_error(data, pos):
    with time_limit(2):
        try:
            found = p.walk_client(data, pos)
        except p.ProtocolError:
            return
    assert isinstance(found, p.ClientWalk)
    assert found.end >= pos
    if found.terminate >= 0:
        assert found.end == found.terminate
        assert data[found.terminate] == ord("X")
    elif found.end < len(data):
        assert len(data) - found.end < 5  # only an incomplete header is left over
    assert found.syncs >= 0
    assert found.open_batch in (None, True, False)


@FUZZ
@given(data=st.binary(max_size=400), pos=st.integers(min_value=0, max_value=450))
def test_walk_server_fuzz_returns(data, pos):
    with time_limit(2):
        end, ready_count, status = p.walk_server(data, pos)
    assert end >= pos
    assert ready_count >= 0
    if end < len(data):
        assert len(data) - end < 6
    if ready_count == 0:
        assert status == 0


# ------------------------------------------------------------------------------------ walk_server


def test_walk_server_whole_stream_matches_hand_counts():
    expected = server_totals([s for s, _ in SERVER_MESSAGES])
    assert expected == (5, ord("T"))
    end, count, status = p.walk_server(SERVER_STREAM, 0)
    assert end == len(SERVER_STREAM)
    assert (count, status) == expected


def test_walk_server_every_two_chunk_split_gives_same_totals():
    expected = server_totals([s for s, _ in SERVER_MESSAGES])
    whole = pump_server([SERVER_STREAM])
    assert (whole.ready, whole.status) == expected
    for i in range(1, len(SERVER_STREAM)):
        got = pump_server([SERVER_STREAM[:i], SERVER_STREAM[i:]])
        assert (got.ready, got.status) == expected, f"split at {i}"
        assert got.forwarded == SERVER_STREAM, f"split at {i}"
        assert (got.pos, got.carry) == (0, b""), f"split at {i}"


def test_walk_server_ready_without_status_byte_is_incomplete():
    z = ready(b"T")
    end, count, status = p.walk_server(frame(b"1") + z[:5], 0)
    assert (end, count, status) == (5, 0, 0)
    # once the status byte arrives, it counts
    assert p.walk_server(z, 0) == (6, 1, ord("T"))
    # other messages with a complete header but a missing body are passed over
    assert p.walk_server(data_row(b"abc")[:5], 0) == (len(data_row(b"abc")), 0, 0)


def test_walk_server_no_ready_reports_status_zero():
    assert p.walk_server(row_description() + data_row(b"1"), 0)[1:] == (0, 0)


server_message = st.one_of(
    st.sampled_from([b"I", b"T", b"E"]).map(lambda s: (s, ready(s))),
    st.tuples(st.sampled_from(list(b"123ACDEKNSTdnst")), st.binary(max_size=300)).map(
        lambda t: (None, frame(bytes([t[0]]), t[1]))
    ),
)


@FUZZ
@given(
    messages=st.lists(server_message, min_size=1, max_size=25),
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_walk_server_random_chunkings_match_whole(messages, points):
    stream = b"".join(m for _, m in messages)
    expected = server_totals([s for s, _ in messages])
    for got in (pump_server([stream]), pump_server(cut(stream, points))):
        assert (got.ready, got.status) == expected
        assert got.forwarded == stream
        assert (got.pos, got.carry) == (0, b"")


# ------------------------------------------------------------------------------------ split_messages


def test_split_messages_frames_and_keeps_the_rest():
    data = frame(b"R", struct.pack("!i", 0)) + frame(b"S", cs("a") + cs("b")) + ready(b"I")
    msgs, rest = p.split_messages(data + b"K\0\0")
    assert msgs == [
        (ord("R"), struct.pack("!i", 0)),
        (ord("S"), b"a\0b\0"),
        (ord("Z"), b"I"),
    ]
    assert rest == b"K\0\0"
    # a complete header but an incomplete body stays in the rest
    partial = frame(b"K", struct.pack("!ii", 1, 2))[:9]
    assert p.split_messages(partial) == ([], partial)


@FUZZ
@given(data=st.binary(max_size=400))
def test_split_messages_fuzz(data):
    with time_limit(2):
        try:
            msgs, rest = p.split_messages(data)
        except p.ProtocolError:
            return
    rebuilt = b"".join(frame(bytes([k]), body) for k, body in msgs) + rest
    assert rebuilt == data
    if len(rest) >= 5:
        assert struct.unpack_from("!I", rest, 1)[0] + 1 > len(rest)


@FEW
@given(
    bodies=st.lists(
        st.tuples(st.integers(min_value=0, max_value=255), st.binary(max_size=80)), max_size=10
    ),
    tail=st.integers(min_value=0, max_value=4),
)
def test_split_messages_roundtrip(bodies, tail):
    data = b"".join(frame(bytes([k]), b) for k, b in bodies)
    extra = frame(b"d", b"abcdef")[:tail]
    msgs, rest = p.split_messages(data + extra)
    assert msgs == [(k, b) for k, b in bodies]
    assert rest == extra


# ------------------------------------------------------------------------------------ startup


def startup_body(version: int, pairs: list[tuple[bytes, bytes]], terminator: bool = True) -> bytes:
    body = struct.pack("!i", version) + b"".join(k + b"\0" + v + b"\0" for k, v in pairs)
    return body + (b"\0" if terminator else b"")


def test_parse_startup_v3_with_params():
    body = startup_body(
        3 << 16,
        [(b"user", b"alice"), (b"database", b"app"), (b"options", b"-c a=b"), (b"x", b"")],
    )
    packet = p.parse_startup_packet(body)
    assert isinstance(packet, p.Startup)
    assert packet.minor == 0
    assert packet.params == {"user": "alice", "database": "app", "options": "-c a=b", "x": ""}
    assert list(packet.params) == ["user", "database", "options", "x"]


def test_parse_startup_no_params_and_minor_version():
    packet = p.parse_startup_packet(startup_body((3 << 16) | 2, []))
    assert packet == p.Startup(2, {})


def test_parse_startup_utf8_values():
    packet = p.parse_startup_packet(startup_body(3 << 16, [(b"user", "jos\u00e9".encode())]))
    assert packet.params == {"user": "jos\u00e9"}


def test_parse_startup_encryption_requests():
    # SSLRequest is 1234 << 16 | 5679, GSSENCRequest 1234 << 16 | 5680.
    assert p.parse_startup_packet(struct.pack("!i", (1234 << 16) | 5679)) == 80877103
    assert p.parse_startup_packet(struct.pack("!i", (1234 << 16) | 5680)) == 80877104
    with pytest.raises(p.ProtocolError):
        p.parse_startup_packet(struct.pack("!ii", (1234 << 16) | 5679, 0))


def test_parse_startup_cancel_request():
    body = struct.pack("!iii", (1234 << 16) | 5678, 4242, -123456789)
    assert p.parse_startup_packet(body) == p.CancelKey(4242, -123456789)
    with pytest.raises(p.ProtocolError):
        p.parse_startup_packet(body[:-1])
    with pytest.raises(p.ProtocolError):
        p.parse_startup_packet(body + b"\0")


def test_cancel_request_builder_matches_docs():
    built = p.cancel_request(p.CancelKey(7, -8))
    assert built == struct.pack("!iiii", 16, (1234 << 16) | 5678, 7, -8)
    assert p.parse_startup_packet(built[4:]) == p.CancelKey(7, -8)


def test_parse_startup_protocol_2_is_rejected_with_version():
    with pytest.raises(p.ProtocolError, match=r"2\.0"):
        p.parse_startup_packet(startup_body(2 << 16, [(b"user", b"u")]))
    with pytest.raises(p.ProtocolError, match=r"4\.1"):
        p.parse_startup_packet(startup_body((4 << 16) | 1, [(b"user", b"u")]))


@pytest.mark.parametrize(
    "rest",
    [
        b"",  # nothing after the version: no terminator
        b"user\0alice",  # last value not terminated
        b"user\0alice\0",  # parameter list without its final terminator byte
        b"user\0",  # a name without a value
        b"user\0\0",  # a name with a value but no final terminator
        b"user\0alice\0database\0\0",  # odd list: database has no value before the terminator
        b"\0alice\0\0",  # empty parameter name
        b"user\0\xff\xfe\0\0",  # not UTF-8
    ],
)
def test_parse_startup_malformed_parameter_lists(rest):
    with pytest.raises(p.ProtocolError):
        p.parse_startup_packet(struct.pack("!i", 3 << 16) + rest)


@pytest.mark.parametrize("body", [b"", b"\0", b"\0\3\0"])
def test_parse_startup_too_short(body):
    with pytest.raises(p.ProtocolError):
        p.parse_startup_packet(body)


@FUZZ
@given(data=st.binary(max_size=200))
def test_parse_startup_fuzz(data):
    with time_limit(2):
        try:
            result = p.parse_startup_packet(data)
        except p.ProtocolError:
            return
    assert isinstance(result, (p.Startup, p.CancelKey, int))


@FUZZ
@given(tail=st.binary(max_size=120))
def test_parse_startup_fuzz_v3_params(tail):
    try:
        result = p.parse_startup_packet(struct.pack("!i", 3 << 16) + tail)
    except p.ProtocolError:
        return
    assert isinstance(result, p.Startup)
    # A well-formed list of n distinct parameters holds exactly 2n + 1 NUL bytes; when that is
    # what was accepted, re-encoding it as the docs lay it out must give back the input.
    if tail.count(b"\0") == 2 * len(result.params) + 1:
        rebuilt = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0" for k, v in result.params.items()
        )
        assert rebuilt + b"\0" == tail


param_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20
)


@FEW
@given(params=st.dictionaries(param_text.filter(bool), param_text, max_size=8))
def test_startup_message_roundtrip(params):
    built = p.startup_message(params)
    body = startup_body(3 << 16, [(k.encode(), v.encode()) for k, v in params.items()])
    assert built == struct.pack("!I", len(body) + 4) + body
    assert p.parse_startup_packet(built[4:]) == p.Startup(0, params)


# ------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "options, expected",
    [
        ("", []),
        ("   ", []),
        ("-c a=b", [("a", "b")]),
        ("-ca=b", [("a", "b")]),
        ("--a-b=c", [("a_b", "c")]),
        ("-c statement-timeout=5s", [("statement_timeout", "5s")]),
        ("-c search_path=a,\\ b", [("search_path", "a, b")]),
        ("-c x=\\\\y", [("x", "\\y")]),
        ("-c a= ", [("a", "")]),
        ("-c a=b=c", [("a", "b=c")]),
        (
            "  -c work_mem=64MB\t--geqo=off   -cjit=on ",
            [("work_mem", "64MB"), ("geqo", "off"), ("jit", "on")],
        ),
    ],
)
def test_options_settings(options, expected):
    assert p.options_settings(options) == expected


@pytest.mark.parametrize(
    "options",
    ["x", "-c", "-c a", "-ca", "--a", "--=b", "-c =b", "-B 100", "-c a=b junk", "-d 5", "-"],
)
def test_options_settings_rejects_invalid_words(options):
    with pytest.raises(p.ProtocolError):
        p.options_settings(options)


def test_parse_options_escapes():
    assert p.parse_options("a\\ b  c") == ["a b", "c"]
    assert p.parse_options("\\\\") == ["\\"]
    assert p.parse_options(" one\ttwo\nthree ") == ["one", "two", "three"]


@FUZZ
@given(options=st.text(max_size=60))
def test_options_settings_fuzz(options):
    with time_limit(2):
        try:
            result = p.options_settings(options)
        except p.ProtocolError:
            return
    for name, value in result:
        assert name and "-" not in name
        assert isinstance(value, str)


# ------------------------------------------------------------------------------------ builders


def test_simple_builders_match_docs():
    assert p.query("SELECT 1") == b"Q" + struct.pack("!I", 13) + b"SELECT 1\0"
    assert p.SYNC_MESSAGE == b"S\0\0\0\4"
    assert p.TERMINATE_MESSAGE == b"X\0\0\0\4"
    assert p.ready_for_query(b"T") == b"Z\0\0\0\5T"
    assert p.ready_for_query() == b"Z\0\0\0\5I"
    assert p.parameter_status("a", "bc") == b"S" + struct.pack("!I", 9) + b"a\0bc\0"
    assert p.backend_key_data(p.CancelKey(1, -2)) == b"K" + struct.pack("!Iii", 12, 1, -2)
    assert p.auth_request(0) == b"R" + struct.pack("!Ii", 8, 0)
    assert p.auth_request(5, b"salt") == b"R" + struct.pack("!Ii", 12, 5) + b"salt"
    assert p.password_message(b"pw\0") == b"p" + struct.pack("!I", 7) + b"pw\0"
    assert p.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x") == (
        b"p" + struct.pack("!I", 4 + 14 + 4 + 9) + b"SCRAM-SHA-256\0" + struct.pack("!i", 9)
        + b"n,,n=,r=x"
    )
    assert p.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]) == (
        b"v" + struct.pack("!Iii", 4 + 8 + 14, 0, 2) + b"_pq_.a\0_pq_.b\0"
    )


def test_error_response_layout():
    msg = p.error_response("28P01", "password authentication failed")
    (length,) = struct.unpack_from("!I", msg, 1)
    assert msg[0:1] == b"E" and length == len(msg) - 1
    body = msg[5:]
    assert body.endswith(b"\0\0")
    assert b"SERROR\0" in body and b"VERROR\0" in body and b"C28P01\0" in body
    assert b"Mpassword authentication failed\0" in body


error_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
)


@FUZZ
@given(
    sqlstate=st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5),
    text=error_text,
    severity=st.sampled_from(["ERROR", "FATAL", "PANIC", "WARNING"]),
    detail=st.none() | error_text,
    hint=st.none() | error_text,
)
def test_error_response_roundtrip(sqlstate, text, severity, detail, hint):
    extra = {}
    if detail is not None:
        extra["D"] = detail
    if hint is not None:
        extra["H"] = hint
    msg = p.error_response(sqlstate, text, severity, **extra)
    msgs, rest = p.split_messages(msg)
    assert rest == b""
    assert len(msgs) == 1 and msgs[0][0] == ord("E")
    fields = p.parse_fields(msgs[0][1])
    assert fields == {"S": severity, "V": severity, "C": sqlstate, "M": text, **extra}


# ------------------------------------------------------------------------------------ parsers


def test_parse_fields_hand_built_notice():
    body = b"SWARNING\0VWARNING\0C01000\0Mcaf\xc3\xa9\0Dmore\0\0"
    assert p.parse_fields(body) == {
        "S": "WARNING",
        "V": "WARNING",
        "C": "01000",
        "M": "caf\u00e9",
        "D": "more",
    }


def test_parse_parameter_status():
    assert p.parse_parameter_status(b"server_version\x0016.2\0") == ("server_version", "16.2")
    assert p.parse_parameter_status(b"a\0\0") == ("a", "")


def test_parse_data_row():
    body = struct.pack("!h", 3) + struct.pack("!i", 2) + b"ab" + struct.pack("!i", -1)
    body += struct.pack("!i", 0)
    assert p.parse_data_row(body) == [b"ab", None, b""]
    assert p.parse_data_row(struct.pack("!h", 0)) == []


def test_parse_password_message():
    assert p.parse_password_message(b"secret\0") == b"secret"
    assert p.parse_password_message(b"\0") == b""
    with pytest.raises(p.ProtocolError):
        p.parse_password_message(b"secret")


def test_parse_sasl_initial():
    body = b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"n,,n="
    assert p.parse_sasl_initial(body) == ("SCRAM-SHA-256", b"n,,n=")
    assert p.parse_sasl_initial(b"M\0" + struct.pack("!i", 0)) == ("M", b"")
    for bad in (
        b"SCRAM-SHA-256",  # no terminator
        b"SCRAM-SHA-256\0\0\0",  # truncated length
        b"SCRAM-SHA-256\0" + struct.pack("!i", 6) + b"n,,n=",  # length too long
        b"SCRAM-SHA-256\0" + struct.pack("!i", 4) + b"n,,n=",  # length too short
        b"SCRAM-SHA-256\0" + struct.pack("!i", -1),  # -1 means no data, not allowed here
    ):
        with pytest.raises(p.ProtocolError):
            p.parse_sasl_initial(bad)


@pytest.mark.parametrize(
    "text, literal",
    [
        ("abc", "'abc'"),
        ("it's", "'it''s'"),
        ("a\\b", "E'a\\\\b'"),
        ("a\\'b", "E'a\\\\''b'"),
        ("", "''"),
    ],
)
def test_quote_literal(text, literal):
    assert p.quote_literal(text) == literal


def test_quote_ident():
    assert p.quote_ident("users") == '"users"'
    assert p.quote_ident('we"ird') == '"we""ird"'
