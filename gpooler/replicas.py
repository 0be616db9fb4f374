"""Primary and replicas of one tenant: who is the primary, who is fit for reads, how far behind.

The YAML's `host` is only the first guess: every member is probed (`pg_is_in_recovery()`) in the
background, so after a promotion the new primary is found without a reload. The probes also give
each replica's replay position, which serves both `max_replica_lag` and read-your-writes: a client
that wrote at WAL position X reads only from members known to have replayed X.

The probes run through psycopg2, made cooperative with a gevent wait callback so that a slow
member stalls only its own probe.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable

import gevent
import psycopg2
import psycopg2.extensions
from gevent.event import Event
from gevent.socket import wait_read, wait_write

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
PROBE_SQL = (
    "SELECT pg_catalog.pg_is_in_recovery(),"
    " (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()"
    " ELSE pg_catalog.pg_current_wal_lsn() END)::text,"
    " EXTRACT(EPOCH FROM now() - pg_catalog.pg_last_xact_replay_timestamp())::float8"
)


def gevent_wait_callback(conn: psycopg2.extensions.connection) -> None:
    """Let other greenlets run while psycopg2 waits on the network."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            wait_read(conn.fileno())
        elif state == psycopg2.extensions.POLL_WRITE:
            wait_write(conn.fileno())
        else:
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


def make_psycopg2_cooperative() -> None:
    psycopg2.extensions.set_wait_callback(gevent_wait_callback)


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass
class Member:
    """One server of a tenant, as the probes last saw it."""

    host: str
    port: int
    role: str = "unknown"  # primary | replica | unknown
    healthy: bool = True  # until a probe says otherwise
    lsn: int = 0  # current (primary) or replayed (replica) WAL position
    lag: float = 0.0  # seconds behind the primary; 0 for the primary
    routed: int = 0  # transactions sent here
    _conn: object = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Topology:
    """The members of one tenant and the choice among them."""

    def __init__(
        self,
        tenant_id: str,
        primary: tuple[str, int],
        replicas: list[tuple[str, int]],
        credentials: Callable[[], tuple[str, str | None, str]],
        interval: float,
        max_lag: float,
    ) -> None:
        self.tenant_id = tenant_id
        self.members = [Member(*primary, role="primary")] + [Member(*r, role="replica")
                                                               for r in replicas]
        self.credentials = credentials  # (user, password, database) to probe with
        self.interval = interval
        self.max_lag = max_lag
        self._wake = Event()
        self._runner: gevent.Greenlet | None = None
        self.probed = Event()  # set after each full round

    # ---------------------------------------------------------------- choosing

    def primary(self) -> Member:
        """The member to write to: the healthy one not in recovery, else the best guess."""
        for member in self.members:
            if member.role == "primary" and member.healthy:
                return member
        for member in self.members:
            if member.role == "primary":
                return member
        return self.members[0]

    def readers(self, min_lsn: int = 0) -> list[Member]:
        """Members fit for a read: healthy, not lagging too far, and past min_lsn."""
        primary = self.primary()
        fit = [primary] if primary.healthy else []
        for member in self.members:
            if member is primary or not member.healthy or member.role != "replica":
                continue
            if self.max_lag and member.lag > self.max_lag:
                continue
            if min_lsn and member.lsn < min_lsn:
                continue
            fit.append(member)
        return fit or [primary]

    def choose_reader(
        self,
        policy: str,
        min_lsn: int = 0,
        replicas_only: bool = False,
        busy: Callable[[Member], int] = lambda member: 0,
    ) -> Member:
        """A member to read from; replicas_only (SET gpooler.target = replica) leaves the primary
        out unless no replica is fit; least_busy picks the one with fewest connections in use."""
        fit = self.readers(min_lsn)
        if replicas_only:
            fit = [m for m in fit if m.role == "replica"] or fit
        if policy == "least_busy":
            return min(fit, key=lambda m: (busy(m), random.random()))
        return random.choice(fit)

    def mark_down(self, member: Member, why: str) -> None:
        """A connection to member just failed: out of rotation until a probe finds it again."""
        self._set(member, member.role, False, why)
        self.reprobe()

    # ---------------------------------------------------------------- probing

    def start(self) -> None:
        if self._runner is None:
            self._runner = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.kill(block=False)
            self._runner = None
        for member in self.members:
            self._disconnect(member)

    def reprobe(self) -> None:
        """Probe now rather than at the next interval (a write met a server in recovery)."""
        self._wake.set()

    def reconfigure(self, primary: tuple[str, int], replicas: list[tuple[str, int]],
                    interval: float, max_lag: float) -> None:
        """Apply a reload: keep what is known of members that stay."""
        known = {m.address: m for m in self.members}
        wanted = [primary] + list(replicas)
        members = []
        for index, address in enumerate(wanted):
            member = known.pop(address, None) or Member(*address,
                                                        role="primary" if index == 0 else "replica")
            members.append(member)
        for gone in known.values():
            self._disconnect(gone)
        self.members = members
        self.interval = interval
        self.max_lag = max_lag
        self.reprobe()

    def _run(self) -> None:
        while True:
            self.probe_round()
            self._wake.wait(self.interval)
            self._wake.clear()

    def probe_round(self) -> None:
        """Probe every member at once; then work out each replica's lag against the primary."""
        members = list(self.members)
        results = [gevent.spawn(self._probe, member) for member in members]
        gevent.joinall(results)
        primary_lsn = max((m.lsn for m in members if m.role == "primary" and m.healthy), default=0)
        for member, job in zip(members, results):
            if member.role == "replica" and member.healthy and job.value is not None:
                if primary_lsn and member.lsn >= primary_lsn:
                    member.lag = 0.0
                else:
                    # Behind: as old as its last replayed commit; with none replayed since it
                    # started, no telling how far behind, so too far.
                    member.lag = job.value[0] if job.value[0] is not None else float("inf")
        self.probed.set()

    def _probe(self, member: Member) -> tuple[float | None] | None:
        """One probe; returns (age of the last replayed commit or None,), or None when down."""
        try:
            with gevent.Timeout(PROBE_TIMEOUT):
                conn = member._conn
                if conn is None or conn.closed:
                    user, password, database = self.credentials()
                    conn = member._conn = psycopg2.connect(
                        host=member.host, port=member.port, user=user, password=password,
                        dbname=database, connect_timeout=int(PROBE_TIMEOUT) or 1,
                        application_name="gpooler probe",
                    )
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(PROBE_SQL)
                    in_recovery, lsn, delay = cur.fetchone()
        except (psycopg2.Error, gevent.Timeout, OSError) as exc:
            self._disconnect(member)
            self._set(member, member.role, False, str(exc).strip().splitlines()[0] if str(exc)
                      else type(exc).__name__)
            return None
        member.lsn = parse_lsn(lsn) if lsn else 0
        self._set(member, "replica" if in_recovery else "primary", True, "")
        return (delay,)

    def _set(self, member: Member, role: str, healthy: bool, why: str) -> None:
        if role != member.role:
            log.info("tenant %s: %s is now %s", self.tenant_id, member, role)
        if healthy != member.healthy:
            log.info("tenant %s: %s is %s%s", self.tenant_id, member,
                     "healthy again" if healthy else "unreachable", f": {why}" if why else "")
        member.role = role
        member.healthy = healthy

    @staticmethod
    def _disconnect(member: Member) -> None:
        conn = member._conn
        member._conn = None
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass
