"""Process lifecycle with real clients: SIGHUP reload under load, SIGTERM, SIGINT.

Clients keep running queries in threads while the configuration changes under them; they must
never see an error unless their own user is the one that changed. Server connections are counted in
pg_stat_activity by a Postgres role of the test's own (see test_pooling.py).
"""

from __future__ import annotations

import copy
import signal
import socket
import threading
import time
import uuid

import psycopg2
import pytest

from cluster import base_config, connect_error, deep_merge
from test_admin import ADMIN_PASSWORD, show
from test_pooling import Super, connect2, fresh_role, q1, su  # noqa: F401  (fixtures)
from waiting import wait_until

PASSWORD = "secret"


# --------------------------------------------------------------------------------------------------
# helpers


def refused(h, mode: str) -> bool:
    try:
        with socket.create_connection((h.hosts[mode], h.port(mode)), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


class Load:
    """Clients running queries continuously, each on its own thread and connection.

    Every query checks its answer; any exception or wrong answer is recorded in `errors`."""

    def __init__(self, h, clients: list[tuple[str, str]], sql: str = "select %s::int, %s::text"):
        self.h = h
        self.sql = sql
        self.stop_event = threading.Event()
        self.counts = [0] * len(clients)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i, user, mode), daemon=True)
                        for i, (user, mode) in enumerate(clients)]

    def _run(self, i: int, user: str, mode: str) -> None:
        conn = None
        try:
            conn = connect2(self.h, user, mode)
            n = 0
            with conn.cursor() as cur:
                while not self.stop_event.is_set():
                    n += 1
                    if n % 5 == 0:      # now and then a transaction of several statements
                        cur.execute("begin")
                        cur.execute("select pg_backend_pid()")
                        pid = cur.fetchone()[0]
                        cur.execute("select pg_backend_pid()")
                        if cur.fetchone()[0] != pid:
                            raise AssertionError("transaction moved to another backend")
                        cur.execute("commit")
                    else:
                        cur.execute(self.sql, (i * 100000 + n, f"{user}-{n}"))
                        got = cur.fetchone()
                        if tuple(got[:2]) != (i * 100000 + n, f"{user}-{n}"):
                            raise AssertionError(f"wrong answer {got}")
                    self.counts[i] += 1
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(f"{user}/{mode} #{i}: {exc!r}")
        finally:
            if conn is not None:
                conn.close()

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        self.wait_progress(1)
        return self

    def wait_progress(self, n: int = 5, timeout: float = 15.0) -> None:
        """Wait until every client has run n more queries (proves they are all still going)."""
        target = [c + n for c in self.counts]
        wait_until(lambda: self.errors or all(c >= t for c, t in zip(self.counts, target)),
                   timeout, what=f"every client to run {n} more queries")
        assert not self.errors, self.errors

    def stop(self) -> list[str]:
        self.stop_event.set()
        for t in self.threads:
            t.join(15)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"
        return self.errors


@pytest.fixture
def loads():
    started: list[Load] = []

    def make(*args, **kw) -> Load:
        load = Load(*args, **kw)
        started.append(load)
        return load.start()

    yield make
    for load in started:
        load.stop_event.set()


STEADY = [("app.acme", "transaction"), ("app.acme", "transaction"), ("app.acme", "session"),
          ("md5user.acme", "transaction"), ("md5user.acme", "session")]


# --------------------------------------------------------------------------------------------------
# SIGHUP


def test_reload_adds_a_user(pg, gpooler, loads):
    h = gpooler(base_config(pg))
    load = loads(h, STEADY)
    err = connect_error(h.params("newbie.acme", PASSWORD))
    assert err["C"] == "28000", err

    cfg = copy.deepcopy(h.config)
    cfg["tenants"]["acme"]["users"]["newbie"] = {"password": PASSWORD, "server_user": "u_md5",
                                                 "server_password": "pw_u_md5"}
    assert h.reload(cfg) == "reloaded"
    for mode in ("transaction", "session"):       # at once, no retry
        conn = connect2(h, "newbie.acme", mode)
        try:
            assert q1(conn, "select current_user") == "u_md5"
        finally:
            conn.close()
    load.wait_progress()
    assert load.stop() == []


