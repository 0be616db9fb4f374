"""Read replicas: reads spread over the primary and its streaming replicas, writes on the primary.

End to end against real streaming replication (pg_basebackup -R): which server answered is read
from the answer itself (`pg_is_in_recovery(), inet_server_port()`), so every assertion is about
where a statement really ran. The shared `pg` cluster is never used: a module-scoped primary with
one replica serves the routing tests; tests that stop, lag or promote a server get their own.

Nothing here sleeps and hopes: every wait is a condition with a deadline.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import closing

import psycopg
import psycopg.errors
import psycopg2
import pytest

from cluster import Cluster, base_config
from waiting import wait_until

PASSWORD = "secret"
USER = "app.acme"  # u_scram on the servers
WHERE = "select pg_is_in_recovery(), inet_server_port()"
PROBE_INTERVAL = 0.2


# --------------------------------------------------------------------------------------------------
# helpers


def direct(cluster: Cluster):
    conn = psycopg2.connect(cluster.dsn(), connect_timeout=5)
    conn.autocommit = True
    return closing(conn)


def one(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def wait_caught_up(primary: Cluster, replica: Cluster, timeout: float = 15.0,
                   flush: bool = True) -> None:
    """Wait until the replica has replayed all the primary has written so far.

    The clusters commit asynchronously: with flush, a synchronous commit first writes out all
    the WAL before it, so that the write position covers every commit made until now (but the
    replica then replays that commit too)."""
    with direct(primary) as p:
        if flush:
            one(p, "set synchronous_commit = on; select pg_current_xact_id()")
        lsn = one(p, "select pg_current_wal_lsn()::text")[0]
    with direct(replica) as r:
        wait_until(lambda: one(r, "select pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0],
                   timeout, f"replica :{replica.port} replays up to {lsn}")


def setup_schema(primary: Cluster) -> None:
    primary.psql(
        "create table items (id bigserial primary key, v text);"
        "create sequence seq;"
        "grant all on items, items_id_seq, seq to u_scram;"
        "insert into items (v) values ('first');"
    )


def replica_config(primary: Cluster, *replicas: Cluster, **tenant) -> dict:
    settings = {"replicas": [{"host": "127.0.0.1", "port": r.port} for r in replicas],
                "health_check_interval": PROBE_INTERVAL}
    settings.update(tenant)
    return base_config(primary, tenants={"acme": settings})


def connect(h, mode: str = "transaction", autocommit: bool = True):
    """A psycopg2 connection through gpooler; use it in `with closing(...)`: psycopg2's own
    `with conn` opens a transaction even in autocommit mode."""
    conn = psycopg2.connect(h.dsn(USER, PASSWORD, mode=mode), connect_timeout=5)
    conn.autocommit = autocommit
    return conn


def where(conn, sql: str = WHERE) -> tuple[bool, int]:
    return tuple(one(conn, sql)[:2])


def seen(conn, n: int = 60, sql: str = WHERE) -> dict[tuple[bool, int], int]:
    counts: dict[tuple[bool, int], int] = {}
    for _ in range(n):
        key = where(conn, sql)
        counts[key] = counts.get(key, 0) + 1
    return counts


class Members:
    """What each member looks like in a WHERE answer."""

    def __init__(self, primary: Cluster, replica: Cluster):
        self.primary = (False, primary.port)
        self.replica = (True, replica.port)
        self.both = {self.primary, self.replica}


# --------------------------------------------------------------------------------------------------
# clusters


@pytest.fixture(scope="module")
def pair():
    """A primary with one streaming replica, for tests that neither stop nor slow them."""
    primary = Cluster()
    replicas: list[Cluster] = []
    try:
        primary.start()
        setup_schema(primary)
        replica = primary.make_replica()
        replicas.append(replica)
        wait_caught_up(primary, replica)
        yield primary, replica
    finally:
        for r in replicas:
            r.stop()
        primary.stop()


@pytest.fixture(scope="module")
def module_replicas(pair):
    """More replicas of the module primary, made on demand: make(extra_conf) -> started Cluster."""
    made: list[Cluster] = []

    def make(extra_conf: dict | None = None) -> Cluster:
        replica = pair[0].make_replica(extra_conf=extra_conf)
        made.append(replica)
        return replica

    yield make
    for r in made:
        r.stop()


@pytest.fixture(scope="module")
def slow_replica(pair, module_replicas):
    """A replica that applies every commit 300 ms late."""
    replica = module_replicas({"recovery_min_apply_delay": "300ms"})
    wait_caught_up(pair[0], replica)
    return replica


@pytest.fixture
def routed(pair, gpooler):
    """gpooler in front of the module pair; returns (handle, Members)."""
    primary, replica = pair
    h = gpooler(replica_config(primary, replica))
    return h, Members(primary, replica)


# --------------------------------------------------------------------------------------------------
# routing


def test_reads_spread_over_both_members_writes_only_on_the_primary(routed):
    h, m = routed
    with closing(connect(h)) as conn:
        reads = seen(conn, 60)
        assert set(reads) == m.both, reads
        for _ in range(20):
            assert where(conn, "insert into items (v) values ('w') "
                               "returning pg_is_in_recovery(), inet_server_port()") == m.primary
        for _ in range(10):
            assert where(conn, "update items set v = v where id = 1 "
                               "returning pg_is_in_recovery(), inet_server_port()") == m.primary
        # a data-modifying CTE under a SELECT is a write
        for _ in range(10):
            assert where(conn, "with w as (insert into items (v) values ('cte') returning 1) "
                               "select pg_is_in_recovery(), inet_server_port() from w") == m.primary


def test_read_only_transactions_may_use_a_replica_others_stay_on_the_primary(routed):
    h, m = routed
    with closing(connect(h)) as conn:
        for begin, allowed in (("BEGIN READ ONLY", m.both), ("START TRANSACTION READ ONLY", m.both),
                               ("begin transaction isolation level repeatable read, read only",
                                m.both),
                               ("BEGIN", {m.primary}), ("START TRANSACTION", {m.primary})):
            servers = set()
            for _ in range(30):
                with conn.cursor() as cur:
                    cur.execute(begin)
                    inside = {where(conn) for _ in range(3)}
                    inside.add(where(conn, "select pg_is_in_recovery(), inet_server_port() "
                                           "from items limit 1"))
                    cur.execute("COMMIT")
                assert len(inside) == 1, f"{begin}: one transaction ran on {inside}"
                servers |= inside
            assert servers == allowed, begin
    # psycopg2 outside autocommit: its BEGIN opens every transaction, reads included
    with closing(connect(h, autocommit=False)) as conn:
        for _ in range(20):
            assert where(conn) == m.primary
            assert where(conn) == m.primary
            conn.commit()


def test_session_mode_always_uses_the_primary(routed):
    h, m = routed
    for _ in range(10):
        conn = connect(h, mode="session")
        try:
            assert seen(conn, 5) == {m.primary: 5}
            assert where(conn, "/* gpooler:replica */ select pg_is_in_recovery(), "
                               "inet_server_port()") == m.primary
        finally:
            conn.close()


def test_locking_reads_and_sequence_calls_go_to_the_primary(routed):
    h, m = routed
    with closing(connect(h)) as conn:
        assert set(seen(conn, 40)) == m.both  # the replica is in rotation for plain reads
        for sql in (
            "select pg_is_in_recovery(), inet_server_port() from items where id = 1 for update",
            "select pg_is_in_recovery(), inet_server_port() from items where id = 1 for share",
            "select pg_is_in_recovery(), inet_server_port() from items where id = 1 "
            "for no key update",
            "select pg_is_in_recovery(), inet_server_port(), nextval('seq')",
            "select pg_is_in_recovery(), inet_server_port(), setval('seq', 100)",
            "select pg_is_in_recovery(), inet_server_port(), pg_advisory_xact_lock(1)",
        ):
            assert seen(conn, 20, sql) == {m.primary: 20}, sql


def test_routing_hints_in_a_leading_comment(routed):
    h, m = routed
    with closing(connect(h)) as conn:
        assert seen(conn, 30, "/* gpooler:primary */ " + WHERE) == {m.primary: 30}
        assert seen(conn, 30, "/* gpooler:replica */ " + WHERE) == {m.replica: 30}
        assert seen(conn, 30, "  /*gpooler: replica*/\n" + WHERE) == {m.replica: 30}
        assert set(seen(conn, 60, "/* gpooler:any */ " + WHERE)) == m.both
        # a hint elsewhere than at the start is just a comment
        assert set(seen(conn, 60, WHERE + " /* gpooler:primary */")) == m.both
        # a replica hint on a read-only transaction keeps the whole transaction there
        with conn.cursor() as cur:
            for _ in range(10):
                cur.execute("/* gpooler:replica */ BEGIN READ ONLY")
                assert {where(conn) for _ in range(3)} == {m.replica}
                cur.execute("COMMIT")


def test_set_gpooler_target_simple_protocol(routed):
    h, m = routed
    with closing(connect(h)) as conn, conn.cursor() as cur:
        cur.execute("SHOW gpooler.target")
        assert cur.fetchall() == [("any",)]
        assert [d.name for d in cur.description] == ["gpooler.target"]

        cur.execute("SET gpooler.target = primary")
        cur.execute("show gpooler.target")
        assert cur.fetchone() == ("primary",)
        assert seen(conn, 30) == {m.primary: 30}
        # gpooler keeps the setting itself: Postgres never hears of it
        cur.execute("select current_setting('gpooler.target', true)")
        assert cur.fetchone() == (None,)

        cur.execute("SET gpooler.target TO 'replica'")
        cur.execute("SHOW gpooler.target")
        assert cur.fetchone() == ("replica",)
        assert seen(conn, 30) == {m.replica: 30}
        cur.execute("select current_setting('gpooler.target', true), pg_is_in_recovery()")
        assert cur.fetchone() == (None, True)
        # a write can only succeed on the primary: it goes there whatever the target
        assert where(conn, "insert into items (v) values ('t') "
                           "returning pg_is_in_recovery(), inet_server_port()") == m.primary

        cur.execute("set session gpooler.target = any;")
        assert set(seen(conn, 60)) == m.both

        cur.execute("SET gpooler.target = primary")
        cur.execute("RESET gpooler.target")
        cur.execute("SHOW gpooler.target")
        assert cur.fetchone() == ("any",)

        cur.execute("SET gpooler.target = replica")
        with pytest.raises(psycopg2.Error) as raised:
            cur.execute("SET gpooler.target = bogus")
        assert raised.value.pgcode == "22023"
        assert "gpooler.target" in raised.value.pgerror
        # the invalid value changed nothing, and the connection goes on
        cur.execute("SHOW gpooler.target")
        assert cur.fetchone() == ("replica",)
        assert seen(conn, 10) == {m.replica: 10}

        # RESET ALL is a reset of gpooler.target too
        cur.execute("SET gpooler.target = primary")
        cur.execute("RESET ALL")
        cur.execute("SHOW gpooler.target")
        assert cur.fetchone() == ("any",)


def within(h, seconds: float, what: str, work):
    """Run work() on a thread; if it does not return in time, kill gpooler (which frees the
    thread) and fail: a hang is reported as such instead of stalling the suite."""
    result: dict = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        h.kill()
        thread.join(10)
        pytest.fail(f"{what}: no answer within {seconds}s", pytrace=False)
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_set_gpooler_target_inside_a_transaction_psycopg2(routed):
    """psycopg2's default mode opens a transaction before every statement, SET included."""
    h, m = routed
    conn = connect(h, autocommit=False)
    try:
        cur = conn.cursor()

        def set_in_transaction():
            cur.execute("SET gpooler.target = replica")
            conn.commit()

        within(h, 5, "SET gpooler.target inside a transaction (BEGIN; SET ...)", set_in_transaction)
        for _ in range(10):
            assert where(conn) == m.replica  # each transaction opens with BEGIN: on the replica
            conn.commit()

        def show_in_transaction():
            cur.execute("select 1")
            cur.execute("SHOW gpooler.target")
            return cur.fetchone()

        assert within(h, 5, "SHOW gpooler.target inside a transaction",
                      show_in_transaction) == ("replica",)
        conn.rollback()

        def invalid_in_transaction():
            with pytest.raises(psycopg2.Error) as raised:
                cur.execute("SET gpooler.target = bogus")
            return raised.value.pgcode

        assert within(h, 5, "an invalid SET gpooler.target inside a transaction",
                      invalid_in_transaction) == "22023"
        conn.rollback()
        assert where(conn) == m.replica
        conn.commit()
    finally:
        conn.close()


