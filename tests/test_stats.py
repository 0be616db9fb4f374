"""StatsD: metric names, and what gpooler pushes for known traffic.

One test listens with a plain UDP socket and checks names and exact counts; one runs the real
StatsD daemon (the `statsd` npm package, with a tiny backend that prints each flush as JSON) and
checks that it parses every line gpooler sends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import defaultdict

import psycopg2
import pytest

from cluster import base_config, connect_error, free_port
from gpooler import protocol as p
from gpooler.stats import metric, sanitize

TIMEOUT = 10.0


def test_names_are_safe_for_graphite():
    assert sanitize("first.last") == "first_last"
    assert sanitize("a b/c:d|e@f") == "a_b_c_d_e_f"
    assert sanitize("Ok-name_1") == "Ok-name_1"
    assert sanitize("") == "_"
    assert metric("gp", "acme", "first.last", "queries") == "gp.acme.first_last.queries"
    assert metric("prod.gp", "t+1", "u", "refused", "28P01") == "prod.gp.t_1.u.refused.28P01"
    assert metric("", "clients") == "clients"


class Collector:
    """A UDP socket playing StatsD: collects `name:value|type` lines from a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.lines: list[tuple[str, float, str]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                with self._lock:
                    self.raw.append(line)
                    self.lines.append((name, float(value), kind))

    def counter(self, name: str) -> float:
        with self._lock:
            return sum(v for n, v, k in self.lines if n == name and k == "c")

    def values(self, name: str, kind: str) -> list[float]:
        with self._lock:
            return [v for n, v, k in self.lines if n == name and k == kind]

    def wait(self, predicate, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                with self._lock:
                    seen = sorted({n for n, _, _ in self.lines})
                pytest.fail(f"statsd: timed out waiting for {what}; names seen: {seen}")
            time.sleep(0.02)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def stats_config(pg, port: int) -> dict:
    cfg = base_config(pg, statsd={"host": "127.0.0.1", "port": port, "prefix": "gp",
                                  "interval": 0.2})
    cfg["tenants"]["acme"]["users"]["first.last"] = {"password": "secret",
                                                      "server_user": "u_trust", "pool_size": 1}
    return cfg


def test_counters_gauges_and_timers_for_known_traffic(pg, gpooler):
    udp = Collector()
    try:
        h = gpooler(stats_config(pg, udp.port))
        m = "gp.acme.first_last."
        conn = psycopg2.connect(h.dsn("first.last.acme", "secret", connect_timeout=10))
        conn.autocommit = True
        sent = 0
        with conn.cursor() as cur:
            for i in range(10):
                cur.execute(f"select {i}")
                sent += len(p.query(f"select {i}"))
            for sql in ("begin", "select 1", "commit"):     # one transaction, three queries
                cur.execute(sql)
                sent += len(p.query(sql))
        # the client is connected and idle: one active client, no one waiting
        udp.wait(lambda: 1.0 in udp.values(m + "cl_active", "g"), "cl_active 1")
        conn.close()
        sent += len(p.TERMINATE_MESSAGE)

        udp.wait(lambda: udp.counter(m + "queries") >= 13, "13 queries")
        udp.wait(lambda: udp.counter(m + "bytes_in") >= sent, f"{sent} bytes in")
        assert udp.counter(m + "queries") == 13
        assert udp.counter(m + "transactions") == 11
        assert udp.counter(m + "bytes_in") == sent
        assert udp.counter(m + "bytes_out") > 13 * len(p.ready_for_query())
        assert udp.counter(m + "logins_ok") == 1 and udp.counter("gp.logins_ok") == 1
        for timer in ("query_time", "xact_time", "wait_time"):
            values = udp.values(m + timer, "ms")
            assert values and all(0 <= v < 5000 for v in values), (timer, values)
        assert 1.0 in udp.values("gp.tenants", "g")
        assert udp.values("gp.clients", "g")

        # refusals: by SQLSTATE, per user when the user is known, and in the daemon-wide totals
        assert connect_error(h.params("first.last.acme", "wrong"))["C"] == "28P01"
        assert connect_error(h.params("nobody.acme", "secret"))["C"] == "28000"
        udp.wait(lambda: udp.counter("gp.refused.28000") == 1
                 and udp.counter(m + "refused.28P01") == 1, "the refusals")
        assert udp.counter(m + "logins_failed") == 1
        assert udp.counter("gp.logins_failed") == 2 and udp.counter("gp.refused.28P01") == 1

        # pool_size 1: a second client waits while the first holds a transaction
        holder = psycopg2.connect(h.dsn("first.last.acme", "secret", connect_timeout=10))
        waiter = psycopg2.connect(h.dsn("first.last.acme", "secret", connect_timeout=10))
        waiter.autocommit = True
        holder.cursor().execute("select 1")           # psycopg2 opened a transaction: held
        done = threading.Event()

        def wait_for_server():
            waiter.cursor().execute("select 2")
            done.set()

        thread = threading.Thread(target=wait_for_server, daemon=True)
        thread.start()
        udp.wait(lambda: 1.0 in udp.values(m + "cl_waiting", "g")
                 and any(v > 0 for v in udp.values(m + "maxwait", "g")), "a waiting client")
        assert 1.0 in udp.values(m + "sv_active", "g")
        assert not done.is_set()
        holder.commit()
        assert done.wait(TIMEOUT)
        holder.close()
        waiter.close()
        assert all(":" in line and "|" in line for line in udp.raw)
    finally:
        udp.close()


JSON_BACKEND = """
exports.init = function (startupTime, config, events) {
  events.on('flush', function (timestamp, metrics) {
    process.stdout.write(JSON.stringify({counters: metrics.counters, gauges: metrics.gauges,
                                         timers: metrics.timers}) + '\\n');
  });
  return true;
};
"""


@pytest.fixture(scope="module")
def statsd_daemon_dir():
    """The `statsd` npm package installed into a temporary directory."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are needed to run the real StatsD daemon (npm package statsd)")
    tmp = tempfile.mkdtemp(prefix="gpooler-statsd-")
    try:
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                               "statsd@0.9"], cwd=tmp, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.skip(f"npm install statsd failed (no registry access?): {done.stderr[-500:]}")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_real_statsd_daemon_parses_every_line(pg, gpooler, statsd_daemon_dir):
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:   # free for UDP too
        probe.bind(("127.0.0.1", port))
    backend = os.path.join(statsd_daemon_dir, "json_backend.js")
    with open(backend, "w") as f:
        f.write(JSON_BACKEND)
    config = os.path.join(statsd_daemon_dir, "config.js")
    with open(config, "w") as f:
        f.write(json.dumps({"address": "127.0.0.1", "port": port, "mgmt_address": "127.0.0.1",
                            "mgmt_port": free_port(), "flushInterval": 300,
                            "backends": [backend]}))
    node = subprocess.Popen(["node", "node_modules/statsd/bin/statsd", config],
                            cwd=statsd_daemon_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    flushes: list[dict] = []
    other: list[str] = []

    def read():
        for line in node.stdout:
            if line.startswith("{"):
                flushes.append(json.loads(line))
            else:
                other.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not flushes:                       # statsd is up once it flushes
            assert node.poll() is None, "".join(other)
            assert time.monotonic() < deadline, "statsd never flushed:\n" + "".join(other)
            time.sleep(0.02)
        h = gpooler(stats_config(pg, port))
        conn = psycopg2.connect(h.dsn("app.acme", "secret", connect_timeout=10))
        conn.autocommit = True
        with conn.cursor() as cur:
            for i in range(7):
                cur.execute(f"select {i}")
        conn.close()
        assert connect_error(h.params("app.acme", "wrong"))["C"] == "28P01"

        def total(kind: str, name: str) -> float:
            return sum(f[kind].get(name, 0) for f in list(flushes))

        deadline = time.monotonic() + TIMEOUT
        while not (total("counters", "gp.acme.app.queries") >= 7
                   and total("counters", "gp.acme.app.refused.28P01") >= 1):
            assert time.monotonic() < deadline, f"statsd saw: {flushes[-1] if flushes else None}"
            time.sleep(0.05)
        last = flushes[-1]
        assert total("counters", "gp.acme.app.queries") == 7
        assert total("counters", "gp.acme.app.transactions") == 7
        assert total("counters", "gp.logins_ok") == 1
        assert "statsd.bad_lines_seen" in last["counters"]
        assert total("counters", "statsd.bad_lines_seen") == 0, "statsd rejected some lines"
        assert last["gauges"]["gp.tenants"] == 1
        assert "gp.acme.app.sv_idle" in last["gauges"] and "gp.acme.app.maxwait" in last["gauges"]
        timers = defaultdict(list)
        for f in flushes:
            for name, values in f["timers"].items():
                timers[name] += values
        assert timers["gp.acme.app.query_time"], sorted(timers)
    finally:
        node.terminate()
        node.wait(10)
        reader.join(2)


def test_gauges_name_the_worker_and_a_new_pusher_starts_from_now():
    """Unit test of Pusher.collect on a stand-in daemon: with workers > 1 each gauge gets the
    worker as its last part (they would overwrite each other), counters do not (StatsD adds
    them up); a pusher started later (statsd: changed on reload) sends no old counts."""
    from types import SimpleNamespace

    from gpooler.config import StatsdConfig
    from gpooler.daemon import WorkerSlot
    from gpooler.pool import Pool, Target
    from gpooler.stats import Pusher, Stats

    pool = Pool("app.acme/db", Target("h", 1, "u", None, "db"), 5, 10)
    daemon = SimpleNamespace(pools={("acme", "app", "db"): pool}, worker=WorkerSlot(1, 3),
                             cancel_keys=SimpleNamespace(clients=lambda: []),
                             config=SimpleNamespace(tenants={"acme": None}))
    daemon.stats = Stats(daemon)
    pool.stats.query_count = 5
    daemon.stats.logins_ok = 2
    config = StatsdConfig("127.0.0.1", 8125, "gp", 1.0)
    pusher = Pusher(daemon, config)
    pool.stats.query_count += 3
    lines = {name: (value, kind) for name, value, kind in pusher.collect()}
    assert lines["gp.acme.app.queries"] == (3, "c")
    assert "gp.logins_ok" not in lines            # nothing new since the pusher started
    assert lines["gp.acme.app.cl_active.w2"] == (0, "g")
    assert lines["gp.clients.w2"] == (0, "g") and lines["gp.tenants.w2"] == (1, "g")
    assert not any(kind == "g" and not name.endswith(".w2") for name, (_, kind) in lines.items())
    assert "gp.acme.app.queries" in lines and "gp.acme.app.queries.w2" not in lines
