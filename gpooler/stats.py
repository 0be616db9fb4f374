"""Counters, pool gauges and the StatsD push.

The relay only does integer additions on plain attributes of its pool's PoolStats: bytes in per
chunk read from the client, sync points (queries) per chunk forwarded, bytes out per chunk
forwarded to the client. Times are taken once per round trip (`busy`, `ready`) and once per
checkout (`waited`), never per message. Everything else (gauges, averages, names) is computed
by whoever reads: SHOW POOLS/STATS on the admin console, and the StatsD greenlet, which wakes
every `statsd.interval` seconds, diffs the counters against its previous push and sends it all over
UDP in a few datagrams.

What is counted (the same in SHOW STATS and StatsD):

- queries: sync points the clients sent to a server: each simple Query, each extended-protocol
  Sync, each FunctionCall. Syncs gpooler answers itself (no server held) are not counted.
- transactions: the times a client's server connection came back to idle (ReadyForQuery "I") with
  nothing outstanding: an explicit transaction counts once at its COMMIT/ROLLBACK, an autocommit
  statement once, and a pipelined batch of autocommit statements once per catch-up.
- xact_time: from the client's first message after being idle to that idle ReadyForQuery.
- query_time: the time the server connection had work outstanding for the client (from a message
  sent while nothing was outstanding to the ReadyForQuery that caught up), so
  query_time / queries is the average query duration, as in PgBouncer.
- wait_time: time a client waited at checkout for a server connection (PAUSE included).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import gevent

if TYPE_CHECKING:
    from gpooler.client import Client
    from gpooler.config import StatsdConfig
    from gpooler.daemon import Daemon
    from gpooler.pool import Pool

log = logging.getLogger(__name__)

IDLE = ord("I")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_TOTALS = ("xact_count", "query_count", "bytes_in", "bytes_out", "xact_time", "query_time",
           "wait_time", "wait_count")


class PoolStats:
    """One pool's counters: plain integers (times in microseconds) bumped in place."""

    __slots__ = ("created", "waiting") + _TOTALS

    def __init__(self) -> None:
        self.created = time.monotonic()
        self.waiting: dict["Client", float] = {}  # clients at checkout -> since (monotonic)
        self.xact_count = self.query_count = self.bytes_in = self.bytes_out = 0
        self.xact_time = self.query_time = self.wait_time = self.wait_count = 0

    def busy(self, client: "Client") -> None:
        """The client sent work while nothing was outstanding: a round trip (maybe a transaction)
        begins."""
        client.busy_since = client.last_request = now = time.monotonic()
        if not client.xact_start:
            client.xact_start = now

    def ready(self, client: "Client", status: int) -> None:
        """The server caught up with everything the client sent (on_ready)."""
        now = time.monotonic()
        self.query_time += int((now - client.busy_since) * 1e6)
        client.busy_since = 0.0
        if status == IDLE and client.xact_start:
            self.xact_count += 1
            self.xact_time += int((now - client.xact_start) * 1e6)
            client.xact_start = 0.0

    def waited(self, client: "Client", start: float) -> None:
        """A checkout is over, with or without a server connection."""
        self.waiting.pop(client, None)
        self.wait_count += 1
        self.wait_time += int((time.monotonic() - start) * 1e6)

    def totals(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in _TOTALS)


def sanitize(part: str) -> str:
    """One component of a Graphite name: only [A-Za-z0-9_-]; anything else becomes _."""
    return _UNSAFE.sub("_", part) or "_"


def metric(prefix: str, *parts: str) -> str:
    """`<prefix>.<part>...`; the prefix may have dots of its own, the parts may not."""
    head = ".".join(sanitize(p) for p in prefix.split(".")) if prefix else ""
    tail = ".".join(sanitize(p) for p in parts)
    return f"{head}.{tail}" if head else tail


def active_clients(daemon: "Daemon") -> Counter:
    """Logged-in clients per pool that are not waiting at checkout (cl_active)."""
    active: Counter = Counter()
    for client in daemon.cancel_keys.clients():
        pool = client.pool
        if pool is not None and client not in pool.stats.waiting:
            active[pool] += 1
    return active


def pool_gauges(pool: "Pool", cl_active: int, now: float) -> dict[str, Any]:
    """What SHOW POOLS shows and StatsD gets as gauges; maxwait in seconds (float)."""
    waiting = pool.stats.waiting
    oldest = min(waiting.values(), default=now)
    idle = len(pool.idle)
    due = sum(1 for server in pool.idle if server.last_used < pool.check_before)
    return {
        "cl_active": cl_active,
        "cl_waiting": len(waiting),
        "sv_active": max(0, len(pool.members) - idle - pool.testing),
        "sv_idle": idle - due,
        "sv_used": due,  # idle past server_check_delay: checked before they serve again
        "sv_tested": pool.testing,
        "sv_login": pool.opening,
        "maxwait": max(0.0, now - oldest),
    }


