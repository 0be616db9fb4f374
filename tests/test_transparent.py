"""Transaction pooling keeps each client's session transparent: end to end against the cluster.

What a client believes it has on its own session must hold whatever server connection serves each
of its transactions: protocol-level named prepared statements, SQL PREPARE/EXECUTE, session
settings (SET, RESET, set_config, startup parameters) with the ParameterStatus a direct connection
would show, and session-only features (LISTEN, session advisory locks, temporary tables, WITH HOLD
cursors, LOAD), which keep ("pin") the server connection until the state is gone.

Many tests here run the same steps on a direct connection and through gpooler and compare what the
client sees; through gpooler a "disturber" on the same small pool works in between, with the same
statement names and other settings, so that every step meets a server another client just used.
"""

from __future__ import annotations

import asyncio
import select
import struct
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import psycopg.errors
import psycopg2
import psycopg2.errors
import pytest

from cluster import base_config, deep_merge
from test_pooling import (
    FLUSH,
    PASSWORD,
    SYNC,
    RawClient,
    Super,
    _cstr,
    _msg,
    connect2,
    data_rows,
    fields,
    pg_env,
    q1,
    wait_until,
)

# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def su(pg):
    s = Super(pg)
    yield s
    s.close()


def config(pg, pool_size: int = 2, checkout_timeout: float = 5, **overrides) -> dict:
    cfg = base_config(pg, defaults={"pool_size": pool_size,
                                    "pool_checkout_timeout": checkout_timeout})
    return deep_merge(cfg, overrides)


def with_users(cfg: dict, **users) -> dict:
    return deep_merge(cfg, {"tenants": {"acme": {"users": users}}})


def connect3(h, user: str = "app.acme", dbname: str = "postgres", **kw):
    kw.setdefault("autocommit", True)
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(h.dsn(user, PASSWORD, dbname=dbname), **kw)


def raw_pooled(h, user: str = "app.acme", **params) -> RawClient:
    return RawClient(h.hosts["transaction"], h.port("transaction"), user, PASSWORD, **params)


def raw_direct(pg, **params) -> RawClient:
    return RawClient(pg.host, pg.port, "u_scram", "pw_u_scram", **params)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# raw extended-protocol messages (all parameters and results in text)

def parse(name: str, sql: str, oids=()) -> bytes:
    return _msg(b"P", _cstr(name) + _cstr(sql) + struct.pack("!h", len(oids))
                + b"".join(struct.pack("!I", o) for o in oids))


def bind(statement: str, params=(), portal: str = "") -> bytes:
    body = _cstr(portal) + _cstr(statement) + struct.pack("!hh", 0, len(params))
    for value in params:
        if value is None:
            body += struct.pack("!i", -1)
        else:
            data = str(value).encode()
            body += struct.pack("!i", len(data)) + data
    return _msg(b"B", body + struct.pack("!h", 0))


def describe(kind: bytes, name: str) -> bytes:
    return _msg(b"D", kind + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + struct.pack("!i", max_rows))


def close(kind: bytes, name: str) -> bytes:
    return _msg(b"C", kind + _cstr(name))


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def run(client: RawClient, *messages: bytes) -> list[tuple]:
    """Send messages, read until every Sync/Query is answered; the answer as comparable tuples.

    ParameterStatus, notices and notifications are left out (they are checked where they matter).
    """
    syncs = sum(1 for m in messages if m[:1] in (b"S", b"Q"))
    client.send(*messages)
    out = []
    while syncs:
        kind, body = client.read()
        if kind == b"Z":
            syncs -= 1
        out.append(summary(kind, body))
    return [m for m in out if m is not None]


def summary(kind: bytes, body: bytes):
    if kind in (b"S", b"N", b"A", b"K"):
        return None
    if kind == b"E":
        f = fields(body)
        return ("E", f.get("C"), f.get("M"))
    if kind == b"Z":
        return ("Z", body.decode())
    if kind == b"C":
        return ("C", body.rstrip(b"\0").decode())
    if kind == b"D":
        return ("D", tuple(data_rows([(kind, body)])[0]))
    if kind == b"T":
        count = struct.unpack_from("!h", body)[0]
        names, pos = [], 2
        for _ in range(count):
            end = body.index(b"\0", pos)
            names.append(body[pos:end].decode())
            pos = end + 1 + 18
        return ("T", tuple(names))
    if kind == b"t":
        count = struct.unpack_from("!h", body)[0]
        return ("t", struct.unpack_from(f"!{count}I", body, 2))
    return (kind.decode(),)


def errors_in(answer: list[tuple]) -> list[tuple]:
    return [m for m in answer if m[0] == "E"]


def do(conn, sql: str, args=None) -> None:
    with conn.cursor() as cur:
        cur.execute(sql, args)


def prepared_here(conn) -> list[str]:
    """The gpooler statements on the server connection conn is on (its own session's view)."""
    with conn.cursor() as cur:
        cur.execute("select name from pg_prepared_statements where name like 'gp\\_%' order by 1")
        return [r[0] for r in cur.fetchall()]


class Holders:
    """Psycopg2 clients holding server connections in open transactions, to steer the others."""

    def __init__(self, h, n: int, user: str = "app.acme"):
        self.conns = [connect2(h, user, autocommit=False) for _ in range(n)]
        self.pids = [q1(c, "select pg_backend_pid()") for c in self.conns]

    def keep_only(self, pid: int):
        """Hold the server connection with this pid, let the others go; return its holder."""
        assert pid in self.pids, (pid, self.pids)
        kept = None
        for conn, p in zip(self.conns, self.pids):
            if p == pid:
                kept = conn
            else:
                conn.commit()
        return kept

    def close(self):
        for c in self.conns:
            c.close()


# --------------------------------------------------------------------------------------------------
# 1. protocol-level named prepared statements