def test_set_gpooler_target_extended_protocol(routed):
    h, m = routed
    with psycopg.connect(h.dsn(USER, PASSWORD), autocommit=True, prepare_threshold=0,
                         connect_timeout=5) as conn:

        def where3():
            return tuple(conn.execute(WHERE).fetchone())

        assert conn.execute("SHOW gpooler.target").fetchone() == ("any",)
        conn.execute("SET gpooler.target = replica")
        assert conn.execute("SHOW gpooler.target").fetchone() == ("replica",)
        assert {where3() for _ in range(30)} == {m.replica}
        assert conn.execute("select current_setting('gpooler.target', true)").fetchone() == (None,)

        conn.execute("SET gpooler.target = primary")
        assert conn.execute("SHOW gpooler.target").fetchone() == ("primary",)
        assert {where3() for _ in range(30)} == {m.primary}
        assert conn.execute("select current_setting('gpooler.target', true)").fetchone() == (None,)
        # a statement already prepared runs again: the same answers
        conn.execute("SET gpooler.target = replica")
        assert {where3() for _ in range(10)} == {m.replica}

        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SET gpooler.target = nowhere")
        assert conn.execute("SHOW gpooler.target").fetchone() == ("replica",)

        conn.execute("RESET gpooler.target")
        assert conn.execute("SHOW gpooler.target").fetchone() == ("any",)
        assert {where3() for _ in range(60)} == m.both

    # inside transactions (psycopg sends BEGIN first, then the statements by Parse/Bind/Execute)
    with psycopg.connect(h.dsn(USER, PASSWORD), prepare_threshold=0, connect_timeout=5) as conn:
        conn.execute("SET gpooler.target = replica")
        assert conn.execute("SHOW gpooler.target").fetchone() == ("replica",)
        conn.commit()
        for _ in range(10):
            assert tuple(conn.execute(WHERE).fetchone()) == m.replica
            conn.commit()
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SET gpooler.target = nowhere")
        status = conn.info.transaction_status
        conn.rollback()
        assert conn.execute("SHOW gpooler.target").fetchone() == ("replica",)
        conn.rollback()
        # the error failed the transaction, as it would on Postgres (and as gpooler's other
        # synthetic errors do)
        assert status == psycopg.pq.TransactionStatus.INERROR


