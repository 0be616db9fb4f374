"""The rules of brute-force lockout (lockout.py) and login backoff (backoff.py), on a fake clock."""

from __future__ import annotations

import logging

import gevent
import pytest

from gpooler.backend import ServerError
from gpooler.backoff import FIRST_RETRY, LoginBackoff
from gpooler.config import parse_config
from gpooler.lockout import FailureBook
from gpooler.login import Refusal
from gpooler.pool import Pool, Target


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenants(**settings):
    doc = {"listen": [{"port": 6543, "mode": "transaction"}],
           "defaults": settings,
           "tenants": {name: {"host": "db", "users": {"app": {"password": "pw"}}}
                       for name in ("acme", "beta")}}
    return parse_config(doc, {}).tenants


def book_for(**settings) -> tuple[FailureBook, Clock, object]:
    """A book on a fake clock, and tenant acme with these settings."""
    clock = Clock()
    return FailureBook(clock), clock, tenants(**settings)["acme"]


def refused(book: FailureBook, tenant, address: str) -> str | None:
    try:
        book.check(tenant, address)
    except Refusal as refusal:
        assert refusal.sqlstate == "28000"
        return refusal.text
    return None


# ------------------------------------------------------------------------------- lockout


def test_the_limit_locks_the_address_out_of_the_tenant_only():
    clock = Clock()
    book = FailureBook(clock)
    t = tenants(auth_failure_limit=3, auth_failure_window=60, auth_lockout=300)
    for _ in range(2):
        book.failed(t["acme"], "10.0.0.7")
    assert refused(book, t["acme"], "10.0.0.7") is None  # below the limit: unaffected
    book.failed(t["acme"], "10.0.0.7")
    text = refused(book, t["acme"], "10.0.0.7")
    assert text == ('address 10.0.0.7 is locked out of tenant "acme" after too many failed '
                    "logins: try again in 300s")
    assert refused(book, t["acme"], "10.0.0.8") is None  # another address
    assert refused(book, t["beta"], "10.0.0.7") is None  # another tenant
    clock.now += 299.5
    assert "try again in 1s" in refused(book, t["acme"], "10.0.0.7")
    clock.now += 0.5
    assert refused(book, t["acme"], "10.0.0.7") is None  # the lockout is over
    book.failed(t["acme"], "10.0.0.7")  # and the count starts afresh
    assert refused(book, t["acme"], "10.0.0.7") is None


def test_failures_count_within_the_window_from_the_first():
    book, clock, t = book_for(auth_failure_limit=3, auth_failure_window=10, auth_lockout=60)
    book.failed(t, "10.0.0.7")
    clock.now += 5
    book.failed(t, "10.0.0.7")
    clock.now += 5  # the window of the first failure is over: a new one starts here
    book.failed(t, "10.0.0.7")
    clock.now += 9
    book.failed(t, "10.0.0.7")
    assert refused(book, t, "10.0.0.7") is None
    book.failed(t, "10.0.0.7")
    assert refused(book, t, "10.0.0.7") is not None


def test_addresses_are_the_clients_own_spelling():
    """An IPv4 client on a dual-stack socket shows up IPv4-mapped: one address all the same."""
    book, _, t = book_for(auth_failure_limit=2)
    book.failed(t, "::ffff:10.0.0.7")
    book.failed(t, "10.0.0.7")
    assert "address 10.0.0.7 " in refused(book, t, "::ffff:10.0.0.7")
    book.failed(t, "fe80::1%eth0")
    book.failed(t, "fe80::1")
    assert "address fe80::1 " in refused(book, t, "fe80::1%eth1")


@pytest.mark.parametrize("settings", [{"auth_failure_limit": 0}, {"auth_lockout": 0}])
def test_zero_turns_lockout_off(settings):
    book, _, t = book_for(**{"auth_failure_limit": 1, "auth_lockout": 300, **settings})
    for _ in range(20):
        book.failed(t, "10.0.0.7")
    assert refused(book, t, "10.0.0.7") is None
    assert len(book) == 0


def test_turning_it_off_on_reload_lifts_lockouts():
    book = FailureBook(Clock())
    book.failed(tenants(auth_failure_limit=1)["acme"], "10.0.0.7")
    assert refused(book, tenants(auth_failure_limit=1)["acme"], "10.0.0.7") is not None
    assert refused(book, tenants(auth_failure_limit=0)["acme"], "10.0.0.7") is None


def test_memory_is_bounded_and_old_entries_expire():
    clock = Clock()
    book = FailureBook(clock, capacity=100)
    t = tenants(auth_failure_limit=5, auth_failure_window=10, auth_lockout=30)["acme"]
    for i in range(1000):  # a flood of distinct addresses
        book.failed(t, f"10.0.{i // 256}.{i % 256}")
        assert len(book) <= 100
    clock.now += 10  # their windows are over: the next failure clears them away
    book.failed(t, "192.0.2.1")
    assert len(book) == 1


def test_a_lockout_outlives_its_window_in_the_book():
    book, clock, t = book_for(auth_failure_limit=1, auth_failure_window=1, auth_lockout=30)
    book.failed(t, "10.0.0.7")
    clock.now += 20
    book.failed(t, "10.0.0.8")  # would forget entries past their window, not past their lockout
    assert "try again in 10s" in refused(book, t, "10.0.0.7")