def test_reload_removes_a_user(pg, gpooler, loads):
    h = gpooler(base_config(pg))
    conn = connect2(h, "trustuser.acme")
    assert q1(conn, "select current_user") == "u_trust"
    conn.close()
    load = loads(h, STEADY)

    cfg = copy.deepcopy(h.config)
    del cfg["tenants"]["acme"]["users"]["trustuser"]
    assert h.reload(cfg) == "reloaded"
    for mode in ("transaction", "session"):
        err = connect_error(h.params("trustuser.acme", PASSWORD, mode=mode))
        assert err["C"] == "28000", err
        assert "trustuser" in err["M"]
    load.wait_progress()
    # the users that stayed can still log in, and the running clients never noticed
    conn = connect2(h, "md5user.acme")
    assert q1(conn, "select current_user") == "u_md5"
    conn.close()
    assert load.stop() == []


def test_a_client_waiting_on_a_removed_pool_still_times_out(pg, gpooler):
    """A reload removes the user while one of its clients waits for the pool's only connection:
    the wait still ends at pool_checkout_timeout (53300), not when the holder lets go."""
    cfg = base_config(pg, admin={"host": "127.0.0.1", "users": {"admin": ADMIN_PASSWORD}})
    cfg["tenants"]["acme"]["users"]["trustuser"].update(pool_size=1, pool_checkout_timeout=2)
    h = gpooler(cfg)
    holder = connect2(h, "trustuser.acme", autocommit=False)
    q1(holder, "select 1")  # a transaction is open: the connection stays with it
    waiter = connect2(h, "trustuser.acme")
    failures: list[Exception] = []

    def wait_for_the_pool():
        try:
            q1(waiter, "select 1")
        except psycopg2.Error as exc:
            failures.append(exc)

    thread = threading.Thread(target=wait_for_the_pool, daemon=True)
    thread.start()
    wait_until(lambda: any(row["cl_waiting"] == "1" for row in show(h, "POOLS")), 10,
               "the second client to wait for the pool")
    removed = copy.deepcopy(h.config)
    del removed["tenants"]["acme"]["users"]["trustuser"]
    assert h.reload(removed) == "reloaded"
    thread.join(10)
    assert not thread.is_alive(), "the waiting client was never answered"
    assert failures, "the waiting client got an answer instead of an error"
    # libpq reports a FATAL that ends a query as a closed connection, as it does from Postgres
    h.wait_log("reason=refused: 53300 no server connection available within 2s")
    holder.rollback()
    holder.close()


def test_a_removed_pool_keeps_no_connection_open(pg, gpooler, su):
    """A client of a removed user goes on, on connections that are closed as they come back."""
    h = gpooler(base_config(pg))
    conn = connect2(h, "trustuser.acme")
    assert q1(conn, "select 1") == 1
    removed = copy.deepcopy(h.config)
    del removed["tenants"]["acme"]["users"]["trustuser"]
    assert h.reload(removed) == "reloaded"
    assert q1(conn, "select current_user") == "u_trust"  # on a connection opened after the reload
    conn.close()
    wait_until(lambda: su.backends("u_trust") == 0, 10,
               "the removed pool's server connections to close")


