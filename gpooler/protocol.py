"""The Postgres v3 wire codec: framing, builders and parsers.

Pure functions over bytes: no sockets, no gevent. The walkers are the hot path: they find message
boundaries in whatever chunk a socket returned without copying it, so the relay can forward the
chunk as it came and only learns what it must (how many Syncs went out, which ReadyForQuery came
back).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

MAX_STARTUP_PACKET = 10000
MAX_MESSAGE = 1 << 30

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")

# Frontend message types, as byte values.
QUERY = ord("Q")
SYNC = ord("S")
FLUSH = ord("H")
TERMINATE = ord("X")
FUNCTION_CALL = ord("F")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
PASSWORD = ord("p")
COPY_PART = -1  # not a message type: part of a CopyData body, see MessageReader

READY_FOR_QUERY = ord("Z")

_FRONTEND_TYPES = frozenset(b"BCDEFHPQSXcdfp")
_SYNC_POINTS = frozenset((QUERY, SYNC, FUNCTION_CALL))
_BATCH_MESSAGES = frozenset((PARSE, BIND, DESCRIBE, EXECUTE, CLOSE))


class ProtocolError(Exception):
    """A peer sent bytes that are not the Postgres protocol; answered with 08P01."""


# --------------------------------------------------------------------------- walking streams


def frontend_error(kind: int, length: int) -> ProtocolError:
    """What is wrong with a client message header the walkers refused (one test on the hot path)."""
    if kind not in _FRONTEND_TYPES:
        return ProtocolError(f"invalid frontend message type {kind}")
    return ProtocolError(f"invalid message length {length}")


class ClientWalk(NamedTuple):
    """What one chunk of client bytes holds, as far as pooling cares (a tuple: made per chunk)."""

    end: int  # where framing stopped: past the chunk inside a body, or before an incomplete header
    syncs: int  # Query, Sync and FunctionCall messages: each earns exactly one ReadyForQuery
    open_batch: bool | None  # extended-protocol work after the last sync point; None: no change
    terminate: int  # offset of a Terminate message, or -1
    only_sync_flush: bool  # every framed message was a Sync or a Flush


def walk_client(data: bytes | memoryview, pos: int) -> ClientWalk:
    """Frame client messages from pos; raise ProtocolError on a type or length no client sends.

    pos may exceed len(data) when the previous chunk ended inside a message body; the caller carries
    `end - len(data)` into the next chunk.
    """
    n = len(data)
    syncs = 0
    open_batch = None
    only_sync_flush = True
    unpack = _U32.unpack_from
    while pos + 5 <= n:
        kind = data[pos]
        length = unpack(data, pos + 1)[0]
        if kind not in _FRONTEND_TYPES or length < 4 or length >= MAX_MESSAGE:
            raise frontend_error(kind, length)
        if kind == TERMINATE:
            return ClientWalk(pos, syncs, open_batch, pos, only_sync_flush)
        if kind in _SYNC_POINTS:
            syncs += 1
            open_batch = False
        elif kind in _BATCH_MESSAGES:
            open_batch = True
        if kind != SYNC and kind != FLUSH:
            only_sync_flush = False
        pos += 1 + length
    return ClientWalk(pos, syncs, open_batch, -1, only_sync_flush)


class MessageReader:
    """Cuts a client's byte stream into whole messages; only CopyData may stream through in parts.

    Transaction pooling must read whole messages (it rewrites statement names and classifies
    query texts), but a COPY can carry any amount of data, so CopyData bodies are passed on as they
    come. Incomplete messages are kept as a list of chunks and joined once, so a large message
    arriving in many chunks costs one copy, not one per chunk.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0
        self._streaming = 0  # CopyData body bytes still to pass on

    @property
    def streaming(self) -> bool:
        """A CopyData message was passed on in part: the rest is still to come."""
        return self._streaming > 0

    def feed(self, data: bytes) -> list[tuple[int, bytes, int, int]]:
        """(kind, buffer, start, end) for each message, or part of a CopyData (kind COPY_PART)."""
        items: list[tuple[int, bytes, int, int]] = []
        if self._streaming:
            take = min(self._streaming, len(data))
            items.append((COPY_PART, data, 0, take))
            self._streaming -= take
            if take == len(data):
                return items
            data = data[take:]
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return items
            data = b"".join(self._parts)
            self._parts = []
        n = len(data)
        i = 0
        unpack = _U32.unpack_from
        need = 5
        while i + 5 <= n:
            kind = data[i]
            length = unpack(data, i + 1)[0]
            if kind not in _FRONTEND_TYPES or length < 4 or length >= MAX_MESSAGE:
                raise frontend_error(kind, length)
            end = i + 1 + length
            if end > n:
                if kind == COPY_DATA:
                    items.append((COPY_PART, data, i, n))
                    self._streaming = end - n
                    return items
                need = end - i
                break
            items.append((kind, data, i, end))
            if kind == TERMINATE:
                return items
            i = end
        if i < n:
            self._parts = [data[i:]]
            self._have = n - i
            self._need = need
        return items


def walk_server(data: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """Frame server messages from pos; return (end, ready_count, last_ready_status).

    end is where framing stopped: past len(data) inside a body, or before an incomplete header
    (a ReadyForQuery counts as incomplete until its status byte is there), which the caller keeps
    and prepends to the next chunk. last_ready_status is 0 when no ReadyForQuery was seen.
    """
    n = len(data)
    ready = 0
    status = 0
    unpack = _U32.unpack_from
    while pos + 5 <= n:
        kind = data[pos]
        if kind == READY_FOR_QUERY:
            if pos + 6 > n:
                break
            ready += 1
            status = data[pos + 5]
        pos += 1 + unpack(data, pos + 1)[0]
    return pos, ready, status


def split_messages(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split a buffer into complete (type, body) messages and the incomplete rest.

    For the slow paths (startup, authentication, internal queries), where every message is read.
    """
    out = []
    pos = 0
    n = len(data)
    while pos + 5 <= n:
        kind = data[pos]
        length = _U32.unpack_from(data, pos + 1)[0]
        if length < 4 or length >= MAX_MESSAGE:
            raise ProtocolError(f"invalid message length {length}")
        end = pos + 1 + length
        if end > n:
            break
        out.append((kind, data[pos + 5 : end]))
        pos = end
    return out, data[pos:]


# --------------------------------------------------------------------------- startup packets


@dataclass(frozen=True)
class Startup:
    """A StartupMessage: protocol version and its parameters, in order."""

    minor: int
    params: dict[str, str]


@dataclass(frozen=True)
class CancelKey:
    """A CancelRequest, or the BackendKeyData it echoes."""

    pid: int
    secret: int


def parse_startup_packet(body: bytes) -> Startup | CancelKey | int:
    """Decode a packet that arrives before any message type exists.

    Returns a Startup, a CancelKey, or the request code of SSLRequest/GSSENCRequest.
    """
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    code = _I32.unpack_from(body, 0)[0]
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if len(body) != 4:
            raise ProtocolError("malformed encryption request")
        return code
    if code == CANCEL_REQUEST:
        if len(body) != 12:
            raise ProtocolError("malformed cancel request")
        pid, secret = struct.unpack_from("!ii", body, 4)
        return CancelKey(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
        )
    return Startup(minor, _parse_key_values(body[4:]))


def _parse_key_values(data: bytes) -> dict[str, str]:
    if not data.endswith(b"\0"):
        raise ProtocolError("startup packet is not terminated")
    pairs = data[:-1]  # without the list terminator: empty, or name\0value\0 ...
    if pairs and not pairs.endswith(b"\0"):
        raise ProtocolError("startup packet is not terminated")
    parts = pairs[:-1].split(b"\0") if pairs else []
    if len(parts) % 2:
        raise ProtocolError("startup packet has a parameter without a value")
    try:
        decoded = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise ProtocolError("startup packet is not valid UTF-8") from exc
    params = {}
    for key, value in zip(decoded[::2], decoded[1::2]):
        if not key:
            raise ProtocolError("startup packet has an empty parameter name")
        params[key] = value
    return params


def startup_message(params: dict[str, str]) -> bytes:
    body = struct.pack("!i", PROTOCOL_V3) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()
    ) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def cancel_request(key: CancelKey) -> bytes:
    return struct.pack("!IIii", 16, CANCEL_REQUEST, key.pid, key.secret)


def parse_options(options: str) -> list[str]:
    """Split a libpq `options` string into words, honouring backslash escapes as Postgres does."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def options_settings(options: str) -> list[tuple[str, str]]:
    """Read `-c name=value` and `--name=value` settings from an options string.

    Raises ProtocolError for words Postgres would reject, so a client learns at once.
    """
    words = parse_options(options)
    settings = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif word.startswith("-c") and len(word) > 2:
            setting = word[2:]
            i += 1
        elif word.startswith("--"):
            setting = word[2:]
            i += 1
        else:
            raise ProtocolError(f"invalid command-line argument for server process: {word}")
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise ProtocolError(f"invalid command-line argument for server process: {word}")
        settings.append((name.replace("-", "_"), value))
    return settings


# --------------------------------------------------------------------------- builders


def message(kind: bytes, body: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\0"


def auth_request(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + payload)


AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(key: CancelKey) -> bytes:
    return message(b"K", struct.pack("!ii", key.pid, key.secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


SYNC_MESSAGE = message(b"S")
TERMINATE_MESSAGE = message(b"X")


def password_message(payload: bytes) -> bytes:
    return message(b"p", payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return password_message(cstr(mechanism) + _I32.pack(len(data)) + data)


def negotiate_protocol_version(minor: int, unsupported: list[str]) -> bytes:
    body = _I32.pack(minor) + _I32.pack(len(unsupported)) + b"".join(cstr(o) for o in unsupported)
    return message(b"v", body)


def error_response(
    sqlstate: str, text: str, severity: str = "ERROR", **extra: str
) -> bytes:
    """An ErrorResponse; `extra` takes single-letter field codes (D detail, H hint)."""
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", text)]
    fields.extend((code.encode(), value) for code, value in extra.items())
    return message(b"E", b"".join(code + cstr(value) for code, value in fields) + b"\0")


# --------------------------------------------------------------------------- parsers


def parse_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter codes."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, value, _ = body.split(b"\0", 2)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_data_row(body: bytes) -> list[bytes | None]:
    count = struct.unpack_from("!h", body, 0)[0]
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        length = _I32.unpack_from(body, pos)[0]
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(bytes(body[pos : pos + length]))
            pos += length
    return values


def parse_password_message(body: bytes) -> bytes:
    """A cleartext or md5 PasswordMessage: the string without its terminator."""
    if not body.endswith(b"\0"):
        raise ProtocolError("malformed password message")
    return body[:-1]


def parse_sasl_initial(body: bytes) -> tuple[str, bytes]:
    end = body.find(b"\0")
    if end < 0 or end + 5 > len(body):
        raise ProtocolError("malformed SASLInitialResponse")
    mechanism = body[:end].decode("ascii", "replace")
    length = _I32.unpack_from(body, end + 1)[0]
    data = body[end + 5 :]
    if length != len(data):
        raise ProtocolError("malformed SASLInitialResponse")
    return mechanism, data


def quote_literal(text: str) -> str:
    """A SQL string literal that is safe whatever standard_conforming_strings says."""
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
