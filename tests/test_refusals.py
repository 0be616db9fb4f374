"""Every way a client can be turned away, and that turning it away hurts nobody else.

The contract's refusal table: each refused client gets a FATAL ErrorResponse with the SQLSTATE of
its case and a message naming the cause, the daemon logs one info line with "refused" and the
SQLSTATE, never a traceback, and a good client on the same daemon still works afterwards.

Real drivers where they can produce the input: pg8000 (cluster.connect_error) and asyncpg expose
the SQLSTATE of a startup-time ErrorResponse; libpq (psycopg2, psycopg 3) only the message at
connect time (`e.pgcode` / `e.sqlstate` are None there). After login psycopg 3 reports the
SQLSTATE of a FATAL; psycopg2 on libpq >= 14 does not (it says "server closed the connection
unexpectedly", against Postgres itself too), so mid-session refusals use psycopg 3. Raw sockets
for what no driver sends: garbage, absurd lengths, old protocols, unknown message types,
vanishing clients.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from contextlib import closing, contextmanager

import asyncpg
import psycopg
import psycopg2
import pytest

from cluster import base_config, connect_error, deep_merge, free_port, ipv6_available

PROTOCOL_V3 = 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104

# A second tenant that is always reachable: the good client when acme itself is refused, and the
# tenant that makes tenant resolution observable (its "app" logs in to Postgres as u_trust).
BETA = {"host": None, "port": None, "database": "postgres",
        "users": {"app": {"password": "secret2", "server_user": "u_trust"}}}


def config(pg, **overrides) -> dict:
    """base_config with plainuser checked in clear text (what the raw-socket client speaks)."""
    cfg = base_config(pg, tenants={"acme": {"users": {"plainuser": {"auth_type": "plain"}}}})
    return deep_merge(cfg, overrides)


def with_beta(pg, **beta) -> dict:
    return deep_merge(dict(BETA, host=pg.host, port=pg.port), beta)


# --------------------------------------------------------------------------------------------------
# helpers: log, health

def wait_line(h, *needles: str, since: int = 0, timeout: float = 5.0) -> str:
    """A complete log line (starting at or after byte `since`) holding every needle."""
    deadline = time.monotonic() + timeout
    while True:
        with open(h.log_path, "rb") as f:
            f.seek(since)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1].decode("utf-8", "replace")
        for line in complete.splitlines():
            if all(n in line for n in needles):
                return line
        if time.monotonic() > deadline:
            lines = "\n".join(complete.splitlines()[-15:])
            pytest.fail(f"no gpooler log line with all of {needles!r} within {timeout}s; "
                        f"log since the bad client:\n{lines}", pytrace=False)
        time.sleep(0.02)


def outcome_line(h, since: int, *needles: str) -> str:
    """The line gpooler logs when it is done with a client (pre-startup: "client refused: ...",
    afterwards: "client disconnected: ... reason=..."), first one after `since` that is not a good
    client's ordinary goodbye."""
    deadline = time.monotonic() + 5.0
    while True:
        with open(h.log_path, "rb") as f:
            f.seek(since)
            data = f.read()
        lines = data[: data.rfind(b"\n") + 1].decode("utf-8", "replace").splitlines()
        for line in lines:
            if ("client refused" in line or "client disconnected" in line) and \
                    "reason=client terminated the session" not in line and \
                    all(n in line for n in needles):
                return line
        if time.monotonic() > deadline:
            pytest.fail(f"gpooler logged no outcome line with {needles!r} for the client; log "
                        "since it connected:\n" + "\n".join(lines[-15:]), pytrace=False)
        time.sleep(0.02)


def assert_refusal_logged(h, sqlstate: str, since: int, *needles: str) -> str:
    """One info line per refused client naming the reason: "refused" and the SQLSTATE."""
    line = outcome_line(h, since, *needles)
    assert " INFO " in line, line
    assert "refused" in line and sqlstate in line, \
        f"the log line for a client refused with {sqlstate} lacks 'refused' or the SQLSTATE:\n{line}"
    return line


