"""Pooling end to end: real drivers and tools through gpooler against the real cluster.

Modes, drivers (psycopg2, psycopg 3 incl. pipeline mode, asyncpg, pg8000, psql, pgbench), every
authentication method in both directions, 200 clients over a pool of 5, transaction release and
pinning, session reset, startup parameters, cancel, clients vanishing mid-transaction, 50 MB
through pipelines and COPY, and Sync/Flush answered without a server connection.

Server connections are counted in pg_stat_activity by the Postgres role a pool logs in as; tests
that count use a role of their own (`fresh_role`) so nothing left over from another test (or another
test's daemon, killed at its teardown) can be counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid

import asyncpg
import pg8000.native
import psycopg
import psycopg2
import psycopg2.errors
import pytest
from scramp import ScramClient

from cluster import _clean_env, base_config, connect_error, deep_merge
from waiting import wait_until

MODES = ["transaction", "session"]
PASSWORD = "secret"


# --------------------------------------------------------------------------------------------------
# helpers


def run_in_thread(fn, timeout: float, what: str):
    """Run fn() in a daemon thread; fail the test if it does not finish within timeout.
    Returns fn's result, re-raises its exception."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not finish within {timeout}s (deadlock?)")
    if "error" in box:
        raise box["error"]
    return box["result"]


class Super:
    """An autocommit superuser connection straight to the cluster (not through gpooler)."""

    def __init__(self, pg, dbname: str = "postgres"):
        self.conn = psycopg2.connect(pg.dsn(dbname=dbname))
        self.conn.autocommit = True

    def all(self, sql: str, args=None) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []

    def one(self, sql: str, args=None):
        rows = self.all(sql, args)
        return rows[0][0] if rows else None

    def backends(self, role: str) -> int:
        return self.one("select count(*) from pg_stat_activity "
                        "where usename = %s and backend_type = 'client backend'", (role,))

    def in_transaction(self, role: str) -> int:
        return self.one("select count(*) from pg_stat_activity "
                        "where usename = %s and state like 'idle in transaction%%'", (role,))

    def active(self, role: str, query: str) -> int:
        return self.one("select count(*) from pg_stat_activity "
                        "where usename = %s and state = 'active' and query = %s", (role, query))

    def close(self):
        self.conn.close()


@pytest.fixture
def su(pg):
    s = Super(pg)
    yield s
    s.close()


@pytest.fixture
def fresh_role(pg, su):
    """Factory: a new login role (SCRAM password) allowed to create tables in database `app`.
    Returns (role, password)."""
    made = []

    def make(prefix: str = "r") -> tuple[str, str]:
        role = f"{prefix}_{uuid.uuid4().hex[:8]}"
        password = "pw_" + role
        su.all(f"create role {role} login password %s", (password,))
        app = Super(pg, "app")
        try:
            app.all(f"grant usage, create on schema public to {role}")
        finally:
            app.close()
        made.append(role)
        return role, password

    return make


def user_entry(role: str, password: str, **extra) -> dict:
    return {"password": PASSWORD, "server_user": role, "server_password": password, **extra}


def config_with(pg, users: dict | None = None, **overrides) -> dict:
    """base_config plus extra users in tenant acme and top-level overrides."""
    cfg = base_config(pg, **overrides)
    if users:
        cfg = deep_merge(cfg, {"tenants": {"acme": {"users": users}}})
    return cfg


def connect2(h, user: str = "app.acme", mode: str = "transaction", dbname: str = "postgres",
             autocommit: bool = True, **kw):
    kw.setdefault("connect_timeout", 10)
    conn = psycopg2.connect(h.dsn(user, PASSWORD, mode=mode, dbname=dbname, **kw))
    conn.autocommit = autocommit
    return conn


def q1(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def pg_env(password: str | None = PASSWORD) -> dict:
    env = _clean_env()
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def psql_cmd(h, user: str, mode: str, dbname: str = "postgres", *args) -> list[str]:
    return ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", h.hosts[mode],
            "-p", str(h.port(mode)), "-U", user, "-d", dbname, *args]


# --------------------------------------------------------------------------------------------------
# a tiny raw v3 client (for what drivers will not do on purpose)


def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


SYNC = _msg(b"S")
FLUSH = _msg(b"H")


