"""Shared fixtures: a throwaway Postgres cluster and gpooler daemons started as subprocesses.

    def test_something(pg, gpooler):
        h = gpooler(base_config(pg))            # from cluster import base_config
        conn = psycopg2.connect(h.dsn("app.acme", "secret"))

Fixtures:
    pg        (session)  a started cluster.Cluster, removed at the end of the session
    gpooler   (function) factory: gpooler(config: dict, wait=True, ...) -> GpoolerHandle
    cluster_factory (function) factory: cluster_factory(**Cluster kwargs) -> started Cluster
    base_cfg  (function) a fresh base_config(pg) dict
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import Cluster, base_config, fill_ports, libpq_dsn  # noqa: E402

__all__ = ["GpoolerHandle", "base_config", "fill_ports"]

START_TIMEOUT = 15.0
LOG_TAIL_LINES = 60


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test (documentation only; nothing deselects it)")


# --------------------------------------------------------------------------------------------------
# Postgres

@pytest.fixture(scope="session")
def pg():
    """The default cluster: roles u_trust/u_md5/u_scram/u_plain (password pw_<role>), db `app`."""
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_factory():
    """Factory for extra clusters, stopped and removed after the test: cluster_factory(**Cluster
    kwargs) -> started Cluster. Use one for anything that stops, restarts or reconfigures Postgres,
    so the shared `pg` stays untouched."""
    made: list[Cluster] = []

    def make(port: int | None = None, **kwargs) -> Cluster:
        c = Cluster(**kwargs)
        made.append(c)
        return c.start(port)

    yield make
    for c in reversed(made):
        c.stop()


# --------------------------------------------------------------------------------------------------
# gpooler daemons

def _connect_host(host: str) -> str:
    host = str(host or "127.0.0.1")
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class GpoolerHandle:
    """One gpooler daemon started by the `gpooler` fixture."""

    def __init__(self, config: dict, config_path: str, log_path: str, proc: subprocess.Popen):
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.proc = proc
        self._cursor = 0          # wait_log() searches from here
        self._set_ports()

    def _set_ports(self):
        self.listeners = [(_connect_host(e.get("host")), int(e["port"]), e.get("mode", "transaction"))
                          for e in self.config.get("listen", [])]
        self.ports = {}
        self.hosts = {}
        for host, port, mode in self.listeners:
            self.ports.setdefault(mode, port)
            self.hosts.setdefault(mode, host)
        admin = self.config.get("admin")
        self.admin_port = int(admin["port"]) if isinstance(admin, dict) and admin.get("port") else None

    # addresses ---------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def port(self, mode: str = "transaction") -> int:
        return self.ports[mode]

    def params(self, user: str, password: str | None = None, mode: str = "transaction",
               dbname: str = "postgres", **extra) -> dict:
        """Connection keywords (host, port, user, password, dbname) for drivers taking kwargs."""
        d = {"host": self.hosts[mode], "port": self.ports[mode], "user": user,
             "password": password, "dbname": dbname}
        d.update(extra)
        return {k: v for k, v in d.items() if v is not None}

    def dsn(self, user: str, password: str | None = None, mode: str = "transaction",
            dbname: str = "postgres", **extra) -> str:
        """libpq keyword/value DSN, e.g. psycopg2.connect(h.dsn("app.acme", "secret"))."""
        return libpq_dsn(**self.params(user, password, mode, dbname, **extra))

    def uri(self, user: str, password: str | None = None, mode: str = "transaction",
            dbname: str = "postgres") -> str:
        from urllib.parse import quote
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        host = self.hosts[mode]
        host = f"[{host}]" if ":" in host else host
        return f"postgresql://{auth}@{host}:{self.ports[mode]}/{dbname}"

    # log -----------------------------------------------------------------------------------------
    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_mark(self) -> int:
        """The current end of the log; pass as wait_log(..., since=mark) to see only later lines."""
        return os.path.getsize(self.log_path)

    def wait_log(self, substring: str, timeout: float = 10.0, since: int | None = None) -> str:
        """Wait for a complete log line containing `substring` that starts at or after `since`
        (default: after the line last matched by wait_log/reload). Returns the line; fails the test
        on timeout. Moves the cursor past the matched line."""
        start = self._cursor if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None     # checked before the read: no line is missed
            with open(self.log_path, "rb") as f:
                f.seek(start)
                data = f.read()
            pos = 0
            while True:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                line = data[pos:nl].decode("utf-8", "replace")
                if substring in line:
                    self._cursor = start + nl + 1
                    return line
                pos = nl + 1
            if exited:
                pytest.fail(f"gpooler exited ({self.proc.returncode}) without logging {substring!r}\n"
                            f"--- gpooler log tail ---\n{self.log_tail()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"gpooler log: no line containing {substring!r} within {timeout}s\n"
                            f"--- gpooler log tail ---\n{self.log_tail()}", pytrace=False)
            time.sleep(0.02)

    # lifecycle -----------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every listener (and the admin port) accepts TCP connections."""
        targets = [(h, p) for h, p, _ in self.listeners]
        if self.admin_port:
            targets.append((_connect_host(self.config["admin"].get("host")), self.admin_port))
        deadline = time.monotonic() + timeout
        pending = list(targets)
        while pending:
            if self.proc.poll() is not None:
                pytest.fail(f"gpooler exited with code {self.proc.returncode} during startup\n"
                            f"--- gpooler log tail ---\n{self.log_tail()}", pytrace=False)
            pending = [t for t in pending if not _tcp_accepts(*t)]
            if not pending:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"gpooler not accepting on {pending} after {timeout}s\n"
                            f"--- gpooler log tail ---\n{self.log_tail()}", pytrace=False)
            time.sleep(0.05)

    def write_config(self, config: dict) -> None:
        """Rewrite the config file (no signal); listeners without a port keep their old one."""
        config = fill_ports(copy.deepcopy(config), previous=self.config)
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        self.config = config
        self._set_ports()

    def reload(self, new_config: dict | None = None, timeout: float = 10.0) -> str:
        """Optionally rewrite the config file (listeners without a port keep the old one), send
        SIGHUP, wait for a new "configuration reloaded" / "configuration reload failed" line.
        Returns "reloaded" or "failed"."""
        if new_config is not None:
            self.write_config(new_config)
        mark = self.log_mark()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                data = f.read()
            pos = 0
            while (nl := data.find(b"\n", pos)) >= 0:
                line = data[pos:nl]
                pos = nl + 1
                for needle, result in ((b"configuration reload failed", "failed"),
                                       (b"configuration reloaded", "reloaded")):
                    if needle in line:
                        self._cursor = mark + pos
                        return result
            if exited or time.monotonic() > deadline:
                pytest.fail(f"gpooler did not report a reload within {timeout}s "
                            f"(exit code {self.proc.returncode})\n"
                            f"--- gpooler log tail ---\n{self.log_tail()}", pytrace=False)
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def interrupt(self, timeout: float = 10.0) -> int:
        """SIGINT and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the daemon and anything in its process group (workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def __repr__(self):
        return f"<gpooler pid={self.proc.pid} ports={self.ports} rc={self.proc.poll()}>"


_ITEM_HANDLES = "_gpooler_handles"


@pytest.fixture
def gpooler(request, tmp_path):
    """Factory: gpooler(config, wait=True, env=None, args=(), timeout=15) -> GpoolerHandle.

    Listen (and admin) entries without a port get a free one. The daemon runs as
    `python -m gpooler -c FILE [args]` with stdout+stderr in a log file; with wait=True the call
    returns once every listener accepts TCP connections (the test fails with the log tail if the
    process exits first or after `timeout` s). Everything is killed at teardown; on failure the
    log tail is attached to the report ("gpooler log" section)."""
    handles: list[GpoolerHandle] = []
    setattr(request.node, _ITEM_HANDLES, handles)
    counter = [0]

    def start(config: dict, wait: bool = True, env: dict | None = None, args=(),
              timeout: float = START_TIMEOUT) -> GpoolerHandle:
        counter[0] += 1
        n = counter[0]
        config = fill_ports(copy.deepcopy(config))
        config_path = str(tmp_path / f"gpooler{n}.yaml")
        log_path = str(tmp_path / f"gpooler{n}.log")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        penv = dict(os.environ)
        penv["PYTHONUNBUFFERED"] = "1"
        penv.pop("GPOOLER_CONFIG", None)
        if env:
            penv.update(env)
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "gpooler", "-c", config_path, *args],
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=str(tmp_path), env=penv, start_new_session=True)
        h = GpoolerHandle(config, config_path, log_path, proc)
        handles.append(h)
        if wait:
            h.wait_ready(timeout)
        return h

    yield start
    for h in handles:
        h.kill()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.when in ("setup", "call"):
        for i, h in enumerate(getattr(item, _ITEM_HANDLES, []) or []):
            try:
                tail = h.log_tail()
            except OSError:
                continue
            report.sections.append((f"gpooler log #{i + 1} (pid {h.pid}, tail)", tail))
    return report


@pytest.fixture(scope="session")
def pgbench_db(pg) -> str:
    """A database initialised by `pgbench -i` directly on the cluster, its tables open to u_scram."""
    db = "pgbench_shared"
    pg.psql(f"create database {db}")
    subprocess.run([os.path.join(pg.bindir, "pgbench"), "-i", "-q", "-h", pg.host, "-p",
                    str(pg.port), "-U", "postgres", db], check=True, capture_output=True,
                   timeout=120)
    pg.psql("grant all on all tables in schema public to u_scram", dbname=db)
    return db


@pytest.fixture
def base_cfg(pg) -> dict:
    """A fresh base_config(pg) dict (tenant acme, users app/md5user/trustuser/plainuser)."""
    return base_config(pg)
