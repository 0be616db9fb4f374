"""Liveness, driven by the janitor loop: client timeouts, heartbeats, server lifetime and warm pools."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time

import psycopg
import psycopg2
import pytest

from cluster import base_config
from netns import namespace
from waiting import wait_until

PASSWORD = "secret"


def backends(pg, role: str = "u_scram") -> list[int]:
    conn = psycopg2.connect(pg.dsn())
    try:
        with conn.cursor() as cur:
            cur.execute("select pid from pg_stat_activity where usename = %s "
                        "and backend_type = 'client backend' order by pid", (role,))
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def wait_event(pg, pid: int) -> str | None:
    """What server process `pid` waits for, as pg_stat_activity says (ClientWrite, ...)."""
    conn = psycopg2.connect(pg.dsn())
    try:
        with conn.cursor() as cur:
            cur.execute("select wait_event from pg_stat_activity where pid = %s", (pid,))
            return cur.fetchone()[0]
    finally:
        conn.close()


def config(pg, **user) -> dict:
    cfg = base_config(pg)
    cfg["tenants"]["acme"]["users"]["app"].update(user)
    return cfg


def fatal_of(conn: psycopg.Connection) -> psycopg.Error:
    """The FATAL gpooler sent before closing: the next statement reports it."""
    with pytest.raises(psycopg.Error) as failure:
        conn.execute("select 1")
    return failure.value


def test_client_idle_timeout(pg, gpooler):
    h = gpooler(config(pg, client_idle_timeout=0.5))
    conn = psycopg.connect(h.dsn("app.acme", PASSWORD), autocommit=True)
    conn.execute("select 1")
    h.wait_log("reason=idle timeout")
    assert "idle-session timeout" in str(fatal_of(conn))
    # a busy client is not idle: a statement longer than the timeout is fine
    busy = psycopg.connect(h.dsn("app.acme", PASSWORD), autocommit=True)
    assert busy.execute("select pg_sleep(1), 7").fetchone()[1] == 7
    busy.close()


def test_idle_in_transaction_timeout(pg, gpooler):
    pg.psql("create table if not exists liveness_t (x int); grant all on liveness_t to u_scram")
    h = gpooler(config(pg, idle_transaction_timeout=0.5, pool_size=1))
    conn = psycopg.connect(h.dsn("app.acme", PASSWORD))
    conn.execute("insert into liveness_t values (42)")
    h.wait_log("reason=idle in transaction timeout")
    assert "idle-in-transaction timeout" in str(fatal_of(conn))
    # rolled back, and the only server connection serves the next client at once
    other = psycopg.connect(h.dsn("app.acme", PASSWORD), autocommit=True)
    assert other.execute("select count(*) from liveness_t where x = 42").fetchone() == (0,)
    other.close()


def test_query_timeout_cancels_the_statement_only(pg, gpooler):
    h = gpooler(config(pg, query_timeout=0.5))
    for mode in ("transaction", "session"):
        conn = psycopg2.connect(h.dsn("app.acme", PASSWORD, mode=mode))
        conn.autocommit = True
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("select pg_sleep(10)")
            cur.execute("select 5")
            assert cur.fetchone() == (5,)
        conn.close()


def test_server_lifetime_rotates_under_load_without_errors(pg, gpooler):
    h = gpooler(config(pg, server_lifetime=0.3, pool_size=2))
    seen: set[int] = set()
    errors: list[str] = []

    def work():
        try:
            conn = psycopg2.connect(h.dsn("app.acme", PASSWORD))
            conn.autocommit = True
            with conn.cursor() as cur:
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    cur.execute("select pg_backend_pid()")
                    seen.add(cur.fetchone()[0])
            conn.close()
        except psycopg2.Error as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(seen) > 2, "server connections were not replaced when they got old"


def test_min_pool_size_and_server_idle_timeout(pg, gpooler):
    h = gpooler(config(pg, min_pool_size=2, server_idle_timeout=0.5, pool_size=5))
    conns = [psycopg2.connect(h.dsn("app.acme", PASSWORD)) for _ in range(4)]
    for conn in conns:  # four transactions at once: four server connections
        conn.cursor().execute("select 1")
    assert len(backends(pg)) == 4
    for conn in conns:
        conn.commit()
    # idle beyond server_idle_timeout: back down to min_pool_size, not below
    wait_until(lambda: len(backends(pg)) == 2, 10, "the pool to shrink to min_pool_size")
    for conn in conns:
        conn.close()


def test_min_pool_size_is_kept_warm(pg, gpooler):
    h = gpooler(config(pg, min_pool_size=3, pool_size=5))
    conn = psycopg2.connect(h.dsn("app.acme", PASSWORD))  # the pool exists from the first login
    wait_until(lambda: len(backends(pg)) == 3, 10, "min_pool_size connections")
    conn.close()


def test_heartbeat_reaches_idle_clients(pg, gpooler):
    """An idle client receives a ParameterStatus it can ignore: a write that fails within
    TCP_USER_TIMEOUT when the client has vanished without a word."""
    cfg = config(pg, client_heartbeat_interval=0.3, auth_type="plain")
    h = gpooler(cfg)
    sock = socket.create_connection(("127.0.0.1", h.port()))
    params = b"user\0app.acme\0database\0postgres\0\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    received = b""
    while b"R\0\0\0\x08\0\0\0\x03" not in received:
        received += sock.recv(4096)
    sock.sendall(b"p" + struct.pack("!i", 4 + len(PASSWORD) + 1) + PASSWORD.encode() + b"\0")
    sock.settimeout(10)
    received = b""
    while b"gpooler.heartbeat" not in received:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before a heartbeat"
        received += chunk
    sock.close()


# A client in a network namespace: it logs in, takes the server connection and prints its pid.
# Then it idles (in session mode), idles inside a transaction (in transaction mode), or stalls in
# the middle of a large COPY result, having announced it, until the test cuts its link.
ZOMBIE = """
import sys, psycopg2
dsn, how = sys.argv[1:]
conn = psycopg2.connect(dsn)
conn.autocommit = how != "in_transaction"
cur = conn.cursor()
cur.execute("select pg_backend_pid()")
print(cur.fetchone()[0], flush=True)