def test_reload_changes_pool_size(pg, gpooler, loads, su, fresh_role):
    role, pw = fresh_role("sz")
    cfg = deep_merge(base_config(pg), {"tenants": {"acme": {"users": {
        "sz": {"password": PASSWORD, "server_user": role, "server_password": pw,
               "pool_size": 5}}}}})
    h = gpooler(cfg)
    busy = loads(h, [("sz.acme", "transaction")] * 10,
                 sql="select %s::int, %s::text, pg_sleep(0.005)")
    steady = loads(h, STEADY)
    wait_until(lambda: su.backends(role) == 5, what="the pool to grow to 5")

    def observe(limit: int) -> list[int]:
        """Sample the server connections while every client runs more queries."""
        samples = []
        target = [c + 10 for c in busy.counts]
        while not all(c >= t for c, t in zip(busy.counts, target)):
            assert not busy.errors, busy.errors
            samples.append(su.backends(role))
            assert samples[-1] <= limit, f"{samples[-1]} server connections, limit {limit}"
            time.sleep(0.01)
        return samples

    cfg = copy.deepcopy(h.config)
    cfg["tenants"]["acme"]["users"]["sz"]["pool_size"] = 2
    assert h.reload(cfg) == "reloaded"
    wait_until(lambda: su.backends(role) <= 2, what="the pool to shrink to 2")
    samples = observe(2)
    assert max(samples) == 2

    cfg["tenants"]["acme"]["users"]["sz"]["pool_size"] = 4
    assert h.reload(cfg) == "reloaded"
    wait_until(lambda: su.backends(role) == 4, what="the pool to grow to 4")
    observe(4)

    steady.wait_progress()
    assert busy.stop() == []
    assert steady.stop() == []


def test_reload_with_a_broken_file_keeps_the_old_config(pg, gpooler, loads):
    h = gpooler(base_config(pg))
    load = loads(h, STEADY)
    original = copy.deepcopy(h.config)

    with open(h.config_path, "w") as f:
        f.write("listen: [\n  - {host: 127.0.0.1, port: \ntenants: {{{\n")
    assert h.reload() == "failed"          # a new "configuration reload failed" line
    assert "Traceback" not in h.log()

    # a file that parses but is not valid fails the same way
    invalid = copy.deepcopy(h.config)
    invalid["tenants"]["acme"]["users"]["app"]["pool_size"] = 0
    del invalid["tenants"]["acme"]["users"]["trustuser"]
    assert h.reload(invalid) == "failed"

    for user, mode in [("app.acme", "transaction"), ("trustuser.acme", "session"),
                       ("plainuser.acme", "transaction")]:
        conn = connect2(h, user, mode)         # the old configuration still serves everyone
        try:
            assert q1(conn, "select 1") == 1
        finally:
            conn.close()
    load.wait_progress()

    assert h.reload(original) == "reloaded"    # and a good file is taken again afterwards
    load.wait_progress()
    assert load.stop() == []


# --------------------------------------------------------------------------------------------------
# SIGTERM


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_sigterm_lets_a_transaction_finish(pg, gpooler, su, fresh_role, mode):
    role, pw = fresh_role("term")
    cfg = deep_merge(base_config(pg, shutdown_timeout=20), {"tenants": {"acme": {"users": {
        "term": {"password": PASSWORD, "server_user": role, "server_password": pw}}}}})
    h = gpooler(cfg)
    table = f"term_{uuid.uuid4().hex[:8]}"
    setup = connect2(h, "term.acme", dbname="app")
    q1(setup, f"create table {table} (x int); select 1")
    setup.close()

    idle = connect2(h, "term.acme", mode, dbname="app")
    assert q1(idle, "select 1") == 1
    tx = connect2(h, "term.acme", mode, dbname="app", autocommit=False)
    with tx.cursor() as cur:
        cur.execute(f"insert into {table} values (1)")

    h.signal(signal.SIGTERM)
    h.wait_log("shutting down")
    wait_until(lambda: refused(h, "transaction") and refused(h, "session"), timeout=5,
               what="the listeners to close")
    assert h.proc.poll() is None, "gpooler exited with a transaction still running"

    # the idle client is sent away; the one in a transaction finishes it
    with pytest.raises(psycopg2.OperationalError):
        q1(idle, "select 1")
    with tx.cursor() as cur:
        cur.execute(f"insert into {table} values (2)")
        cur.execute(f"select count(*) from {table}")
        assert cur.fetchone()[0] == 2
    committed_at = time.monotonic()
    tx.commit()
    rc = h.proc.wait(10)
    assert rc == 0
    assert time.monotonic() - committed_at < 5      # not the 20 s shutdown_timeout
    with pytest.raises(psycopg2.OperationalError):
        q1(tx, "select 1")
    tx.close()
    idle.close()
    app = Super(pg, "app")
    try:
        assert app.one(f"select count(*) from {table}") == 2
        app.one(f"drop table {table}")
    finally:
        app.close()
    assert "Traceback" not in h.log()