def assert_unharmed(h, user: str = "app.acme", password: str = "secret") -> None:
    """The daemon is alive, a good client works (and gpooler has seen it leave), no traceback."""
    assert h.proc.poll() is None, f"gpooler exited with {h.proc.returncode}"
    mark = h.log_mark()
    with closing(psycopg2.connect(h.dsn(user, password, connect_timeout=10))) as conn:
        with conn.cursor() as cur:
            cur.execute("select 41 + 1")
            assert cur.fetchone() == (42,)
    wait_line(h, "client disconnected", f"user={user.rsplit('.', 1)[0]} ",
              "client terminated the session", since=mark)
    assert "Traceback" not in h.log()


def assert_fatal(fields: dict, sqlstate: str, *words: str) -> None:
    assert fields.get("C") == sqlstate, fields
    assert fields.get("S") == "FATAL", fields
    if "V" in fields:
        assert fields["V"] == "FATAL", fields
    for word in words:
        assert word in fields.get("M", ""), (word, fields)


def refused(h, user: str, password: str = "secret", mode: str = "transaction", **kw) -> dict:
    """pg8000's view of a refused login: the ErrorResponse fields."""
    return connect_error(h.params(user, password, mode, **kw))


def psycopg2_refused(h, user: str, password: str = "secret", **kw) -> str:
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(h.dsn(user, password, connect_timeout=10, **kw)).close()
    return str(info.value)


def asyncpg_refused(h, user: str, password: str = "secret", **kw) -> Exception:
    async def attempt():
        conn = await asyncpg.connect(host=h.hosts["transaction"], port=h.port(), user=user,
                                     password=password, database="postgres", timeout=10, **kw)
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    return info.value


def current_user(h, user: str, password: str = "secret", **kw) -> str:
    with closing(psycopg2.connect(h.dsn(user, password, connect_timeout=10, **kw))) as conn:
        with conn.cursor() as cur:
            cur.execute("select current_user")
            return cur.fetchone()[0]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------------------------------
# a raw protocol client

