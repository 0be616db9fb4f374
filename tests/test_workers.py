"""Several worker processes on the same ports: traffic, cancel across workers, reload, stop."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg2
import pytest

from cluster import base_config

PASSWORD = "secret"


def worker_pids(master_pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == master_pid:
                        children.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return children


@pytest.fixture
def two_workers(pg, gpooler):
    h = gpooler(base_config(pg, workers=2, log_level="debug"))
    h.wait_log("worker 1 of 2 ready")
    h.wait_log("worker 2 of 2 ready", since=0)
    return h


def running(pg, sql: str) -> bool:
    conn = psycopg2.connect(pg.dsn())
    try:
        with conn.cursor() as cur:
            cur.execute("select count(*) from pg_stat_activity where state = 'active' and query = %s",
                        (sql,))
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


def test_both_workers_serve_and_cancel_finds_its_worker(pg, two_workers):
    h = two_workers
    assert len(worker_pids(h.pid)) == 2
    sql = "select pg_sleep(10)"
    # The kernel spreads connections over the workers, so a cancel request often arrives at the
    # worker that did not issue its key and must be passed on; try until that has happened.
    for attempt in range(40):
        if attempt >= 2 and "passing a cancel request to worker" in h.log():
            break
        mode = ("transaction", "session")[attempt % 2]
        conn = psycopg2.connect(h.dsn("app.acme", PASSWORD, mode=mode))
        conn.autocommit = True

        def cancel_when_running():
            deadline = time.monotonic() + 10
            while not running(pg, sql) and time.monotonic() < deadline:
                time.sleep(0.01)
            conn.cancel()

        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute(sql)
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
        canceller.join()
        conn.close()
    assert "passing a cancel request to worker" in h.log()


def test_reload_reaches_every_worker_and_sigterm_stops_them(pg, two_workers):
    h = two_workers
    cfg = base_config(pg, workers=2, log_level="debug")
    cfg["tenants"]["acme"]["users"]["newbie"] = {"password": PASSWORD, "server_user": "u_trust"}
    h.write_config(cfg)
    mark = h.log_mark()
    h.signal(signal.SIGHUP)
    h.wait_log("configuration reloaded", since=mark)
    h.wait_log("configuration reloaded")
    for _ in range(6):  # new connections are spread over both workers
        conn = psycopg2.connect(h.dsn("newbie.acme", PASSWORD))
        with conn.cursor() as cur:
            cur.execute("select current_user")
            assert cur.fetchone() == ("u_trust",)
        conn.close()
    assert h.terminate() == 0
    assert worker_pids(h.pid) == set()


def test_a_dead_worker_is_replaced(two_workers):
    h = two_workers
    victim = min(worker_pids(h.pid))
    os.kill(victim, 9)
    h.wait_log("starting a new one")
    h.wait_log("ready")
    deadline = time.monotonic() + 10
    while len(worker_pids(h.pid)) != 2 or victim in worker_pids(h.pid):
        assert time.monotonic() < deadline, "the worker was not replaced"
        time.sleep(0.05)
    conn = psycopg2.connect(h.dsn("app.acme", PASSWORD))
    conn.close()
