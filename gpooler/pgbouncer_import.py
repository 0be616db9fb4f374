"""`gpooler import-pgbouncer`: turn a PgBouncer configuration into a gpooler YAML document.

translate() takes the text of pgbouncer.ini and of its userlist.txt and returns the gpooler document
(a dict ready for yaml.safe_dump) and a list of warnings: one line per PgBouncer setting that could
not be carried over, or only approximately, each naming the setting and why. It reads no file except
the ones named by `%include` lines (relative to the ini's directory); translate_files() is the
wrapper that reads the ini and the userlist (or the ini's auth_file) from disk.

What maps to what is decided in the tables below and explained, setting by setting, in
docs/pgbouncer.md. Settings that gpooler may grow (server_lifetime, query_timeout, ...) are looked
up in gpooler.config.SETTINGS at run time: once gpooler has a setting of that name, the translator
carries the value over instead of warning, without a change here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from gpooler.config import SETTINGS, ConfigError, Setting, parse_config, password_kind

__all__ = ["PgBouncerIniError", "translate", "translate_files", "parse_ini", "parse_userlist",
           "parse_connstr", "RULES", "DATABASE_KEYS", "USER_KEYS"]

DEFAULT_LISTEN_PORT = 6432
OTHER_MODE_OFFSET = 1  # the listener for the second pool mode, when one is needed: listen_port + 1
ADMIN_OFFSET = 2  # the admin console: listen_port + 2, on 127.0.0.1
MAX_INCLUDE_DEPTH = 10


class PgBouncerIniError(Exception):
    """pgbouncer.ini (or a file it includes) cannot be read or is not an ini file at all."""


# ------------------------------------------------------------------------------ the ini file


@dataclass(frozen=True)
class Value:
    text: str
    where: str  # "pgbouncer.ini:12"


Ini = dict[str, dict[str, Value]]  # section (lowercase) -> key -> last value given


def _unquote_key(raw: str, where: str) -> str:
    """A key as written: bare, or double-quoted with "" for a quote (database names)."""
    raw = raw.strip()
    if raw.startswith('"'):
        m = re.fullmatch(r'"((?:[^"]|"")*)"', raw)
        if not m:
            raise PgBouncerIniError(f"{where}: unterminated quoted name {raw!r}")
        return m[1].replace('""', '"')
    return raw


def parse_ini(text: str, ini_dir: str, name: str = "pgbouncer.ini",
              read: Callable[[str], str] | None = None, _depth: int = 0) -> Ini:
    """Sections of a PgBouncer ini file. Lines starting with ";" or "#" are comments (not later
    in a line); `%include FILE` reads FILE, relative to `ini_dir`, in place. A later key replaces
    an earlier one, as in PgBouncer. Raises PgBouncerIniError for what PgBouncer refuses to load:
    a line that is no section, key = value or include, a key outside any section, a missing
    include."""
    read = read or _read_text
    sections: Ini = {}
    _parse_into(sections, text, ini_dir, name, read, _depth, [None])
    return sections


def _parse_into(sections: Ini, text: str, ini_dir: str, name: str, read: Callable[[str], str],
                depth: int, current: list[str | None]) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{number}"
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        if stripped.startswith("%include"):
            target = stripped[len("%include"):].strip()
            if not target:
                raise PgBouncerIniError(f"{where}: %include without a file name")
            if depth >= MAX_INCLUDE_DEPTH:
                raise PgBouncerIniError(f"{where}: %include nested too deeply")
            path = target if os.path.isabs(target) else os.path.join(ini_dir, target)
            try:
                included = read(path)
            except OSError as e:
                raise PgBouncerIniError(
                    f"{where}: cannot read included file {path}: {e.strerror or e}") from None
            _parse_into(sections, included, ini_dir, os.path.basename(path), read, depth + 1,
                        current)
            continue
        if stripped.startswith("["):
            if "]" not in stripped:
                raise PgBouncerIniError(f"{where}: section name without ']'")
            current[0] = stripped[1:stripped.index("]")].strip().lower()
            sections.setdefault(current[0], {})
            continue
        key, sep, value = stripped.partition("=")
        if key.startswith('"'):  # a quoted database name may hold "="
            m = re.match(r'"(?:[^"]|"")*"\s*=', stripped)
            if m:
                key, value, sep = m[0][:-1], stripped[m.end():], "="
        if not sep or not key.strip():
            raise PgBouncerIniError(f"{where}: syntax error: expected key = value")
        if current[0] is None:
            raise PgBouncerIniError(f"{where}: {key.strip()} is outside any [section]")
        key = _unquote_key(key, where)
        if current[0] == "pgbouncer":
            key = key.lower()
        sections[current[0]][key] = Value(value.strip(), where)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def parse_connstr(text: str) -> list[tuple[str, str]]:
    """The key=value pairs of a [databases] or [users] entry; values may be 'single-quoted' with ''
    for a quote. Raises ValueError on a malformed string, as PgBouncer would."""
    pairs, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return pairs
        start = i
        while i < n and text[i] not in "= \t":
            i += 1
        key = text[start:i]
        while i < n and text[i] in " \t":
            i += 1
        if not key or i >= n or text[i] != "=":
            raise ValueError(f"expected key=value at {text[start:start + 20]!r}")
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "'":
            i += 1
            value = []
            while True:
                if i >= n:
                    raise ValueError(f"unterminated quoted value for {key}")
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        value.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                value.append(text[i])
                i += 1
            value = "".join(value)
        else:
            start = i
            while i < n and text[i] not in " \t":
                i += 1
            value = text[start:i]
        if not value:
            raise ValueError(f"empty value for {key}")
        pairs.append((key, value))


def parse_userlist(text: str, name: str = "userlist.txt") -> tuple[dict[str, str], list[str]]:
    """userlist.txt: `"user" "password"` per line (anything after is ignored, "" is a quote inside
    a field, ";" or "#" starts a comment line). Returns (user -> password, warnings)."""
    users: dict[str, str] = {}
    warnings: list[str] = []
    field = r'"((?:[^"]|"")*)"'
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        m = re.match(rf"{field}\s*{field}", stripped)
        if not m:
            warnings.append(f'{name}:{number}: not a "user" "password" line: skipped')
            continue
        users[m[1].replace('""', '"')] = m[2].replace('""', '"')
    return users, warnings


# --------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Rule:
    """What becomes of one PgBouncer setting.

    handled: translated by the code of translate() (see docs/pgbouncer.md for how).
    future: names of gpooler settings that would take the value; when gpooler.config.SETTINGS has
      one of them, the value is carried over (as `kind`), otherwise the setting is reported.
    reason: why it is not translated (reported when the setting is present).
    harmless: values needing no warning, because gpooler behaves that way anyway.
    """

    reason: str = ""
    handled: bool = False
    future: tuple[str, ...] = ()
    kind: str = "str"  # "seconds" | "int" | "str" | "path" (made absolute, relative to the ini)
    harmless: tuple[str, ...] = ()


_H = Rule(handled=True)
_LOGS = "gpooler logs to stderr only: let the service manager (systemd, docker) collect it"
_NO_UNIX = "gpooler listens on TCP only, not on a Unix socket"
_DNS = "gpooler resolves host names with the system resolver at each new server connection"
_NO_SERVER_CERT = "gpooler presents no client certificate to Postgres"
_SERVER_TLS_DEFAULTS = "gpooler speaks TLS 1.2 or later to Postgres, with OpenSSL's default ciphers"
_LIMITS = ("gpooler's limits are pool_size per (tenant, user, database) and max_clients per "
           "(tenant, user)")


def _future(kind: str, *names: str, reason: str = "", harmless: tuple[str, ...] = ()) -> Rule:
    return Rule(reason=reason, future=names, kind=kind, harmless=harmless)


# The [pgbouncer] section: every setting PgBouncer knows (up to 1.24), in the order of its manual.
RULES: dict[str, Rule] = {
    # generic settings
    "logfile": Rule(_LOGS),
    "pidfile": Rule("gpooler runs in the foreground and writes no PID file"),
    "listen_addr": _H,
    "listen_port": _H,
    "unix_socket_dir": Rule(_NO_UNIX, harmless=("",)),
    "unix_socket_mode": Rule(_NO_UNIX),
    "unix_socket_group": Rule(_NO_UNIX),
    "user": Rule("gpooler does not change its Unix user: start it as that user"),
    "pool_mode": _H,
    "max_client_conn": _H,
    "default_pool_size": _H,
    "min_pool_size": _future("int", "min_pool_size", harmless=("0",),
                             reason="gpooler opens server connections on demand only"),
    "reserve_pool_size": _future("int", "reserve_pool_size", harmless=("0",),
                                 reason="gpooler has no reserve pool: raise pool_size instead"),
    "reserve_pool_timeout": _future("seconds", "reserve_pool_timeout",
                                    reason="gpooler has no reserve pool"),
    "max_db_connections": _future("int", "max_db_connections", harmless=("0",), reason=_LIMITS),
    "max_db_client_connections": _future("int", "max_db_client_connections", harmless=("0",),
                                         reason=_LIMITS),
    "max_user_connections": _future("int", "max_user_connections", harmless=("0",),
                                    reason=_LIMITS),
    "max_user_client_connections": _H,
    "server_round_robin": Rule("gpooler always reuses the most recently used idle connection",
                               harmless=("0",)),
    "track_extra_parameters": Rule("gpooler restores the parameters a client sent at startup, "
                                   "not ones it changes later with SET"),
    "ignore_startup_parameters": Rule("not needed: gpooler accepts every startup parameter and "
                                      "applies it on the server", harmless=("",)),
    "peer_id": Rule("gpooler has no peering between separate instances; its own workers "
                    "(workers: N) pass cancel requests to each other", harmless=("0",)),
    "disable_pqexec": Rule("gpooler always allows the simple query protocol", harmless=("0",)),
    "application_name_add_host": Rule("gpooler does not rewrite application_name",
                                      harmless=("0",)),
    "conffile": Rule("gpooler reads the file given with -c or GPOOLER_CONFIG"),
    "service_name": Rule("a Windows service name: gpooler has no Windows service"),
    "job_name": Rule("a Windows service name: gpooler has no Windows service"),
    "stats_period": Rule("gpooler writes no periodic statistics; configure statsd: for metrics"),
    "max_prepared_statements": _future(
        "int", "max_prepared_statements", harmless=("0",),
        reason="gpooler does not re-prepare protocol-level prepared statements on other server "
               "connections in transaction mode"),
    "scram_iterations": Rule("gpooler derives SCRAM secrets from plain passwords with 4096 "
                             "iterations", harmless=("4096",)),
    # authentication
    "auth_type": _H,
    "auth_hba_file": Rule("gpooler has no HBA file: limit client networks per tenant with "
                          "allow_list", harmless=("",)),
    "auth_ident_file": Rule("gpooler has no ident maps"),
    "auth_file": _H,
    "auth_user": _future("str", "auth_user"),
    "auth_query": _future("str", "auth_query"),
    "auth_dbname": _future("str", "auth_dbname"),
    "auth_ldap_options": Rule("gpooler has no LDAP authentication"),
    # logging
    "syslog": Rule(_LOGS, harmless=("0",)),
    "syslog_ident": Rule(_LOGS),
    "syslog_facility": Rule(_LOGS),
    "log_connections": Rule("gpooler always logs logins (at info; log_level: warning hides them)",
                            harmless=("1",)),
    "log_disconnections": Rule("gpooler always logs disconnections (at info; log_level: warning "
                               "hides them)", harmless=("1",)),
    "log_pooler_errors": Rule("gpooler always logs what it refuses", harmless=("1",)),
    "log_stats": Rule("gpooler writes no periodic statistics to the log; configure statsd:",
                      harmless=("0",)),
    "verbose": _H,
    # console access control
    "admin_users": _H,
    "stats_users": _H,
    # connection sanity checks, timeouts
    "server_reset_query": Rule("gpooler always runs DISCARD ALL before a session-mode server "
                               "connection serves another client", harmless=("discard all",)),
    "server_reset_query_always": Rule("gpooler resets session-mode connections only",
                                      harmless=("0",)),
    "server_check_delay": _future("seconds", "server_check_delay"),
    "server_check_query": Rule("gpooler checks idle server connections with an empty query; to "
                               "check less often, raise server_check_delay",
                               harmless=("select 1", ";")),
    "server_fast_close": Rule("gpooler lets session-mode clients keep their server connection "
                              "until they leave", harmless=("0",)),
    "server_lifetime": _future("seconds", "server_lifetime"),
    "server_idle_timeout": _future("seconds", "server_idle_timeout"),
    "server_connect_timeout": _future("seconds", "server_connect_timeout"),
    "server_login_retry": _future("seconds", "server_login_retry"),
    "client_login_timeout": _future("seconds", "client_login_timeout"),
    "autodb_idle_timeout": Rule('gpooler has no automatic ("*") databases'),
    "pool_idle_timeout": _future("seconds", "pool_idle_timeout", harmless=("0",),
                                 reason="gpooler keeps a pool once made"),
    "dns_max_ttl": Rule(_DNS),
    "dns_nxdomain_ttl": Rule(_DNS),
    "dns_zone_check_period": Rule(_DNS, harmless=("0",)),
    "resolv_conf": Rule(_DNS, harmless=("",)),
    "query_wait_notify": Rule("gpooler sends no notice to clients waiting for a connection",
                              harmless=("0",)),
    "login_notify_message": Rule("gpooler sends no welcome notice", harmless=("",)),
    # TLS
    "client_tls_sslmode": _H,
    "client_tls_key_file": _H,
    "client_tls_cert_file": _H,
    "client_tls_ca_file": _H,
    "client_tls_protocols": _H,
    "client_tls_ciphers": _H,
    "client_tls13_ciphers": _H,
    "client_tls_ecdhcurve": _H,
    "client_tls_dheparams": _H,
    "server_tls_sslmode": _future("str", "server_tls", harmless=("prefer",)),
    "server_tls_ca_file": _future("path", "server_tls_ca_file"),
    "server_tls_key_file": _future("str", "server_tls_key_file",
                                   reason=_NO_SERVER_CERT),
    "server_tls_cert_file": _future("str", "server_tls_cert_file",
                                    reason=_NO_SERVER_CERT),
    "server_tls_protocols": _future("str", "server_tls_protocols", harmless=("secure",),
                                    reason=_SERVER_TLS_DEFAULTS),
    "server_tls_ciphers": _future("str", "server_tls_ciphers", harmless=("default",),
                                  reason=_SERVER_TLS_DEFAULTS),
    "server_tls13_ciphers": _future("str", "server_tls13_ciphers",
                                    reason=_SERVER_TLS_DEFAULTS),
    # dangerous timeouts
    "query_timeout": _future("seconds", "query_timeout", harmless=("0",)),
    "query_wait_timeout": _H,
    "cancel_wait_timeout": _future("seconds", "cancel_wait_timeout"),
    "client_idle_timeout": _H,
    "idle_transaction_timeout": _future("seconds", "idle_transaction_timeout", harmless=("0",)),
    "transaction_timeout": _future("seconds", "transaction_timeout", harmless=("0",)),
    "suspend_timeout": Rule("gpooler has no SUSPEND or online restart; on SIGTERM it drains "
                            "within shutdown_timeout"),
    # low-level network settings
    "pkt_buf": Rule("gpooler sizes its buffers itself"),
    "max_packet_size": Rule("gpooler has its own message size limit (1 GiB)"),
    "listen_backlog": Rule("gpooler uses its own listen backlog"),
    "sbuf_loopcnt": Rule("gpooler's greenlets take turns by themselves"),
    "so_reuseport": Rule("use workers: N, gpooler's processes sharing the listening sockets",
                         harmless=("0",)),
    "tcp_defer_accept": Rule("gpooler does not set TCP_DEFER_ACCEPT"),
    "tcp_socket_buffer": Rule("gpooler leaves socket buffer sizes to the kernel",
                              harmless=("0",)),
    "tcp_keepalive": Rule("gpooler does not turn on TCP keepalive; client_heartbeat_interval "
                          "checks idle clients instead", harmless=("0",)),
    "tcp_keepcnt": Rule("gpooler does not set TCP keepalive", harmless=("0",)),
    "tcp_keepidle": Rule("gpooler does not set TCP keepalive", harmless=("0",)),
    "tcp_keepintvl": Rule("gpooler does not set TCP keepalive", harmless=("0",)),
    "tcp_user_timeout": Rule("gpooler does not set TCP_USER_TIMEOUT", harmless=("0",)),
}

_SERVER_PARAMS = ("gpooler sends Postgres only the client's own startup parameters: set it on the "
                  "role or database (ALTER ROLE ... SET) or in the client")

# The keys of a [databases] entry's connection string.
DATABASE_KEYS: dict[str, Rule] = {
    "dbname": _H, "host": _H, "port": _H, "user": _H, "password": _H, "pool_size": _H,
    "pool_mode": _H, "query_wait_timeout": _H,
    "auth_user": RULES["auth_user"], "auth_query": RULES["auth_query"],
    "auth_dbname": RULES["auth_dbname"],
    "min_pool_size": RULES["min_pool_size"],
    "reserve_pool": RULES["reserve_pool_size"], "reserve_pool_size": RULES["reserve_pool_size"],
    "max_db_connections": RULES["max_db_connections"],
    "max_db_client_connections": RULES["max_db_client_connections"],
    "server_lifetime": RULES["server_lifetime"],
    "connect_query": Rule("gpooler runs no query on new server connections: use ALTER ROLE ... "
                          "SET for settings"),
    "client_encoding": Rule(_SERVER_PARAMS),
    "datestyle": Rule(_SERVER_PARAMS),
    "timezone": Rule(_SERVER_PARAMS),
    "application_name": Rule(_SERVER_PARAMS),
    "load_balance_hosts": Rule("gpooler connects to one host per tenant"),
    "target_session_attrs": Rule("gpooler does not check what kind of server it reached",
                                 harmless=("any",)),
}

# The keys of a [users] entry.
USER_KEYS: dict[str, Rule] = {
    "pool_mode": _H, "pool_size": _H, "client_idle_timeout": _H, "query_wait_timeout": _H,
    "max_user_client_connections": _H,
    "reserve_pool_size": RULES["reserve_pool_size"],
    "max_user_connections": RULES["max_user_connections"],
    "query_timeout": RULES["query_timeout"],
    "idle_transaction_timeout": RULES["idle_transaction_timeout"],
    "transaction_timeout": RULES["transaction_timeout"],
}

_CLIENT_TLS_EXTRAS = ("client_tls_ca_file", "client_tls_protocols", "client_tls_ciphers",
                      "client_tls13_ciphers", "client_tls_ecdhcurve", "client_tls_dheparams")
_TLS_DEFAULTS = {"client_tls_protocols": "secure", "client_tls_ciphers": "default",
                 "client_tls_ecdhcurve": "auto", "client_tls_dheparams": "auto"}


# ----------------------------------------------------------------------------- value parsing


def _int(text: str) -> int:
    """An integer as C's strtol(s, 0) reads it (0x.. hex, 0.. octal)."""
    t = text.strip().lower()
    sign = -1 if t.startswith("-") else 1
    t = t.lstrip("+-")
    if t.startswith("0x"):
        return sign * int(t[2:], 16)
    if len(t) > 1 and t.startswith("0"):
        return sign * int(t[1:], 8)
    return sign * int(t, 10)