def test_named_statement_is_prepared_where_it_is_needed(pg, gpooler):
    """A statement parsed on one server connection is used on another: prepared there first, also
    before a standalone Describe; both servers hold it under the same gp_ name."""
    h = gpooler(config(pg, pool_size=2))
    a = raw_pooled(h)
    sql = "select pg_backend_pid(), $1::int * 2 as doubled"
    try:
        answer = run(a, parse("s1", sql), bind("s1", [21]), execute(), SYNC)
        assert [m[0] for m in answer] == ["1", "2", "D", "C", "Z"], answer
        first_pid = int(answer[2][1][0])

        # the next transaction of `a` must run on the other server connection
        holders = Holders(h, 2)
        kept = holders.keep_only(first_pid)
        try:
            assert run(a, describe(b"S", "s1"), SYNC) == [
                ("t", (23,)), ("T", ("pg_backend_pid", "doubled")), ("Z", "I")]
            answer = run(a, bind("s1", [5]), execute(), SYNC)
            assert [m[0] for m in answer] == ["2", "D", "C", "Z"], answer
            second_pid = int(answer[1][1][0])
            assert second_pid != first_pid and answer[1][1][1] == b"10"
            on_first = prepared_here(kept)
        finally:
            holders.close()
        # the same name on both servers, and nothing else there
        holders = Holders(h, 2)
        try:
            names = {pid: prepared_here(c) for pid, c in zip(holders.pids, holders.conns)}
        finally:
            holders.close()
        assert names[first_pid] == on_first and len(on_first) == 1, names
        assert names[second_pid] == on_first, names

        # Bind straight away on a server that lacks a statement (no Describe first)
        answer = run(a, parse("s2", "select $1::text || '!'"), SYNC)
        assert answer == [("1",), ("Z", "I")]
        holders = Holders(h, 2)
        try:
            has_s2 = [pid for pid, c in zip(holders.pids, holders.conns)
                      if len(prepared_here(c)) == 2]
            assert len(has_s2) == 1, has_s2
            holders.keep_only(has_s2[0])
            answer = run(a, bind("s2", ["hey"]), execute(), SYNC)
            assert answer == [("2",), ("D", (b"hey!",)), ("C", "SELECT 1"), ("Z", "I")]
        finally:
            holders.close()
    finally:
        a.close()


def test_identical_statements_share_one_server_statement(pg, gpooler):
    """Two clients, one server connection: the same (text, types) under different client names is
    one server statement, and the second Parse is answered without the server (which would say
    42P05 to a second Parse of the same server name). Other parameter types: another statement."""
    h = gpooler(config(pg, pool_size=1))
    a, b = raw_pooled(h), raw_pooled(h)
    look = connect2(h)
    sql = "select $1::int + 1000"
    try:
        assert run(a, parse("mine", sql), SYNC) == [("1",), ("Z", "I")]
        assert run(b, parse("theirs", sql), bind("theirs", [1]), execute(), SYNC) == [
            ("1",), ("2",), ("D", (b"1001",)), ("C", "SELECT 1"), ("Z", "I")]
        assert len(prepared_here(look)) == 1
        assert run(a, parse("typed", sql, oids=(20,)), SYNC) == [("1",), ("Z", "I")]
        assert len(prepared_here(look)) == 2
        assert run(a, bind("mine", [2]), execute(), bind("typed", [3]), execute(), SYNC) == [
            ("2",), ("D", (b"1002",)), ("C", "SELECT 1"),
            ("2",), ("D", (b"1003",)), ("C", "SELECT 1"), ("Z", "I")]
    finally:
        a.close()
        b.close()
        look.close()


def test_close_is_answered_locally(pg, gpooler):
    """Close of a named statement forgets the client's name only: another client sharing the
    server statement keeps using it, and the name can be parsed again with another text."""
    h = gpooler(config(pg, pool_size=1))
    a, b = raw_pooled(h), raw_pooled(h)
    look = connect2(h)
    sql = "select 'shared'::text"
    try:
        run(a, parse("x", sql), SYNC)
        run(b, parse("y", sql), SYNC)
        before = prepared_here(look)
        assert len(before) == 1
        assert run(a, close(b"S", "x"), SYNC) == [("3",), ("Z", "I")]
        assert prepared_here(look) == before
        # a closed name is gone for its client, as on a direct connection
        assert errors_in(run(a, bind("x"), execute(), SYNC)) == [
            ("E", "26000", 'prepared statement "x" does not exist')]
        assert run(b, bind("y"), execute(), SYNC) == [
            ("2",), ("D", (b"shared",)), ("C", "SELECT 1"), ("Z", "I")]
        assert run(a, parse("x", "select 'other'::text"), bind("x"), execute(), SYNC) == [
            ("1",), ("2",), ("D", (b"other",)), ("C", "SELECT 1"), ("Z", "I")]
        # Close then Flush only: the CloseComplete must arrive without a Sync
        a.send(close(b"S", "x"), FLUSH)
        assert a.read() == (b"3", b"")
        assert run(a, SYNC) == [("Z", "I")]
    finally:
        a.close()
        b.close()
        look.close()


def test_a_failed_parse_leaves_no_mapping(pg, gpooler):
    h = gpooler(config(pg, pool_size=1))
    a = raw_pooled(h)
    look = connect2(h)
    try:
        answer = run(a, parse("s", "select nosuchcolumn"), bind("s"), execute(), SYNC)
        assert answer == [("E", "42703", 'column "nosuchcolumn" does not exist'), ("Z", "I")]
        assert prepared_here(look) == []
        assert run(a, parse("s", "select 7"), bind("s"), execute(), SYNC) == [
            ("1",), ("2",), ("D", (b"7",)), ("C", "SELECT 1"), ("Z", "I")]
    finally:
        a.close()
        look.close()


