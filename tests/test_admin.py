"""The admin console through real psql: every command, its columns and its effect, and who is let in.

psql runs as a subprocess (PGPASSWORD, --csv) against `admin:` of a gpooler started by the fixture.
Waiting is on conditions with deadlines (SHOW output, log lines, process exit), never on a sleep.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import threading

import psycopg2
import pytest
from scramp import ScramMechanism

from cluster import base_config, connect_error, deep_merge
from gpooler import __version__
from waiting import wait_until

ADMIN_PASSWORD = "Adm1n-console-pw"
TIMEOUT = 10.0


def admin_config(pg, **overrides) -> dict:
    beta = {"host": pg.host, "port": pg.port, "database": "postgres",
            "users": {"app": {"password": "secret", "server_user": "u_trust"}}}
    cfg = base_config(pg, admin={"host": "127.0.0.1", "users": {"admin": ADMIN_PASSWORD}})
    cfg["tenants"]["beta"] = beta
    return deep_merge(cfg, overrides)


def psql(h, *commands: str, user: str = "admin", password: str = ADMIN_PASSWORD,
         dbname: str = "gpooler", check: bool = True) -> subprocess.CompletedProcess:
    args = ["psql", "-X", "--csv", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1",
            "-p", str(h.admin_port), "-U", user, "-d", dbname]
    for command in commands:
        args += ["-c", command]
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="10")
    env.pop("PGSERVICE", None)
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)
    if check:
        assert done.returncode == 0, f"psql {commands} failed:\n{done.stderr}"
    return done


def show(h, what: str) -> list[dict]:
    """SHOW <what> as a list of rows keyed by column name."""
    return list(csv.DictReader(io.StringIO(psql(h, f"SHOW {what}").stdout)))


def connect(h, user="app.acme", mode="transaction", **kw):
    conn = psycopg2.connect(h.dsn(user, "secret", mode=mode, connect_timeout=10, **kw))
    conn.autocommit = True
    return conn


def one(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def pools_of(h, tenant: str) -> list[dict]:
    return [r for r in show(h, "POOLS") if r["tenant"] == tenant]


# --------------------------------------------------------------------------------------------------


def test_show_commands_describe_pools_clients_servers_and_stats(pg, gpooler):
    h = gpooler(admin_config(pg))
    txn = connect(h, application_name="adm_txn")
    sess = connect(h, mode="session", application_name="adm_sess")
    try:
        for i in range(3):
            assert one(txn, f"select {i}") == i
        session_pid = one(sess, "select pg_backend_pid()")
        assert one(sess, "select 1") == 1

        pools = show(h, "POOLS")
        assert [(r["tenant"], r["user"], r["database"]) for r in pools] == [("acme", "app", "postgres")]
        pool = pools[0]
        assert list(pool)[:12] == ["database", "user", "cl_active", "cl_waiting", "sv_active",
                                   "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait",
                                   "maxwait_us", "pool_mode"]
        assert (pool["cl_active"], pool["cl_waiting"]) == ("2", "0")
        assert pool["sv_active"] == "1"          # the session client holds one
        assert int(pool["sv_idle"]) >= 1          # the transaction client's went back
        assert pool["pool_mode"] == "session,transaction"
        assert (pool["maxwait"], pool["maxwait_us"]) == ("0", "0")

        clients = show(h, "CLIENTS")
        by_app = {c["application_name"]: c for c in clients}
        assert set(by_app) == {"adm_txn", "adm_sess"}
        for name, mode in (("adm_txn", "transaction"), ("adm_sess", "session")):
            c = by_app[name]
            assert (c["type"], c["user"], c["database"], c["tenant"], c["mode"], c["state"]) == \
                ("C", "app", "postgres", "acme", mode, "active")
            assert c["addr"] == "127.0.0.1" and int(c["port"]) > 0
            assert c["local_port"] == str(h.port(mode))
            assert c["connect_time"].endswith(" UTC")
        assert by_app["adm_txn"]["link"] == ""   # between transactions it holds nothing

        servers = show(h, "SERVERS")
        held = [s for s in servers if s["remote_pid"] == str(session_pid)]
        assert len(held) == 1, servers
        assert (held[0]["type"], held[0]["user"], held[0]["state"], held[0]["tenant"]) == \
            ("S", "u_scram", "active", "acme")
        assert held[0]["link"] == by_app["adm_sess"]["ptr"]
        assert held[0]["port"] == str(pg.port)
        assert all(s["state"] == "idle" for s in servers if s is not held[0])

        stats = show(h, "STATS")
        assert len(stats) == 1
        s = stats[0]
        assert (s["tenant"], s["user"], s["database"]) == ("acme", "app", "postgres")
        assert s["total_query_count"] == "5"     # 3 + 2 simple queries, nothing of gpooler's own
        assert s["total_xact_count"] == "5"
        assert int(s["total_received"]) > 0 and int(s["total_sent"]) > 0
        assert int(s["total_query_time"]) > 0 and int(s["avg_query_time"]) > 0
        assert int(s["total_server_assignment_count"]) >= 4

        tenants = {t["tenant"]: t for t in show(h, "TENANTS")}
        assert set(tenants) == {"acme", "beta"}
        assert (tenants["acme"]["clients"], tenants["acme"]["pools"], tenants["acme"]["paused"]) \
            == ("2", "1", "no")
        assert tenants["beta"]["clients"] == "0" and tenants["acme"]["users"] == "4"

        config = {r["key"]: r for r in show(h, "CONFIG")}
        assert config["admin.users"]["value"] == "admin"
        assert config["log_level"]["value"] == "info" and config["log_level"]["changeable"] == "yes"
        assert config["workers"]["changeable"] == "no"
        assert config["tenants"]["value"] == "acme, beta"
        assert ADMIN_PASSWORD not in psql(h, "SHOW CONFIG").stdout

        assert show(h, "VERSION") == [{"version": f"gpooler {__version__}"}]
    finally:
        txn.close()
        sess.close()


def test_unknown_commands_are_errors_and_the_session_goes_on(pg, gpooler):
    h = gpooler(admin_config(pg))
    done = psql(h, "SELECT 1", "SHOW NONSENSE", "SHOW VERSION; PAUSE a b", "show version",
                check=False)
    assert done.stderr.count("42601") == 3, done.stderr
    assert "unknown command" in done.stderr and "usage: SHOW" in done.stderr
    assert done.stdout.count(f"gpooler {__version__}") == 2, done.stdout   # the session went on
    # the extended protocol (pg8000 with a parameter) is refused politely; the session goes on
    import pg8000.native
    conn = pg8000.native.Connection("admin", host="127.0.0.1", port=h.admin_port,
                                    database="gpooler", password=ADMIN_PASSWORD, timeout=10)
    try:
        with pytest.raises(pg8000.native.DatabaseError) as err:
            conn.run("SHOW VERSION -- :x", x=1)
        assert err.value.args[0]["C"] == "0A000", err.value.args
        assert conn.run("SHOW VERSION") == [[f"gpooler {__version__}"]]
    finally:
        conn.close()


def test_pause_waits_for_running_transactions_and_holds_new_ones_until_resume(pg, gpooler):
    h = gpooler(admin_config(pg))
    a = connect(h)
    b = connect(h)
    other = connect(h, user="app.beta")
    try:
        assert one(a, "select 1") == 1
        with b.cursor() as cur:                 # b is inside a transaction: PAUSE must wait for it
            cur.execute("begin")
            cur.execute("select 1")
        mark = h.log_mark()
        env = dict(os.environ, PGPASSWORD=ADMIN_PASSWORD)
        pausing = subprocess.Popen(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(h.admin_port), "-U", "admin", "-d",
             "gpooler", "-c", "PAUSE acme"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)
        try:
            h.wait_log("paused tenant acme", since=mark)
            with pytest.raises(subprocess.TimeoutExpired):
                pausing.wait(timeout=0.5)           # still waiting for b's transaction
            b.cursor().execute("commit")
            out, err = pausing.communicate(timeout=TIMEOUT)
            assert pausing.returncode == 0 and "PAUSE" in out, err
        finally:
            if pausing.poll() is None:
                pausing.kill()
        assert show(h, "TENANTS")[0]["paused"] == "yes"

        # a new transaction of acme waits at checkout ...
        answered = threading.Event()
        result = []

        def query():
            result.append(one(a, "select 42"))
            answered.set()

        thread = threading.Thread(target=query, daemon=True)
        thread.start()
        wait_until(lambda: [p for p in pools_of(h, "acme") if p["cl_waiting"] == "1"],
                   TIMEOUT, "the paused client to show up in cl_waiting")
        waiting = [c for c in show(h, "CLIENTS") if c["state"] == "waiting"]
        assert len(waiting) == 1 and waiting[0]["tenant"] == "acme"
        assert not answered.is_set()
        # ... other tenants are not held ...
        assert one(other, "select 7") == 7
        assert not answered.is_set()
        # ... until RESUME
        assert "RESUME" in psql(h, "RESUME acme").stdout
        assert answered.wait(TIMEOUT), "the query did not run after RESUME"
        assert result == [42]
        assert show(h, "TENANTS")[0]["paused"] == "no"

        # PAUSE without a tenant holds everyone; RESUME of one tenant alone is then refused
        psql(h, "PAUSE")
        done = psql(h, "RESUME beta", check=False)
        assert "55000" in done.stderr
        psql(h, "RESUME")
        assert one(other, "select 8") == 8
        assert "42704" in psql(h, "PAUSE nosuchtenant", check=False).stderr
    finally:
        for conn in (a, b, other):
            conn.close()


def test_kill_closes_the_tenants_clients_and_server_connections(pg, gpooler):
    h = gpooler(admin_config(pg))
    txn = connect(h)
    sess = connect(h, mode="session")
    other = connect(h, user="app.beta")
    try:
        assert one(txn, "select 1") == 1 and one(sess, "select 1") == 1
        assert one(other, "select 1") == 1
        assert {s["tenant"] for s in show(h, "SERVERS")} == {"acme", "beta"}
        assert "KILL" in psql(h, "KILL acme").stdout
        for conn in (txn, sess):
            with pytest.raises(psycopg2.OperationalError):
                one(conn, "select 1")
        assert {c["tenant"] for c in show(h, "CLIENTS")} == {"beta"}
        wait_until(lambda: {s["tenant"] for s in show(h, "SERVERS")} == {"beta"}, TIMEOUT,
                   "acme's server connections to close")
        assert one(other, "select 2") == 2            # other tenants are untouched
        again = connect(h)                            # KILL does not pause: acme may come back
        assert one(again, "select 3") == 3
        again.close()
        assert "42601" in psql(h, "KILL", check=False).stderr
        h.wait_log("killed by the administrator")
    finally:
        for conn in (txn, sess, other):
            conn.close()


def test_reload_and_shutdown(pg, gpooler):
    h = gpooler(admin_config(pg))
    cfg = admin_config(pg)
    cfg["tenants"]["gamma"] = dict(cfg["tenants"]["beta"])
    h.write_config(cfg)
    assert "RELOAD" in psql(h, "RELOAD").stdout
    assert {t["tenant"] for t in show(h, "TENANTS")} == {"acme", "beta", "gamma"}
    conn = connect(h, user="app.gamma")
    assert one(conn, "select 1") == 1

    with open(h.config_path, "a") as f:
        f.write("workers: [\n")
    done = psql(h, "RELOAD", check=False)
    assert done.returncode != 0 and "F0000" in done.stderr and "old configuration" in done.stderr
    assert {t["tenant"] for t in show(h, "TENANTS")} == {"acme", "beta", "gamma"}

    assert "SHUTDOWN" in psql(h, "SHUTDOWN").stdout
    conn.close()
    assert h.proc.wait(TIMEOUT) == 0


def _scram_verifier(password: str) -> str:
    salt, stored, server, iterations = ScramMechanism().make_auth_info(password, iteration_count=4096)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def test_only_admin_users_with_their_password_get_in(pg, gpooler):
    users = {"admin": ADMIN_PASSWORD,
             "md5admin": "md5" + hashlib.md5(b"md5-pw" + b"md5admin").hexdigest(),
             "scramadmin": _scram_verifier("scram-pw")}
    h = gpooler(admin_config(pg, admin={"users": users}))
    for user, password in (("admin", ADMIN_PASSWORD), ("md5admin", "md5-pw"),
                           ("scramadmin", "scram-pw")):
        assert show_as(h, user, password) == [{"version": f"gpooler {__version__}"}]

    params = {"host": "127.0.0.1", "port": h.admin_port, "dbname": "gpooler"}
    mark = h.log_mark()
    assert connect_error(params, user="admin", password="wrong")["C"] == "28P01"
    h.wait_log("admin disconnected: user=admin", since=mark)
    assert connect_error(params, user="md5admin", password="wrong")["C"] == "28P01"
    fields = connect_error(params, user="app", password="secret")   # a pooler user is no admin
    assert fields["C"] == "28000" and "not an admin user" in fields["M"]
    assert connect_error(params, user="app.acme", password="secret")["C"] == "28000"
    fields = connect_error(dict(params, dbname="postgres"), user="admin", password=ADMIN_PASSWORD)
    assert fields["C"] == "3D000" and "gpooler" in fields["M"]
    done = psql(h, "SHOW VERSION", password="nope", check=False)
    assert done.returncode != 0 and "password authentication failed" in done.stderr
    # and the admin is no pooler user
    assert connect_error(h.params("admin", ADMIN_PASSWORD))["C"] == "28000"
    line = h.wait_log("reason=refused: 28000", since=mark)
    assert "admin disconnected" in line and "addr=127.0.0.1:" in line
    assert ADMIN_PASSWORD not in h.log()


def show_as(h, user: str, password: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(psql(h, "SHOW VERSION", user=user,
                                                password=password).stdout)))


def test_no_admin_console_with_several_workers(pg, gpooler):
    h = gpooler(admin_config(pg, workers=2), wait=False)
    h.wait_log("admin console not started")
    h.wait_log("worker 2 of 2 ready", since=0)
    conn = psycopg2.connect(h.dsn("app.acme", "secret", connect_timeout=10))
    conn.close()


def test_shutdown_while_paused_closes_the_waiting_clients(pg, gpooler):
    h = gpooler(admin_config(pg, shutdown_timeout=60))
    conn = connect(h)
    assert one(conn, "select 1") == 1
    psql(h, "PAUSE")
    failed = threading.Event()

    def query():
        try:
            one(conn, "select 2")
        except psycopg2.Error:
            failed.set()

    threading.Thread(target=query, daemon=True).start()
    wait_until(lambda: [p for p in show(h, "POOLS") if p["cl_waiting"] == "1"], TIMEOUT,
               "a paused client")
    assert "SHUTDOWN" in psql(h, "SHUTDOWN").stdout
    assert h.proc.wait(TIMEOUT) == 0               # well within shutdown_timeout: nobody is left
    assert failed.wait(TIMEOUT)
    conn.close()


def test_show_replicas(cluster_factory, gpooler):
    """Per member: role, health, lag and how many transactions were routed there."""
    primary = cluster_factory()
    replica = primary.make_replica()
    try:
        cfg = admin_config(primary)
        cfg["tenants"]["acme"].update(replicas=[{"host": "127.0.0.1", "port": replica.port}],
                                      health_check_interval=0.2)
        h = gpooler(cfg)
        wait_until(lambda: {r["port"]: (r["role"], r["healthy"]) for r in show(h, "REPLICAS")} == {
            str(primary.port): ("primary", "True"), str(replica.port): ("replica", "True")},
            TIMEOUT, "both members probed")
        conn = psycopg2.connect(h.dsn("app.acme", "secret"))
        conn.autocommit = True
        with conn.cursor() as cur:
            for _ in range(20):
                cur.execute("select 1")
        conn.close()
        routed = {r["port"]: int(r["routed"]) for r in show(h, "REPLICAS")}
        assert sum(routed.values()) == 20 and routed[str(replica.port)] > 0
        replica.shutdown()
        wait_until(lambda: [r["healthy"] for r in show(h, "REPLICAS")
                            if r["port"] == str(replica.port)] == ["False"], TIMEOUT,
                   "the replica down")
    finally:
        replica.stop()
