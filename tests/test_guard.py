"""Protection against guessers and against a failing Postgres, through real drivers and Postgres.

- Brute-force lockout: wrong passwords from one address lock it out of the tenant (28000 before
  any password is asked); unknown users do not count, other tenants and addresses are unaffected.
- server_check_delay: a server connection idle past it gets an empty query before it serves
  again (seen in pg_stat_activity), one used recently does not, and one that stopped answering
  (its backend stopped with SIGSTOP) is replaced without the client noticing.
- server_login_retry: while Postgres refuses logins, clients get its own error at once, Postgres
  sees one attempt per backoff period (counted in its log), and clients get in again once the
  cause is gone, without a restart of gpooler.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import closing, contextmanager

import psycopg2

from cluster import base_config, connect_error, deep_merge, ipv6_available
from test_admin import show
import test_pooling
from test_pooling import run_in_thread
from waiting import wait_until

PASSWORD = "secret"
su, fresh_role = test_pooling.su, test_pooling.fresh_role  # fixtures
ADMIN = {"host": "127.0.0.1", "users": {"admin": "Adm1n-console-pw"}}
CHECK = "-- gpooler server check"  # what pg_stat_activity shows for the check


def login_works(h, user: str = "app.acme", mode: str = "session", **kw) -> bool:
    try:
        with closing(psycopg2.connect(h.dsn(user, PASSWORD, mode=mode, connect_timeout=10,
                                            **kw))) as conn:
            with conn.cursor() as cur:
                cur.execute("select 1")
        return True
    except psycopg2.OperationalError:
        return False


def pid_of(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("select pg_backend_pid()")
        return cur.fetchone()[0]


def pool_row(h, user: str = "app") -> dict:
    """The user's SHOW POOLS row; empty until its first client has created the pool."""
    rows = [r for r in show(h, "POOLS") if r["user"] == user]
    assert len(rows) <= 1, rows
    return rows[0] if rows else {}


