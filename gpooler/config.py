"""Configuration: a YAML document in, frozen dataclasses out.

Every setting is declared once, in SETTINGS (the gunicorn way): where it lives, how it is parsed,
its default, its validator and one line of documentation. Parsing, the defaults -> tenant -> user
cascade, validation and (later) the generated reference docs are all driven from that table, so a
new setting is one row plus one dataclass field.

parse_config() is pure and reports *every* problem, each as "yaml.path: message", so that
`gpooler --check` shows a user everything that is wrong in one go rather than one error per run.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

__all__ = [
    "ConfigError", "ListenConfig", "AdminConfig", "StatsdConfig", "TlsConfig", "ServerAddress",
    "UserConfig", "TenantConfig", "Config", "FrozenDict", "Setting", "Derived", "REQUIRED",
    "SETTINGS", "parse_config", "load_config", "password_kind", "find_user",
]


class ConfigError(Exception):
    """The configuration is unusable; `errors` lists every problem as "yaml.path: message"."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------------- the result


class FrozenDict(Mapping):
    """An immutable dict that is also hashable and picklable, so a whole Config can be compared on
    reload, used as a key and handed to worker processes."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping | None = None) -> None:
        self._data = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple:
        return (FrozenDict, (self._data,))


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ListenConfig:
    host: str
    port: int
    mode: str  # "session" | "transaction"


@dataclass(frozen=True)
class AdminConfig:
    host: str
    port: int
    users: Mapping[str, str]  # name -> password (plain, md5 or SCRAM verifier)


@dataclass(frozen=True)
class StatsdConfig:
    host: str
    port: int
    prefix: str
    interval: float


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int


@dataclass(frozen=True)
class UserConfig:
    name: str
    password: str
    server_user: str
    server_password: str | None
    auth_type: str  # "scram-sha-256" | "md5" | "plain"
    pool_size: int
    max_clients: int
    pool_checkout_timeout: float
    client_idle_timeout: float
    client_heartbeat_interval: float
    max_prepared_statements: int
    idle_transaction_timeout: float
    query_timeout: float
    server_idle_timeout: float
    server_lifetime: float
    min_pool_size: int
    server_check_delay: float
    server_login_retry: float


@dataclass(frozen=True)
class TenantConfig:
    id: str
    host: str
    port: int
    database: str
    replicas: tuple[ServerAddress, ...]
    allow_list: tuple[IPNetwork, ...]
    default: bool
    sni_hostname: str | None
    enforce_ssl: bool
    server_tls: str
    server_tls_ca_file: str | None
    session_features: str
    load_balance: str
    max_replica_lag: float
    read_your_writes: bool
    health_check_interval: float
    auth_user: str | None
    auth_query: str
    auth_dbname: str | None
    auth_query_cache_ttl: float
    auth_query_refetch_interval: float
    auth_failure_limit: int
    auth_failure_window: float
    auth_lockout: float
    users: Mapping[str, UserConfig]
    # With auth_user: the settings of a user not listed under users (the defaults -> tenant
    # cascade); find_user() names it.
    unlisted_user: UserConfig | None = None


@dataclass(frozen=True)
class Config:
    listen: tuple[ListenConfig, ...]
    admin: AdminConfig | None
    workers: int
    shutdown_timeout: float
    log_level: str
    log_format: str
    statsd: StatsdConfig | None
    tls: TlsConfig | None
    tenants: Mapping[str, TenantConfig]


# --------------------------------------------------------------------- parsers and validators


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")  # a Setting default: the key must be given
_BAD = _Marker("BAD")  # a value whose error is already reported: skip it silently


class _FromEnv(str):
    """A string that came out of ${VAR} expansion: numbers and booleans may then be spelled as text
    (`port: ${PGPORT}`), which a YAML literal may not."""


class _Invalid(Exception):
    """A parser's complaint: `message` about the value at hand, and/or `errors` deeper inside it
    (already carrying their paths). With neither, the problem was reported earlier."""

    def __init__(self, message: str | None = None, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or []

    def lines(self, path: str) -> list[str]:
        return ([f"{path}: {self.message}"] if self.message else []) + self.errors


_MD5_SECRET = re.compile(r"md5[0-9a-f]{32}")
_B64 = r"[A-Za-z0-9+/]+={0,2}"
_SCRAM_VERIFIER = re.compile(rf"SCRAM-SHA-256\$([0-9]+):({_B64})\$({_B64}):({_B64})")


def password_kind(secret: str) -> str:
    """"md5", "scram" or "plain": how a password in the YAML is stored (checked at parse time)."""
    if secret.startswith("SCRAM-SHA-256$"):
        return "scram"
    if _MD5_SECRET.fullmatch(secret):
        return "md5"
    return "plain"


def _join(path: str, key: object) -> str:
    """The YAML path of `key` under `path`; odd keys are quoted so the path stays unambiguous."""
    text = str(key)
    if not text or re.search(r'[\s.\[\]"]', text):
        text = json.dumps(text)
    return f"{path}.{text}" if path else text


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    return str(value)


def _integer(value: Any, path: str) -> int:
    if isinstance(value, _FromEnv) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("must be an integer")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, _FromEnv):
        try:
            value = float(value)
        except ValueError:
            raise _Invalid("must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid("must be a number")
    return float(value)


def _boolean(value: Any, path: str) -> bool:
    if isinstance(value, _FromEnv) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _choice(*options: str) -> Callable[[Any, str], str]:
    def parse(value: Any, path: str) -> str:
        if value not in options:
            raise _Invalid(f"must be one of: {', '.join(options)}")
        return str(value)

    return parse


def _workers(value: Any, path: str) -> int:
    """An integer, or "auto": the CPU count (the one thing parse_config asks the host)."""
    if value == "auto":
        return os.cpu_count() or 1
    try:
        return _integer(value, path)
    except _Invalid:
        raise _Invalid('must be an integer or "auto"') from None


def _hostname(value: Any, path: str) -> str:
    """SNI names compare case-insensitively, so they are kept lowercase."""
    return _string(value, path).lower()


def _check_password(secret: str) -> None:
    """Reject what looks like a stored hash but is malformed: used as plain text it would
    silently never match."""
    if secret.startswith("SCRAM-SHA-256$"):
        m = _SCRAM_VERIFIER.fullmatch(secret)
        try:
            ok = m is not None and int(m[1]) > 0 and len(base64.b64decode(m[2], validate=True)) > 0
            ok = ok and all(len(base64.b64decode(k, validate=True)) == 32 for k in (m[3], m[4]))
        except binascii.Error:
            ok = False
        if not ok:
            raise _Invalid("is not a valid SCRAM-SHA-256 verifier "
                           "(want SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)")
    elif re.fullmatch(r"md5[0-9a-f]{32}", secret, re.I) and not _MD5_SECRET.fullmatch(secret):
        raise _Invalid('is not a valid md5 hash (want "md5" + 32 lowercase hex digits)')


def _password(value: Any, path: str) -> str:
    secret = _string(value, path)
    if not secret:
        raise _Invalid("must not be empty")
    _check_password(secret)
    return secret


def _server_password(value: Any, path: str) -> str:
    secret = _string(value, path)
    if password_kind(secret) == "scram":
        raise _Invalid(
            "must be plain text or an md5 hash: a SCRAM verifier cannot log in to Postgres")
    return secret


def _key_problem(key: object, dots_allowed: bool) -> str | None:
    """What is wrong with a tenant id or user name used as a mapping key, if anything."""
    if not isinstance(key, str):
        return "must be a string (quote it)"
    if not key:
        return "must not be empty"
    if any(c.isspace() for c in key):
        return "must not contain whitespace"
    if not dots_allowed and "." in key:
        return 'must not contain "."'
    return None


def _passwords(value: Any, path: str) -> FrozenDict:
    """name -> password, for admin users."""
    value = _mapping(value, path)
    out, errors = {}, []
    for name, secret in value.items():
        problem = _key_problem(name, dots_allowed=True)
        if problem:
            errors.append(f"{_join(path, name)}: {problem}")
            continue
        try:
            out[name] = _password(secret, path) if secret is not _BAD else _BAD
        except _Invalid as e:
            errors.extend(e.lines(_join(path, name)))
    if errors or _BAD in out.values():
        raise _Invalid(errors=errors)
    return FrozenDict(out)


def _networks(value: Any, path: str) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise _Invalid("must be a list")
    out, errors, bad = [], [], False
    for i, item in enumerate(value):
        if item is _BAD:
            bad = True
            continue
        try:
            if not isinstance(item, str):
                raise ValueError
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            errors.append(f"{path}[{i}]: must be an IP address or network, like 10.0.0.0/8")
    if errors or bad:
        raise _Invalid(errors=errors)
    return tuple(out)


def _mapping(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise _Invalid("must be a mapping")
    return value


def _section(level: str) -> Callable[[Any, str], Any]:
    """Parser for a nested mapping whose keys are the settings of `level` (admin, a listener...)."""

    def parse(value: Any, path: str) -> Any:
        errors: list[str] = []
        values = _resolve(level, _mapping(value, path), path, errors)
        if errors or values is None:
            raise _Invalid(errors=errors)
        return _SECTION_CLASSES[level](**values)

    return parse


def _list_of(item: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    def parse(value: Any, path: str) -> tuple:
        if not isinstance(value, list):
            raise _Invalid("must be a list")
        out, errors, failed = [], [], False
        for i, element in enumerate(value):
            try:
                if element is _BAD:  # reported during ${} expansion
                    raise _Invalid()
                out.append(item(element, f"{path}[{i}]"))
            except _Invalid as e:
                errors.extend(e.lines(f"{path}[{i}]"))
                failed = True
        if failed:
            raise _Invalid(errors=errors)
        return tuple(out)

    return parse


def _positive(value: Any) -> None:
    if value <= 0:
        raise _Invalid("must be > 0")


def _non_negative(value: Any) -> None:
    if value < 0:
        raise _Invalid("must be >= 0")


def _at_least_one(value: Any) -> None:
    if value < 1:
        raise _Invalid("must be >= 1")


def _port_range(value: Any) -> None:
    if not 1 <= value <= 65535:
        raise _Invalid("must be between 1 and 65535")


def _not_empty(value: Any) -> None:
    if not value:
        raise _Invalid("must not be empty")


def _no_whitespace(value: str) -> None:
    _not_empty(value)
    if any(c.isspace() for c in value):
        raise _Invalid("must not contain whitespace")


# ------------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class Derived:
    """A default computed from the other values of the same record (e.g. server_user = the name)."""

    doc: str
    compute: Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Setting:
    """One configuration key.

    level: "global" (top of the file), "tenant" or "user"; or the nested section the key belongs
      to: "listen" (each entry), "admin", "statsd", "tls", "replica" (each entry of replicas).
    parse: (value, yaml_path) -> python value; the type check ("must be an integer").
    default: a value, REQUIRED, or Derived(...).
    validate: value -> None; the range check ("must be > 0"). Both raise on a bad value.
    cascade: a tenant or user setting that may also be given in `defaults:`, and (for user
      settings) directly in the tenant mapping; the innermost one wins.
    unit: shown in the generated docs/configuration.md (scripts/gen-config-docs), e.g. "bytes";
      None means "seconds" for a number (every float setting is a duration) and none otherwise.
    """

    name: str
    level: str
    parse: Callable[[Any, str], Any]
    default: Any
    validate: Callable[[Any], None] | None
    doc: str
    cascade: bool = False
    unit: str | None = None


def _default_auth_type(v: Mapping[str, Any]) -> str:
    return "md5" if password_kind(v["password"]) == "md5" else "scram-sha-256"


def _default_server_password(v: Mapping[str, Any]) -> str | None:
    return v["password"] if password_kind(v["password"]) == "plain" else None


_ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")
_MODES = ("session", "transaction")
_AUTH_TYPES = ("scram-sha-256", "md5", "plain")
_SESSION_FEATURES = ("pin", "error")
_LOAD_BALANCE = ("random", "least_busy")
_SERVER_TLS = ("disable", "prefer", "require", "verify-ca", "verify-full")
# PgBouncer's default: the role's password unless it expired, for roles that may log in.
DEFAULT_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword "
                      "END FROM pg_authid WHERE rolname = $1 AND rolcanlogin")

# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # name, level, parse, default, validate, doc[, cascade]
    Setting("listen", "global", _list_of(_section("listen")), REQUIRED, _not_empty,
            "listening sockets; each entry's mode is the pool mode of clients arriving on it"),
    Setting("admin", "global", _section("admin"), None, None,
            "optional admin console (SHOW POOLS...), reached as database gpooler"),
    Setting("workers", "global", _workers, 1, _at_least_one,
            'processes sharing the listening ports; "auto" = one per CPU'),
    Setting("shutdown_timeout", "global", _number, 30.0, _non_negative,
            "on SIGTERM, seconds running transactions get to finish before connections are closed"),
    Setting("log_level", "global", _choice(*_LOG_LEVELS), "info", None,
            "one of: " + ", ".join(_LOG_LEVELS)),
    Setting("log_format", "global", _choice(*_LOG_FORMATS), "text", None,
            "text: one line per event; json: one JSON object per line with time, level, logger, "
            "message and the fields tenant, user, addr, db, mode, duration, reason when known"),
    Setting("statsd", "global", _section("statsd"), None, None,
            "optional: push counters to a StatsD server"),
    Setting("tls", "global", _section("tls"), None, None,
            "optional client-facing TLS; relative paths are relative to the config file"),
    Setting("defaults", "global", _mapping, {}, None,
            "tenant and user settings applied to every tenant and user unless overridden"),
    Setting("tenants", "global", _mapping, REQUIRED, _not_empty,
            "tenant id -> tenant; clients log in as <user>.<tenant id>"),

    Setting("host", "listen", _string, "127.0.0.1", _not_empty, "address to listen on"),
    Setting("port", "listen", _integer, REQUIRED, _port_range, "port to listen on"),
    Setting("mode", "listen", _choice(*_MODES), REQUIRED, None,
            "pool mode on this port: " + " or ".join(_MODES)),

    Setting("host", "admin", _string, "127.0.0.1", _not_empty, "admin console address"),
    Setting("port", "admin", _integer, 6544, _port_range, "admin console port"),
    Setting("users", "admin", _passwords, REQUIRED, _not_empty,
            "admin name -> password (plain text, md5 hash or SCRAM verifier)"),

    Setting("host", "statsd", _string, "127.0.0.1", _not_empty, "StatsD server address"),
    Setting("port", "statsd", _integer, 8125, _port_range, "StatsD server UDP port"),
    Setting("prefix", "statsd", _string, "gpooler", None, "prefix of every metric name"),
    Setting("interval", "statsd", _number, 10.0, _positive, "seconds between pushes"),

    Setting("cert_file", "tls", _string, REQUIRED, _not_empty, "PEM certificate chain"),
    Setting("key_file", "tls", _string, REQUIRED, _not_empty, "PEM private key"),

    Setting("host", "tenant", _string, REQUIRED, _not_empty,
            "the primary Postgres server", cascade=True),
    Setting("port", "tenant", _integer, 5432, _port_range, "the primary's port", cascade=True),
    Setting("database", "tenant", _string, "postgres", _not_empty,
            "database used when the client names none", cascade=True),
    Setting("allow_list", "tenant", _networks, _ANYWHERE, None,
            "client networks allowed in, e.g. 10.0.0.0/8 or a bare address; [] refuses everyone",
            cascade=True),
    Setting("replicas", "tenant", _list_of(_section("replica")), (), None,
            "read replicas of the primary"),
    Setting("default", "tenant", _boolean, False, None,
            "the tenant for clients that name none (at most one tenant)"),
    Setting("sni_hostname", "tenant", _hostname, None, _no_whitespace,
            "TLS SNI name that selects this tenant"),
    Setting("enforce_ssl", "tenant", _boolean, False, None,
            "refuse clients of this tenant that connect without TLS (28000); needs tls:",
            cascade=True),
    Setting("server_tls", "tenant", _choice(*_SERVER_TLS), "prefer", None,
            "TLS towards Postgres: disable; prefer (TLS when the server offers it, unverified); "
            "require (TLS or fail, unverified); verify-ca (the certificate must chain to "
            "server_tls_ca_file); verify-full (verify-ca and the host name must match)",
            cascade=True),
    Setting("server_tls_ca_file", "tenant", _string, None, _not_empty,
            "PEM CA certificates that verify-ca and verify-full trust (default: the system's); "
            "relative to the config file", cascade=True),
    Setting("session_features", "tenant", _choice(*_SESSION_FEATURES), "pin", None,
            "in transaction mode, a client using LISTEN, session advisory locks, temporary tables, "
            "WITH HOLD cursors or LOAD: pin keeps its server connection until that state is gone; "
            "error refuses the statement with 0A000", cascade=True),
    Setting("load_balance", "tenant", _choice(*_LOAD_BALANCE), "random", None,
            "transaction mode: how reads are spread over the primary and the healthy replicas",
            cascade=True),
    Setting("max_replica_lag", "tenant", _number, 10.0, _non_negative,
            "a replica further behind the primary than this gets no reads (0 = no limit)",
            cascade=True),
    Setting("read_your_writes", "tenant", _boolean, False, None,
            "after a client's write, its reads go only to members that have replayed it",
            cascade=True),
    Setting("health_check_interval", "tenant", _number, 1.0, _positive,
            "seconds between probes of each member (role, health, replay position)",
            cascade=True),
    Setting("auth_user", "tenant", _string, None, _not_empty,
            "a user of the tenant's users whose server_user and server_password run auth_query; "
            "with it set, clients may also log in as Postgres roles not listed under users",
            cascade=True),
    Setting("auth_query", "tenant", _string, DEFAULT_AUTH_QUERY, _not_empty,
            "the query that finds a role's secret: $1 is the role name, the second column of the "
            "first row its md5 hash or SCRAM verifier (no row or NULL: refused)", cascade=True),
    Setting("auth_dbname", "tenant", _string, None, _not_empty,
            "the database auth_query runs in; default: the tenant's database", cascade=True),
    Setting("auth_query_cache_ttl", "tenant", _number, 60.0, _non_negative,
            "seconds a role's secret (or its absence) is used before auth_query is asked again "
            "(0 = ask at every login)", cascade=True),
    Setting("auth_query_refetch_interval", "tenant", _number, 1.0, _non_negative,
            "after a failed login, auth_query is asked again for the role, at most once per this "
            "many seconds per role", cascade=True),
    Setting("auth_failure_limit", "tenant", _integer, 10, _non_negative,
            "wrong passwords from one client address within auth_failure_window that lock the "
            "address out of the tenant for auth_lockout (0 = no lockout)", cascade=True),
    Setting("auth_failure_window", "tenant", _number, 60.0, _positive,
            "seconds, from an address's first wrong password, in which auth_failure_limit of "
            "them lock it out", cascade=True),
    Setting("auth_lockout", "tenant", _number, 300.0, _non_negative,
            "seconds a locked-out address is refused (28000) before any password is asked "
            "(0 = no lockout)", cascade=True),
    Setting("users", "tenant", _mapping, REQUIRED, _not_empty, "user name -> user"),

    Setting("host", "replica", _string, REQUIRED, _not_empty, "replica address"),
    Setting("port", "replica", _integer, None, _port_range,
            "replica port; defaults to the tenant's port"),

    Setting("password", "user", _password, REQUIRED, None,
            "what clients must present: plain text, md5 hash or SCRAM-SHA-256 verifier"),
    Setting("server_user", "user", _string, Derived("the user name", lambda v: v["name"]),
            _not_empty, "the Postgres role gpooler logs in as"),
    Setting("server_password", "user", _server_password,
            Derived("password, when that is plain text", _default_server_password), None,
            "the password gpooler gives Postgres (plain text or md5 hash)"),
    Setting("auth_type", "user", _choice(*_AUTH_TYPES),
            Derived("md5 for an md5 password, else scram-sha-256", _default_auth_type), None,
            "how clients authenticate: " + ", ".join(_AUTH_TYPES), cascade=True),
    Setting("pool_size", "user", _integer, 15, _positive,
            "server connections per (tenant, user, database) pool", cascade=True),
    Setting("max_clients", "user", _integer, 1000, _positive,
            "client connections per (tenant, user)", cascade=True),
    Setting("pool_checkout_timeout", "user", _number, 60.0, _non_negative,
            "seconds a client waits for a server connection (0 = forever)", cascade=True),
    Setting("client_idle_timeout", "user", _number, 0.0, _non_negative,
            "close clients idle this many seconds (0 = never)", cascade=True),
    Setting("client_heartbeat_interval", "user", _number, 60.0, _non_negative,
            "seconds between liveness checks of idle clients (0 = off)", cascade=True),
    Setting("idle_transaction_timeout", "user", _number, 0.0, _non_negative,
            "a client idle inside a transaction this long gets 25P03, its transaction is rolled "
            "back and the server connection returns to the pool (0 = never)", cascade=True),
    Setting("query_timeout", "user", _number, 0.0, _non_negative,
            "a statement running this long is cancelled on the server: 57014, session intact "
            "(0 = never)", cascade=True),
    Setting("server_idle_timeout", "user", _number, 600.0, _non_negative,
            "idle server connections above min_pool_size are closed after this long (0 = never)",
            cascade=True),
    Setting("server_lifetime", "user", _number, 3600.0, _non_negative,
            "server connections older than this are closed when idle, never mid-transaction "
            "(0 = never)", cascade=True),
    Setting("min_pool_size", "user", _integer, 0, _non_negative,
            "server connections kept open per pool even when idle", cascade=True),
    Setting("server_check_delay", "user", _number, 30.0, _non_negative,
            "a server connection idle longer than this is checked (an empty query) before it "
            "serves again; one that fails is closed and another used (0 = check every reuse)",
            cascade=True),
    Setting("server_login_retry", "user", _number, 15.0, _non_negative,
            "after Postgres refused a new server connection, clients needing one get that same "
            "error at once for 0.5s, doubling after each failed retry up to this "
            "(0 = every client tries)", cascade=True),
    Setting("max_prepared_statements", "user", _integer, 200, _positive,
            "prepared statements kept per server connection in transaction mode, least recently "
            "used closed first", cascade=True),
)
# fmt: on

_SECTION_CLASSES = {"listen": ListenConfig, "admin": AdminConfig, "statsd": StatsdConfig,
                    "tls": TlsConfig, "replica": ServerAddress}


def _level(level: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.level == level)


def _by_name(*groups: tuple[Setting, ...]) -> dict[str, Setting]:
    return {s.name: s for group in groups for s in group}


_CASCADING = tuple(s for s in SETTINGS if s.cascade)
_ALLOWED = {  # place in the file -> the keys it may hold
    "global": _by_name(_level("global")),
    "defaults": _by_name(_CASCADING),
    "tenant": _by_name(_level("tenant"), tuple(s for s in _CASCADING if s.level == "user")),
    "user": _by_name(_level("user")),
    **{section: _by_name(_level(section)) for section in _SECTION_CLASSES},
}
_HOME = _by_name(*(_level(lv) for lv in ("global", "tenant", "user")))


# ------------------------------------------------------------------------------- the engine

Found = dict[str, tuple[Any, str]]  # setting name -> (value or _BAD, yaml path it came from)


def _misplaced(key: object, place: str, allowed: Mapping[str, Setting]) -> str:
    """The message for a key that does not belong where it is: say where it goes, or guess."""
    home = _HOME.get(key) if isinstance(key, str) else None
    if home is not None and place in ("global", "defaults", "tenant", "user"):
        if home.level == "global":
            return "can only be set at the top level"
        where = {"tenant": "per tenant", "user": "per user"}[home.level]
        if home.cascade:
            where = "in defaults or per tenant" + (" or per user" if home.level == "user" else "")
        return f"can only be set {where}"
    guess = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f"unknown setting (did you mean {guess[0]}?)" if guess else "unknown setting"


def _read(mapping: dict, path: str, place: str, errors: list[str]) -> Found:
    """Parse and validate the keys present in one YAML mapping."""
    allowed = _ALLOWED[place]
    found: Found = {}
    for key, raw in mapping.items():
        key_path = _join(path, key)
        setting = allowed.get(key) if isinstance(key, str) else None
        if setting is None:
            errors.append(f"{key_path}: {_misplaced(key, place, allowed)}")
            continue
        value = _BAD
        if raw is None and setting.default is None:
            value = None
        elif raw is not _BAD:
            try:
                value = setting.parse(raw, key_path)
                if setting.validate is not None:
                    setting.validate(value)
            except _Invalid as e:
                errors.extend(e.lines(key_path))
                value = _BAD
        found[key] = (value, key_path)
    return found


def _complete(level: str, found: Found, inherited: Found, path: str, errors: list[str],
              extra: Mapping[str, Any] | None = None) -> Found | None:
    """Fill in one record of `level`: its own value, else the cascaded one, else the default.
    None when anything in it is wrong (already reported)."""
    values: Found = {}
    ok = True
    for s in _level(level):
        if s.name in found:
            values[s.name] = found[s.name]
        elif s.cascade and s.name in inherited:
            values[s.name] = inherited[s.name]
        elif s.default is REQUIRED:
            errors.append(f"{_join(path, s.name)}: is required")
            ok = False
        elif not isinstance(s.default, Derived):
            values[s.name] = (s.default, "")
    if not ok or any(v is _BAD for v, _ in values.values()):
        return None
    plain = {**(extra or {}), **{k: v for k, (v, _) in values.items()}}
    for s in _level(level):
        if s.name not in values and isinstance(s.default, Derived):
            plain[s.name] = s.default.compute(plain)
            values[s.name] = (plain[s.name], "")
    return values


def _resolve(level: str, mapping: dict, path: str, errors: list[str]) -> dict[str, Any] | None:
    """_read + _complete for a record without cascade, as plain name -> value."""
    values = _complete(level, _read(mapping, path, level, errors), {}, path, errors)
    return None if values is None else {k: v for k, (v, _) in values.items()}


# auth_type -> (password kinds it can check a client against, what to tell the user)
_AUTH_NEEDS = {
    "scram-sha-256": (("plain", "scram"), "a plain-text password or a SCRAM verifier"),
    "md5": (("plain", "md5"), "a plain-text or md5 password"),
    "plain": (("plain",), "a plain-text password"),
}


def _user(name: object, raw: Any, path: str, inherited: Found,
          errors: list[str]) -> UserConfig | None:
    problem = _key_problem(name, dots_allowed=True)
    if problem:
        errors.append(f"{path}: {problem}")
    if raw is _BAD:
        return None
    if not isinstance(raw, dict):
        errors.append(f"{path}: must be a mapping")
        return None
    values = _complete("user", _read(raw, path, "user", errors), inherited, path, errors,
                       extra={"name": name})
    if values is None or problem:
        return None
    auth_type, origin = values["auth_type"]
    kinds, needs = _AUTH_NEEDS[auth_type]
    if password_kind(values["password"][0]) not in kinds:
        where = f" (set at {origin})" if origin and origin != _join(path, "auth_type") else ""
        errors.append(f"{_join(path, 'auth_type')}: {auth_type} needs {needs}{where}")
        return None
    return UserConfig(name=name, **{k: v for k, (v, _) in values.items()})


def _tenant(tenant_id: object, raw: Any, path: str, defaults: Found,
            errors: list[str]) -> TenantConfig | None:
    problem = _key_problem(tenant_id, dots_allowed=False)
    if problem:
        errors.append(f"{path}: {problem}")
    if raw is _BAD:
        return None
    if not isinstance(raw, dict):
        errors.append(f"{path}: must be a mapping")
        return None
    found = _read(raw, path, "tenant", errors)
    values = _complete("tenant", found, defaults, path, errors)
    user_level = _ALLOWED["user"]
    inherited = {k: v for k, v in {**defaults, **found}.items() if k in user_level}
    users = {}
    raw_users = found.get("users", (_BAD,))[0]
    if raw_users is not _BAD:
        users_path = _join(path, "users")
        for name, raw_user in raw_users.items():
            users[name] = _user(name, raw_user, _join(users_path, name), inherited, errors)
    if values is None or problem or None in users.values():
        return None
    plain = {k: v for k, (v, _) in values.items()}
    if plain["auth_user"] is not None:
        plain["unlisted_user"] = _unlisted_user(values["auth_user"], users, inherited, path,
                                                errors)
        if plain["unlisted_user"] is None:
            return None
    plain["replicas"] = tuple(r if r.port is not None else replace(r, port=plain["port"])
                              for r in plain["replicas"])
    plain["users"] = FrozenDict(users)
    return TenantConfig(id=tenant_id, **plain)


def _unlisted_user(auth_user: tuple[str, str], users: dict[str, UserConfig], inherited: Found,
                   path: str, errors: list[str]) -> UserConfig | None:
    """Check auth_user, and the settings of the users auth_query lets in: a user record with no
    password of its own, completed from the cascade like a listed one. None: reported."""
    name, origin = auth_user
    where = f" (set at {origin})" if origin != _join(path, "auth_user") else ""
    user = users.get(name)
    if user is None:
        errors.append(f"{_join(path, 'auth_user')}: \"{name}\" is not one of this tenant's "
                      f"users{where}")
        return None
    if user.server_password is not None and password_kind(user.server_password) == "md5":
        errors.append(f"{_join(path, 'auth_user')}: the server_password of \"{name}\" is an md5 "
                      f"hash, which auth_query cannot log in with: give it in plain text{where}")
        return None
    values = _complete("user", {"password": ("", ""), "server_password": (None, "")}, inherited,
                       path, errors, extra={"name": ""})
    return None if values is None else UserConfig(name="", **{k: v for k, (v, _) in
                                                              values.items()})


def find_user(tenant: TenantConfig, name: str) -> UserConfig | None:
    """The tenant's user `name`: the listed one, else (with auth_user) a Postgres role of that
    name that auth_query will vouch for, with the settings from defaults and the tenant."""
    user = tenant.users.get(name)
    if user is None and tenant.unlisted_user is not None:
        user = replace(tenant.unlisted_user, name=name, server_user=name)
    return user


def _expand(node: Any, path: str, environ: Mapping[str, str], errors: list[str]) -> Any:
    """Expand ${VAR} in every string of the document; `$${` stands for a literal `${`.
    A string that cannot be expanded becomes _BAD, so it is reported exactly once."""
    if isinstance(node, dict):
        return {k: _expand(v, _join(path, k), environ, errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", environ, errors) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    problems: list[str] = []
    substituted = False

    def substitute(m: re.Match) -> str:
        nonlocal substituted
        if m[0] == "$${":
            return "${"
        name = m[1]
        if not m[2]:
            problems.append("unterminated ${ (write $${ for a literal ${)")
        elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problems.append(f"invalid environment variable name {name!r}")
        elif name not in environ:
            problems.append(f"environment variable {name} is not set")
        else:
            substituted = True
            return environ[name]
        return ""

    text = re.sub(r"\$\$\{|\$\{([^}]*)(\}?)", substitute, node)
    if problems:
        errors.extend(f"{path}: {p}" for p in problems)
        return _BAD
    return _FromEnv(text) if substituted else text


def _cross_checks(config: dict[str, Any], errors: list[str]) -> None:
    """Rules that span records: duplicate sockets, one default tenant, unique SNI names, TLS for
    tenants that insist on it."""
    seen: dict[tuple[str, int], str] = {}
    for i, entry in enumerate(config["listen"]):
        where = f"listen[{i}]"
        if (entry.host, entry.port) in seen:
            errors.append(f"{where}: same host and port as {seen[entry.host, entry.port]}")
        seen.setdefault((entry.host, entry.port), where)
    admin = config["admin"]
    if admin is not None and (admin.host, admin.port) in seen:
        errors.append(f"admin.port: already used by {seen[admin.host, admin.port]}")
    default_tenant = None
    sni: dict[str, str] = {}
    for tenant in config["tenants"].values():
        path = _join("tenants", tenant.id)
        if tenant.default:
            if default_tenant is not None:
                errors.append(f"{path}.default: only one tenant may be the default, "
                              f"{_join('tenants', default_tenant)} already is")
            default_tenant = default_tenant or tenant.id
        if tenant.sni_hostname is not None:
            if tenant.sni_hostname in sni:
                errors.append(f"{path}.sni_hostname: already used by {sni[tenant.sni_hostname]}")
            sni.setdefault(tenant.sni_hostname, path)
    enforcing = [t.id for t in config["tenants"].values() if t.enforce_ssl]
    if enforcing and config["tls"] is None:
        errors.append(f"tls: is required (cert_file, key_file) when a tenant sets enforce_ssl "
                      f"({', '.join(enforcing)})")


# ------------------------------------------------------------------------------- public API


def parse_config(document: object, environ: Mapping[str, str]) -> Config:
    """Turn a YAML document (as yaml.safe_load returns it) into a Config.

    Pure: environment variables come in as `environ`. Raises ConfigError listing every problem
    found, not just the first, each as "yaml.path: message".
    """
    errors: list[str] = []
    document = _expand({} if document is None else document, "", environ, errors)
    if not isinstance(document, dict):
        raise ConfigError(errors + ["(top level): must be a mapping of settings"])
    found = _read(document, "", "global", errors)
    values = _complete("global", found, {}, "", errors)
    raw_defaults = found.pop("defaults", ({}, ""))[0]
    defaults = {} if raw_defaults is _BAD else _read(raw_defaults, "defaults", "defaults", errors)
    tenants = {}
    raw_tenants = found.get("tenants", (_BAD,))[0]
    if raw_tenants is not _BAD:
        for tenant_id, raw in raw_tenants.items():
            tenants[tenant_id] = _tenant(tenant_id, raw, _join("tenants", tenant_id), defaults,
                                         errors)
    if values is None or errors or None in tenants.values():
        raise ConfigError(errors)
    plain = {k: v for k, (v, _) in values.items() if k != "defaults"}
    plain["tenants"] = FrozenDict(tenants)
    _cross_checks(plain, errors)
    if errors:
        raise ConfigError(errors)
    return Config(**plain)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys: otherwise a second `acme:` tenant would
    silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse the YAML file at `path`; environ defaults to os.environ.

    An unreadable file or a YAML syntax error is a ConfigError naming the file (and line), so
    callers have a single exception to report. Relative TLS file names (tls:, server_tls_ca_file)
    are taken relative to the config file, so the config works whatever the daemon's working directory.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        document = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError([f"{where}: {problem}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: {e}"]) from None
    config = parse_config(document, os.environ if environ is None else environ)
    base = os.path.dirname(os.path.abspath(path))
    if config.tls is not None:
        config = replace(config, tls=TlsConfig(os.path.join(base, config.tls.cert_file),
                                               os.path.join(base, config.tls.key_file)))
    if any(t.server_tls_ca_file for t in config.tenants.values()):
        config = replace(config, tenants=FrozenDict({
            k: replace(t, server_tls_ca_file=os.path.join(base, t.server_tls_ca_file))
            if t.server_tls_ca_file else t for k, t in config.tenants.items()}))
    return config