class RawClient:
    """Startup + authentication (cleartext, md5 or SCRAM-SHA-256), then raw message exchange."""

    def __init__(self, host: str, port: int, user: str, password: str, database: str = "postgres",
                 timeout: float = 10.0, **params):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.params: dict[str, str] = {}
        self.key = None
        startup = {"user": user, "database": database, **params}
        body = struct.pack("!i", 196608) + b"".join(_cstr(k) + _cstr(v) for k, v in startup.items())
        body += b"\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        scram = None
        while True:
            kind, body = self.read()
            if kind == b"R":
                code = struct.unpack("!i", body[:4])[0]
                if code == 0:
                    continue
                if code == 3:
                    self.send(_msg(b"p", _cstr(password)))
                elif code == 5:
                    inner = hashlib.md5((password + user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                    self.send(_msg(b"p", _cstr("md5" + outer)))
                elif code == 10:
                    scram = ScramClient(["SCRAM-SHA-256"], user, password)
                    first = scram.get_client_first().encode()
                    self.send(_msg(b"p", _cstr("SCRAM-SHA-256") + struct.pack("!i", len(first))
                                   + first))
                elif code == 11:
                    scram.set_server_first(body[4:].decode())
                    self.send(_msg(b"p", scram.get_client_final().encode()))
                elif code == 12:
                    scram.set_server_final(body[4:].decode())
                else:
                    raise AssertionError(f"unexpected authentication request {code}")
            elif kind == b"S":
                name, value, _ = body.split(b"\0", 2)
                self.params[name.decode()] = value.decode()
            elif kind == b"K":
                self.key = struct.unpack("!ii", body)
            elif kind == b"E":
                raise AssertionError(f"login failed: {fields(body)}")
            elif kind == b"Z":
                return

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def read(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buf) >= 5:
                length = struct.unpack("!I", self.buf[1:5])[0]
                if len(self.buf) >= 1 + length:
                    kind, body = self.buf[:1], self.buf[5:1 + length]
                    self.buf = self.buf[1 + length:]
                    return kind, body
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buf += data

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            kind, body = self.read()
            out.append((kind, body))
            if kind == b"Z":
                return out

    def close(self) -> None:
        try:
            self.sock.sendall(_msg(b"X"))
        except OSError:
            pass
        self.sock.close()


def fields(body: bytes) -> dict[str, str]:
    return {chr(part[0]): part[1:].decode("utf-8", "replace") for part in body.split(b"\0") if part}


def data_rows(messages) -> list[list[bytes | None]]:
    rows = []
    for kind, body in messages:
        if kind != b"D":
            continue
        count = struct.unpack_from("!h", body, 0)[0]
        pos, row = 2, []
        for _ in range(count):
            n = struct.unpack_from("!i", body, pos)[0]
            pos += 4
            if n < 0:
                row.append(None)
            else:
                row.append(body[pos:pos + n])
                pos += n
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# 1. modes x drivers


@pytest.mark.parametrize("mode", MODES)
def test_psycopg2(pg, gpooler, mode):
    h = gpooler(base_config(pg))
    conn = connect2(h, mode=mode, autocommit=False)
    try:
        assert conn.get_parameter_status("server_version").startswith("15")
        with conn.cursor() as cur:
            cur.execute("select current_user, %s::int * 2, %s::text", (21, "héllo"))
            assert cur.fetchone() == ("u_scram", 42, "héllo")
            cur.execute("select pg_backend_pid()")
            pid = cur.fetchone()[0]
            cur.execute("select x from generate_series(1, 1000) x")
            assert [r[0] for r in cur.fetchall()] == list(range(1, 1001))
            cur.execute("select pg_backend_pid(), txid_current_if_assigned() is null")
            assert cur.fetchone()[0] == pid       # one implicit transaction, one backend
        conn.commit()
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.DivisionByZero):
                cur.execute("select 1/0")
        conn.rollback()
        assert q1(conn, "select 'after error'") == "after error"
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_psycopg3_with_pipeline(pg, gpooler, mode):
    h = gpooler(base_config(pg))
    with psycopg.connect(h.dsn("app.acme", PASSWORD, mode=mode), prepare_threshold=None,
                         autocommit=True, connect_timeout=10) as conn:
        assert conn.info.parameter_status("server_version").startswith("15")
        for i in range(20):   # the same statement again and again: still unnamed
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
        with conn.transaction():
            pids = {conn.execute("select pg_backend_pid()").fetchone()[0] for _ in range(5)}
        assert len(pids) == 1

        with conn.pipeline():
            curs = [conn.execute("select %s::int, %s::text", (i, f"v{i}")) for i in range(200)]
        assert [c.fetchone() for c in curs] == [(i, f"v{i}") for i in range(200)]

        # several syncs inside one pipeline, and a transaction in a pipeline
        with conn.pipeline() as p:
            a = conn.execute("select 1")
            p.sync()
            b = conn.execute("select 2")
            with conn.transaction():
                c = conn.execute("select pg_backend_pid()")
                d = conn.execute("select pg_backend_pid()")
        assert (a.fetchone(), b.fetchone()) == ((1,), (2,))
        assert c.fetchone() == d.fetchone()

        # an error in a pipeline aborts the rest of its batch and the connection recovers
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("select 1/0")
                conn.execute("select 1")
        assert conn.execute("select 'recovered'").fetchone() == ("recovered",)
        if mode == "session":
            assert conn.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_psql(pg, gpooler, mode):
    h = gpooler(base_config(pg))
    script = ("select current_user;\n"
              "begin;\n"
              "select pg_backend_pid();\n"
              "select pg_backend_pid();\n"
              "commit;\n"
              "select string_agg(x::text, ',') from generate_series(1, 5) x;\n")
    res = subprocess.run(psql_cmd(h, "app.acme", mode, "postgres", "-f", "-"), input=script,
                         capture_output=True, text=True, timeout=30, env=pg_env())
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line and line not in ("BEGIN", "COMMIT")]
    assert lines[0] == "u_scram"
    assert lines[1] == lines[2] and lines[1].isdigit()
    assert lines[3] == "1,2,3,4,5"

    bad = subprocess.run(psql_cmd(h, "app.acme", mode, "postgres", "-c", "select 1"),
                         capture_output=True, text=True, timeout=30, env=pg_env("wrong"))
    assert bad.returncode != 0
    assert "password authentication failed" in bad.stderr


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_pgbench(pg, gpooler, pgbench_db, protocol):
    h = gpooler(base_config(pg))
    cmd = ["pgbench", "-n", "-c", "8", "-j", "2", "-t", "50", "-M", protocol,
           "-h", h.hosts["transaction"], "-p", str(h.port("transaction")), "-U", "app.acme",
           pgbench_db]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=pg_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "number of transactions actually processed: 400/400" in res.stdout, res.stdout
    assert "number of failed transactions: 0 " in res.stdout, res.stdout
    s = Super(pg, pgbench_db)
    try:
        assert s.one("select count(*) from pgbench_history") >= 400
    finally:
        s.close()


