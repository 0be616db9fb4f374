"""Throwaway Postgres clusters for tests, scripts/demo and scripts/bench.

Standard library only: scripts import this module with a bare interpreter.

    from cluster import Cluster
    with Cluster() as pg:                 # initdb + start on a free port
        pg.psql("select 1")
        dsn = pg.dsn("u_md5", "pw_u_md5")

Postgres refuses to run as root. When this process is root, initdb, pg_ctl and postgres run as the
"postgres" account (or a "gpooler-pg" system account created on demand), and the cluster's
directory is owned by that account.
"""

from __future__ import annotations

import atexit
import copy
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref

__all__ = [
    "Cluster", "ClusterError", "ROLES", "PASSWORDS", "DEFAULT_HBA", "free_port",
    "find_bindir", "pg_user", "as_pg_user", "base_config", "deep_merge", "fill_ports",
    "libpq_dsn", "ipv6_available", "connect_error",
]

# Roles created in every fresh cluster: name -> the pg_hba method it authenticates with upstream.
ROLES = {
    "u_trust": "trust",
    "u_md5": "md5",
    "u_scram": "scram-sha-256",
    "u_plain": "password",
}
PASSWORDS = {role: "pw_" + role for role in ROLES}

SUPERUSER = "postgres"
_FALLBACK_USER = "gpooler-pg"


class ClusterError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# helpers

def find_bindir() -> str:
    """The directory holding initdb, pg_ctl and postgres.

    `pg_config --bindir` when it has initdb and pg_ctl, else the highest /usr/lib/postgresql/*/bin.
    (Never PATH lookup: /usr/local/bin/initdb on some machines is something else entirely.)
    """
    env = os.environ.get("GPOOLER_PG_BINDIR")
    candidates = [env] if env else []
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass

    def version_key(path):
        v = path.split("/")[-2]
        return [int(p) if p.isdigit() else 0 for p in v.split(".")]

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    for d in candidates:
        if d and all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return d
    raise ClusterError(
        "Postgres server binaries (initdb, pg_ctl) not found: install the 'postgresql' package "
        "(apt-get install postgresql) or set GPOOLER_PG_BINDIR")


