"""auth_query: the secrets of roles not listed in the YAML, looked up in Postgres.

A tenant with `auth_user` lets clients log in as any role its `auth_query` finds a secret for. The
query runs on one psycopg2 connection per tenant, logged in as the auth_user's server_user, one
query at a time (psycopg2 is cooperative through the gevent wait callback the daemon installs at
start: replicas.make_psycopg2_cooperative). Answers are cached per role for
auth_query_cache_ttl, unknown roles included; a failed login asks again, at most once per
auth_query_refetch_interval per role, so a changed password is seen before the TTL runs out.

The client is checked with the exchange its secret allows: SCRAM for a verifier, md5 for an md5
hash, cleartext with `auth_type: plain`. What it proved (its SCRAM keys, or the md5 hash) is what
gpooler then logs in to Postgres with, so no password is kept anywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable

import gevent
import psycopg2
from gevent.lock import Semaphore

from gpooler import logs, tls
from gpooler.auth import (
    AuthFailed,
    ClientAuth,
    Credential,
    Md5ClientAuth,
    PlainClientAuth,
    ScramClientAuth,
    mock_verifier,
    scram_auth_info,
)
from gpooler.client import authenticate
from gpooler.config import Config, TenantConfig, password_kind
from gpooler.login import Login, Refusal

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 5.0  # connecting and asking, together
# For the stable verifiers of unknown roles. Made at import, before workers are forked, so that
# every worker answers an unknown role with the same salt, as it answers a real one (a salt that
# changed from one connection to the next would tell that the role does not exist).
_SEED = os.urandom(32)
MAX_CACHED = 10000  # roles remembered per tenant before old answers are dropped
_STATEMENT = "gpooler_auth_query"


@dataclass(frozen=True)
class _Answer:
    secret: str | None  # an md5 hash or a SCRAM verifier; None: no such role, no password
    fetched: float  # time.monotonic() when it was asked for


def _source(tenant: TenantConfig) -> tuple:
    """What the connection and the prepared query depend on: a change on reload starts afresh."""
    user = tenant.users[tenant.auth_user]
    return (tenant.host, tenant.port, tenant.auth_dbname or tenant.database, user.server_user,
            user.server_password, tenant.auth_query, tls.server_tls(tenant))


class Lookup:
    """One tenant's auth_query: its connection and the answers it gave."""

    def __init__(self, tenant: TenantConfig) -> None:
        self.tenant = tenant
        self.source = _source(tenant)
        self._conn: psycopg2.extensions.connection | None = None
        self._lock = Semaphore()
        self._retired = False
        self._answers: dict[str, _Answer] = {}

    def secret(self, role: str) -> str | None:
        """The role's secret, from the cache while the answer is younger than the TTL."""
        return self._answer(role, time.monotonic() - self.tenant.auth_query_cache_ttl).secret

    def refetch(self, role: str, previous: str | None) -> str | None:
        """After a failed login: the role's secret when it is not `previous` any more, asking
        Postgres unless someone did within auth_query_refetch_interval."""
        since = time.monotonic() - self.tenant.auth_query_refetch_interval
        secret = self._answer(role, since).secret
        return secret if secret != previous else None

    def _answer(self, role: str, since: float) -> _Answer:
        """An answer asked for at or after `since`: the cached one or a new one. One query at a
        time; logins that waited for the same role take the answer the first one got."""
        answer = self._answers.get(role)
        if answer is not None and answer.fetched >= since:
            return answer
        with self._lock:
            answer = self._answers.get(role)
            if answer is None or answer.fetched < since:
                fetched = time.monotonic()
                answer = _Answer(self._query(role), fetched)
                if len(self._answers) >= MAX_CACHED:
                    self._forget_old(fetched)
                self._answers[role] = answer
                if self._retired:
                    self.close()
        return answer

    def _forget_old(self, now: float) -> None:
        tenant = self.tenant
        keep = now - max(tenant.auth_query_cache_ttl, tenant.auth_query_refetch_interval)
        self._answers = {k: v for k, v in self._answers.items() if v.fetched >= keep}

    def _query(self, role: str) -> str | None:
        """Ask Postgres; raise Refusal with what went wrong (the server's SQLSTATE, else 08006)."""
        tenant = self.tenant
        timeout = gevent.Timeout(QUERY_TIMEOUT)
        timeout.start()
        try:
            reused = self._conn is not None
            try:
                secret = self._run(role)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                if not reused:
                    raise
                self.close()  # an idle connection Postgres has closed since: once more
                secret = self._run(role)
        except gevent.Timeout as exc:
            self.close()
            if exc is not timeout:
                raise
            why = f"no answer from {tenant.host}:{tenant.port} within {QUERY_TIMEOUT:g}s"
            log.warning("tenant %s: auth_query failed: %s", tenant.id, why)
            raise Refusal("08006", f"auth_query failed: {why}") from None
        except psycopg2.Error as exc:
            why = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            if self._conn is None:
                user = tenant.users[tenant.auth_user].server_user
                why = f'could not connect to {tenant.host}:{tenant.port} as "{user}": {why}'
            self.close()
            log.warning("tenant %s: auth_query failed: %s", tenant.id, why)
            raise Refusal(exc.pgcode or "08006", f"auth_query failed: {why}") from None
        except BaseException:
            self.close()  # interrupted mid-query (the client's startup timeout): unusable
            raise
        finally:
            timeout.close()
        log.debug("tenant %s: auth_query for role %s: %s", tenant.id, logs.safe(role),
                  {"scram": "a SCRAM verifier", "md5": "an md5 hash"}.get(
                      password_kind(secret) if secret else "", "no secret"))
        return secret

    def _run(self, role: str) -> str | None:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
            with conn.cursor() as cur:
                cur.execute(f"PREPARE {_STATEMENT} AS {self.tenant.auth_query}")
        with conn.cursor() as cur:
            cur.execute(f"EXECUTE {_STATEMENT}(%s)", (role,))
            row = cur.fetchone()
        if row is None or row[1:2] == (None,):
            return None  # no such role, no password, or it expired
        secret = row[1] if len(row) > 1 else None
        if isinstance(secret, str) and _usable(secret):
            return secret
        log.warning("tenant %s: auth_query gave role %s no md5 hash or SCRAM-SHA-256 verifier "
                    "in its second column: refused", self.tenant.id, logs.safe(role))
        return None

    def _connect(self) -> psycopg2.extensions.connection:
        tenant = self.tenant
        user = tenant.users[tenant.auth_user]
        conn = psycopg2.connect(
            host=tenant.host, port=tenant.port, user=user.server_user,
            password=user.server_password, dbname=tenant.auth_dbname or tenant.database,
            connect_timeout=int(QUERY_TIMEOUT), application_name="gpooler auth_query",
            **tls.libpq_params(tls.server_tls(tenant)),
        )
        conn.autocommit = True
        return conn

    def retire(self) -> None:
        """Close the connection once no query runs on it. Closing it under a running query would
        stop the whole process: psycopg2 holds the connection's lock while the query waits, and
        close() would wait for that lock inside C, where no other greenlet can run."""
        self._retired = True  # a login still holding this lookup may ask once more: then close
        if not self._lock.locked():
            self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass


def _usable(secret: str) -> bool:
    kind = password_kind(secret)
    if kind == "scram":
        try:
            scram_auth_info(secret)
        except ValueError:
            return False
    return kind != "plain"


class _Refetching(ClientAuth):
    """An exchange that, when the client's answer is refused, asks auth_query again and checks
    the same answer against a changed secret (md5 and cleartext answers can be checked again)."""

    def __init__(self, inner: ClientAuth, refetch: Callable[[], str | None]) -> None:
        self._inner = inner
        self._refetch = refetch

    def first(self) -> bytes:
        return self._inner.first()

    def step(self, body: bytes) -> tuple[bytes, bool]:
        try:
            return self._inner.step(body)
        except AuthFailed:
            secret = self._refetch()
            if secret is None or not self._inner.recheck(secret):
                raise
            return b"", True


class AuthQueries:
    """The lookups of the tenants with auth_user, and the logins of their unlisted users."""

    def __init__(self) -> None:
        self._lookups: dict[str, Lookup] = {}

    def login(self, sock: socket.socket, login: Login) -> Credential:
        """Authenticate a client as the role auth_query vouches for; return what logs in to
        Postgres as that role. Raises Refusal (28P01 for a wrong password or an unknown role)."""
        lookup = self._lookup(login.tenant)
        role = login.user.server_user
        secret = lookup.secret(role)
        exchange = self._exchange(login, secret)
        authenticate(sock, _Refetching(exchange, lambda: lookup.refetch(role, secret)),
                     login.login_name)
        return exchange.upstream

    def _exchange(self, login: Login, secret: str | None) -> ClientAuth:
        role = login.user.server_user
        if secret is None:
            secret = mock_verifier(_SEED, f"{login.tenant.id}/{role}")
        if login.user.auth_type == "plain":
            return PlainClientAuth(secret, role)
        if password_kind(secret) == "md5":
            if login.login_name != role:
                log.info("role %s has an md5 password, which a client logging in as %s cannot "
                         "answer: log in as the role (with options=-ctenant=%s) or set auth_type: "
                         "plain", logs.safe(role), logs.safe(login.login_name), login.tenant.id)
            return Md5ClientAuth(secret, role)
        return ScramClientAuth(secret)

    def _lookup(self, tenant: TenantConfig) -> Lookup:
        lookup = self._lookups.get(tenant.id)
        if lookup is None or lookup.source != _source(tenant):
            if lookup is not None:
                lookup.retire()
            lookup = self._lookups[tenant.id] = Lookup(tenant)
        lookup.tenant = tenant  # the TTL and refetch interval as the configuration is now
        return lookup

    def reconfigure(self, config: Config) -> None:
        """After a reload: forget what was asked of a changed source, close what is not used."""
        for tenant_id, lookup in list(self._lookups.items()):
            tenant = config.tenants.get(tenant_id)
            if tenant is None or tenant.auth_user is None or _source(tenant) != lookup.source:
                del self._lookups[tenant_id]
                lookup.retire()

    def close(self) -> None:
        for lookup in self._lookups.values():
            lookup.retire()
        self._lookups.clear()