# --------------------------------------------------------------------------------------------------
# authentication in both directions


@pytest.mark.parametrize("user,role", [("app", "u_scram"), ("md5user", "u_md5"),
                                       ("trustuser", "u_trust"), ("plainuser", "u_plain")])
def test_every_upstream_auth_method(pg, gpooler, user, role):
    h = gpooler(base_config(pg))
    for mode in MODES:
        conn = connect2(h, f"{user}.acme", mode=mode)
        try:
            assert q1(conn, "select current_user") == role
            assert q1(conn, "select %s::int + 1", (1,)) == 2
        finally:
            conn.close()


def test_every_client_auth_method(pg, gpooler):
    cfg = config_with(pg, users={"plainuser": {"auth_type": "plain"}})
    h = gpooler(cfg)
    # require_auth (libpq >= 16) makes libpq refuse any other method than the one named
    for user, method, role in [("app", "scram-sha-256", "u_scram"), ("md5user", "md5", "u_md5"),
                               ("plainuser", "password", "u_plain")]:
        for mode in MODES:
            conn = connect2(h, f"{user}.acme", mode=mode, require_auth=method)
            try:
                assert q1(conn, "select current_user") == role
            finally:
                conn.close()
        err = connect_error(h.params(f"{user}.acme", "wrong"))
        assert err["C"] == "28P01", err
        assert "password authentication failed" in err["M"]
    # a driver that speaks cleartext itself
    conn = pg8000.native.Connection("plainuser.acme", host=h.hosts["transaction"],
                                    port=h.port("transaction"), password=PASSWORD,
                                    database="postgres", timeout=10)
    try:
        assert conn.run("select current_user, :x::int", x=7) == [["u_plain", 7]]
    finally:
        conn.close()
    err = connect_error(h.params("nobody.acme", PASSWORD))
    assert err["C"] == "28000", err


# --------------------------------------------------------------------------------------------------
# 2. 200 clients over a pool of 5