@contextmanager
def stopped(pid: int):
    """A Postgres process that neither answers nor goes away: the kernel still acks its TCP."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------------------------------------
# brute-force lockout


def test_wrong_passwords_lock_the_address_out_of_the_tenant(pg, gpooler):
    cfg = base_config(pg, defaults={"auth_failure_limit": 3, "auth_failure_window": 60,
                                    "auth_lockout": 3})
    cfg["tenants"]["beta"] = {"host": pg.host, "port": pg.port,
                              "users": {"app": {"password": PASSWORD, "server_user": "u_trust"}}}
    if ipv6_available():
        cfg["listen"].append({"host": "::1", "mode": "session"})
    h = gpooler(cfg)
    acme = h.params("app.acme", mode="session")
    for _ in range(5):  # unknown users are refused before any password: they do not count
        assert connect_error(acme, user="nobody.acme", password="x")["C"] == "28000"
    for _ in range(2):
        assert connect_error(acme, password="wrong")["C"] == "28P01"
    assert login_works(h)  # below the limit a right password is unaffected
    mark = h.log_mark()
    assert connect_error(acme, password="wrong")["C"] == "28P01"  # the third locks
    warning = h.wait_log("locked out of tenant", since=mark)
    assert "WARNING" in warning and 'address 127.0.0.1 locked out of tenant "acme" for 3s ' \
        "after 3 wrong passwords within 60s" in warning

    fields = connect_error(acme, password=PASSWORD)  # now even the right password is refused
    assert fields["C"] == "28000"
    assert fields["M"].startswith('address 127.0.0.1 is locked out of tenant "acme" after too '
                                  "many failed logins: try again in ")
    # refused before any password exchange: a client with no password is told the same
    assert connect_error(dict(acme, password=None))["C"] == "28000"
    assert login_works(h, "app.beta")  # another tenant from the same address
    if ipv6_available():
        (port6,) = [port for host, port, _ in h.listeners if host == "::1"]
        assert login_works(h, host="::1", port=port6)  # another address, same tenant
    assert connect_error(acme, password=PASSWORD)["C"] == "28000"  # still locked out meanwhile
    h.wait_log("refused: 28000 address 127.0.0.1 is locked out", since=mark)
    wait_until(lambda: login_works(h), 10, "the lockout to end")


def test_a_lockout_of_zero_turns_it_off(pg, gpooler):
    h = gpooler(base_config(pg, defaults={"auth_failure_limit": 1, "auth_lockout": 0}))
    for _ in range(3):
        assert connect_error(h.params("app.acme", "wrong"))["C"] == "28P01"
    assert login_works(h)


# --------------------------------------------------------------------------------------------------
# server_check_delay


def test_server_check_runs_only_on_connections_idle_past_the_delay(pg, gpooler, su):
    h = gpooler(base_config(pg, admin=ADMIN, defaults={"pool_size": 1, "server_check_delay": 2}))

    def last_query(pid: int) -> str:
        return su.one("select query from pg_stat_activity where pid = %s", (pid,))

    with closing(psycopg2.connect(h.dsn("app.acme", PASSWORD, mode="session"))) as first:
        server = pid_of(first)
    # back in the pool after DISCARD ALL; taken again at once: no check
    with closing(psycopg2.connect(h.dsn("app.acme", PASSWORD, mode="session"))) as again:
        assert last_query(server) == "DISCARD ALL"
        assert pid_of(again) == server
    wait_until(lambda: pool_row(h)["sv_used"] == "1", 10, "the connection to be due a check")
    assert pool_row(h)["sv_idle"] == "0"
    # idle past the delay: checked at login, before the client's first statement
    with closing(psycopg2.connect(h.dsn("app.acme", PASSWORD, mode="session"))) as later:
        assert last_query(server) == CHECK
        assert pid_of(later) == server  # it answered, so it serves


def test_a_server_connection_that_stopped_answering_is_replaced_unseen(pg, gpooler, su):
    h = gpooler(base_config(pg, admin=ADMIN, defaults={"pool_size": 2,
                                                       "server_check_delay": 0.5}))
    conn = psycopg2.connect(h.dsn("app.acme", PASSWORD))
    conn.autocommit = True
    silent = pid_of(conn)
    with stopped(silent):
        wait_until(lambda: pool_row(h)["sv_used"] == "1", 10, "the connection to be due a check")
        mark = h.log_mark()
        # no error: the check timed out and another connection served
        replacement = run_in_thread(lambda: pid_of(conn), 30, "the statement")
        assert replacement != silent
        line = h.wait_log("failed its check", since=mark)
        assert f"pid={silent}" in line and "did not answer in time" in line
    conn.close()
    # gpooler closed it: the backend notices as soon as it runs again
    wait_until(lambda: not su.one("select count(*) from pg_stat_activity where pid = %s",
                                  (silent,)), 10, "the silent backend to go away")


# --------------------------------------------------------------------------------------------------
# server_login_retry


def refusals_in_log(cluster, role: str) -> int:
    """Logins Postgres refused for the role's connection limit, as its own log counts them."""
    return cluster.log().count(f'too many connections for role "{role}"')


def allowed_attempts(elapsed: float, limit: float) -> int:
    """At most one login per backoff period: 0.5 s, doubling up to limit, plus the first."""
    attempts, delay, at = 1, 0.5, 0.0
    while at + delay <= elapsed:
        at += delay
        attempts += 1
        delay = min(limit, delay * 2)
    return attempts