def _seconds(text: str) -> float:
    """A PgBouncer duration: a number of seconds, fractions allowed, never negative."""
    value = float(text.strip())
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def _number(value: float) -> int | float:
    """Whole numbers as int, so the YAML says 120 rather than 120.0."""
    return int(value) if float(value).is_integer() else value


def _convert(kind: str, text: str) -> object:
    if kind == "seconds":
        return _number(_seconds(text))
    if kind == "int":
        return _int(text)
    return text


def _normal(text: str) -> str:
    """For comparing with Rule.harmless: numbers by value, words case- and space-insensitively."""
    try:
        return repr(float(_int(text)))
    except ValueError:
        pass
    try:
        return repr(float(text))
    except ValueError:
        return " ".join(text.lower().rstrip("; ").split())


def _find_setting(names: tuple[str, ...], levels: tuple[str, ...]) -> Setting | None:
    """The first gpooler setting called one of `names` that lives at one of `levels`."""
    for name in names:
        for s in SETTINGS:
            if s.name == name and s.level in levels:
                return s
    return None


def _sanitize_id(alias: str) -> str:
    """A tenant id from a database alias: no whitespace, no "." (gpooler splits user.tenant)."""
    return re.sub(r"[\s.]+", "_", alias).strip("_") or "db"


def _check_password(secret: str) -> str | None:
    """Why gpooler would refuse `secret` as a password, if it would (its own validation)."""
    doc = {"listen": [{"port": 1, "mode": "session"}],
           "tenants": {"t": {"host": "h", "users": {"u": {"password": secret}}}}}
    try:
        parse_config(_escape(doc), {})
    except ConfigError as e:
        return "; ".join(err.split(": ", 1)[-1] for err in e.errors)
    return None