class Stall:
    def write(self, data):
        print("stalled", flush=True)
        sys.stdin.read()

if how == "stalled":
    cur.copy_expert("copy (select repeat('x', 1000) from generate_series(1, 1000000)) to stdout",
                    Stall())
sys.stdin.read()
"""
HEARTBEAT_INTERVAL = 1.0


@pytest.fixture
def netns():
    with namespace() as ns:
        yield ns


@pytest.mark.parametrize("how, mode", [("idle", "session"), ("in_transaction", "transaction"),
                                       ("stalled", "session")])
def test_zombie_client_is_dropped_and_its_slot_returns(pg, gpooler, netns, how, mode):
    """A client that vanishes without a FIN (its link cut: no ACK, no reset) while holding the
    pool's only server connection is dropped within about two heartbeat intervals, and the next
    client gets the slot. Idle in session mode, heartbeats and TCP keepalive go unanswered; idle
    in a transaction, only keepalive; stalled mid-result, gpooler's send to it waits on a full
    buffer, and only TCP_USER_TIMEOUT ends the wait."""
    cfg = config(pg, client_heartbeat_interval=HEARTBEAT_INTERVAL, pool_size=1,
                 pool_checkout_timeout=3)
    cfg["listen"] = [{"host": netns.host_addr, "mode": mode}]
    h = gpooler(cfg)
    zombie = netns.popen([sys.executable, "-c", ZOMBIE,
                          h.dsn("app.acme", PASSWORD, mode=mode, connect_timeout=5), how],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = zombie.stdout.readline().strip()
        assert server_pid.isdigit(), "the client in the namespace did not get a server connection"
        h.wait_log(f"client connected: tenant=acme user=app addr={netns.peer_addr}:")
        if how == "stalled":  # wait until Postgres cannot write because gpooler cannot send
            assert zombie.stdout.readline() == "stalled\n"
            wait_until(lambda: wait_event(pg, int(server_pid)) == "ClientWrite", 10,
                       "the server connection to block on the stalled client")
        else:  # else a reply not yet acknowledged would be retransmitted and time out by itself
            wait_until(lambda: netns.unacked() == 0, 5, "the client to acknowledge all it got")
        netns.cut()
        line = h.wait_log(f"client disconnected: tenant=acme user=app addr={netns.peer_addr}:",
                          timeout=3 * HEARTBEAT_INTERVAL)
        reasons = ["connection error: Connection timed out"]
        if how == "stalled":  # the blocked send may notice first
            reasons.append("client connection lost")
        assert line.split(" reason=")[1] in reasons
        other = psycopg2.connect(h.dsn("app.acme", PASSWORD, mode=mode, connect_timeout=5))
        with other.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            if how != "stalled":  # a connection left mid-result is closed, not handed on
                assert cur.fetchone() == (int(server_pid),), "the zombie's server connection was lost"
        other.close()
    finally:
        zombie.kill()
        zombie.wait()