def test_200_clients_over_pool_of_5(pg, gpooler, su, fresh_role):
    role, pw = fresh_role("conc")
    h = gpooler(config_with(pg, users={"conc": user_entry(role, pw, pool_size=5)}))
    n = 200
    connected = threading.Barrier(n + 1, timeout=60)
    errors: list[str] = []
    done_ok: list[int] = []
    lock = threading.Lock()

    def client(i: int):
        conn = None
        try:
            conn = connect2(h, "conc.acme")
            connected.wait()
            with conn.cursor() as cur:
                for k in range(3):
                    cur.execute("select %s::int, %s::text", (i, f"c{i}-{k}"))
                    got = cur.fetchone()
                    if got != (i, f"c{i}-{k}"):
                        raise AssertionError(f"client {i} got {got}")
                cur.execute("begin")
                cur.execute("select pg_backend_pid()")
                pid = cur.fetchone()[0]
                cur.execute("select %s::int * 2, pg_backend_pid()", (i,))
                got = cur.fetchone()
                if got != (i * 2, pid):
                    raise AssertionError(f"client {i} got {got}, expected ({i * 2}, {pid})")
                cur.execute("commit")
                cur.execute("select %s::text || '!'", (str(i),))
                if cur.fetchone() != (f"{i}!",):
                    raise AssertionError(f"client {i}: wrong echo")
            with lock:
                done_ok.append(i)
        except BaseException as exc:  # noqa: BLE001
            with lock:
                errors.append(f"client {i}: {exc!r}")
            connected.abort()
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        connected.wait()     # all 200 logged in at the same time
    except threading.BrokenBarrierError:
        pass
    samples = []
    deadline = time.monotonic() + 90
    while any(t.is_alive() for t in threads):
        samples.append(su.backends(role))
        if time.monotonic() > deadline:
            pytest.fail(f"clients still running after 90s; errors so far: {errors[:5]}")
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert not errors, errors[:10]
    assert sorted(done_ok) == list(range(n))
    assert samples and max(samples) <= 5, f"server connections seen: max {max(samples)}"
    assert max(samples) >= 1       # the monitor did see the load
    assert su.backends(role) <= 5


# --------------------------------------------------------------------------------------------------
# 3. transaction mode releases, transactions pin, session mode keeps


def test_transaction_mode_releases(pg, gpooler, su, fresh_role):
    role, pw = fresh_role("rel")
    h = gpooler(config_with(pg, users={"rel": user_entry(role, pw, pool_size=3,
                                                         pool_checkout_timeout=1)}))
    conns = []
    try:
        for i in range(20):        # 20 clients that stay connected, each doing work
            conn = connect2(h, "rel.acme")
            conns.append(conn)
            assert q1(conn, "select %s::int", (i,)) == i
            with conn.cursor() as cur:
                cur.execute("begin")
                cur.execute("select %s::text", (f"t{i}",))
                assert cur.fetchone() == (f"t{i}",)
                cur.execute("commit")
            assert su.backends(role) <= 3
        for i, conn in enumerate(conns):   # every one of them still served
            assert q1(conn, "select %s::int + 100", (i,)) == i + 100
        assert su.backends(role) <= 3
    finally:
        for conn in conns:
            conn.close()
    # the same load in session mode would need 20 server connections: it is refused there
    held = [connect2(h, "rel.acme", mode="session") for _ in range(3)]
    try:
        err = connect_error(h.params("rel.acme", PASSWORD, mode="session"))
        assert err["C"] == "53300", err
    finally:
        for conn in held:
            conn.close()


def test_transaction_pins_one_backend(pg, gpooler):
    h = gpooler(base_config(pg, defaults={"pool_size": 2, "pool_checkout_timeout": 5}))
    a = connect2(h)
    b = connect2(h)
    try:
        with a.cursor() as cur:
            cur.execute("begin")
            cur.execute("select pg_backend_pid()")
            pid = cur.fetchone()[0]
            # other clients work meanwhile, never on the backend this transaction holds
            for i in range(10):
                assert q1(b, "select pg_backend_pid()") != pid
                cur.execute("select pg_backend_pid(), %s::int", (i,))
                assert cur.fetchone() == (pid, i)
            cur.execute("select txid_current()")
            xid = cur.fetchone()[0]
            assert q1(b, "select pg_backend_pid()") != pid
            cur.execute("select txid_current()")
            assert cur.fetchone()[0] == xid
            cur.execute("commit")
    finally:
        a.close()
        b.close()


def test_session_mode_keeps_backend(pg, gpooler):
    h = gpooler(base_config(pg))
    s = connect2(h, mode="session")
    others = [connect2(h) for _ in range(3)]
    try:
        pid = q1(s, "select pg_backend_pid()")
        for i in range(10):
            for o in others:
                q1(o, "select pg_backend_pid()")
            assert q1(s, "select pg_backend_pid()") == pid
        q1(s, "select set_config('work_mem', '11MB', false)")
        for o in others:
            assert q1(o, "show work_mem") != "11MB"
        assert q1(s, "show work_mem") == "11MB"
    finally:
        s.close()
        for o in others:
            o.close()