def _escape(node: object) -> object:
    """gpooler expands ${VAR} in every string: a literal ${ must be written $${."""
    if isinstance(node, dict):
        return {k: _escape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape(v) for v in node]
    if isinstance(node, str):
        return node.replace("${", "$${")
    return node


# ------------------------------------------------------------------------------ translation


class _Translator:
    def __init__(self, ini: Ini, users: dict[str, str], userlist_name: str, ini_dir: str,
                 warnings: list[str]) -> None:
        self.ini = ini
        self.pgb = ini.get("pgbouncer", {})
        self.users = users  # userlist: name -> secret, already checked
        self.userlist_name = userlist_name
        self.ini_dir = ini_dir
        self.warnings = warnings
        self.doc: dict = {}
        self.defaults: dict = {}
        self.tenants: dict[str, dict] = {}
        self.mode = "session"
        self.auth_type = "md5"
        self.other_mode_users: list[str] = []  # "database X" / "user Y" needing the other mode
        self.scram_server_warned: set[str] = set()
        self._port: int | None = None

    # -- helpers
    def warn(self, where: str, subject: str, message: str) -> None:
        self.warnings.append(f"{where}: {subject}: {message}" if where else f"{subject}: {message}")

    def get(self, key: str) -> Value | None:
        return self.pgb.get(key)

    def parsed(self, key: str, kind: str, default: object = None) -> object:
        """The [pgbouncer] value of `key` converted, `default` when absent; a bad value is
        reported and gives `default`."""
        v = self.get(key)
        if v is None:
            return default
        try:
            return _convert(kind, v.text)
        except ValueError:
            self.warn(v.where, f"[pgbouncer] {key}", f"invalid value {v.text!r}: ignored")
            return default

    def pool_mode(self, text: str, where: str, subject: str) -> str | None:
        mode = text.strip().lower()
        if mode == "statement":
            self.warn(where, subject, "statement pooling is not supported by gpooler: "
                                      "transaction pooling is used instead")
            return "transaction"
        if mode in ("session", "transaction"):
            return mode
        self.warn(where, subject, f"invalid pool mode {text!r}: ignored")
        return None

    def future(self, key: str, value: Value, rule: Rule, subject: str, scope: str,
               tenants: list[dict], users: list[dict]) -> None:
        """Carry a setting over when gpooler has it at a level fitting `scope` ("global" for
        [pgbouncer], "tenant" for a [databases] entry, "user" for a [users] entry), otherwise
        report it. `tenants` and `users` are the mappings it applies to."""
        if rule.harmless and _normal(value.text) in {_normal(h) for h in rule.harmless}:
            return
        levels = {"global": ("global", "user", "tenant"), "tenant": ("user", "tenant"),
                  "user": ("user",)}[scope]
        setting = _find_setting(rule.future, levels) if rule.future else None
        if setting is None:
            why = "not supported by this gpooler version" if rule.future else "not translated"
            if rule.reason.startswith("not needed"):
                why = ""
            self.warn(value.where, subject, ": ".join(filter(None, (why, rule.reason))))
            return
        try:
            converted = _convert(rule.kind, value.text)
        except ValueError:
            self.warn(value.where, subject, f"invalid value {value.text!r}: ignored")
            return
        if rule.kind == "path":
            converted = os.path.normpath(os.path.join(self.ini_dir, str(converted).strip()))
        if key == "server_tls_sslmode":
            converted = str(converted).strip().lower()
            if converted == "allow":
                self.warn(value.where, subject, "allow: gpooler has no such mode: translated as "
                                                "prefer (TLS when the server offers it)")
                converted = "prefer"
        if key == "server_lifetime" and converted == 0:
            self.warn(value.where, subject, "0 (use each server connection once) has no gpooler "
                                            "equivalent: not translated")
            return
        if setting.level == "global":
            self.doc[setting.name] = converted
        elif scope == "global" and setting.cascade:
            self.defaults[setting.name] = converted
        elif scope != "user" and (setting.level == "tenant" or setting.cascade):
            for tenant in tenants:
                tenant[setting.name] = converted
        else:
            for user in users:
                user[setting.name] = converted

    # -- the parts
    def run(self) -> dict:
        self.check_sections()
        self.check_keys()
        mode = self.get("pool_mode")
        if mode is not None:
            self.mode = self.pool_mode(mode.text, mode.where, "[pgbouncer] pool_mode") or "session"
        self.auth_type = (self.get("auth_type").text.strip().lower()
                          if self.get("auth_type") else "md5")
        self.check_auth_type()
        self.make_defaults()
        self.make_tenants()
        self.apply_user_section()
        self.doc["listen"] = self.make_listeners()
        self.make_admin()
        self.make_log_level()
        self.make_tls()
        self.rest_of_pgbouncer()
        doc: dict = {"listen": self.doc.pop("listen")}
        for key in ("admin", "log_level", "tls"):
            if key in self.doc:
                doc[key] = self.doc.pop(key)
        doc.update(self.doc)
        doc["defaults"] = self.defaults
        doc["tenants"] = self.tenants
        return doc

    def check_sections(self) -> None:
        for section in self.ini:
            if section == "peers" and self.ini[section]:
                self.warn("", "[peers]", "gpooler has no peering between separate instances; its "
                                         "own workers (workers: N) pass cancel requests to each "
                                         "other")
            elif section not in ("pgbouncer", "databases", "users", "peers"):
                self.warn("", f"[{section}]", "unknown section: ignored")
        if not self.ini.get("databases"):
            self.warn("", "[databases]", "no databases: the configuration has no tenants")

    def check_keys(self) -> None:
        for key, value in self.pgb.items():
            if key not in RULES:
                self.warn(value.where, f"[pgbouncer] {key}", "unknown PgBouncer setting: ignored")

    def check_auth_type(self) -> None:
        v = self.get("auth_type")
        if self.auth_type in ("md5", "scram-sha-256", "plain"):
            return
        where = v.where if v else ""
        reasons = {
            "trust": "gpooler always checks passwords",
            "any": "gpooler always checks the user name and password",
            "hba": "gpooler has no HBA file (limit client networks with allow_list)",
            "cert": "gpooler does not authenticate clients by certificate",
            "pam": "gpooler has no PAM authentication",
            "ldap": "gpooler has no LDAP authentication",
        }
        reason = reasons.get(self.auth_type, "unknown auth_type")
        self.warn(where, "[pgbouncer] auth_type", f"{self.auth_type}: {reason}; users log in with "
                         "their userlist passwords by SCRAM-SHA-256 (md5 for md5 hashes)")

    def make_defaults(self) -> None:
        pool_size = self.parsed("default_pool_size", "int", 20)
        if not isinstance(pool_size, int) or pool_size <= 0:
            v = self.get("default_pool_size")
            self.warn(v.where, "[pgbouncer] default_pool_size",
                      "must be > 0 in gpooler: using 20")
            pool_size = 20
        self.defaults["pool_size"] = pool_size
        max_clients = self.parsed("max_client_conn", "int", 100)
        v = self.get("max_client_conn")
        if v is not None:
            self.warn(v.where, "[pgbouncer] max_client_conn",
                      "PgBouncer counts clients over the whole process, gpooler per (tenant, "
                      f"user): max_clients {max_clients} now limits each pair separately")
        per_user = self.parsed("max_user_client_connections", "int", 0)
        if isinstance(per_user, int) and per_user > 0:
            v = self.get("max_user_client_connections")
            self.warn(v.where, "[pgbouncer] max_user_client_connections",
                      "PgBouncer counts a user's clients over all databases, gpooler per "
                      "(tenant, user): it becomes max_clients")
            max_clients = min(max_clients, per_user) if max_clients > 0 else per_user
        if max_clients > 0:
            self.defaults["max_clients"] = max_clients
        wait = self.parsed("query_wait_timeout", "seconds", 120)
        self.defaults["pool_checkout_timeout"] = wait
        idle = self.parsed("client_idle_timeout", "seconds", 0)
        if idle:
            self.defaults["client_idle_timeout"] = idle

    # -- tenants
    def make_tenants(self) -> None:
        taken: set[str] = set()
        md5_users = sorted(n for n, s in self.users.items() if password_kind(s) == "md5")
        for alias, value in self.ini.get("databases", {}).items():
            subject = f"[databases] {alias}"
            if alias == "*":
                self.warn(value.where, subject, "gpooler has no fallback database: every "
                          "database needs its own tenant; not translated")
                continue
            try:
                params = dict(parse_connstr(value.text))
            except ValueError as e:
                self.warn(value.where, subject, f"cannot parse the connection string ({e}): "
                                                "database skipped")
                continue
            tenant_id = _sanitize_id(alias)
            base, n = tenant_id, 2
            while tenant_id in taken:
                tenant_id, n = f"{base}_{n}", n + 1
            taken.add(tenant_id)
            if tenant_id != alias:
                self.warn(value.where, subject, f'tenant id "{tenant_id}": gpooler tenant ids '
                                                'cannot contain "." or whitespace')
            tenant = self.make_tenant(alias, tenant_id, params, value.where)
            if tenant is not None:
                self.tenants[tenant_id] = tenant
        if len(self.tenants) > 1:
            self.warn("", "[databases]", "the database name no longer picks the pool: clients "
                      "choose the tenant by logging in as <user>.<tenant> (or with "
                      "options=-ctenant=<tenant>); tenants: " + ", ".join(self.tenants))
        if md5_users and len(self.tenants) > 1:
            self.warn(self.userlist_name, "md5 passwords",
                      f"{', '.join(md5_users)}: an md5 hash is salted with the user name, so these "
                      "users must log in with their plain name and choose the tenant with "
                      "options=-ctenant=ID (or user.tenant with a new hash over that name)")

    def make_tenant(self, alias: str, tenant_id: str, params: dict[str, str],
                    where: str) -> dict | None:
        subject = f"[databases] {alias}"
        users = self.make_users(alias, params, where)
        if not users:
            self.warn(where, subject, "no users (give the userlist, or user= and password= in "
                                      "the entry): tenant left out")
            return None
        tenant: dict = {}
        host = params.get("host", "")
        if not host or host.startswith(("/", "@")):
            self.warn(where, subject, "Unix socket connections to Postgres are not supported: "
                                      "gpooler connects over TCP to 127.0.0.1")
            host = "127.0.0.1"
        elif "," in host:
            hosts = [h.strip() for h in host.split(",") if h.strip()]
            self.warn(where, f"{subject} host", f"gpooler connects to one host: using {hosts[0]}, "
                      f"not {', '.join(hosts[1:])}")
            host = hosts[0]
        tenant["host"] = host
        port = 5432
        if "port" in params:
            try:
                port = _int(params["port"])
                if not 1 <= port <= 65535:
                    raise ValueError
            except ValueError:
                self.warn(where, f"{subject} port", f"invalid port {params['port']!r}: using 5432")
                port = 5432
        tenant["port"] = port
        database = params.get("dbname", alias)
        tenant["database"] = database
        if database != alias:
            self.warn(where, f"{subject} dbname",
                      f'clients that name database "{alias}" would reach Postgres database '
                      f'"{alias}": with gpooler they log in as <user>.{tenant_id} and name '
                      f'database "{database}" or none')
        if "pool_size" in params:
            try:
                size = _int(params["pool_size"])
                if size <= 0:
                    raise ValueError
                tenant["pool_size"] = size
            except ValueError:
                self.warn(where, f"{subject} pool_size",
                          f"must be a number > 0 in gpooler: {params['pool_size']!r} ignored")
        if "pool_mode" in params:
            mode = self.pool_mode(params["pool_mode"], where, f"{subject} pool_mode")
            if mode is not None and mode != self.mode:
                self.other_mode_users.append(f"database {alias}")
        if "query_wait_timeout" in params:
            try:
                wait = float(params["query_wait_timeout"])
                if wait >= 0:  # -1: not set
                    tenant["pool_checkout_timeout"] = _number(wait)
            except ValueError:
                self.warn(where, f"{subject} query_wait_timeout",
                          f"invalid value {params['query_wait_timeout']!r}: ignored")
        for key, text in params.items():
            rule = DATABASE_KEYS.get(key)
            if rule is None:
                self.warn(where, f"{subject} {key}", "unknown PgBouncer database parameter: "
                                                     "ignored")
            elif key == "load_balance_hosts" and "," not in params.get("host", ""):
                continue
            elif not rule.handled:
                self.future(key, Value(text, where), rule, f"{subject} {key}", "tenant",
                            [tenant], list(users.values()))
        tenant["users"] = users
        return tenant

    def make_users(self, alias: str, params: dict[str, str], where: str) -> dict:
        subject = f"[databases] {alias}"
        forced = params.get("user")
        forced_password = params.get("password")
        if forced is not None and any(c.isspace() for c in forced):
            self.warn(where, f"{subject} user", "a user name with whitespace cannot be used")
            return {}
        users: dict[str, dict] = {}
        if forced is not None:
            self.warn(where, f"{subject} user",
                      f"PgBouncer shares one pool as {forced} among all clients; gpooler keeps "
                      f"one pool per client user, each logging in to Postgres as {forced}")
            server_password = forced_password
            if server_password is None:
                server_password = self.users.get(forced)
            if server_password is not None and password_kind(server_password) == "scram":
                self.warn(where, f"{subject} user",
                          f"the password of {forced} is a SCRAM verifier, which cannot log in to "
                          "Postgres: set server_password")
                server_password = ""
            elif server_password is None:
                server_password = ""  # as PgBouncer: no password (enough where Postgres trusts)
        for name, secret in self.users.items():
            user = {"password": secret}
            auth_type = self.client_auth_type(name, secret)
            if auth_type != ("md5" if password_kind(secret) == "md5" else "scram-sha-256"):
                user["auth_type"] = auth_type
            if forced is not None:
                if forced != name:
                    user["server_user"] = forced
                if forced != name or server_password != secret or password_kind(secret) != "plain":
                    user["server_password"] = server_password
            elif password_kind(secret) == "md5":
                user["server_password"] = secret  # logs in to Postgres with md5, as PgBouncer does
            elif password_kind(secret) == "scram" and name not in self.scram_server_warned:
                self.scram_server_warned.add(name)
                self.warn(self.userlist_name, f'user "{name}"',
                          "a SCRAM verifier cannot log in to Postgres: gpooler reaches Postgres as "
                          "this user only where it needs no password (trust); otherwise add its "
                          "plain server_password")
            users[name] = user
        if not users and forced is not None and forced_password:
            self.warn(where, f"{subject} user", f"no userlist: {forced} becomes the only user, "
                                                "with the entry's password")
            users[forced] = {"password": forced_password}
        return users

    def client_auth_type(self, name: str, secret: str) -> str:
        kind = password_kind(secret)
        wanted = self.auth_type
        if wanted == "plain":
            if kind == "plain":
                return "plain"
            fallback = "md5" if kind == "md5" else "scram-sha-256"
            self.warn(self.userlist_name, f'user "{name}"',
                      f"auth_type plain needs a plain-text password: {fallback} is used")
            return fallback
        if wanted == "scram-sha-256" and kind == "md5":
            self.warn(self.userlist_name, f'user "{name}"',
                      "auth_type scram-sha-256 cannot check an md5 hash: md5 is used")
            return "md5"
        if wanted == "md5" and kind == "plain":
            return "scram-sha-256"  # every current driver speaks it; PgBouncer would ask md5
        return "md5" if kind == "md5" else "scram-sha-256"

    def apply_user_section(self) -> None:
        for name, value in self.ini.get("users", {}).items():
            subject = f"[users] {name}"
            if name not in self.users:
                self.warn(value.where, subject, "not in the userlist: no gpooler user to apply "
                                                "it to (PgBouncer would ask auth_query)")
                continue
            try:
                params = parse_connstr(value.text)
            except ValueError as e:
                self.warn(value.where, subject, f"cannot parse the settings ({e}): ignored")
                continue
            targets = [t["users"][name] for t in self.tenants.values() if name in t["users"]]
            for key, text in params:
                rule = USER_KEYS.get(key)
                if rule is None:
                    self.warn(value.where, f"{subject} {key}", "unknown PgBouncer user "
                                                               "parameter: ignored")
                elif not rule.handled:
                    self.future(key, Value(text, value.where), rule, f"{subject} {key}", "user",
                                [], targets)
                else:
                    self.user_setting(name, key, text, value.where, targets)

    def user_setting(self, name: str, key: str, text: str, where: str,
                     targets: list[dict]) -> None:
        subject = f"[users] {name} {key}"
        if key == "pool_mode":
            mode = self.pool_mode(text, where, subject)
            if mode is not None and mode != self.mode:
                self.other_mode_users.append(f"user {name}")
            return
        try:
            if key in ("pool_size", "max_user_client_connections"):
                number = _int(text)
                if number <= 0:
                    return  # 0 and -1: not set
                gp = "pool_size" if key == "pool_size" else "max_clients"
                if key == "max_user_client_connections":
                    self.warn(where, subject, "PgBouncer counts this user's clients over all "
                                              "databases, gpooler per tenant: it becomes "
                                              "max_clients")
            elif key == "client_idle_timeout":
                number = _number(_seconds(text))
                if number == 0:
                    return  # 0: not set, the global one applies
                gp = "client_idle_timeout"
            else:
                number = float(text)
                if number < 0:
                    return  # -1: not set (0 waits forever)
                number = _number(number)
                gp = "pool_checkout_timeout"
        except ValueError:
            self.warn(where, subject, f"invalid value {text!r}: ignored")
            return
        for target in targets:
            target[gp] = number

    # -- listeners, admin, logging, TLS
    def listen_port(self) -> int:
        if self._port is None:
            port = self.parsed("listen_port", "int", DEFAULT_LISTEN_PORT)
            if not 1 <= port <= 65535:
                self.warn(self.get("listen_port").where, "[pgbouncer] listen_port",
                          f"invalid port {port}: using {DEFAULT_LISTEN_PORT}")
                port = DEFAULT_LISTEN_PORT
            self._port = port
        return self._port

    def offset_port(self, port: int, offset: int) -> int:
        return port + offset if port + offset <= 65535 else port - offset

    def listen_hosts(self) -> list[str]:
        v = self.get("listen_addr")
        if v is None or not v.text.strip():
            self.warn(v.where if v else "", "[pgbouncer] listen_addr",
                      "not set: PgBouncer listened on its Unix socket only; gpooler listens on "
                      "TCP 127.0.0.1")
            return ["127.0.0.1"]
        hosts: list[str] = []
        for part in v.text.split(","):
            part = part.strip()
            for host in (["0.0.0.0", "::"] if part == "*" else [part]):
                if host and host not in hosts:
                    hosts.append(host)
        return hosts

    def make_listeners(self) -> list[dict]:
        port = self.listen_port()
        hosts = self.listen_hosts()
        listen = [{"host": h, "port": port, "mode": self.mode} for h in hosts]
        if self.other_mode_users:
            other = "session" if self.mode == "transaction" else "transaction"
            other_port = self.offset_port(port, OTHER_MODE_OFFSET)
            listen += [{"host": h, "port": other_port, "mode": other} for h in hosts]
            self.warn("", "pool_mode", f"gpooler's pool mode is chosen by the port: "
                      f"{', '.join(self.other_mode_users)} use {other} mode, so their clients "
                      f"must connect to port {other_port} (port {port} is {self.mode} mode)")
        return listen

    def make_admin(self) -> None:
        admins = self.get("admin_users")
        stats = self.get("stats_users")
        if stats is not None and stats.text.strip():
            self.warn(stats.where, "[pgbouncer] stats_users", "gpooler's admin console has no "
                      "read-only users: add them to admin_users if they should get in")
        if admins is None or not admins.text.strip():
            return
        users = {}
        for name in (n.strip() for n in admins.text.split(",")):
            if not name:
                continue
            if name in self.users:
                users[name] = self.users[name]
            else:
                self.warn(admins.where, "[pgbouncer] admin_users",
                          f"{name} has no password in the userlist: left out")
        if not users:
            return
        port = self.offset_port(self.listen_port(), ADMIN_OFFSET)
        self.doc["admin"] = {"host": "127.0.0.1", "port": port, "users": users}
        self.warn(admins.where, "[pgbouncer] admin_users",
                  f"the admin console is on its own port: psql -h 127.0.0.1 -p {port} -U "
                  f"{next(iter(users))} gpooler (PgBouncer served it as database pgbouncer)")

    def make_log_level(self) -> None:
        verbose = self.parsed("verbose", "int", 0)
        if verbose > 0:
            self.doc["log_level"] = "debug"

    def make_tls(self) -> None:
        mode_value = self.get("client_tls_sslmode")
        mode = mode_value.text.strip().lower() if mode_value else "disable"
        if mode == "disable":
            return  # PgBouncer ignores the other client_tls_* settings too
        subject = "[pgbouncer] client_tls_sslmode"
        if mode not in ("allow", "prefer", "require", "verify-ca", "verify-full"):
            self.warn(mode_value.where, subject, f"invalid value {mode_value.text!r}: TLS left off")
            return
        files = {k: self.get(f"client_tls_{k}") for k in ("cert_file", "key_file")}
        if not all(v is not None and v.text.strip() for v in files.values()):
            self.warn(mode_value.where, subject, "client_tls_cert_file and client_tls_key_file "
                                                 "are needed: TLS left off")
            return
        tls = {k: os.path.normpath(os.path.join(self.ini_dir, v.text.strip()))
               for k, v in files.items()}
        levels = ("tls",)
        if mode in ("require", "verify-ca", "verify-full"):
            setting = _find_setting(("enforce_ssl",), ("tenant",))
            if setting is not None and setting.cascade:
                self.defaults[setting.name] = True
                if mode != "require":
                    self.warn(mode_value.where, subject, f"{mode}: gpooler requires TLS "
                              "(enforce_ssl) but does not ask clients for certificates")
            else:
                self.warn(mode_value.where, subject, f"{mode}: not supported by this gpooler "
                          "version: clients may still connect without TLS")
        for key in _CLIENT_TLS_EXTRAS:
            v = self.get(key)
            if v is None or _normal(v.text) == _normal(_TLS_DEFAULTS.get(key, "")):
                continue
            name = key.replace("client_tls13_", "tls13_").replace("client_tls_", "")
            setting = _find_setting((name,), levels)
            if setting is None:
                self.warn(v.where, f"[pgbouncer] {key}", "not supported by this gpooler version")
            elif name.endswith("_file"):
                tls[name] = os.path.normpath(os.path.join(self.ini_dir, v.text.strip()))
            else:
                tls[name] = v.text.strip()
        self.doc["tls"] = tls

    def rest_of_pgbouncer(self) -> None:
        tenants = list(self.tenants.values())
        users = [u for t in tenants for u in t["users"].values()]
        for key, value in self.pgb.items():
            rule = RULES.get(key)
            if rule is not None and not rule.handled:
                self.future(key, value, rule, f"[pgbouncer] {key}", "global", tenants, users)