def test_sigterm_timeout_closes_what_is_left(pg, gpooler, su, fresh_role):
    role, pw = fresh_role("tout")
    cfg = deep_merge(base_config(pg, shutdown_timeout=1.5), {"tenants": {"acme": {"users": {
        "tout": {"password": PASSWORD, "server_user": role, "server_password": pw}}}}})
    h = gpooler(cfg)
    table = f"tout_{uuid.uuid4().hex[:8]}"
    setup = connect2(h, "tout.acme", dbname="app")
    q1(setup, f"create table {table} (x int); select 1")
    setup.close()

    tx = connect2(h, "tout.acme", dbname="app", autocommit=False)
    with tx.cursor() as cur:
        cur.execute(f"insert into {table} values (1)")
    started = time.monotonic()
    rc = h.terminate(timeout=15)           # the transaction never ends
    elapsed = time.monotonic() - started
    assert rc == 0
    assert 1.0 <= elapsed < 6, f"exited after {elapsed:.1f}s with shutdown_timeout 1.5"
    with pytest.raises(psycopg2.OperationalError):
        with tx.cursor() as cur:
            cur.execute("select 1")
    tx.close()
    wait_until(lambda: su.backends(role) == 0, what="the server connections to close")
    app = Super(pg, "app")
    try:
        assert app.one(f"select count(*) from {table}") == 0
        app.one(f"drop table {table}")
    finally:
        app.close()


# --------------------------------------------------------------------------------------------------
# SIGINT


def test_sigint_closes_everything_promptly(pg, gpooler, su, fresh_role):
    role, pw = fresh_role("intr")
    cfg = deep_merge(base_config(pg, shutdown_timeout=30), {"tenants": {"acme": {"users": {
        "intr": {"password": PASSWORD, "server_user": role, "server_password": pw}}}}})
    h = gpooler(cfg)
    idle = connect2(h, "intr.acme")
    assert q1(idle, "select 1") == 1
    tx = connect2(h, "intr.acme", "session", autocommit=False)
    assert q1(tx, "select 2") == 2                  # a transaction is open
    sleeper = connect2(h, "intr.acme")
    outcome: dict = {}

    def sleep():
        try:
            q1(sleeper, "select pg_sleep(10)")
            outcome["result"] = "completed"
        except BaseException as exc:  # noqa: BLE001
            outcome["result"] = exc
        outcome["at"] = time.monotonic()

    t = threading.Thread(target=sleep, daemon=True)
    t.start()
    wait_until(lambda: su.one("select count(*) from pg_stat_activity where usename = %s "
                              "and state = 'active' and query = 'select pg_sleep(10)'", (role,)),
               what="the sleep to run")
    started = time.monotonic()
    h.interrupt(timeout=5)
    assert time.monotonic() - started < 3, "SIGINT did not exit promptly"
    t.join(5)
    assert not t.is_alive(), "the client in a query was not told its connection closed"
    assert isinstance(outcome["result"], psycopg2.OperationalError), outcome
    assert outcome["at"] - started < 3
    for conn in (idle, tx):
        with pytest.raises(psycopg2.OperationalError):
            q1(conn, "select 1")
        conn.close()
    sleeper.close()
    assert "Traceback" not in h.log()