def test_postgres_refusing_logins_is_passed_on_at_once_and_spared(pg, gpooler, su, fresh_role):
    role, password = fresh_role("lim")
    su.all(f"alter role {role} connection limit 1")
    user = {"password": PASSWORD, "server_user": role, "server_password": password,
            "pool_size": 3, "server_login_retry": 2}
    h = gpooler(deep_merge(base_config(pg), {"tenants": {"acme": {"users": {"lim": user}}}}))
    holder = psycopg2.connect(h.dsn("lim.acme", PASSWORD))  # holds the one connection allowed
    with holder.cursor() as cur:
        cur.execute("select 1")
    before = refusals_in_log(pg, role)
    answers = []
    start = time.monotonic()
    while time.monotonic() - start < 3.0:
        asked = time.monotonic()
        fields = connect_error(h.params("lim.acme", PASSWORD, mode="session"))
        answers.append((fields["C"], fields["M"], time.monotonic() - asked))
    elapsed = time.monotonic() - start
    assert {(code, text) for code, text, _ in answers} == {
        ("53300", f'too many connections for role "{role}"')}  # Postgres's own words
    assert max(took for _, _, took in answers) < 2.0  # at once, not after pool_checkout_timeout
    tried = refusals_in_log(pg, role) - before
    assert 1 <= tried <= allowed_attempts(elapsed, 2.0) < len(answers)

    holder.close()  # its connection is idle now: it serves during the backoff
    with closing(psycopg2.connect(h.dsn("lim.acme", PASSWORD, mode="session"))) as keeper:
        with keeper.cursor() as cur:
            cur.execute("select 42")
            assert cur.fetchone() == (42,)
        su.all(f"alter role {role} connection limit -1")  # the cause is gone
        # with the one connection kept, a login needs a new one: it works once a retry is due
        wait_until(lambda: login_works(h, "lim.acme"), 10, "logins to work again")
    h.wait_log("server login works again")


def test_clients_queued_behind_a_failing_login_get_its_error(cluster_factory, gpooler):
    c = cluster_factory()
    c.psql("create role lim login password 'pw_lim' connection limit 0")
    user = {"password": PASSWORD, "server_user": "lim", "server_password": "pw_lim",
            "pool_size": 1}
    h = gpooler(deep_merge(base_config(c, admin=ADMIN),
                           {"tenants": {"acme": {"users": {"lim": user}}}}))
    with open(os.path.join(c.datadir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    answers: list[dict] = []

    def client():
        answers.append(connect_error(h.params("lim.acme", PASSWORD, mode="session")))

    threads = [threading.Thread(target=client) for _ in range(2)]
    with stopped(postmaster):  # the first login hangs; the second client queues behind it
        for t in threads:
            t.start()
        wait_until(lambda: pool_row(h, "lim").get("cl_waiting") == "2", 10, "two clients waiting")
        assert pool_row(h, "lim")["sv_login"] == "1"
    for t in threads:
        t.join(15)
    assert [(a["C"], a["M"]) for a in answers] == [
        ("53300", 'too many connections for role "lim"')] * 2
    assert refusals_in_log(c, "lim") == 1  # one login for both


def test_postgres_down_then_up_again(cluster_factory, gpooler):
    c = cluster_factory()
    h = gpooler(base_config(c, defaults={"server_login_retry": 2}))
    c.shutdown()
    for _ in range(3):
        fields = connect_error(h.params("app.acme", PASSWORD, mode="session"))
        assert fields["C"] == "08006"
        assert fields["M"] == (f"could not connect to server at {c.host}:{c.port}: "
                               "Connection refused")
    h.wait_log("server login failed")
    c.start()
    wait_until(lambda: login_works(h), 10, "logins to work once Postgres is back")
    h.wait_log("server login works again")


def test_fixing_server_password_by_reload_takes_effect_at_once(pg, gpooler):
    cfg = base_config(pg, defaults={"server_login_retry": 15})
    cfg["tenants"]["acme"]["users"]["app"]["server_password"] = "wrong"
    h = gpooler(cfg)
    start = time.monotonic()
    while time.monotonic() - start < 2.0:  # long enough for the backoff to grow past 1 s
        fields = connect_error(h.params("app.acme", PASSWORD, mode="session"))
        assert (fields["C"], fields["M"]) == (
            "28P01", 'password authentication failed for user "u_scram"')
    cfg["tenants"]["acme"]["users"]["app"]["server_password"] = "pw_u_scram"
    assert h.reload(cfg) == "reloaded"
    assert login_works(h)