# --------------------------------------------------------------------------------------------------
# load balancing


def concurrent_reads(h, threads: int, each: int, sql: str) -> tuple[dict, list]:
    counts: dict = {}
    errors: list = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work():
        try:
            with closing(connect(h)) as conn:
                start.wait(10)
                for _ in range(each):
                    key = where(conn, sql)
                    with lock:
                        counts[key] = counts.get(key, 0) + 1
        except Exception as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(repr(exc))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return counts, errors


def test_least_busy_answers_concurrent_reads_on_both_members(pair, gpooler):
    primary, replica = pair
    m = Members(primary, replica)
    h = gpooler(replica_config(primary, replica, load_balance="least_busy"))
    counts, errors = concurrent_reads(
        h, 8, 15, "select pg_is_in_recovery(), inet_server_port(), pg_sleep(0.01)")
    assert errors == []
    assert sum(counts.values()) == 8 * 15
    assert set(counts) == m.both, counts


def test_least_busy_prefers_the_member_with_fewer_connections_in_use(pair, gpooler):
    """Three transactions held open on the replica: least_busy sends the next reads elsewhere."""
    primary, replica = pair
    m = Members(primary, replica)
    h = gpooler(replica_config(primary, replica, load_balance="least_busy"))
    holders = [connect(h) for _ in range(3)]
    try:
        for conn in holders:
            with conn.cursor() as cur:
                cur.execute("/* gpooler:replica */ BEGIN READ ONLY")
            assert where(conn) == m.replica
        with closing(connect(h)) as conn:
            reads = seen(conn, 30)
        assert reads == {m.primary: 30}, (
            f"least_busy with 3 connections busy on the replica and none on the primary: {reads}")
    finally:
        for conn in holders:
            conn.close()