def startup_packet(params: dict, version: int = PROTOCOL_V3) -> bytes:
    body = struct.pack("!I", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_fields(body: bytes) -> dict:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


class Raw:
    """A socket speaking just enough of the protocol; every read has a deadline."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buf += data
        return bool(data)

    def read_byte(self) -> bytes:
        while not self.buf:
            if not self._fill():
                raise AssertionError("connection closed, expected a one-byte answer")
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_message(self) -> tuple[bytes, bytes] | None:
        """The next (type, body), or None when the peer closed cleanly between messages."""
        while len(self.buf) < 5:
            if not self._fill():
                if not self.buf:
                    return None
                raise AssertionError(f"connection closed inside a message header: {self.buf!r}")
        length = struct.unpack("!I", self.buf[1:5])[0]
        assert 4 <= length < 1 << 24, f"absurd message length from gpooler: {length}"
        while len(self.buf) < 1 + length:
            if not self._fill():
                raise AssertionError("connection closed inside a message")
        kind, body = self.buf[:1], self.buf[5 : 1 + length]
        self.buf = self.buf[1 + length :]
        return kind, body

    def expect(self, kind: bytes) -> bytes:
        m = self.read_message()
        assert m is not None, f"connection closed, expected {kind!r}"
        if m[0] == b"E" and kind != b"E":
            raise AssertionError(f"expected {kind!r}, got ErrorResponse {error_fields(m[1])}")
        assert m[0] == kind, f"expected {kind!r}, got {m!r}"
        return m[1]

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        seen = []
        while True:
            m = self.read_message()
            assert m is not None, f"connection closed before ReadyForQuery; saw {seen!r}"
            if m[0] == b"E":
                raise AssertionError(f"ErrorResponse {error_fields(m[1])}")
            seen.append(m)
            if m[0] == b"Z":
                return seen

    def expect_error_and_close(self) -> dict:
        """An ErrorResponse as the next message, then EOF: the refusal and nothing after it."""
        m = self.read_message()
        assert m is not None, "socket closed without an ErrorResponse"
        assert m[0] == b"E", f"expected an ErrorResponse, got {m!r}"
        fields = error_fields(m[1])
        after = self.read_message()
        assert after is None, f"gpooler kept talking after the refusal: {after!r}"
        self.close()
        return fields

    def query_one(self, sql: str) -> bytes:
        self.send(msg(b"Q", sql.encode() + b"\0"))
        value = None
        for kind, body in self.read_until_ready():
            if kind == b"D":
                (n,) = struct.unpack_from("!h", body)
                assert n == 1
                (size,) = struct.unpack_from("!i", body, 2)
                value = body[6 : 6 + size]
        return value


def raw_plain_login(h, mode: str = "transaction", user: str = "plainuser.acme",
                    password: str = "secret", prelude: bytes = b"", version: int = PROTOCOL_V3,
                    extra: dict | None = None) -> Raw:
    """Log in with a cleartext password; returns the client at ReadyForQuery."""
    r = Raw(h.hosts[mode], h.port(mode))
    r.send(startup_packet({"user": user, "database": "postgres", **(extra or {})}, version))
    body = r.expect(b"R")
    assert struct.unpack("!i", body[:4])[0] == 3, f"expected AuthenticationCleartextPassword: {body!r}"
    r.send(msg(b"p", password.encode() + b"\0"))
    seen = r.read_until_ready()
    assert seen[0] == (b"R", struct.pack("!i", 0)), seen[0]
    return r


# --------------------------------------------------------------------------------------------------
# tenant resolution

def test_user_suffix_names_the_tenant(pg, gpooler):
    h = gpooler(config(pg, tenants={"beta": with_beta(pg)}))
    assert current_user(h, "app.acme") == "u_scram"
    assert current_user(h, "app.beta", "secret2") == "u_trust"
    conn = psycopg.connect(h.dsn("app.beta", "secret2", connect_timeout=10))
    with closing(conn):
        assert conn.execute("select current_user").fetchone()[0] == "u_trust"


@pytest.mark.parametrize("options", ["-c tenant=beta", "-ctenant=beta", "--tenant=beta"])
def test_tenant_from_options(pg, gpooler, options):
    # two tenants, no default: only the option can have picked beta
    h = gpooler(config(pg, tenants={"beta": with_beta(pg)}))
    assert current_user(h, "app", "secret2", options=options) == "u_trust"
    assert current_user(h, "app", "secret", options=options.replace("beta", "acme")) == "u_scram"
    # psycopg 3 sends the same startup parameter
    with closing(psycopg.connect(h.dsn("app", "secret2", options=options, connect_timeout=10))) as c:
        assert c.execute("select current_user").fetchone()[0] == "u_trust"


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_tenant_option_is_stripped_and_other_options_apply(pg, gpooler, mode):
    h = gpooler(config(pg))
    options = "-c tenant=acme -c search_path=foo --work-mem=3MB"
    with closing(psycopg2.connect(h.dsn("app", "secret", mode, options=options))) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("show search_path")
            assert cur.fetchone()[0] == "foo"
            cur.execute("show work_mem")
            assert cur.fetchone()[0] == "3MB"
            # Postgres never heard of a setting named tenant
            with pytest.raises(psycopg2.errors.UndefinedObject):
                cur.execute("show tenant")
    assert_unharmed(h)


def test_the_only_tenant_is_used_when_none_is_given(pg, gpooler):
    h = gpooler(config(pg))
    assert current_user(h, "app") == "u_scram"
    assert current_user(h, "md5user") == "u_md5"


def test_two_tenants_and_none_given_is_refused(pg, gpooler):
    h = gpooler(config(pg, tenants={"beta": with_beta(pg)}))
    mark = h.log_mark()
    fields = refused(h, "app")
    assert_fatal(fields, "28000", "no tenant", "app")
    assert "no tenant" in psycopg2_refused(h, "app")
    assert_unharmed(h)
    assert_refusal_logged(h, "28000", mark, "no tenant")


def test_default_tenant_is_used_when_none_is_given(pg, gpooler):
    h = gpooler(config(pg, tenants={"beta": with_beta(pg, default=True)}))
    assert current_user(h, "app", "secret2") == "u_trust"
    assert current_user(h, "app.acme") == "u_scram"   # a named tenant still wins
    mark = h.log_mark()
    assert_fatal(refused(h, "md5user"), "28000", "md5user", "beta")   # beta has no md5user
    assert_unharmed(h)
    assert_refusal_logged(h, "28000", mark)


def test_user_names_with_dots(pg, gpooler):
    first_last = {"password": "secret", "server_user": "u_md5", "server_password": "pw_u_md5"}
    h = gpooler(config(pg, tenants={"acme": {"users": {"first.last": first_last}},
                                    "beta": with_beta(pg, default=True)}))
    # split at the last dot: user "first.last" in tenant acme
    assert current_user(h, "first.last.acme") == "u_md5"
    # "last" is no tenant: the whole name is the user, in the default tenant beta (no such user)
    mark = h.log_mark()
    assert_fatal(refused(h, "first.last"), "28000", '"first.last"', "beta")
    # a suffix that is not a tenant id is part of the user name
    assert_fatal(refused(h, "app.nope"), "28000", '"app.nope"')
    assert_unharmed(h)
    assert_refusal_logged(h, "28000", mark, "app.nope")


def test_suffix_that_is_no_tenant_is_part_of_the_only_tenants_user_name(pg, gpooler):
    first_last = {"password": "secret", "server_user": "u_md5", "server_password": "pw_u_md5"}
    h = gpooler(config(pg, tenants={"acme": {"users": {"first.last": first_last}}}))
    assert current_user(h, "first.last") == "u_md5"
    assert current_user(h, "first.last.acme") == "u_md5"


# --------------------------------------------------------------------------------------------------
# who: unknown tenant or user, wrong password, allow_list

def test_unknown_tenant(pg, gpooler):
    h = gpooler(config(pg))
    mark = h.log_mark()
    fields = refused(h, "app", startup_params={"options": "-c tenant=nope"})
    assert_fatal(fields, "28000", '"nope"', "tenant")
    assert 'unknown tenant "nope"' in psycopg2_refused(h, "app", options="--tenant=nope")
    err = asyncpg_refused(h, "app", server_settings={"options": "-c tenant=nope"})
    assert err.sqlstate == "28000" and "nope" in str(err) and err.severity == "FATAL"
    assert_unharmed(h)
    assert_refusal_logged(h, "28000", mark, "nope")


def test_unknown_user(pg, gpooler):
    h = gpooler(config(pg))
    mark = h.log_mark()
    assert_fatal(refused(h, "nobody.acme"), "28000", '"nobody"', "acme")
    assert 'unknown user "nobody"' in psycopg2_refused(h, "nobody.acme")
    with pytest.raises(psycopg.OperationalError, match='unknown user "nobody"'):
        psycopg.connect(h.dsn("nobody.acme", "secret", connect_timeout=10))
    err = asyncpg_refused(h, "nobody.acme")
    assert isinstance(err, asyncpg.InvalidAuthorizationSpecificationError)
    assert err.sqlstate == "28000" and err.severity == "FATAL"
    assert_unharmed(h)
    assert_refusal_logged(h, "28000", mark, "nobody")


@pytest.mark.parametrize("user", ["app", "md5user", "plainuser"])
def test_wrong_password(pg, gpooler, user):
    h = gpooler(config(pg))
    mark = h.log_mark()
    login = f"{user}.acme"
    fields = refused(h, login, "wrong")
    assert_fatal(fields, "28P01", "password authentication failed", login)
    assert "password authentication failed" in psycopg2_refused(h, login, "wrong")
    assert current_user(h, login) == {"app": "u_scram", "md5user": "u_md5",
                                      "plainuser": "u_plain"}[user]
    assert_unharmed(h)
    assert_refusal_logged(h, "28P01", mark, login)


def test_wrong_password_asyncpg(pg, gpooler):
    h = gpooler(config(pg))
    err = asyncpg_refused(h, "app.acme", "wrong")
    assert isinstance(err, asyncpg.InvalidPasswordError)
    assert err.sqlstate == "28P01" and err.severity == "FATAL"
    assert_unharmed(h)


def test_allow_list_refuses_other_addresses_before_the_password(pg, gpooler):
    h = gpooler(config(pg, tenants={"acme": {"allow_list": ["10.0.0.0/8"]},
                                    "beta": with_beta(pg)}))
    mark = h.log_mark()
    fields = refused(h, "app.acme", "secret")     # the right password does not help
    assert_fatal(fields, "28000", "127.0.0.1", '"acme"')
    assert "127.0.0.1" in psycopg2_refused(h, "app.acme")
    # raw: refused at once, no password asked for
    r = Raw(h.hosts["transaction"], h.port())
    r.send(startup_packet({"user": "plainuser.acme", "database": "postgres"}))
    assert_fatal(r.expect_error_and_close(), "28000", "127.0.0.1", "acme")
    assert_unharmed(h, "app.beta", "secret2")
    assert_refusal_logged(h, "28000", mark, "127.0.0.1")


def test_allow_list_admits_listed_addresses(pg, gpooler):
    h = gpooler(config(pg, tenants={"acme": {"allow_list": ["127.0.0.1/32"]}}))
    assert current_user(h, "app.acme") == "u_scram"
    assert_unharmed(h)


@pytest.mark.skipif(not ipv6_available(), reason="no ::1 on this machine")
def test_allow_list_ipv6(pg, gpooler):
    cfg = config(pg, tenants={"acme": {"allow_list": ["::1/128"]}, "beta": with_beta(pg)})
    cfg["listen"].append({"host": "::1", "mode": "transaction"})
    h = gpooler(cfg)
    (port6,) = [port for host, port, _ in h.listeners if host == "::1"]
    with closing(psycopg2.connect(host="::1", port=port6, user="app.acme", password="secret",
                                  dbname="postgres", connect_timeout=10)) as conn:
        with conn.cursor() as cur:
            cur.execute("select current_user")
            assert cur.fetchone()[0] == "u_scram"
    mark = h.log_mark()
    assert_fatal(refused(h, "app.acme"), "28000", "127.0.0.1", "acme")
    assert_unharmed(h, "app.beta", "secret2")
    assert_refusal_logged(h, "28000", mark, "127.0.0.1")


# --------------------------------------------------------------------------------------------------
# too many: max_clients, pool_checkout_timeout

def test_max_clients(pg, gpooler):
    h = gpooler(config(pg, tenants={"acme": {"users": {"app": {"max_clients": 2}}}}))
    first = psycopg2.connect(h.dsn("app.acme", "secret"))
    second = psycopg.connect(h.dsn("app.acme", "secret"))
    try:
        refused_mark = h.log_mark()
        assert_fatal(refused(h, "app.acme"), "53300", "too many clients", "app")
        assert "too many clients" in psycopg2_refused(h, "app.acme")
        err = asyncpg_refused(h, "app.acme")
        assert err.sqlstate == "53300" and err.severity == "FATAL"
        # the limit is per (tenant, user): others are not affected; the two inside still work
        assert current_user(h, "md5user.acme") == "u_md5"
        assert second.execute("select 1").fetchone() == (1,)
        with first.cursor() as cur:
            cur.execute("select 1")
        first.rollback()
        # one leaves; once gpooler has seen it go, a new one gets in
        mark = h.log_mark()
        first.close()
        wait_line(h, "client disconnected", "user=app ", "client terminated the session",
                  since=mark)
        assert current_user(h, "app.acme") == "u_scram"
    finally:
        first.close()
        second.close()
    assert_unharmed(h)
    assert_refusal_logged(h, "53300", refused_mark, "too many clients")


def test_pool_checkout_timeout(pg, gpooler):
    h = gpooler(config(pg, tenants={"acme": {"users": {"app": {
        "pool_size": 1, "pool_checkout_timeout": 0.5}}}}))
    a = psycopg2.connect(h.dsn("app.acme", "secret"))
    # B: psycopg 3, because psycopg2 on libpq >= 14 reports a FATAL that arrives mid-session as
    # "server closed the connection unexpectedly" without its SQLSTATE (so it does against
    # Postgres itself, e.g. after pg_terminate_backend)
    b = psycopg.connect(h.dsn("app.acme", "secret"), autocommit=True)
    try:
        with a.cursor() as cur:
            cur.execute("select pg_backend_pid()")      # opens a transaction: A holds the server
            pid = cur.fetchone()[0]
        mark = h.log_mark()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            b.execute("select 1")
        elapsed = time.monotonic() - started
        assert info.value.sqlstate == "53300", (info.value.sqlstate, str(info.value))
        assert "no server connection available" in str(info.value)
        assert info.value.diag.severity == "FATAL"
        assert 0.4 <= elapsed < 3.0, elapsed
        # A was not disturbed: same server, same transaction
        with a.cursor() as cur:
            cur.execute("select pg_backend_pid(), now() = statement_timestamp()")
            assert cur.fetchone() == (pid, False)
        a.commit()
        # C gets the server A gave back
        with closing(psycopg2.connect(h.dsn("app.acme", "secret"))) as c, c.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            assert cur.fetchone()[0] == pid
    finally:
        a.close()
        b.close()
    assert_unharmed(h)
    assert "user=app " in assert_refusal_logged(h, "53300", mark)


# --------------------------------------------------------------------------------------------------
# Postgres unreachable or refusing

def test_postgres_unreachable(pg, gpooler):
    down = with_beta(pg, port=free_port())          # nothing listens there
    h = gpooler(config(pg, tenants={"down": down}))
    mark = h.log_mark()
    fields = refused(h, "app.down", "secret2")
    assert_fatal(fields, "08006", "could not connect")
    assert "could not connect" in psycopg2_refused(h, "app.down", "secret2")
    assert_unharmed(h)
    assert_refusal_logged(h, "08006", mark)


def test_wrong_server_password_is_passed_through(pg, gpooler):
    bad = {"password": "secret", "server_user": "u_scram", "server_password": "not-it"}
    h = gpooler(config(pg, tenants={"acme": {"users": {"badpw": bad}}}))
    direct = connect_error(host=pg.host, port=pg.port, user="u_scram", password="not-it")
    mark = h.log_mark()
    fields = refused(h, "badpw.acme")
    assert_fatal(fields, "28P01", "authentication", "u_scram")   # Postgres' words, its role name
    assert (fields["C"], fields["M"]) == (direct["C"], direct["M"])
    assert 'for user "u_scram"' in psycopg2_refused(h, "badpw.acme")
    assert_unharmed(h)
    assert_refusal_logged(h, "28P01", mark)


@contextmanager
def hba_trusting(pg, role: str):
    """Let `role` in by trust (so Postgres reports that it does not exist), then restore."""
    original = pg.hba
    lines = original.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("host    all          all"))
    lines[at:at] = [f"host all {role} 127.0.0.1/32 trust", f"host all {role} ::1/128 trust"]
    pg.hba = "\n".join(lines) + "\n"
    try:
        pg.reload()
        deadline = time.monotonic() + 10
        while connect_error(host=pg.host, port=pg.port, user=role, password="x")["C"] != "28000":
            assert time.monotonic() < deadline, "Postgres did not pick up the pg_hba.conf change"
            time.sleep(0.05)
        yield
    finally:
        pg.hba = original
        pg.reload()


def test_missing_server_user_is_passed_through(pg, gpooler):
    ghost = {"password": "secret", "server_user": "u_ghost", "server_password": "x"}
    h = gpooler(config(pg, tenants={"acme": {"users": {"ghost": ghost}}}))
    with hba_trusting(pg, "u_ghost"):
        direct = connect_error(host=pg.host, port=pg.port, user="u_ghost", password="x")
        mark = h.log_mark()
        fields = refused(h, "ghost.acme")
        assert_fatal(fields, "28000", "u_ghost")
        assert (fields["C"], fields["M"]) == (direct["C"], direct["M"])
        assert 'role "u_ghost" does not exist' in psycopg2_refused(h, "ghost.acme")
    assert_unharmed(h)
    assert_refusal_logged(h, "28000", mark)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_missing_database_is_passed_through(pg, gpooler, mode):
    h = gpooler(config(pg))
    mark = h.log_mark()
    fields = refused(h, "app.acme", mode=mode, dbname="nosuchdb")
    assert_fatal(fields, "3D000", '"nosuchdb"')
    assert 'database "nosuchdb" does not exist' in psycopg2_refused(h, "app.acme", dbname="nosuchdb")
    assert_unharmed(h)
    assert_refusal_logged(h, "3D000", mark)


# --------------------------------------------------------------------------------------------------
# malformed or oversized, before login

def _ssl_twice():
    return struct.pack("!II", 8, SSL_REQUEST) * 2


def _not_terminated():
    body = struct.pack("!I", PROTOCOL_V3) + b"user\0plainuser.acme"
    return struct.pack("!I", len(body) + 4) + body


def _bad_utf8():
    body = struct.pack("!I", PROTOCOL_V3) + b"user\0\xff\xfe\0\0"
    return struct.pack("!I", len(body) + 4) + body


BAD_STARTUPS = {
    "http": b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
    "garbage": struct.pack("!I", 16) + b"\xde\xad\xbe\xef" * 3,
    "length-2GB": struct.pack("!II", 0x7FFFFFFF, PROTOCOL_V3),
    "length-3": struct.pack("!I", 3),
    "protocol-2.0": struct.pack("!II", 8, 2 << 16),
    "not-terminated": _not_terminated(),
    "bad-utf8": _bad_utf8(),
    "ssl-twice": _ssl_twice(),
}


@pytest.mark.parametrize("case", list(BAD_STARTUPS))
def test_malformed_startup(pg, gpooler, case):
    h = gpooler(config(pg))
    rss_before = rss_kb(h.pid)
    mark = h.log_mark()
    r = Raw(h.hosts["transaction"], h.port())
    started = time.monotonic()
    r.send(BAD_STARTUPS[case])
    if case == "ssl-twice":
        assert r.read_byte() == b"N"
    fields = r.expect_error_and_close()
    assert time.monotonic() - started < 2.0
    assert_fatal(fields, "08P01")
    assert fields.get("M"), fields
    if case == "protocol-2.0":
        assert "2.0" in fields["M"]
    assert rss_kb(h.pid) - rss_before < 32 * 1024
    assert_unharmed(h)
    assert_refusal_logged(h, "08P01", mark)


@pytest.mark.parametrize("cut", ["header", "half"])
def test_truncated_startup(pg, gpooler, cut):
    h = gpooler(config(pg, log_level="debug"))
    packet = startup_packet({"user": "plainuser.acme", "database": "postgres"})
    mark = h.log_mark()
    r = Raw(h.hosts["transaction"], h.port())
    r.send(packet[:2] if cut == "header" else packet[: len(packet) // 2])
    r.close()
    wait_line(h, "ended before startup", since=mark)
    assert_unharmed(h)


def test_oversized_password_message(pg, gpooler):
    h = gpooler(config(pg))
    rss_before = rss_kb(h.pid)
    mark = h.log_mark()
    r = Raw(h.hosts["transaction"], h.port())
    r.send(startup_packet({"user": "plainuser.acme", "database": "postgres"}))
    r.expect(b"R")
    started = time.monotonic()
    r.send(b"p" + struct.pack("!I", 0x7FFFFFFF) + b"secret\0")
    fields = r.expect_error_and_close()
    assert time.monotonic() - started < 2.0
    assert_fatal(fields, "08P01")
    assert rss_kb(h.pid) - rss_before < 32 * 1024
    assert_unharmed(h)
    assert_refusal_logged(h, "08P01", mark)


# --------------------------------------------------------------------------------------------------
# malformed or oversized, after login

BAD_MESSAGES = {
    "unknown-type": msg(b"y", b"hello\0"),
    "type-0xff": b"\xff" + struct.pack("!I", 4),
    "length-2GB": b"Q" + struct.pack("!I", 0x7FFFFFFF) + b"select 1\0",
    "length-3": b"Q" + struct.pack("!I", 3),
}


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_malformed_message_after_login(pg, gpooler, case, mode):
    h = gpooler(config(pg))
    r = raw_plain_login(h, mode)
    assert r.query_one("select 7") == b"7"
    rss_before = rss_kb(h.pid)
    mark = h.log_mark()
    started = time.monotonic()
    r.send(BAD_MESSAGES[case])
    fields = r.expect_error_and_close()
    assert time.monotonic() - started < 2.0
    assert_fatal(fields, "08P01")
    assert rss_kb(h.pid) - rss_before < 32 * 1024
    assert_unharmed(h, "plainuser.acme")
    assert_unharmed(h)
    line = outcome_line(h, mark, "user=plainuser")
    assert " INFO " in line, line
    assert "08P01" in line, f"the log line for a client cut off with 08P01 lacks the SQLSTATE:\n{line}"


# --------------------------------------------------------------------------------------------------
# encryption requests and protocol negotiation

@pytest.mark.parametrize("requests", [[SSL_REQUEST], [GSSENC_REQUEST], [GSSENC_REQUEST, SSL_REQUEST]])
def test_encryption_requests_answered_no(pg, gpooler, requests):
    h = gpooler(config(pg))
    r = Raw(h.hosts["transaction"], h.port())
    for code in requests:
        r.send(struct.pack("!II", 8, code))
        assert r.read_byte() == b"N"
    r.send(startup_packet({"user": "plainuser.acme", "database": "postgres"}))
    assert struct.unpack("!i", r.expect(b"R")[:4])[0] == 3
    r.send(msg(b"p", b"secret\0"))
    r.read_until_ready()
    assert r.query_one("select current_user") == b"u_plain"
    r.close()
    assert_unharmed(h)


def test_libpq_sslmode(pg, gpooler):
    h = gpooler(config(pg))
    with closing(psycopg2.connect(h.dsn("app.acme", "secret", sslmode="prefer"))) as conn:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
    text = psycopg2_refused(h, "app.acme", sslmode="require")
    assert "SSL" in text
    assert_unharmed(h)


def test_negotiate_protocol_version(pg, gpooler):
    h = gpooler(config(pg))
    r = Raw(h.hosts["transaction"], h.port())
    r.send(startup_packet({"user": "plainuser.acme", "database": "postgres", "_pq_.foo": "bar"},
                          version=(3 << 16) | 2))
    body = r.expect(b"v")
    newest_minor, count = struct.unpack_from("!ii", body)
    assert newest_minor == 0
    assert count == 1 and body[8:] == b"_pq_.foo\0"
    assert struct.unpack("!i", r.expect(b"R")[:4])[0] == 3
    r.send(msg(b"p", b"secret\0"))
    r.read_until_ready()
    assert r.query_one("select 5") == b"5"
    r.close()
    assert_unharmed(h)


# --------------------------------------------------------------------------------------------------
# clients vanishing during authentication

@pytest.mark.parametrize("when", ["before-answering", "after-scram-first"])
def test_client_vanishing_during_authentication(pg, gpooler, when):
    # max_clients 1: a vanished half-login must not keep a slot
    h = gpooler(config(pg, tenants={"acme": {"users": {"app": {"max_clients": 1}}}}))
    mark = h.log_mark()
    r = Raw(h.hosts["transaction"], h.port())
    r.send(startup_packet({"user": "app.acme", "database": "postgres"}))
    body = r.expect(b"R")
    assert struct.unpack("!i", body[:4])[0] == 10 and b"SCRAM-SHA-256" in body
    if when == "after-scram-first":
        first = b"n,,n=,r=" + os.urandom(18).hex().encode()
        r.send(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
        body = r.expect(b"R")
        assert struct.unpack("!i", body[:4])[0] == 11 and body[4:].startswith(b"r=")
    r.close()
    line = outcome_line(h, mark, "user=app")
    assert "refused" not in line and " INFO " in line, line
    assert_unharmed(h)
    assert_unharmed(h)    # the one slot was not kept by the vanished client, nor by the first