# --------------------------------------------------------------------------------------------------
# 4. session mode resets what a client left behind


def test_session_reset_between_clients(pg, gpooler, su):
    h = gpooler(base_config(pg, defaults={"pool_size": 1, "pool_checkout_timeout": 5}))
    direct = psycopg2.connect(pg.dsn("u_scram", "pw_u_scram"))
    default_work_mem = q1(direct, "show work_mem")
    direct.close()
    assert default_work_mem != "77MB"

    first = connect2(h, mode="session")
    try:
        pid = q1(first, "select pg_backend_pid()")
        with first.cursor() as cur:
            cur.execute("set work_mem = '77MB'")
            cur.execute("create temp table gp_leftover (x int)")
            cur.execute("prepare gp_stmt as select 1")
            cur.execute("select pg_advisory_lock(4242)")
        assert q1(first, "show work_mem") == "77MB"
    finally:
        first.close()

    second = connect2(h, mode="session")
    try:
        assert q1(second, "select pg_backend_pid()") == pid     # the same server connection
        assert q1(second, "show work_mem") == default_work_mem
        assert q1(second, "select count(*) from pg_class "
                          "where relname = 'gp_leftover' and relpersistence = 't'") == 0
        assert q1(second, "select count(*) from pg_prepared_statements") == 0
        assert q1(second, "select count(*) from pg_locks "
                          "where locktype = 'advisory' and pid = pg_backend_pid()") == 0
    finally:
        second.close()
    assert su.one("select count(*) from pg_locks where locktype = 'advisory'") == 0


# --------------------------------------------------------------------------------------------------
# 5. startup parameters


# psycopg2 itself sends SET DATESTYLE TO 'ISO' after connecting when DateStyle does not start with
# ISO, so the DateStyle given here keeps ISO output and changes only the field order.
STARTUP = {"application_name": "gp_startup",
           "options": "-c search_path=gp_schema,public -c TimeZone=Asia/Tokyo "
                      "-c DateStyle=ISO,DMY -c work_mem=5MB"}
SHOWN = ["application_name", "search_path", "TimeZone", "DateStyle", "work_mem"]


def show_all(conn) -> dict:
    return {name: q1(conn, f"show {name}") for name in SHOWN}


@pytest.mark.parametrize("mode", MODES)
def test_startup_parameters_reach_the_server(pg, gpooler, mode):
    h = gpooler(base_config(pg))
    direct = psycopg2.connect(pg.dsn("u_scram", "pw_u_scram", **STARTUP))
    direct.autocommit = True
    try:
        expected = show_all(direct)
        expected_status = {k: direct.get_parameter_status(k)
                           for k in ("application_name", "TimeZone", "DateStyle")}
    finally:
        direct.close()
    assert expected["TimeZone"] == "Asia/Tokyo" and expected["work_mem"] == "5MB"
    assert expected["DateStyle"] == "ISO, DMY"

    # other clients with default settings keep using the same pool in between
    other = connect2(h, mode="transaction")
    conn = connect2(h, mode=mode, **STARTUP)
    try:
        for _ in range(3):
            assert show_all(conn) == expected
            assert q1(other, "show TimeZone") != "Asia/Tokyo"
            assert q1(other, "show application_name") != "gp_startup"
        for name, value in expected_status.items():
            assert conn.get_parameter_status(name) == value, name
        assert conn.get_parameter_status("server_version").startswith("15")
        assert conn.get_parameter_status("integer_datetimes") == "on"
    finally:
        conn.close()
        other.close()

    # startup parameters proper (not options): asyncpg sends server_settings in the packet
    async def via_asyncpg():
        c = await asyncpg.connect(host=h.hosts[mode], port=h.port(mode), user="app.acme",
                                  password=PASSWORD, database="postgres", statement_cache_size=0,
                                  server_settings={"application_name": "gp_async",
                                                   "TimeZone": "America/Lima",
                                                   "DateStyle": "German, DMY",
                                                   "search_path": "gp_other"}, timeout=10)
        try:
            return [await c.fetchval(f"show {n}") for n in
                    ("application_name", "TimeZone", "DateStyle", "search_path")]
        finally:
            await c.close()

    assert asyncio.run(via_asyncpg()) == ["gp_async", "America/Lima", "German, DMY", "gp_other"]