# Sequences compared between a direct connection and gpooler. Through gpooler a disturber parses
# the same names with other texts on the one server connection before every step.
MIRRORED = {
    "bind_unknown": [
        [bind("nope"), execute(), SYNC],
        [query("select 'alive'")],
    ],
    "describe_unknown": [
        [describe(b"S", "nope"), SYNC],
        [query("select 'alive'")],
    ],
    "parse_twice": [
        [parse("x", "select 1"), SYNC],
        [parse("x", "select 2"), bind("x"), execute(), SYNC],
        [bind("x"), execute(), SYNC],
    ],
    "parse_twice_in_one_batch": [
        [parse("x", "select 1"), parse("x", "select 1"), bind("x"), execute(), SYNC],
        [bind("x"), execute(), SYNC],
    ],
    "parse_twice_in_a_transaction": [
        [query("begin")],
        [parse("x", "select 1"), SYNC],
        [parse("x", "select 1"), SYNC],
        [bind("x"), execute(), SYNC],
        [query("rollback")],
        [bind("x"), execute(), SYNC],
    ],
    "bind_error_then_rebind": [
        [parse("p", "select $1::int"), bind("p", [1, 2]), execute(), SYNC],
        [bind("p", ["x"]), execute(), SYNC],
        [bind("p", [3]), execute(), SYNC],
    ],
    "close_unknown_is_fine": [
        [close(b"S", "never"), close(b"P", "never"), SYNC],
    ],
    "close_and_reparse": [
        [parse("c", "select 1"), close(b"S", "c"), parse("c", "select 2"), bind("c"), execute(),
         SYNC],
    ],
    "portal_suspended": [
        [parse("g", "select generate_series(1, 5)"), bind("g", portal="cur"), execute("cur", 2),
         execute("cur", 2), SYNC],
    ],
    "failed_parse_then_same_text_elsewhere": [
        # the server already holds "select 11" (parsed by the disturber): a later Parse of it in a
        # batch that failed first is skipped by Postgres, and must not change gpooler's books
        [parse("bad", "select from where"), parse("late", "select 11"), SYNC],
        [parse("again", "select 11"), bind("again"), execute(), SYNC],
        [parse("late", "select 11"), bind("late"), execute(), SYNC],
    ],
    "sql_and_protocol_names_are_one_namespace": [
        [query("prepare common as select 'sql'")],
        [parse("common", "select 'protocol'"), SYNC],
        [bind("common"), execute(), SYNC],
        [query("deallocate common")],
        [parse("common", "select 'protocol'"), SYNC],
        [query("deallocate common")],
        [bind("common"), execute(), SYNC],
    ],
}


def disturb(d: RawClient):
    """Another client on the same server: the same statement names, other texts; and "select 11"
    under a name of its own."""
    texts = {name: f"select 'disturber {name}'"
             for name in ("x", "p", "c", "g", "s", "common", "bad", "late", "again")}
    texts["eleven"] = "select 11"
    for name, text in texts.items():
        answer = run(d, parse(name, text), SYNC)
        if errors_in(answer) == [("E", "42P05", f'prepared statement "{name}" already exists')]:
            answer = []  # parsed at an earlier step
        answer += run(d, bind(name), execute(), SYNC)
        assert not errors_in(answer), f"the other client on the server, {name!r}: {answer}"
    assert not errors_in(run(d, parse("", "select 11"), SYNC))


KNOWN_GAPS = {
    "sql_and_protocol_names_are_one_namespace":
        "SQL PREPARE names and protocol-level statement names are kept apart by gpooler; "
        "Postgres keeps them in one namespace",
}


@pytest.mark.parametrize("scenario", [
    pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_GAPS[name], strict=True))
    if name in KNOWN_GAPS else name
    for name in MIRRORED
])
def test_errors_and_answers_match_a_direct_connection(pg, gpooler, scenario):
    steps = MIRRORED[scenario]
    direct = raw_direct(pg)
    try:
        expected = [run(direct, *step) for step in steps]
    finally:
        direct.close()
    h = gpooler(config(pg, pool_size=1))
    client, disturber = raw_pooled(h), raw_pooled(h)
    try:
        got = []
        for step in steps:
            if not got or got[-1][-1] == ("Z", "I"):  # (the pool's one server is free)
                disturb(disturber)
            got.append(run(client, *step))
        for number, (mine, theirs) in enumerate(zip(got, expected)):
            assert mine == theirs, f"step {number}: through gpooler {mine}, directly {theirs}"
    finally:
        client.close()
        disturber.close()


def test_a_failed_batch_keeps_evicted_statements_in_the_books(pg, gpooler):
    """max_prepared_statements 2: a Parse that must evict comes after an error in its batch, so
    Postgres skips both the Close gpooler adds and the Parse. The evicted statement is still on the
    server: preparing it again later must not fail with 42P05."""
    h = gpooler(with_users(config(pg, pool_size=1), lim={
        "password": PASSWORD, "server_user": "u_scram", "server_password": "pw_u_scram",
        "max_prepared_statements": 2}))
    a = raw_pooled(h, "lim.acme")
    try:
        assert run(a, parse("s1", "select 1"), parse("s2", "select 2"), SYNC) == [
            ("1",), ("1",), ("Z", "I")]
        answer = run(a, parse("bad", "select from where"), parse("s3", "select 3"), SYNC)
        assert answer == [("E", "42601", 'syntax error at or near "where"'), ("Z", "I")]
        for name, text in (("t1", "select 1"), ("t2", "select 2"), ("t3", "select 3")):
            answer = run(a, parse(name, text), bind(name), execute(), SYNC)
            assert not errors_in(answer), (name, answer)
    finally:
        a.close()


def test_unnamed_statements_pass_through(pg, gpooler):
    h = gpooler(config(pg, pool_size=1))
    look = connect2(h)
    try:
        with connect3(h, prepare_threshold=None) as conn:
            for i in range(5):
                assert conn.execute("select %s::int * 3", (i,)).fetchone() == (i * 3,)
        a = raw_pooled(h)
        try:
            assert run(a, parse("", "select $1::int"), bind("", [4]), execute(),
                       bind("", [5]), execute(), SYNC) == [
                ("1",), ("2",), ("D", (b"4",)), ("C", "SELECT 1"),
                ("2",), ("D", (b"5",)), ("C", "SELECT 1"), ("Z", "I")]
        finally:
            a.close()
        assert prepared_here(look) == []
    finally:
        look.close()