def test_guard_counts_wrong_passwords_only():
    book, _, t = book_for(auth_failure_limit=2)
    for sqlstate in ("28000", "08P01", "53300"):
        with pytest.raises(Refusal):
            with book.guard(t, "10.0.0.7"):
                raise Refusal(sqlstate, "not a wrong password")
    assert len(book) == 0
    for _ in range(2):
        with pytest.raises(Refusal):
            with book.guard(t, "10.0.0.7"):
                raise Refusal("28P01", "password authentication failed")
    with pytest.raises(Refusal) as locked:
        with book.guard(t, "10.0.0.7"):
            pytest.fail("a locked-out address must not get to the password exchange")
    assert locked.value.sqlstate == "28000"


def test_one_warning_when_an_address_is_locked_out(caplog):
    book, _, t = book_for(auth_failure_limit=3, auth_failure_window=60, auth_lockout=300)
    with caplog.at_level(logging.WARNING, logger="gpooler.lockout"):
        for _ in range(3):
            book.failed(t, "10.0.0.7")
    assert [r.getMessage() for r in caplog.records] == [
        'address 10.0.0.7 locked out of tenant "acme" for 300s after 3 wrong passwords within 60s']


# ------------------------------------------------------------------------------- backoff


def error(text: str = "53300 too many connections") -> ServerError:
    return ServerError(b"E-bytes of " + text.encode(), text)


def backoff(limit: float = 15.0) -> tuple[LoginBackoff, Clock]:
    clock = Clock()
    b = LoginBackoff("app.acme/postgres", clock)
    b.limit = limit
    return b, clock


def remembered(b: LoginBackoff) -> ServerError | None:
    """The error start() raises, or None when the caller may try (which then counts as a try)."""
    try:
        b.start()
    except ServerError as exc:
        return exc
    return None


def test_a_failure_is_passed_on_until_the_retry_is_due():
    b, clock = backoff()
    started = b.start()
    b.failed(error(), started)
    got = remembered(b)
    assert (got.response, str(got)) == (b"E-bytes of 53300 too many connections",
                                        "53300 too many connections")
    clock.now += FIRST_RETRY - 0.01
    assert remembered(b) is not None
    clock.now += 0.01
    assert remembered(b) is None  # this caller retries...
    assert remembered(b) is not None  # ...and the others keep getting the error meanwhile


def test_the_period_doubles_up_to_server_login_retry_and_success_ends_it():
    b, clock = backoff(limit=3.0)
    periods = []
    for _ in range(5):
        b.failed(error(), b.start())
        periods.append(b.delay)
        clock.now += b.delay
    assert periods == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.start()
    b.succeeded()
    assert remembered(b) is None and remembered(b) is None
    b.failed(error(), b.start())
    assert b.delay == FIRST_RETRY  # a new trouble starts short again


def test_logins_begun_before_a_failure_do_not_lengthen_the_period():
    b, clock = backoff()
    burst = [b.start() for _ in range(5)]  # five clients at once, all failing
    clock.now += 0.1
    for started in burst:
        b.failed(error(), started)
    assert b.delay == FIRST_RETRY


def test_zero_means_every_client_tries():
    b, clock = backoff(limit=0)
    b.failed(error(), b.start())
    assert remembered(b) is None and not b.waiting()


def test_waiting_is_false_once_a_retry_is_due():
    b, clock = backoff()
    assert not b.waiting()
    b.failed(error(), b.start())
    assert b.waiting()
    clock.now += FIRST_RETRY
    assert not b.waiting()


# ---------------------------------------------------------------- the pool around them


def test_a_new_auth_query_credential_ends_the_backoff():
    """A login refused with a role's old keys is no reason to refuse its new ones."""
    pool = Pool("r.acme/db", Target("db", 5432, "r", "old", "db"), 2, 10)
    pool.backoff.limit = 15.0
    pool.backoff.failed(ServerError.unreachable("password authentication failed"),
                        pool.backoff.start())
    assert pool.backoff.waiting()
    pool.use_password("new")
    assert not pool.backoff.waiting() and pool.target.password == "new"


class StuckServer:
    """A connection whose check never answers (a server frozen mid-network-cut)."""

    broken = False
    last_used = 0.0

    def run(self, sql: str, timeout: float) -> None:
        gevent.sleep(60)

    def close(self) -> None:
        self.broken = True


def test_a_check_cut_short_closes_the_connection_and_frees_its_slot():
    """The client doing the check may be timed out or killed mid-check: the answer is then
    unread, so the connection must go, and the pool must not count it any more."""
    pool = Pool("u.acme/db", Target("db", 5432, "u", "pw", "db"), 1, 10)
    server = StuckServer()
    pool.members.add(server)
    pool.idle.append(server)
    pool.check_before = float("inf")  # everything idle is due a check
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.01):
            pool.checkout(1.0)
    assert server.broken and server not in pool.members and pool.total == 0 and not pool.testing


class IdleServer:
    broken = False
    generation = 0
    created = last_used = 0.0


def test_a_waiter_interrupted_after_being_handed_a_connection_gives_it_back():
    """The hand-off reaches a waiting client through the event loop: if the client is killed
    first (its startup timeout, say), the connection it was handed goes back to the pool."""
    pool = Pool("u.acme/db", Target("db", 5432, "u", "pw", "db"), 1, 10)
    server = IdleServer()
    pool.members.add(server)  # the only connection, busy: the next checkout waits
    waiting = gevent.spawn(pool.checkout, 5.0)
    gevent.sleep(0)
    assert len(pool.waiters) == 1
    waiting.kill(block=False)  # scheduled before the hand-off below
    pool.checkin(server)
    waiting.join(1)
    assert waiting.dead and pool.idle == [server] and not pool.waiters and pool.opening == 0
    assert pool.checkout(0.1) is server