def test_each_client_sees_its_own_settings_on_a_pool_of_1(pg, gpooler):
    h = gpooler(base_config(pg, defaults={"pool_size": 1, "pool_checkout_timeout": 5}))
    a = connect2(h, application_name="client_a", options="-c TimeZone=Asia/Tokyo")
    b = connect2(h, application_name="client_b")
    c = connect2(h)
    try:
        assert a.get_parameter_status("application_name") == "client_a"
        assert b.get_parameter_status("application_name") == "client_b"
        pids = set()
        for _ in range(3):
            assert q1(a, "show application_name") == "client_a"
            assert q1(a, "show TimeZone") == "Asia/Tokyo"
            assert q1(b, "show application_name") == "client_b"
            assert q1(b, "show TimeZone") != "Asia/Tokyo"
            assert q1(c, "show application_name") == ""
            pids.update(q1(x, "select pg_backend_pid()") for x in (a, b, c))
        assert len(pids) == 1          # all on the one server connection
    finally:
        for x in (a, b, c):
            x.close()


# --------------------------------------------------------------------------------------------------
# 6. cancel


@pytest.mark.parametrize("mode", MODES)
def test_cancel(pg, gpooler, su, fresh_role, mode):
    role, pw = fresh_role("cx")
    h = gpooler(config_with(pg, users={"cx": user_entry(role, pw)}))
    conn = connect2(h, "cx.acme", mode=mode)
    sql = "select pg_sleep(10)"
    canceller_error = []

    def canceller():
        try:
            wait_until(lambda: su.active(role, sql) == 1, what="the sleep to run")
            conn.cancel()
        except BaseException as exc:  # noqa: BLE001
            canceller_error.append(exc)

    t = threading.Thread(target=canceller, daemon=True)
    t.start()
    started = time.monotonic()
    try:
        with pytest.raises(psycopg2.errors.QueryCanceled) as info:
            with conn.cursor() as cur:
                cur.execute(sql)
        elapsed = time.monotonic() - started
        t.join(10)
        assert not canceller_error, canceller_error
        assert info.value.pgcode == "57014"
        assert elapsed < 5, f"cancel took {elapsed:.1f}s"
        assert q1(conn, "select 'usable'") == "usable"
        conn.autocommit = False        # and a transaction after it
        assert q1(conn, "select 2") == 2
        conn.commit()
    finally:
        conn.close()
    h.wait_log("cancel request")


def test_cancel_reaches_only_its_client(pg, gpooler, su, fresh_role):
    role, pw = fresh_role("cy")
    h = gpooler(config_with(pg, users={"cy": user_entry(role, pw)}))
    a = connect2(h, "cy.acme")
    b = connect2(h, "cy.acme")
    a_sql, b_sql = "select pg_sleep(10)", "select pg_sleep(2.5)"
    results: dict = {}

    def run(name, conn, sql):
        started = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
            results[name] = ("ok", time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001
            results[name] = (exc, time.monotonic() - started)

    ta = threading.Thread(target=run, args=("a", a, a_sql), daemon=True)
    tb = threading.Thread(target=run, args=("b", b, b_sql), daemon=True)
    try:
        ta.start()
        tb.start()
        wait_until(lambda: su.active(role, a_sql) == 1 and su.active(role, b_sql) == 1,
                   what="both sleeps to run")
        a.cancel()
        ta.join(8)
        tb.join(8)
        assert not ta.is_alive() and not tb.is_alive()
        a_result, a_time = results["a"]
        b_result, b_time = results["b"]
        assert isinstance(a_result, psycopg2.errors.QueryCanceled), a_result
        assert a_time < 5
        assert b_result == "ok", f"B was disturbed: {b_result!r}"
        assert b_time >= 2.4
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("mode", MODES)
def test_psql_ctrl_c_cancels(pg, gpooler, su, fresh_role, mode):
    role, pw = fresh_role("cz")
    h = gpooler(config_with(pg, users={"cz": user_entry(role, pw)}))
    sql = "select pg_sleep(10)"
    proc = subprocess.Popen(psql_cmd(h, "cz.acme", mode, "postgres", "-c", sql),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=pg_env())
    try:
        wait_until(lambda: su.active(role, sql) == 1 or proc.poll() is not None,
                   what="psql's query to run")
        assert proc.poll() is None, proc.communicate()
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=8)
        assert time.monotonic() - started < 5
        assert "canceling statement due to user request" in err, (out, err)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------
# 7. a client vanishing mid-transaction