_handed_out: set[int] = set()


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1", also_ipv6: bool = False) -> int:
    """A TCP port that is free on `host` (and on ::1 when also_ipv6), never the same twice per process."""
    for _ in range(200):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port in _handed_out:
            continue
        if also_ipv6 and ipv6_available():
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.bind(("::1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ClusterError("could not find a free port")


def libpq_dsn(**params) -> str:
    """A libpq keyword/value string; values quoted when needed; None values left out."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        value = str(value)
        if value == "" or any(c in value for c in " '\\\t\n"):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _clean_env(extra=None) -> dict:
    """os.environ without PG* variables (a stray PGHOST must not redirect our tools)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    if extra:
        env.update(extra)
    return env


_pg_user_cache = None


def pg_user():
    """(name, uid, gid) of the account that runs Postgres when we are root; None when not root."""
    global _pg_user_cache
    if os.geteuid() != 0:
        return None
    if _pg_user_cache:
        return _pg_user_cache
    for name in ("postgres", _FALLBACK_USER):
        try:
            pw = pwd.getpwnam(name)
            break
        except KeyError:
            continue
    else:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", _FALLBACK_USER], check=True)
        pw = pwd.getpwnam(_FALLBACK_USER)
    _pg_user_cache = (pw.pw_name, pw.pw_uid, pw.pw_gid)
    return _pg_user_cache


def as_pg_user(home: str | None = None) -> dict:
    """Extra subprocess.Popen/run kwargs that run a command as the unprivileged Postgres account
    when we are root ({} otherwise)."""
    u = pg_user()
    if not u:
        return {}
    return {"user": u[1], "group": u[2], "extra_groups": []}


def chown_tree(path: str) -> None:
    u = pg_user()
    if not u:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, u[1], u[2])
        for f in files:
            os.chown(os.path.join(root, f), u[1], u[2], follow_symlinks=False)


def make_tempdir(prefix: str, base_dir: str = "/tmp") -> str:
    """A fresh directory, mode 0755, owned by the Postgres account when root, parents traversable."""
    d = tempfile.mkdtemp(prefix=prefix, dir=base_dir)
    os.chmod(d, 0o755)
    if pg_user():
        # every parent must be traversable by the unprivileged account
        p = os.path.dirname(os.path.abspath(d))
        while p and p != "/":
            mode = os.stat(p).st_mode
            if mode & 0o001 == 0:
                os.chmod(p, mode | 0o755)
            p = os.path.dirname(p)
        chown_tree(d)
    return d


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


_live: "weakref.WeakSet[Cluster]" = weakref.WeakSet()


@atexit.register
def _cleanup_all():
    for c in list(_live):
        try:
            c.stop()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------

def default_hba() -> str:
    lines = [
        "# TYPE  DATABASE     USER      ADDRESS        METHOD",
        f"local   all          {SUPERUSER}                  trust",
        "local   replication  all                      trust",
        f"host    all          {SUPERUSER}  127.0.0.1/32   trust",
        f"host    all          {SUPERUSER}  ::1/128        trust",
        f"host    replication  {SUPERUSER}  127.0.0.1/32   trust",
        f"host    replication  {SUPERUSER}  ::1/128        trust",
    ]
    for role, method in ROLES.items():
        for addr in ("127.0.0.1/32", "::1/128"):
            lines.append(f"host    all          {role:9} {addr:14} {method}")
    lines += [
        "# everything else: local socket trusted (setup), TCP by SCRAM",
        "local   all          all                      trust",
        "host    all          all       127.0.0.1/32   scram-sha-256",
        "host    all          all       ::1/128        scram-sha-256",
    ]
    return "\n".join(lines) + "\n"


DEFAULT_HBA = default_hba()

SETUP_SQL = """
SET password_encryption = 'md5';
CREATE ROLE u_md5 LOGIN PASSWORD 'pw_u_md5';
SET password_encryption = 'scram-sha-256';
CREATE ROLE u_scram LOGIN PASSWORD 'pw_u_scram';
CREATE ROLE u_trust LOGIN PASSWORD 'pw_u_trust';
CREATE ROLE u_plain LOGIN PASSWORD 'pw_u_plain';
CREATE DATABASE app OWNER u_scram;
"""


class Cluster:
    """A throwaway Postgres cluster in a temp directory.

    extra_conf: postgresql.conf settings added after ours (e.g. {"ssl": "on"}).
    hba: full pg_hba.conf text (str or list of lines) replacing DEFAULT_HBA.
    files: {name: bytes|str} written into the data directory (mode 0600) before the first start,
           e.g. server.crt/server.key for ssl; relative paths in extra_conf resolve there.
    setup_roles: create the ROLES and the `app` database after initdb.
    """

    def __init__(self, extra_conf: dict | None = None, hba=None, files: dict | None = None,
                 setup_roles: bool = True, base_dir: str = "/tmp", _primary: "Cluster | None" = None):
        self.bindir = find_bindir()
        self.extra_conf = dict(extra_conf or {})
        if isinstance(hba, (list, tuple)):
            hba = "\n".join(hba) + "\n"
        self.hba = hba if hba is not None else DEFAULT_HBA
        self.files = dict(files or {})
        self.setup_roles = setup_roles
        self.base_dir = base_dir
        self._primary = _primary
        self.dir: str | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.ipv6 = ipv6_available()
        self.superuser = SUPERUSER
        self.passwords = dict(PASSWORDS)
        self._initialized = False
        self._running = False

    # paths -----------------------------------------------------------------------------------
    @property
    def datadir(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def socket_dir(self) -> str:
        return self.dir

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "postgres.log")

    @property
    def running(self) -> bool:
        return self._running

    def bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    # running commands --------------------------------------------------------------------------
    def run_as_pg(self, cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
        """Run a command as the unprivileged Postgres account (or ourselves when not root)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", self.dir or "/")
        env = _clean_env({"HOME": self.dir or "/tmp"})
        res = subprocess.run(cmd, env=env, timeout=timeout, **as_pg_user(), **kw)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
                               f"\n--- postgres log tail ---\n{_tail(self.log_path) if self.dir else ''}")
        return res

    # lifecycle ---------------------------------------------------------------------------------
    def start(self, port: int | None = None) -> "Cluster":
        """initdb on first use, then start on `port` (a free one by default); waits until ready."""
        if self._running:
            return self
        if port is not None:
            self.port = port
        elif self.port is None:
            self.port = free_port(also_ipv6=self.ipv6)
        if self.dir is None:
            self.dir = make_tempdir("gpooler-pg-", self.base_dir)
            _live.add(self)
        try:
            if not self._initialized:
                if self._primary is not None:
                    self._basebackup()
                else:
                    self._initdb()
            self._write_conf()
            self.run_as_pg([self.bin("pg_ctl"), "-D", self.datadir, "-l", self.log_path,
                            "-w", "-t", "60", "start"])
            self._running = True
            if not self._initialized:
                self._initialized = True
                if self.setup_roles and self._primary is None:
                    self.psql(SETUP_SQL)
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self):
        self.run_as_pg([self.bin("initdb"), "-D", self.datadir, "-U", SUPERUSER, "-A", "trust",
                        "--encoding=UTF8", "--locale=C",
                        "--no-sync"])
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write(self.hba)
        for name, data in self.files.items():
            path = os.path.join(self.datadir, name)
            with open(path, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.chmod(path, 0o600)
        chown_tree(self.datadir)

    def _basebackup(self):
        p = self._primary
        self.run_as_pg([self.bin("pg_basebackup"), "-D", self.datadir, "-R", "-X", "stream",
                        "-c", "fast", "-h", p.socket_dir, "-p", str(p.port), "-U", SUPERUSER,
                        "--no-sync"])

    def _write_conf(self):
        listen = "127.0.0.1,::1" if self.ipv6 else "127.0.0.1"
        conf = {
            "listen_addresses": listen,
            "port": self.port,
            "unix_socket_directories": self.socket_dir,
            "max_connections": 300,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "log_min_messages": "warning",
            "shared_buffers": "128MB",
        }
        conf.update(self.extra_conf)
        path = os.path.join(self.datadir, "postgresql.conf")
        marker = "# ---- gpooler test settings ----\n"
        with open(path) as f:
            # drop our previous block (a restart, or the primary's block copied by pg_basebackup)
            text = f.read().split(marker)[0]
        lines = [marker]
        for k, v in conf.items():
            if isinstance(v, bool):
                v = "on" if v else "off"
            if isinstance(v, str):
                v = "'" + v.replace("'", "''") + "'"
            lines.append(f"{k} = {v}\n")
        with open(path, "w") as f:
            f.write(text + "".join(lines))
        chown_tree(self.datadir)

    def stop(self, mode: str = "immediate", remove: bool = True) -> None:
        """Stop the server (mode immediate|fast|smart) and, by default, delete the directory."""
        if self._running:
            try:
                self.run_as_pg([self.bin("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "-t", "60",
                                "stop"], check=False)
            except Exception:
                pass
            self._kill_postmaster()
            self._running = False
        if remove and self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self._initialized = False
            _live.discard(self)

    def shutdown(self, mode: str = "fast") -> None:
        """Stop the server but keep its data: start() brings it back on the same port."""
        self.stop(mode=mode, remove=False)

    def _kill_postmaster(self):
        if not self.dir:
            return
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def restart(self, mode: str = "fast") -> None:
        """pg_ctl restart (same port, same data); every server connection is dropped."""
        self._write_conf()
        self.run_as_pg([self.bin("pg_ctl"), "-D", self.datadir, "-l", self.log_path, "-m", mode,
                        "-w", "-t", "60", "restart"])
        self._running = True

    def reload(self) -> None:
        """pg_ctl reload (after changing extra_conf or hba)."""
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write(self.hba)
        self._write_conf()
        self.run_as_pg([self.bin("pg_ctl"), "-D", self.datadir, "reload"])

    def make_replica(self, port: int | None = None, extra_conf: dict | None = None) -> "Cluster":
        """A started streaming replica of this cluster (pg_basebackup -R). Stop it yourself."""
        r = Cluster(extra_conf=extra_conf, base_dir=self.base_dir, _primary=self)
        return r.start(port)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # clients -----------------------------------------------------------------------------------
    def dsn(self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres",
            host: str | None = None, **extra) -> str:
        """libpq keyword/value DSN over TCP (host 127.0.0.1 by default)."""
        return libpq_dsn(host=host or self.host, port=self.port, user=user, password=password,
                         dbname=dbname, **extra)

    def uri(self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres") -> str:
        from urllib.parse import quote
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres", user: str = SUPERUSER, check: bool = True) -> str:
        """Run SQL through psql over the Unix socket (trusted); returns unaligned tuples-only output.
        Statements run one by one (so CREATE DATABASE is fine), stopping at the first error."""
        cmd = [self.bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
               "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", dbname, "-f", "-"]
        res = subprocess.run(cmd, input=sql, capture_output=True, text=True, timeout=120,
                             env=_clean_env(), cwd=self.dir)
        if check and res.returncode != 0:
            raise ClusterError(f"psql failed ({res.returncode}): {res.stderr.strip()}\nSQL: {sql}")
        return res.stdout.strip()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def __repr__(self):
        return f"<Cluster {self.dir} port={self.port} running={self._running}>"


# --------------------------------------------------------------------------------------------------
# gpooler configuration helpers (plain dicts, shared by tests and scripts)

def deep_merge(base: dict, overrides: dict) -> dict:
    """Recursively merge `overrides` into a copy of `base`; a None value deletes the key."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def base_config(pg: Cluster, **overrides) -> dict:
    """A valid gpooler config for cluster `pg`: listeners (no port: gpooler fixture/fill_ports
    assign one) in transaction and session mode on 127.0.0.1, tenant "acme" with users
    app (SCRAM upstream), md5user, trustuser, plainuser, all with client password "secret".
    Keyword overrides are deep-merged at the top level (None deletes a key)."""
    cfg = {
        "listen": [
            {"host": "127.0.0.1", "mode": "transaction"},
            {"host": "127.0.0.1", "mode": "session"},
        ],
        "defaults": {"pool_size": 5},
        "tenants": {
            "acme": {
                "host": pg.host,
                "port": pg.port,
                "database": "postgres",
                "users": {
                    "app": {"password": "secret", "server_user": "u_scram",
                            "server_password": "pw_u_scram"},
                    "md5user": {"password": "secret", "auth_type": "md5", "server_user": "u_md5",
                                "server_password": "pw_u_md5"},
                    "trustuser": {"password": "secret", "server_user": "u_trust"},
                    "plainuser": {"password": "secret", "server_user": "u_plain",
                                  "server_password": "pw_u_plain"},
                },
            },
        },
    }
    return deep_merge(cfg, overrides)


def fill_ports(cfg: dict, previous: dict | None = None) -> dict:
    """Give every listen entry (and admin) without a port a free one, in place; returns cfg.
    With `previous` (an earlier config), an entry with the same host and mode keeps its port."""
    taken = {}
    if previous:
        for e in previous.get("listen", []):
            taken.setdefault((e.get("host"), e.get("mode")), e.get("port"))
    for e in cfg.get("listen", []):
        if not e.get("port"):
            e["port"] = taken.pop((e.get("host"), e.get("mode")), None) or free_port(
                "::1" if ":" in str(e.get("host", "")) else "127.0.0.1")
    admin = cfg.get("admin")
    if isinstance(admin, dict) and not admin.get("port"):
        old = (previous or {}).get("admin") or {}
        admin["port"] = old.get("port") or free_port()
    return cfg


def connect_error(params: dict | None = None, timeout: float = 10.0, **kw) -> dict:
    """Try to connect (pg8000, which exposes the server's ErrorResponse even at startup, unlike
    libpq) and return the ErrorResponse fields, e.g. {"C": "28P01", "M": "password ...", ...}.
    `params`/kwargs: host, port, user, password, dbname (or database), plus pg8000 kwargs.
    Raises AssertionError if the connection succeeds. A connection closed without an ErrorResponse
    gives {"C": None, "M": "<the exception text>"}."""
    import pg8000.native  # lazy: this module stays stdlib-only for the scripts

    p = dict(params or {}, **kw)
    if "dbname" in p:
        p["database"] = p.pop("dbname")
    p.setdefault("timeout", timeout)
    try:
        conn = pg8000.native.Connection(**p)
    except pg8000.native.DatabaseError as e:
        if e.args and isinstance(e.args[0], dict):
            return e.args[0]
        return {"C": None, "M": str(e)}
    except pg8000.native.InterfaceError as e:
        return {"C": None, "M": str(e)}
    conn.close()
    raise AssertionError(f"connection as {p.get('user')!r} unexpectedly succeeded")