@pytest.mark.parametrize("level", ["defaults", "tenant", "user"])
def test_max_prepared_statements_bounds_each_server(pg, gpooler, level):
    limit = 3
    cfg = config(pg, pool_size=2)
    if level == "defaults":
        cfg = deep_merge(cfg, {"defaults": {"max_prepared_statements": limit}})
    elif level == "tenant":
        cfg = deep_merge(cfg, {"tenants": {"acme": {"max_prepared_statements": limit}}})
    else:
        cfg = deep_merge(cfg, {"tenants": {"acme": {"users": {"app": {
            "max_prepared_statements": limit}}}}})
    h = gpooler(cfg)
    texts = [f"select %s::int + {k}" for k in range(8)]
    errors: list = []

    def client(i: int):
        try:
            with connect3(h, prepare_threshold=0) as conn:
                for round_ in range(3):
                    for k, text in enumerate(texts):
                        got = conn.execute(text, (i * 100 + round_,)).fetchone()
                        if got != (i * 100 + round_ + k,):
                            raise AssertionError(f"client {i}: {text} gave {got}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    holders = Holders(h, 2)
    try:
        counts = [len(prepared_here(c)) for c in holders.conns]
    finally:
        holders.close()
    assert all(1 <= n <= limit for n in counts), counts


# --------------------------------------------------------------------------------------------------
# 2. SQL PREPARE / EXECUTE / DEALLOCATE


def test_sql_prepare_follows_the_client(pg, gpooler):
    """A PREPARE made on one server connection works for EXECUTE on each of the others."""
    h = gpooler(config(pg, pool_size=2))
    conn = connect2(h)
    try:
        do(conn, "prepare gp_pq (int) as select pg_backend_pid(), $1 + 1")
        seen = []
        keep = None
        for _ in range(2):
            holders = Holders(h, 2)
            try:
                keep = holders.pids[0] if keep is None else keep
                holders.keep_only(keep)
                with conn.cursor() as cur:
                    cur.execute("execute gp_pq (41)")
                    pid, value = cur.fetchone()
            finally:
                holders.close()

            assert value == 42 and pid != keep
            seen.append(pid)
            keep = pid   # next time, keep that one busy: the other server must do it
        assert len(set(seen)) == 2, seen
    finally:
        conn.close()


def test_explain_execute_follows_the_client(pg, gpooler):
    """EXPLAIN EXECUTE names a SQL prepared statement too: the server running it needs it."""
    h = gpooler(config(pg, pool_size=2))
    conn = connect2(h)
    try:
        pid = q1(conn, "prepare gp_ex (int) as select $1 + 1; select pg_backend_pid()")
        holders = Holders(h, 2)
        try:
            holders.keep_only(pid)
            assert q1(conn, "explain execute gp_ex (1)").startswith("Result")
            assert q1(conn, "explain analyze execute gp_ex (1)").startswith("Result")
        finally:
            holders.close()
    finally:
        conn.close()


def test_same_sql_name_for_two_clients(pg, gpooler):
    """Pool of one: each client's PREPARE q is its own, in and out of transactions."""
    h = gpooler(config(pg, pool_size=1))
    a, b = connect2(h), connect2(h)
    c = connect2(h, autocommit=False)
    try:
        do(a, "prepare q as select 'a'")
        do(b, "prepare q as select 'b'")
        for _ in range(3):
            assert q1(a, "execute q") == "a"
            assert q1(b, "execute q") == "b"
        # in a transaction, with a server that holds someone else's q
        do(c, "prepare q as select 'c'")
        assert q1(c, "execute q") == "c"
        c.commit()
        assert q1(a, "execute q") == "a"
        assert q1(c, "execute q") == "c"
        c.commit()
        with pytest.raises(psycopg2.errors.DuplicatePreparedStatement):
            do(c, "prepare q as select 'again'")
        c.rollback()
        assert q1(c, "execute q") == "c"
        c.rollback()
        # a client without q gets 26000 even though the server holds others' q
        d = connect2(h)
        try:
            with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
                q1(d, "execute q")
        finally:
            d.close()
        assert (q1(a, "execute q"), q1(b, "execute q")) == ("a", "b")
    finally:
        for x in (a, b, c):
            x.close()


def test_same_sql_name_in_one_text_inside_a_transaction(pg, gpooler):
    """PREPARE and EXECUTE of one name in one Query, in a transaction, on a server that holds
    another client's statement of that name."""
    h = gpooler(config(pg, pool_size=1))
    a, c = connect2(h), connect2(h, autocommit=False)
    try:
        do(a, "prepare q as select 'a'")
        assert q1(c, "prepare q as select 'c'; execute q") == "c"
        c.commit()
        assert (q1(a, "execute q"), q1(c, "execute q")) == ("a", "c")
        c.commit()
    finally:
        a.close()
        c.close()


def test_sql_prepare_through_the_extended_protocol(pg, gpooler):
    """PREPARE / EXECUTE / DEALLOCATE sent as Parse/Bind/Execute (psycopg 3 with binary=True;
    without it, a text without parameters goes as a simple Query)."""
    h = gpooler(config(pg, pool_size=1))
    a, b = connect2(h), connect2(h)
    try:
        with connect3(h) as e:
            e.execute("prepare q as select 'e'", binary=True)
            do(a, "prepare q as select 'a'")
            assert e.execute("execute q", binary=True).fetchone() == ("e",)
            assert q1(a, "execute q") == "a"
            with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
                q1(b, "execute q")
            e.execute("deallocate q", binary=True)
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                e.execute("execute q", binary=True)
            assert q1(a, "execute q") == "a"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["deallocate q", "deallocate prepare q", "deallocate all",
                                 "discard all"])
def test_deallocate_updates_the_books(pg, gpooler, how):
    h = gpooler(config(pg, pool_size=2))
    a, other = connect2(h), connect2(h)
    try:
        do(a, "prepare q as select 1")
        do(other, "prepare q as select 2")   # someone else's q lives on too
        assert q1(a, "execute q") == 1
        with a.cursor() as cur:
            cur.execute(how)
        for _ in range(3):     # on whichever server
            with pytest.raises(psycopg2.errors.InvalidSqlStatementName) as info:
                q1(a, "execute q")
            assert info.value.pgerror.startswith('ERROR:  prepared statement "q" does not exist')
            assert q1(other, "execute q") == 2
        do(a, "prepare q as select 3")
        assert q1(a, "execute q") == 3
    finally:
        a.close()
        other.close()


def test_discard_all_from_the_extended_protocol_keeps_books_right(pg, gpooler):
    """psycopg 3 sends DISCARD ALL and DEALLOCATE ALL as Parse/Bind/Execute: the server's
    statements are gone, so another client's statements must be prepared again, not assumed."""
    h = gpooler(config(pg, pool_size=1))
    with connect3(h, prepare_threshold=0) as a, connect3(h) as b:
        assert a.execute("select %s::int + 1", (1,)).fetchone() == (2,)
        for how in ("discard all", "deallocate all"):
            b.execute(how, binary=True)  # (without binary, psycopg 3 sends a simple Query)
            assert a.execute("select %s::int + 1", (2,)).fetchone() == (3,)