def translate(ini_text: str, userlist_text: str | None, ini_dir: str, *,
              ini_name: str = "pgbouncer.ini",
              userlist_name: str = "userlist.txt") -> tuple[dict, list[str]]:
    """pgbouncer.ini (+ userlist.txt) -> (gpooler document for yaml.safe_dump, warnings).

    Reads only the files named by `%include` (relative to ini_dir). Raises PgBouncerIniError when
    the ini is not an ini file PgBouncer would load. The document is checked with gpooler's own
    parser; whatever that still finds wrong is added to the warnings.
    """
    ini = parse_ini(ini_text, ini_dir, ini_name)
    warnings: list[str] = []
    users: dict[str, str] = {}
    if userlist_text is not None:
        listed, problems = parse_userlist(userlist_text, userlist_name)
        warnings += problems
        for name, secret in listed.items():
            where = f'{userlist_name}: user "{name}"'
            if not name or any(c.isspace() for c in name):
                warnings.append(f"{where}: gpooler user names cannot be empty or contain "
                                "whitespace: left out")
                continue
            if re.fullmatch(r"md5[0-9a-fA-F]{32}", secret) and secret != secret.lower():
                secret = secret.lower()
            problem = "must not be empty" if not secret else _check_password(secret)
            if problem:
                warnings.append(f"{where}: password {problem}: left out")
                continue
            users[name] = secret
    elif not ini.get("pgbouncer", {}).get("auth_file"):
        warnings.append("[pgbouncer] auth_file: no userlist given: only users forced with user= "
                        "and password= in [databases] can be translated")
    translator = _Translator(ini, users, userlist_name, ini_dir, warnings)
    doc = _escape(translator.run())
    try:
        parse_config(doc, {})
    except ConfigError as e:
        warnings += [f"the result does not pass gpooler --check: {err}" for err in e.errors]
    return doc, _in_file_order(warnings, ini_name)


def _in_file_order(warnings: list[str], ini_name: str) -> list[str]:
    """Warnings about lines of the ini first, by line number; then the others as they came."""
    pattern = re.compile(re.escape(ini_name) + r":(\d+): ")

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        m = pattern.match(item[1])
        return (0, int(m[1]), item[0]) if m else (1, 0, item[0])

    return [w for _, w in sorted(enumerate(warnings), key=key)]


def translate_files(ini_path: str, userlist_path: str | None = None) -> tuple[dict, list[str]]:
    """Read pgbouncer.ini and the userlist (USERLIST_TXT, else the ini's auth_file, relative to
    the ini's directory) and translate them. Raises PgBouncerIniError when the ini, an include or
    a userlist named explicitly cannot be read."""
    try:
        ini_text = _read_text(ini_path)
    except OSError as e:
        raise PgBouncerIniError(f"{ini_path}: cannot read: {e.strerror or e}") from None
    ini_dir = os.path.dirname(os.path.abspath(ini_path))
    ini_name = os.path.basename(ini_path)
    warnings: list[str] = []
    userlist_text = None
    if userlist_path is not None:
        try:
            userlist_text = _read_text(userlist_path)
        except OSError as e:
            raise PgBouncerIniError(f"{userlist_path}: cannot read: {e.strerror or e}") from None
    else:
        auth_file = parse_ini(ini_text, ini_dir, ini_name).get("pgbouncer", {}).get("auth_file")
        if auth_file is not None and auth_file.text.strip():
            userlist_path = os.path.join(ini_dir, auth_file.text.strip())
            try:
                userlist_text = _read_text(userlist_path)
            except OSError as e:
                warnings.append(f"{auth_file.where}: [pgbouncer] auth_file: cannot read "
                                f"{userlist_path}: {e.strerror or e}; give USERLIST_TXT")
    doc, more = translate(ini_text, userlist_text, ini_dir, ini_name=ini_name,
                          userlist_name=os.path.basename(userlist_path or "userlist.txt"))
    return doc, warnings + more