# --------------------------------------------------------------------------------------------------
# health


class ReadLoad:
    """Several threads reading through gpooler without pause; every answer and error is kept."""

    def __init__(self, h, threads: int = 4):
        self.h = h
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[bool, int]] = []
        self.errors: list[str] = []
        self.workers = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for w in self.workers:
            w.start()

    def _work(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = connect(self.h)
                answer = where(conn)
                with self.lock:
                    self.answers.append(answer)
            except Exception as exc:  # noqa: BLE001 - the test asserts there are none
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {str(exc).strip()}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def since(self, mark: int) -> list[tuple[bool, int]]:
        with self.lock:
            return self.answers[mark:]

    def finish(self):
        self.stop.set()
        for w in self.workers:
            w.join(10)


def test_replica_down_and_back_under_read_load(pair, gpooler):
    primary = pair[0]
    replica = primary.make_replica()
    m = Members(primary, replica)
    load = None
    try:
        wait_caught_up(primary, replica)
        h = gpooler(replica_config(primary, replica))
        load = ReadLoad(h, threads=4)
        wait_until(lambda: m.replica in load.since(0), 10, "reads reach the replica")

        mark = h.log_mark()
        replica.shutdown()
        h.wait_log(f"tenant acme: 127.0.0.1:{replica.port} is unreachable", since=mark)
        down = load.count()
        # reads go on, on the primary, while the replica is away
        wait_until(lambda: len(load.since(down)) >= 200, 20, "200 reads while the replica is down")
        assert set(load.since(down)) == {m.primary}

        replica.start()
        h.wait_log(f"tenant acme: 127.0.0.1:{replica.port} is healthy again")
        back = load.count()
        wait_until(lambda: m.replica in load.since(back), 10, "reads return to the replica")
        load.finish()
        # A read can only fail when the replica stopped after part of its answer was sent (between
        # the result and its ReadyForQuery), as it would on a direct connection; gpooler says so.
        def cut_short() -> int:
            return h.log().count("reason=server connection lost during an answer")

        wait_until(lambda: cut_short() >= len(load.errors), 5, "gpooler to log every error")
        assert len(load.errors) == cut_short(), f"client errors: {load.errors[:3]}"
    finally:
        if load is not None:
            load.finish()
        replica.stop()


APPLY_DELAY = "3s"  # the lagging replicas: far longer than max_replica_lag, short for the suite


def write_token(conn) -> str:
    token = uuid.uuid4().hex
    with conn.cursor() as cur:
        cur.execute("insert into items (v) values (%s) "
                    "returning pg_is_in_recovery(), inet_server_port()", (token,))
        assert cur.fetchone()[0] is False
    return token


def replayed(replica_conn, token: str) -> bool:
    return one(replica_conn, "select count(*) from items where v = %s", (token,))[0] == 1


def check_no_reads_while_lagging(h, m: Members, replica: Cluster) -> None:
    """Write, then: the replica gets no reads until it has replayed the write, then gets some."""
    hinted = "/* gpooler:replica */ " + WHERE  # the replica whenever it is fit for reads
    with closing(connect(h)) as conn, direct(replica) as r:
        token = write_token(conn)
        wait_until(lambda: where(conn, hinted) == m.primary, 2,
                   f"the probe notices the replica lags (apply delay {APPLY_DELAY})")
        # while it lags, no read goes there, hinted or not
        reads = seen(conn, 60)
        reads_hinted = seen(conn, 20, hinted)
        assert not replayed(r, token), "the replica caught up during the check: delay too short"
        assert reads == {m.primary: 60}
        assert reads_hinted == {m.primary: 20}
        # once it has replayed the write, it is back
        wait_until(lambda: replayed(r, token), 15, "the replica replays the write")
        wait_until(lambda: where(conn, hinted) == m.replica, 5, "the replica gets reads again")


def test_lagging_replica_gets_no_reads(pair, module_replicas, gpooler):
    primary = pair[0]
    replica = module_replicas({"recovery_min_apply_delay": APPLY_DELAY})
    m = Members(primary, replica)
    h = gpooler(replica_config(primary, replica, max_replica_lag=0.5))
    hinted = "/* gpooler:replica */ " + WHERE
    with closing(connect(h)) as conn, direct(replica) as r:
        # a first transaction replayed, so that the replica knows when it last replayed one
        token = write_token(conn)
        wait_until(lambda: replayed(r, token), 15, "the replica replays a first write")
        # caught up, even long after its last replayed commit: in rotation
        wait_until(lambda: where(conn, hinted) == m.replica, 10, "the caught-up replica gets reads")
        assert set(seen(conn, 60)) == m.both
    check_no_reads_while_lagging(h, m, replica)


def test_lag_is_seen_before_the_replica_replays_its_first_transaction(pair, gpooler):
    """Just (re)started, a replica knows no replay timestamp (pg_last_xact_replay_timestamp() is
    NULL) until it replays a commit: behind the primary, it lags all the same."""
    primary = pair[0]
    replica = primary.make_replica(extra_conf={"recovery_min_apply_delay": APPLY_DELAY})
    try:
        m = Members(primary, replica)
        wait_caught_up(primary, replica, flush=False)  # and still no transaction replayed
        h = gpooler(replica_config(primary, replica, max_replica_lag=0.5))
        with closing(connect(h)) as conn:
            wait_until(lambda: where(conn, "/* gpooler:replica */ " + WHERE) == m.replica, 10,
                       "the caught-up replica gets reads")
        check_no_reads_while_lagging(h, m, replica)
    finally:
        replica.stop()


def test_failover_writes_follow_the_promoted_replica(cluster_factory, gpooler):
    old = cluster_factory()
    setup_schema(old)
    new = old.make_replica()
    try:
        wait_caught_up(old, new)
        h = gpooler(replica_config(old, new))
        insert = ("insert into items (v) values ('failover') "
                  "returning pg_is_in_recovery(), inet_server_port()")
        with closing(connect(h)) as conn:
            assert where(conn, insert) == (False, old.port)

        mark = h.log_mark()
        old.shutdown()
        new.run_as_pg([new.bin("pg_ctl"), "promote", "-w", "-D", new.datadir])
        promoted = time.monotonic()

        failures: list[str] = []

        def write():
            try:
                with closing(connect(h)) as c:
                    return where(c, insert)
            except psycopg2.Error as exc:
                failures.append(str(exc).strip().splitlines()[0])
                return None

        landed = wait_until(write, 15, "a write succeeds after the promotion", interval=0.1)
        took = time.monotonic() - promoted
        assert landed == (False, new.port), landed
        h.wait_log(f"tenant acme: 127.0.0.1:{new.port} is now primary", since=mark)
        h.wait_log(f"tenant acme: 127.0.0.1:{old.port} is unreachable", since=mark)
        # every later write lands there too, reads included, and session mode follows
        with closing(connect(h)) as conn:
            assert seen(conn, 20, insert) == {(False, new.port): 20}
            assert seen(conn, 20) == {(False, new.port): 20}
        with closing(connect(h, mode="session")) as conn:
            assert where(conn, insert) == (False, new.port)
        print(f"writes back {took:.2f}s after the promotion; {len(failures)} failed tries")
    finally:
        new.stop()


# --------------------------------------------------------------------------------------------------
# read your writes


def wait_probed(replica: Cluster) -> None:
    """Wait until gpooler's probe has asked the replica again since now."""
    with direct(replica) as r:
        now = one(r, "select clock_timestamp()")[0]
        wait_until(lambda: one(r, "select count(*) from pg_stat_activity where application_name"
                                  " = 'gpooler probe' and state = 'idle' and query_start > %s",
                               (now,))[0], 5, "a probe of the replica")


def write_then_read(h, rounds: int) -> tuple[list[int], list[bool]]:
    """Insert a row and read it back at once, `rounds` times: (the rounds whose read missed the
    row, whether each read ran on a replica)."""
    stale = []
    on_replica = []
    with closing(connect(h)) as conn, conn.cursor() as cur:
        for i in range(rounds):
            cur.execute("insert into items (v) values (%s) returning id", (f"ryw{i}",))
            row_id = cur.fetchone()[0]
            cur.execute("select count(*), pg_is_in_recovery() from items where id = %s", (row_id,))
            found, recovery = cur.fetchone()
            on_replica.append(recovery)
            if not found:
                stale.append(i)
    return stale, on_replica


def test_read_your_writes_never_reads_stale(pair, slow_replica, gpooler):
    primary = pair[0]
    m = Members(primary, slow_replica)
    h = gpooler(replica_config(primary, slow_replica, read_your_writes=True))
    with closing(connect(h)) as conn:
        wait_until(lambda: where(conn, "/* gpooler:replica */ " + WHERE) == m.replica, 10,
                   "the delayed replica is in rotation")
    # start where a replica often is: at a fresh WAL segment (archive_timeout, a base backup),
    # replayed up to the primary's position, and the probes know it
    wait_caught_up(primary, slow_replica)
    primary.psql("select pg_switch_wal()")
    wait_caught_up(primary, slow_replica, flush=False)
    wait_probed(slow_replica)
    stale, on_replica = write_then_read(h, 1000)
    assert stale == [], (f"{len(stale)} of 1000 reads did not see the client's own write, all on "
                         f"the replica: {all(on_replica[i] for i in stale)}; rounds {stale[:20]}")

    # the replica still serves this client once it has replayed the client's writes
    with closing(connect(h)) as conn, conn.cursor() as cur:
        cur.execute("insert into items (v) values ('ryw-last') returning id")
        row_id = cur.fetchone()[0]

        def replica_sees_it():
            cur.execute("select count(*), pg_is_in_recovery() from items where id = %s", (row_id,))
            found, recovery = cur.fetchone()
            assert found == 1, "stale read"
            return recovery

        wait_until(replica_sees_it, 10, "a read of the client's write goes to the replica")


def test_without_read_your_writes_the_delayed_replica_reads_stale(pair, slow_replica, gpooler):
    """The control: the same workload without read_your_writes does see stale rows."""
    primary = pair[0]
    m = Members(primary, slow_replica)
    h = gpooler(replica_config(primary, slow_replica))
    with closing(connect(h)) as conn:
        wait_until(lambda: where(conn, "/* gpooler:replica */ " + WHERE) == m.replica, 10,
                   "the delayed replica is in rotation")
    stale, on_replica = write_then_read(h, 200)
    assert any(on_replica), "no read went to the replica"
    assert stale, f"no stale read in 200 (replica used {sum(on_replica)} times)"


def test_a_write_on_a_server_in_recovery_moves_to_the_real_primary(cluster_factory, gpooler):
    """The old primary's address comes back as a replica before any probe noticed: the write gets
    25006 there, gpooler probes at once and runs it on the real primary, and the client sees only
    its answer."""
    old = cluster_factory()
    setup_schema(old)
    new = old.make_replica()
    comeback = None
    try:
        wait_caught_up(old, new)
        h = gpooler(replica_config(old, new, health_check_interval=3600))
        with closing(connect(h)) as conn:
            assert where(conn, "insert into items (v) values ('before') "
                               "returning pg_is_in_recovery(), inet_server_port()") == (
                False, old.port)
        old_port = old.port
        old.stop()
        new.run_as_pg([new.bin("pg_ctl"), "promote", "-w", "-D", new.datadir])
        comeback = new.make_replica(port=old_port)  # the old address, now in recovery
        with closing(connect(h)) as conn:
            assert where(conn, "insert into items (v) values ('moved') "
                               "returning pg_is_in_recovery(), inet_server_port()") == (
                False, new.port)
        h.wait_log("met a server in recovery")
    finally:
        if comeback is not None:
            comeback.stop()
        new.stop()