# --------------------------------------------------------------------------------------------------
# 3. plans invalidated by DDL


@pytest.fixture
def table(pg):
    """A table in database `app` owned by u_scram, with one row; dropped afterwards."""
    name = unique("inv")
    s = Super(pg, "app")
    s.all(f"create table {name} (a int); insert into {name} values (1); "
          f"alter table {name} owner to u_scram")
    yield name
    s.all(f"drop table if exists {name}")
    s.close()


def test_invalidated_plan_is_prepared_again_outside_a_transaction(pg, gpooler, table):
    # the control: on a direct connection the second execution fails
    direct = psycopg.connect(pg.dsn("u_scram", "pw_u_scram", dbname="app"), autocommit=True,
                             prepare_threshold=0)
    s = Super(pg, "app")
    try:
        assert direct.execute(f"select * from {table}").fetchall() == [(1,)]
        s.all(f"alter table {table} add column b int default 7")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="cached plan must not"):
            direct.execute(f"select * from {table}")
    finally:
        direct.close()
    h = gpooler(config(pg, pool_size=1))
    try:
        with connect3(h, dbname="app", prepare_threshold=0) as conn:
            assert conn.execute(f"select * from {table}").fetchall() == [(1, 7)]
            s.all(f"alter table {table} add column c text default 'x'")
            assert conn.execute(f"select * from {table}").fetchall() == [(1, 7, "x")]
            assert conn.execute(f"select * from {table}").fetchall() == [(1, 7, "x")]
            # the raw protocol: Bind/Execute of the statement parsed before the change
            raw = raw_pooled(h, database="app")
            try:
                assert run(raw, parse("r", f"select * from {table}"), bind("r"), execute(),
                           SYNC)[2] == ("D", (b"1", b"7", b"x"))
                s.all(f"alter table {table} add column d int default 9")
                answer = run(raw, bind("r"), describe(b"P", ""), execute(), SYNC)
                assert not errors_in(answer), answer
                assert ("D", (b"1", b"7", b"x", b"9")) in answer
            finally:
                raw.close()
    finally:
        s.close()


def test_invalidated_sql_prepared_statement_outside_a_transaction(pg, gpooler, table):
    h = gpooler(config(pg, pool_size=1))
    s = Super(pg, "app")
    conn = connect2(h, dbname="app")
    try:
        do(conn, f"prepare inv as select * from {table}")
        assert q1(conn, "execute inv") == 1
        s.all(f"alter table {table} add column b int default 7")
        with conn.cursor() as cur:
            cur.execute("execute inv")
            assert cur.fetchall() == [(1, 7)]
        conn.autocommit = False
        s.all(f"alter table {table} add column c int default 8")
        with pytest.raises(psycopg2.errors.FeatureNotSupported,
                           match="cached plan must not change result type"):
            q1(conn, "execute inv")
        conn.rollback()
    finally:
        conn.close()
        s.close()


def test_invalidated_plan_inside_a_transaction_fails_as_on_a_direct_connection(pg, gpooler, table):
    h = gpooler(config(pg, pool_size=1))
    s = Super(pg, "app")
    try:
        with connect3(h, dbname="app", prepare_threshold=0) as conn:
            assert conn.execute(f"select * from {table}").fetchall() == [(1,)]
            s.all(f"alter table {table} add column b int default 7")
            with pytest.raises(psycopg.errors.FeatureNotSupported,
                               match="cached plan must not change result type"):
                with conn.transaction():
                    conn.execute(f"select * from {table}")
            assert conn.execute("select 'alive'").fetchone() == ("alive",)
    finally:
        s.close()


# --------------------------------------------------------------------------------------------------
# 4. session state


def test_client_set_of_reported_setting_does_not_leak(pg, gpooler):
    """Transaction mode, one server connection. Client A changes DateStyle and application_name
    with a plain SET (what psycopg2 itself does for DateStyle when the one given at connect does not
    start with ISO). Both are GUC_REPORT settings: Postgres announces the change with a
    ParameterStatus, so a pooler can see it (PgBouncer tracks exactly these). Clients that asked for
    something else at startup, or for nothing, must not inherit A's values."""
    h = gpooler(config(pg, pool_size=1))
    direct = psycopg2.connect(pg.dsn("u_scram", "pw_u_scram"))
    direct.autocommit = True
    default_datestyle = q1(direct, "show DateStyle")
    direct.close()

    b = connect2(h, application_name="client_b", options="-c DateStyle=ISO,DMY")
    c = connect2(h)
    a = connect2(h)
    try:
        with a.cursor() as cur:
            cur.execute("set DateStyle = 'German, DMY'")
            cur.execute("set application_name = 'client_a'")
        assert a.get_parameter_status("DateStyle") == "German, DMY"
        # C asked for the same as A at startup (nothing), B for something else
        assert (q1(c, "show DateStyle"), q1(c, "show application_name")) == (default_datestyle, "")
        assert (q1(b, "show DateStyle"), q1(b, "show application_name")) == ("ISO, DMY", "client_b")
        assert (q1(a, "show DateStyle"), q1(a, "show application_name")) == ("German, DMY",
                                                                              "client_a")
    finally:
        for x in (a, b, c):
            x.close()
    # the psycopg2 case: it sends SET DATESTYLE TO 'ISO' for a connection asking for SQL style
    p2 = connect2(h, options="-c DateStyle=SQL,DMY")
    p2.close()
    with psycopg.connect(h.dsn("app.acme", PASSWORD, options="-c DateStyle=SQL,DMY"),
                         prepare_threshold=None, autocommit=True, connect_timeout=10) as p3:
        assert p3.execute("show DateStyle").fetchone() == ("SQL, DMY",)


WATCHED = ["work_mem", "search_path", "statement_timeout", "lock_timeout",
           "idle_in_transaction_session_timeout", "application_name", "DateStyle", "TimeZone",
           "extra_float_digits"]