@pytest.mark.parametrize("how", ["terminate", "abrupt", "kill_psql"])
def test_client_vanishing_mid_transaction(pg, gpooler, su, fresh_role, how):
    role, pw = fresh_role("vx")
    h = gpooler(config_with(pg, users={"vx": user_entry(role, pw, pool_size=1,
                                                        pool_checkout_timeout=5)}))
    table = f"gone_{uuid.uuid4().hex[:8]}"
    setup = connect2(h, "vx.acme", dbname="app")
    q1(setup, f"create table {table} (x int); select 1")
    setup.close()

    if how == "kill_psql":
        proc = subprocess.Popen(psql_cmd(h, "vx.acme", "transaction", "app"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=pg_env())
        try:
            proc.stdin.write(f"begin;\ninsert into {table} values (1);\n")
            proc.stdin.flush()
            wait_until(lambda: su.in_transaction(role) == 1 or proc.poll() is not None,
                       what="psql's open transaction")
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
    else:
        conn = connect2(h, "vx.acme", dbname="app", autocommit=False)
        with conn.cursor() as cur:
            cur.execute(f"insert into {table} values (1)")
        assert su.in_transaction(role) == 1
        if how == "abrupt":     # no Terminate: the socket just goes away
            s = socket.socket(fileno=os.dup(conn.fileno()))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        conn.close()

    nxt = connect2(h, "vx.acme", dbname="app")
    try:
        assert q1(nxt, f"select count(*) from {table}") == 0
        assert q1(nxt, "select 'fine'") == "fine"
        wait_until(lambda: su.in_transaction(role) == 0, timeout=5,
                   what="no transaction left open")
        assert su.backends(role) <= 1
        q1(nxt, f"drop table {table}; select 1")
    finally:
        nxt.close()


# --------------------------------------------------------------------------------------------------
# 8. large data, transaction mode


MB = 1 << 20


def test_50mb_pipeline(pg, gpooler):
    h = gpooler(base_config(pg))
    table = f"bigp_{uuid.uuid4().hex[:8]}"
    values = [(chr(ord("a") + i % 26) * MB) for i in range(25)]

    def work():
        with psycopg.connect(h.dsn("app.acme", PASSWORD, dbname="app"), prepare_threshold=None,
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"create table {table} (i int, v text)")
            try:
                with conn.pipeline():
                    with conn.cursor() as cur:
                        cur.executemany(f"insert into {table} values (%s, %s)",
                                        list(enumerate(values)))
                    echoes = [conn.execute("select %s::int, length(%s::text), %s::text",
                                           (i, v, v)) for i, v in enumerate(values)]
                out = [c.fetchone() for c in echoes]
                for i, (n, length, v) in enumerate(out):
                    assert (n, length) == (i, MB)
                    assert v == values[i]
                rows = conn.execute(
                    f"select i, length(v), md5(v) from {table} order by i").fetchall()
                assert rows == [(i, MB, hashlib.md5(v.encode()).hexdigest())
                                for i, v in enumerate(values)]
            finally:
                conn.execute(f"drop table {table}")

    run_in_thread(work, 120, "the 50 MB pipeline")


def test_50mb_copy_in_and_out(pg, gpooler):
    h = gpooler(base_config(pg))
    table = f"bigc_{uuid.uuid4().hex[:8]}"
    rows = 50_000
    line_len = 1000

    def work():
        with psycopg.connect(h.dsn("app.acme", PASSWORD, dbname="app"), prepare_threshold=None,
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"create table {table} (i int, v text)")
            try:
                payload = "z" * (line_len - 10)
                sent = 0
                with conn.cursor() as cur:
                    with cur.copy(f"copy {table} (i, v) from stdin") as copy:
                        chunk = []
                        for i in range(rows):
                            chunk.append(f"{i:09d}\t{payload}\n")
                            if len(chunk) == 1000:
                                data = "".join(chunk).encode()
                                sent += len(data)
                                copy.write(data)
                                chunk = []
                    assert cur.rowcount == rows
                assert sent >= 50 * 1000 * 1000
                assert conn.execute(f"select count(*), sum(length(v)), count(distinct i) "
                                    f"from {table}").fetchone() == (rows, rows * len(payload), rows)

                received = 0
                lines = 0
                with conn.cursor() as cur:
                    out_sql = (f"copy (select lpad(i::text, 9, '0'), v from {table} order by i) "
                               "to stdout")
                    with cur.copy(out_sql) as copy:
                        for block in copy:
                            received += len(block)
                            lines += bytes(block).count(b"\n")
                assert lines == rows
                assert received == sent
                assert conn.execute("select 'after copy'").fetchone() == ("after copy",)
            finally:
                conn.execute(f"drop table {table}")

    run_in_thread(work, 120, "50 MB of COPY in and out")


def test_50mb_raw_extended_stream(pg, gpooler):
    """A raw client writes 50 MB of extended-protocol messages while reading the answers on
    another thread: neither side may wait for the other to drain."""
    h = gpooler(base_config(pg, tenants={"acme": {"users": {"plainuser": {"auth_type": "plain"}}}}))
    raw = RawClient(h.hosts["transaction"], h.port("transaction"), "plainuser.acme", PASSWORD,
                    timeout=60)
    value = b"q" * (256 * 1024)
    count = 200          # 200 x 256 KB = 50 MB out, and the same back
    sql = _cstr("select $1::text")
    parse = _msg(b"P", b"\0" + sql + struct.pack("!h", 0))
    bind = _msg(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, len(value)) + value
                + struct.pack("!h", 0))
    execute = _msg(b"E", b"\0" + struct.pack("!i", 0))
    batch = (parse + bind + execute) * 10 + SYNC

    received = {"rows": 0, "bytes": 0, "ready": 0, "errors": []}

    def reader():
        while received["ready"] < count // 10:
            kind, body = raw.read()
            if kind == b"D":
                received["rows"] += 1
                received["bytes"] += struct.unpack_from("!i", body, 2)[0]
                if body[6:7] != b"q" or body[-1:] != b"q":
                    received["errors"].append("bad row")
            elif kind == b"E":
                received["errors"].append(fields(body))
            elif kind == b"Z":
                received["ready"] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()

    def writer():
        for _ in range(count // 10):
            raw.sock.sendall(batch)

    try:
        run_in_thread(writer, 120, "writing 50 MB of extended-protocol messages")
        t.join(120)
        assert not t.is_alive(), f"answers stopped after {received}"
        assert not received["errors"], received["errors"][:3]
        assert received["rows"] == count
        assert received["bytes"] == count * len(value)
        raw.send(_msg(b"Q", _cstr("select 'still here'")))
        assert data_rows(raw.until_ready()) == [[b"still here"]]
    finally:
        raw.close()


# --------------------------------------------------------------------------------------------------
# 9. Sync and Flush from a client that holds no server connection


def test_sync_and_flush_answered_without_a_server(pg, gpooler, su, fresh_role):
    role, pw = fresh_role("sf")
    h = gpooler(config_with(pg, users={"sf": user_entry(role, pw, pool_size=1,
                                                        pool_checkout_timeout=2,
                                                        auth_type="plain")}))
    raw = RawClient(h.hosts["transaction"], h.port("transaction"), "sf.acme", PASSWORD, timeout=10)
    holder = connect2(h, "sf.acme", autocommit=False)
    try:
        assert raw.params.get("server_version", "").startswith("15")
        assert raw.key is not None
        # the holder takes the only server connection and keeps it in a transaction
        holder_pid = q1(holder, "select pg_backend_pid()")
        assert su.in_transaction(role) == 1

        started = time.monotonic()
        raw.send(SYNC)
        assert raw.read() == (b"Z", b"I")
        raw.send(FLUSH)                  # nothing to flush: no answer at all
        raw.send(FLUSH + SYNC + SYNC)    # answered by the two ReadyForQuery only
        assert [raw.read(), raw.read()] == [(b"Z", b"I"), (b"Z", b"I")]
        # answered locally, not after waiting for (and failing) a checkout of the busy server
        assert time.monotonic() - started < 1.5
        assert su.in_transaction(role) == 1    # the holder's transaction was not disturbed
        holder.commit()

        # real work afterwards: simple and extended protocol, on the same one server
        raw.send(_msg(b"Q", _cstr("select pg_backend_pid()")))
        assert data_rows(raw.until_ready()) == [[str(holder_pid).encode()]]
        raw.send(_msg(b"P", b"\0" + _cstr("select 40 + 2") + struct.pack("!h", 0)),
                 _msg(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0)),
                 _msg(b"E", b"\0" + struct.pack("!i", 0)), FLUSH)
        kinds = [raw.read()[0] for _ in range(3)]
        assert kinds == [b"1", b"2", b"D"]
        raw.send(SYNC)
        assert raw.until_ready()[-1] == (b"Z", b"I")
        assert q1(holder, "select 'holder again'") == "holder again"
        holder.commit()
    finally:
        raw.close()
        holder.close()


# --------------------------------------------------------------------------------------------------
# beyond the list: a reported setting a client SETs itself, in transaction mode