class Stats:
    """The daemon's login counters, and the StatsD pusher (restarted when `statsd:` changes)."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.logins_ok = 0
        self.logins_failed = 0
        self.refused: Counter[str] = Counter()  # SQLSTATE -> clients refused with it
        self.by_user: Counter[tuple[str, str, str]] = Counter()  # (tenant, user, metric) -> count
        self._config: "StatsdConfig | None" = None
        self._pusher: gevent.Greenlet | None = None

    # ------------------------------------------------------------ logins (once per client)

    def logged_in(self, client: "Client") -> None:
        self.logins_ok += 1
        self.by_user[client.login.tenant.id, client.login.user.name, "logins_ok"] += 1

    def client_done(self, client: "Client", reason: str) -> None:
        """Count a refusal (reason "refused: SQLSTATE ...") and a login that did not complete."""
        if not reason.startswith("refused: "):
            return
        sqlstate = reason.split(" ", 2)[1] if reason.count(" ") else ""
        sqlstate = sqlstate if _SQLSTATE.fullmatch(sqlstate) else "other"
        failed = client.key is None
        self.refused[sqlstate] += 1
        self.logins_failed += failed
        login = client.login
        if login is not None:
            self.by_user[login.tenant.id, login.user.name, f"refused.{sqlstate}"] += 1
            self.by_user[login.tenant.id, login.user.name, "logins_failed"] += failed

    # ------------------------------------------------------------ StatsD

    def configure(self, config: "StatsdConfig | None") -> None:
        """Start, restart or stop the pusher for a (re)loaded `statsd:` section."""
        if config == self._config and (config is None or self._pusher is not None):
            return
        if self._pusher is not None:
            self._pusher.kill(block=False)
            self._pusher = None
        self._config = config
        if config is not None:
            self._pusher = gevent.spawn(Pusher(self.daemon, config).run)
            log.info("statsd: pushing to %s:%d every %gs", config.host, config.port,
                     config.interval)


class Pusher:
    """Every interval: gauges as they are, counters as differences, timers as averages."""

    def __init__(self, daemon: "Daemon", config: "StatsdConfig") -> None:
        self.daemon = daemon
        self.config = config
        self._last_pools: dict[Any, tuple[int, ...]] = {}
        self._last_daemon: Counter = Counter()
        self.collect()  # the baseline: a pusher started by a reload sends only what comes next

    def run(self) -> None:
        import statsd  # UDP; with gevent's monkey-patching the socket never blocks the hub

        config = self.config
        try:
            client = statsd.StatsClient(config.host, config.port, prefix=None,
                                        ipv6=":" in config.host)
        except OSError as exc:
            log.error("statsd: cannot use %s:%d: %s", config.host, config.port, exc)
            return
        kinds = {"c": "incr", "g": "gauge", "ms": "timing"}
        while True:
            gevent.sleep(config.interval)
            try:
                lines = self.collect()
                pipe = client.pipeline()
                for name, value, kind in lines:
                    getattr(pipe, kinds[kind])(name, value)
                pipe.send()
            except Exception:
                log.exception("statsd: push failed")

    def collect(self) -> list[tuple[str, float, str]]:
        """(name, value, kind) for one push; kind is StatsD's c (counter), g (gauge), ms (timer)."""
        daemon, prefix = self.daemon, self.config.prefix
        worker = daemon.worker
        suffix = (f"w{worker.index + 1}",) if worker.count > 1 else ()  # gauges per worker
        now = time.monotonic()
        active = active_clients(daemon)
        gauges: dict[tuple[str, str], dict[str, float]] = {}
        deltas: dict[tuple[str, str], list[int]] = {}
        last, self._last_pools = self._last_pools, {}
        servers = 0
        for (tenant, user, _database, *_member), pool in list(daemon.pools.items()):
            servers += len(pool.members)
            key = (tenant, user)
            found = pool_gauges(pool, active[pool], now)
            group = gauges.setdefault(key, dict.fromkeys(found, 0))
            for name, value in found.items():
                group[name] = max(group[name], value) if name == "maxwait" else group[name] + value
            totals = pool.stats.totals()
            self._last_pools[pool] = totals
            before = last.get(pool, (0,) * len(totals))
            summed = deltas.setdefault(key, [0] * len(totals))
            for i, (a, b) in enumerate(zip(totals, before)):
                summed[i] += a - b
        lines: list[tuple[str, float, str]] = []
        for (tenant, user), group in gauges.items():
            for name, value in group.items():
                if name != "sv_tested":
                    lines.append((metric(prefix, tenant, user, name, *suffix), value, "g"))
        for (tenant, user), d in deltas.items():
            xacts, queries, bytes_in, bytes_out, xact_us, query_us, wait_us, waits = d
            for name, value in (("transactions", xacts), ("queries", queries),
                                ("bytes_in", bytes_in), ("bytes_out", bytes_out)):
                if value:
                    lines.append((metric(prefix, tenant, user, name), value, "c"))
            for name, total, count in (("xact_time", xact_us, xacts),
                                       ("query_time", query_us, queries),
                                       ("wait_time", wait_us, waits)):
                if count > 0:
                    lines.append((metric(prefix, tenant, user, name), total / count / 1000, "ms"))
        stats = daemon.stats
        current: Counter = Counter({("logins_ok",): stats.logins_ok,
                                    ("logins_failed",): stats.logins_failed})
        current.update({("refused", s): n for s, n in stats.refused.items()})
        current.update({(t, u, *m.split(".")): n for (t, u, m), n in stats.by_user.items()})
        for parts, value in current.items():
            delta = value - self._last_daemon[parts]
            if delta:
                lines.append((metric(prefix, *parts), delta, "c"))
        self._last_daemon = current
        lines.append((metric(prefix, "clients", *suffix), len(daemon.cancel_keys.clients()), "g"))
        lines.append((metric(prefix, "tenants", *suffix), len(daemon.config.tenants), "g"))
        lines.append((metric(prefix, "pools", *suffix), len(daemon.pools), "g"))
        lines.append((metric(prefix, "servers", *suffix), servers, "g"))
        return lines
