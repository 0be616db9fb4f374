"""Session state in transaction mode: what a client SET, and what pins it to its server connection.

Rather than replaying the semantics of SET, RESET, SET LOCAL, set_config and rolled-back
transactions, gpooler asks the server once the transaction that touched session state is over:
the settings whose source is `session` are exactly what the client's session now holds (gpooler's
own set_config calls for its startup parameters included). Those are remembered per client and
brought to whatever server connection it gets next.

The same question tells whether state that cannot move between connections is still there:
listened channels, session advisory locks, temporary relations, holdable cursors.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpooler import protocol as p

SETTINGS_QUERY = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"
)
PINNED_QUERY = (
    "SELECT (SELECT count(*) FROM pg_catalog.pg_listening_channels())"
    " + (SELECT count(*) FROM pg_catalog.pg_locks"
    " WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())"
    " + (SELECT count(*) FROM pg_catalog.pg_class"
    " WHERE relnamespace = pg_catalog.pg_my_temp_schema())"
    " + (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)"
)

PIN_FEATURES = {
    "listen": "LISTEN",
    "advisory_lock": "session advisory locks",
    "temp_table": "temporary tables",
    "cursor_with_hold": "WITH HOLD cursors",
    "load": "LOAD",
}


WAL_POSITION_QUERY = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text"


def inspection_query(settings: bool, pins: bool, wal: bool = False) -> str:
    asked = ((SETTINGS_QUERY, settings), (PINNED_QUERY, pins), (WAL_POSITION_QUERY, wal))
    return ";".join(q for q, wanted in asked if wanted)


@dataclass
class Inspection:
    settings: dict[str, str] | None  # None: not asked
    pinned_objects: int | None  # None: not asked
    wal_position: str | None = None  # the primary's, after a write (read-your-writes)


def read_inspection(output: bytes, settings: bool, pins: bool) -> Inspection:
    """Parse what inspection_query returned: two-column rows are settings, a one-column row the
    count of pinned objects or (with a slash: X/Y) the WAL position."""
    found: dict[str, str] = {}
    count = None
    wal = None
    messages, _ = p.split_messages(output)
    for kind, body in messages:
        if kind != ord("D"):
            continue
        row = p.parse_data_row(body)
        if len(row) == 2 and row[0] is not None and row[1] is not None:
            found[row[0].decode().lower()] = row[1].decode()
        elif len(row) == 1 and row[0] is not None:
            if b"/" in row[0]:
                wal = row[0].decode()
            else:
                count = int(row[0])
    return Inspection(found if settings else None, count if pins else None, wal)


def pinned_notice(features: set[str]) -> bytes:
    names = ", ".join(PIN_FEATURES[f] for f in sorted(features) if f in PIN_FEATURES)
    text = (
        f"gpooler: this session keeps its server connection while it uses {names}; "
        "transaction pooling resumes when that state is gone"
    )
    fields = [(b"S", "NOTICE"), (b"V", "NOTICE"), (b"C", "00000"), (b"M", text)]
    return p.message(b"N", b"".join(code + p.cstr(value) for code, value in fields) + b"\0")


def refused_feature(features: set[str]) -> str:
    names = ", ".join(PIN_FEATURES[f] for f in sorted(features) if f in PIN_FEATURES)
    return (
        f"{names} cannot be used on gpooler's transaction pooling port "
        "(session_features: error); use the session port"
    )


def refusing_statement(text: str, sqlstate: str = "0A000") -> str:
    """A statement that fails with `sqlstate` and `text`, so Postgres itself aborts the
    transaction it is in, exactly as the error would on a direct connection."""
    body = (f"BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', "
            f"MESSAGE = {p.quote_literal(text)}; END")
    return "DO " + p.quote_literal(body)