REPORTED = ["application_name", "DateStyle", "TimeZone"]
SESSION_STEPS = [
    "set work_mem = '7MB'",
    "set search_path = gp_a, public",
    "begin; set statement_timeout = '3s'; rollback",
    "begin; set local lock_timeout = '4s'; commit",
    "select set_config('idle_in_transaction_session_timeout', '5s', false)",
    "begin; select set_config('lock_timeout', '6s', false); rollback",
    "select set_config('extra_float_digits', (1 + 1)::text, false)",
    "begin; savepoint s; set TimeZone = 'Asia/Tokyo'; rollback to s; commit",
    "set application_name = 'gp_changed'",
    "set DateStyle = 'German, DMY'",
    "reset work_mem",
    "begin; set application_name = 'gp_rolled_back'; rollback",
    "reset application_name",
    "set TimeZone = 'America/Lima'",
    "reset all",
    "set statement_timeout = '9s'; select 1",
]
SUBJECT = {"application_name": "gp_subject",
           "options": "-c work_mem=5MB -c DateStyle=ISO,DMY"}


def session_view(conn) -> dict:
    view = {name: q1(conn, f"show {name}") for name in WATCHED}
    view.update({f"status:{name}": conn.get_parameter_status(name) for name in REPORTED})
    return view


def test_session_state_matches_a_direct_connection(pg, gpooler):
    """SET, RESET, RESET ALL, set_config(..., false) and startup parameters as a direct connection
    has them after each step; SET LOCAL and settings rolled back are not remembered. Through
    gpooler another client with settings of its own uses the one server connection in between."""
    direct = psycopg2.connect(pg.dsn("u_scram", "pw_u_scram", **SUBJECT))
    direct.autocommit = True
    try:
        expected = []
        for step in SESSION_STEPS:
            do(direct, step)
            expected.append(session_view(direct))
        plain = psycopg2.connect(pg.dsn("u_scram", "pw_u_scram", application_name="gp_other"))
        plain.autocommit = True
        do(plain, "set work_mem = '99MB'; set search_path = gp_other")
        other_view = session_view(plain)
        plain.close()
    finally:
        direct.close()

    h = gpooler(config(pg, pool_size=1))
    subject = connect2(h, **SUBJECT)
    other = connect2(h, application_name="gp_other")
    try:
        do(other, "set work_mem = '99MB'; set search_path = gp_other")
        problems = []  # all of them, not only the first
        for step, want in zip(SESSION_STEPS, expected):
            do(subject, step)
            seen = session_view(other)
            problems += [f"after {step!r}: the other client sees {k} = {v!r}, not {other_view[k]!r}"
                         for k, v in seen.items() if v != other_view[k]]
            seen = session_view(subject)
            problems += [f"after {step!r}: {k} = {v!r}, directly {want[k]!r}"
                         for k, v in seen.items() if v != want[k]]
        assert not problems, "\n".join(problems)
    finally:
        subject.close()
        other.close()


def test_parameter_status_after_set(pg, gpooler):
    h = gpooler(config(pg, pool_size=1))
    a = connect2(h, application_name="gp_first")
    b = connect2(h)
    try:
        assert a.get_parameter_status("application_name") == "gp_first"
        do(a, "set application_name = 'gp_second'")
        assert a.get_parameter_status("application_name") == "gp_second"
        do(b, "set application_name = 'gp_b'")
        assert b.get_parameter_status("application_name") == "gp_b"
        assert q1(a, "show application_name") == "gp_second"
        assert a.get_parameter_status("application_name") == "gp_second"
        q1(a, "select set_config('application_name', 'gp_third', false)")
        assert a.get_parameter_status("application_name") == "gp_third"
        assert q1(b, "show application_name") == "gp_b"
        assert q1(a, "show application_name") == "gp_third"
    finally:
        a.close()
        b.close()


def test_set_config_with_a_bound_value(pg, gpooler):
    """psycopg 3 binds parameters server-side: set_config('work_mem', $1, false) gives gpooler no
    literal to read, but the setting is the client's alone all the same."""
    h = gpooler(config(pg, pool_size=1))
    with connect3(h) as a, connect3(h) as b:
        default = b.execute("show work_mem").fetchone()[0]
        assert default != "13MB"
        a.execute("select set_config('work_mem', %s, false)", ("13MB",))
        assert b.execute("show work_mem").fetchone() == (default,)
        assert a.execute("show work_mem").fetchone() == ("13MB",)
        assert b.execute("show work_mem").fetchone() == (default,)


# --------------------------------------------------------------------------------------------------
# 5. pinning


def gpooler_notices(conn) -> list[str]:
    return [n for n in conn.notices if "gpooler" in n]


PIN_CASES = {
    # name: (statements that pin, statement using the state -> value, statements that unpin)
    "listen": (["listen gp_chan"], "select count(*) from pg_listening_channels()",
               ["unlisten *"]),
    "advisory_lock": (["select pg_advisory_lock(424242)"],
                      "select count(*) from pg_locks where locktype = 'advisory' "
                      "and objid = 424242 and pid = pg_backend_pid()",
                      ["select pg_advisory_unlock(424242)"]),
    "temp_table_dropped": (["create temp table gp_tmp (x int)"],
                           "insert into gp_tmp values (1); select count(*) from gp_tmp",
                           ["drop table gp_tmp"]),
    "temp_table_discarded": (["create temp table gp_tmp (x int)"],
                             "insert into gp_tmp values (1); select count(*) from gp_tmp",
                             ["discard temp"]),
    "temp_table_by_select_into": (["select 0 as x into temp gp_tmp"],
                                  "insert into gp_tmp values (1); select count(*) - 1 from gp_tmp",
                                  ["drop table gp_tmp"]),
    "cursor_with_hold": (["begin", "declare gp_cur cursor with hold for "
                          "select generate_series(1, 100)", "commit"],
                         "fetch 1 from gp_cur", ["close gp_cur"]),
}


def checkout_fails(h, user: str = "app.acme") -> bool:
    """True when a new client finds no server connection free within the checkout timeout."""
    raw = raw_pooled(h, user)
    try:
        raw.send(query("select 1"))
        kind, body = raw.read()
        while kind in (b"S", b"N"):
            kind, body = raw.read()
        if kind == b"E":
            assert fields(body)["C"] == "53300", fields(body)
            return True
        return False
    finally:
        raw.close()


@pytest.mark.parametrize("case", list(PIN_CASES))
def test_session_features_pin_the_server_connection(pg, gpooler, su, case):
    pin, use, unpin = PIN_CASES[case]
    h = gpooler(config(pg, pool_size=2, checkout_timeout=1))
    p, other = connect2(h), connect2(h)
    try:
        with p.cursor() as cur:
            for statement in pin:
                cur.execute(statement)
        pid = q1(p, "select pg_backend_pid()")
        values = []
        for _ in range(4):
            assert q1(other, "select pg_backend_pid()") != pid
            values.append(q1(p, use))
            assert q1(p, "select pg_backend_pid()") == pid
        grows = case == "cursor_with_hold" or case.startswith("temp_table")
        assert values == ([1, 2, 3, 4] if grows else [1, 1, 1, 1])
        notices = gpooler_notices(p)
        assert len(notices) == 1, p.notices
        assert notices[0].startswith("NOTICE:")
        # the pinned connection is not the pool's: with the other one held, nothing is free
        with other.cursor() as cur:
            cur.execute("begin")
            cur.execute("select 1")
            assert checkout_fails(h)
            cur.execute("commit")

        with p.cursor() as cur:
            for statement in unpin:
                cur.execute(statement)
        # the server connection is the pool's again: with the other one held, a client gets it
        with other.cursor() as cur:
            cur.execute("begin")
            cur.execute("select 1")
            assert not checkout_fails(h), f"still pinned after {unpin}"
            cur.execute("commit")
        assert q1(p, "select 'still fine'") == "still fine"
        assert len(gpooler_notices(p)) == 1, p.notices
    finally:
        p.close()
        other.close()
    assert su.one("select count(*) from pg_locks where locktype = 'advisory' "
                  "and objid = 424242") == 0


def test_a_pinned_client_leaves_nothing_behind(pg, gpooler, su):
    """A client leaving with its session-only state: the next client on that server connection
    finds no lock, listen, temporary table, cursor, setting or prepared statement of it."""
    h = gpooler(config(pg, pool_size=1))
    p = connect2(h)
    try:
        with p.cursor() as cur:
            for statement in ["listen gp_chan", "select pg_advisory_lock(434343)",
                              "create temp table gp_left (x int)", "set work_mem = '23MB'",
                              "prepare gp_left_q as select 1",
                              "begin", "declare gp_left_c cursor with hold for select 1",
                              "commit"]:
                cur.execute(statement)
        pid = q1(p, "select pg_backend_pid()")
    finally:
        p.close()
    nxt = connect2(h)
    try:
        assert q1(nxt, "select pg_backend_pid()") == pid
        assert q1(nxt, "select count(*) from pg_listening_channels()") == 0
        assert q1(nxt, "select count(*) from pg_locks where locktype = 'advisory' "
                       "and pid = pg_backend_pid()") == 0
        assert q1(nxt, "select count(*) from pg_class "
                       "where relnamespace = pg_my_temp_schema()") == 0
        assert q1(nxt, "select count(*) from pg_cursors") == 0
        assert q1(nxt, "select count(*) from pg_prepared_statements") == 0
        assert q1(nxt, "show work_mem") != "23MB"
    finally:
        nxt.close()
    assert su.one("select count(*) from pg_locks where locktype = 'advisory' "
                  "and objid = 434343") == 0


def test_load_pins_until_disconnect(pg, gpooler, su):
    cfg = with_users(config(pg, pool_size=2, checkout_timeout=1),
                     root={"password": PASSWORD, "server_user": "postgres"})
    h = gpooler(cfg)
    p, other = connect2(h, "root.acme"), connect2(h, "root.acme")
    try:
        do(p, "load 'auto_explain'")
        pid = q1(p, "select pg_backend_pid()")
        for _ in range(3):
            assert q1(other, "select pg_backend_pid()") != pid
            assert q1(p, "select pg_backend_pid()") == pid
        assert len(gpooler_notices(p)) == 1, p.notices
        assert "LOAD" in gpooler_notices(p)[0]
        do(p, "discard all")
        assert q1(p, "select pg_backend_pid()") == pid
    finally:
        p.close()
    wait_until(lambda: su.one("select count(*) from pg_stat_activity where pid = %s", (pid,)) == 0,
               what="the server connection that loaded a library to be closed")
    other.close()


def test_listen_notify_round_trip(pg, gpooler):
    h = gpooler(config(pg, pool_size=2))
    listener, notifier = connect2(h), connect2(h)
    try:
        do(listener, "listen gp_news")
        for i in range(3):
            do(notifier, f"notify gp_news, 'hello {i}'")
            deadline = time.monotonic() + 10
            while not listener.notifies:
                left = deadline - time.monotonic()
                assert left > 0, "no notification within 10 s"
                select.select([listener], [], [], left)
                listener.poll()
            n = listener.notifies.pop(0)
            assert (n.channel, n.payload) == ("gp_news", f"hello {i}")
        assert len(gpooler_notices(listener)) == 1
    finally:
        listener.close()
        notifier.close()


REFUSED = ["listen gp_chan", "select pg_advisory_lock(777)", "create temp table gp_t (x int)",
           "declare c cursor with hold for select 1", "load 'auto_explain'"]


@pytest.fixture
def refusing(pg, gpooler):
    return gpooler(config(pg, pool_size=1, tenants={"acme": {"session_features": "error"}}))


def test_session_features_error_simple_protocol(refusing, su):
    h = refusing
    conn = connect2(h)
    tx = connect2(h, autocommit=False)
    try:
        for statement in REFUSED:
            with pytest.raises(psycopg2.errors.FeatureNotSupported) as info:
                do(conn, statement)
            assert "session_features" in str(info.value), str(info.value)
            assert q1(conn, "select 'alive'") == "alive"
        # an ordinary ERROR: the transaction it happens in is aborted
        assert q1(tx, "select 1") == 1
        with pytest.raises(psycopg2.errors.FeatureNotSupported):
            q1(tx, "select pg_advisory_lock(777)")
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            q1(tx, "select 1")
        tx.rollback()
        assert q1(conn, "select count(*) from pg_listening_channels()") == 0
    finally:
        conn.close()
        tx.close()
    assert su.one("select count(*) from pg_locks where locktype = 'advisory' and objid = 777") == 0


def test_session_features_error_extended_protocol(refusing, su):
    h = refusing
    with connect3(h) as conn:
        for statement in REFUSED:
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                conn.execute(statement, binary=True)  # Parse/Bind/Execute, not a simple Query
            assert conn.execute("select 'alive'").fetchone() == ("alive",)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("select pg_advisory_lock(%s)", (777,), prepare=True)
        assert conn.execute("select %s::text", ("alive",), prepare=True).fetchone() == ("alive",)
    assert su.one("select count(*) from pg_locks where locktype = 'advisory' and objid = 777") == 0


def test_session_features_error_aborts_the_transaction_extended_protocol(refusing, su):
    """The refusal is an ordinary ERROR: inside a transaction, what follows fails with 25P02 until
    the rollback, as after any error (the server's transaction must know it failed)."""
    h = refusing
    with connect3(h, autocommit=False) as tx:
        assert tx.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            tx.execute("select pg_advisory_lock(%s)", (777,))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            tx.execute("select 1")
        tx.rollback()
    assert su.one("select count(*) from pg_locks where locktype = 'advisory' and objid = 777") == 0


# --------------------------------------------------------------------------------------------------
# 6. real drivers, more clients than server connections

CLIENTS = 40
POOL = 4


@pytest.fixture
def crowded(pg, gpooler):
    return gpooler(config(pg, pool_size=POOL, checkout_timeout=30))


def run_threads(target, n: int = CLIENTS, timeout: float = 60):
    errors: list = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append((i, exc))

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"clients still running after {timeout}s"
    assert not errors, errors[:5]


def test_asyncpg_named_statements(crowded, su):
    h = crowded

    async def client(i: int):
        conn = await asyncpg.connect(host=h.hosts["transaction"], port=h.port(), user="app.acme",
                                     password=PASSWORD, database="postgres", timeout=30)
        try:
            stmt = await conn.prepare("select $1::int * 2 + $2::int")
            for k in range(10):
                assert await conn.fetchval("select $1::int + $2::int", i, k) == i + k
                assert await conn.fetchval("select $1::text || '-' || $2::text", str(i), str(k)) \
                    == f"{i}-{k}"
                assert await stmt.fetchval(k, i) == k * 2 + i
                rows = await conn.fetch("select g, $1::int from generate_series(1, 3) g", i)
                assert [tuple(r) for r in rows] == [(1, i), (2, i), (3, i)]
                async with conn.transaction():
                    a = await conn.fetchval("select pg_backend_pid()")
                    assert await conn.fetchval("select pg_backend_pid()") == a
                    assert await stmt.fetchval(i, k) == i * 2 + k
        finally:
            await conn.close()

    async def main():
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(CLIENTS))), 60)

    asyncio.run(main())
    assert su.one("select count(*) from pg_stat_activity where usename = 'u_scram' "
                  "and backend_type = 'client backend'") <= POOL


def test_psycopg3_prepared_and_pipelined(crowded):
    h = crowded

    def client(i: int):
        with connect3(h, prepare_threshold=0) as conn:
            for k in range(10):
                assert conn.execute("select %s::int + %s::int", (i, k)).fetchone() == (i + k,)
                assert conn.execute("select %s::text", (f"c{i}",)).fetchone() == (f"c{i}",)
            with conn.pipeline():
                curs = [conn.execute("select %s::int * %s::int", (i, k)) for k in range(20)]
                other = conn.execute("select %s::text || %s::text", ("p", str(i)))
            assert [c.fetchone() for c in curs] == [(i * k,) for k in range(20)]
            assert other.fetchone() == (f"p{i}",)
            with conn.transaction():
                pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                assert conn.execute("select pg_backend_pid()").fetchone() == (pid,)

    run_threads(client)


def test_psycopg2_sql_prepare_execute(crowded):
    h = crowded

    def client(i: int):
        conn = connect2(h)
        try:
            with conn.cursor() as cur:
                cur.execute(f"prepare q (int) as select $1 + {i * 1000}")
                cur.execute("prepare r as select 'mine'")
                for k in range(15):
                    cur.execute(f"execute q ({k})")
                    assert cur.fetchone() == (i * 1000 + k,)
                    cur.execute("execute r")
                    assert cur.fetchone() == ("mine",)
                cur.execute("deallocate r")
                with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
                    cur.execute("execute r")
                cur.execute("execute q (1)")
                assert cur.fetchone() == (i * 1000 + 1,)
        finally:
            conn.close()

    run_threads(client)


def test_pgbench_prepared(pg, gpooler, pgbench_db):
    h = gpooler(config(pg, pool_size=3, checkout_timeout=30))
    # One thread per client: pgbench prepares with the synchronous PQprepare, so a client waiting
    # for a server connection would stall every other client of its thread, including the one in
    # a transaction on the server it waits for.
    cmd = ["pgbench", "-n", "-c", "12", "-j", "12", "-t", "40", "-M", "prepared",
           "-h", h.hosts["transaction"], "-p", str(h.port()), "-U", "app.acme", pgbench_db]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=pg_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "number of transactions actually processed: 480/480" in res.stdout, res.stdout
    assert "number of failed transactions: 0 " in res.stdout, res.stdout


def test_settings_observed_in_later_transactions(pg, gpooler):
    schemas = [unique("gpsp") for _ in range(8)]
    s = Super(pg, "app")
    try:
        for schema in schemas:
            s.all(f"create schema {schema} authorization u_scram")
        h = gpooler(config(pg, pool_size=2, checkout_timeout=30))

        def client(i: int):
            conn = connect2(h, dbname="app")
            try:
                do(conn, f"set search_path = {schemas[i]}")
                do(conn, "set statement_timeout = '300ms'")
                for k in range(5):
                    do(conn, f"create table t{k} (x int)")
                    assert q1(conn, f"select to_regclass('{schemas[i]}.t{k}') is not null")
                    assert q1(conn, "select current_schema()") == schemas[i]
                conn.autocommit = False
                assert q1(conn, "select count(*) from t0") == 0
                conn.commit()
                started = time.monotonic()
                with pytest.raises(psycopg2.errors.QueryCanceled):
                    q1(conn, "select pg_sleep(5)")
                assert time.monotonic() - started < 3
                conn.rollback()
            finally:
                conn.close()

        run_threads(client, n=len(schemas))
    finally:
        for schema in schemas:
            s.all(f"drop schema if exists {schema} cascade")
        s.close()
