"""`gpooler import-pgbouncer`: the parsers, the translation of a realistic PgBouncer setup, the
command end to end, docs/pgbouncer.md covering every PgBouncer setting, and a translated
configuration serving real traffic."""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
import yaml
from scramp import ScramMechanism

from cluster import free_port
from gpooler import config as gpconfig
from gpooler import pgbouncer_import as pi
from gpooler.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
MAN_PAGE = Path("/usr/share/man/man5/pgbouncer.5.gz")


def md5(password: str, user: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def scram(password: str) -> str:
    salt, stored, server, iterations = ScramMechanism().make_auth_info(password, 4096)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def has_setting(name: str) -> bool:
    return any(s.name == name for s in gpconfig.SETTINGS)


def warned(warnings: list[str], *parts: str) -> list[str]:
    """The warnings containing every one of `parts`."""
    return [w for w in warnings if all(p in w for p in parts)]


# ------------------------------------------------------------------------------------ parsers


def test_parse_connstr_quotes_and_errors():
    assert pi.parse_connstr("host=db port=5433  dbname=app") == [
        ("host", "db"), ("port", "5433"), ("dbname", "app")]
    assert pi.parse_connstr("connect_query='SET x = ''y''' user=u") == [
        ("connect_query", "SET x = 'y'"), ("user", "u")]
    assert pi.parse_connstr("") == []
    for bad in ("host", "host=", "host='db", "=db"):
        with pytest.raises(ValueError):
            pi.parse_connstr(bad)


def test_parse_userlist():
    users, warnings = pi.parse_userlist(
        '; comment\n"alice" "pw" trailing junk\n\n"bo""b" "p""w"\nbroken line\n"carol"   "x"\n',
        "users.txt")
    assert users == {"alice": "pw", 'bo"b': 'p"w', "carol": "x"}
    assert warnings == ['users.txt:5: not a "user" "password" line: skipped']


def test_parse_ini_sections_includes_and_quoted_names(tmp_path):
    (tmp_path / "dbs.ini").write_text("[databases]\nincluded = host=inc\n")
    ini = pi.parse_ini(
        "# comment\n[pgbouncer]\nLISTEN_PORT = 7000\n; another\n[databases]\n"
        '"my db" = host=a\nplain=host=b\n%include dbs.ini\n[pgbouncer]\nlisten_port = 7001\n',
        str(tmp_path))
    assert ini["pgbouncer"]["listen_port"].text == "7001"
    assert ini["pgbouncer"]["listen_port"].where == "pgbouncer.ini:10"
    assert {k: v.text for k, v in ini["databases"].items()} == {
        "my db": "host=a", "plain": "host=b", "included": "host=inc"}
    assert ini["databases"]["included"].where == "dbs.ini:2"


@pytest.mark.parametrize("text, message", [
    ("[pgbouncer]\njust words\n", "pgbouncer.ini:2: syntax error"),
    ("listen_port = 1\n", "outside any [section]"),
    ("[pgbouncer\n", "without ']'"),
    ("[databases]\n%include missing.ini\n", "cannot read included file"),
])
def test_parse_ini_refuses_what_pgbouncer_refuses(tmp_path, text, message):
    with pytest.raises(pi.PgBouncerIniError, match=re.escape(message)):
        pi.parse_ini(text, str(tmp_path))


def test_include_loop_is_stopped(tmp_path):
    (tmp_path / "self.ini").write_text("%include self.ini\n")
    with pytest.raises(pi.PgBouncerIniError, match="nested too deeply"):
        pi.parse_ini("%include self.ini\n", str(tmp_path))


# ---------------------------------------------------------------------- a realistic translation

INI = """\
;; pgbouncer.ini of a production setup
[databases]
appdb = host=10.0.0.5 port=5433 dbname=app pool_size=30
reports = host=10.0.0.6 dbname=reports user=reporter pool_mode=session connect_query='SET a=''b'''
legacy.db = host=/var/run/postgresql dbname=legacy
replicas = host=10.0.0.7,10.0.0.8 dbname=app client_encoding=UTF8
* = host=10.0.0.9

[users]
alice = pool_size=5 max_user_connections=10
ghost = pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1, 10.0.0.2
listen_port = 6432
auth_type = md5
auth_file = userlist.txt
admin_users = admin, nobody
stats_users = stats
pool_mode = transaction
max_client_conn = 500
default_pool_size = 25
query_wait_timeout = 30
client_idle_timeout = 600.5
server_lifetime = 1800
server_idle_timeout = 300
idle_transaction_timeout = 60
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
max_db_connections = 50
server_reset_query = DISCARD ALL
log_connections = 1
so_reuseport = 0
tcp_keepalive = 1
verbose = 1
server_round_robin = 1
bogus_setting = 1
"""

CAROL = scram("carol-pw")
USERLIST = f"""\
"alice" "alice-pw"
"bob" "{md5('bob-pw', 'bob')}"
"carol" "{CAROL}"
"admin" "adm${{in}}pw"
"reporter" "reporter-pw"
"has space" "x"
"broken" "SCRAM-SHA-256$4096:not-a-verifier"
"""


@pytest.fixture
def translated(tmp_path):
    return pi.translate(INI, USERLIST, str(tmp_path))


def test_listeners_admin_and_defaults(translated):
    doc, warnings = translated
    # the global mode on listen_port; "reports" wants session: a second listener on port + 1
    assert doc["listen"] == [
        {"host": "127.0.0.1", "port": 6432, "mode": "transaction"},
        {"host": "10.0.0.2", "port": 6432, "mode": "transaction"},
        {"host": "127.0.0.1", "port": 6433, "mode": "session"},
        {"host": "10.0.0.2", "port": 6433, "mode": "session"},
    ]
    assert warned(warnings, "pool_mode", "database reports", "port 6433")
    assert doc["admin"] == {"host": "127.0.0.1", "port": 6434, "users": {"admin": "adm$${in}pw"}}
    assert warned(warnings, "[pgbouncer] admin_users", "nobody", "left out")
    assert warned(warnings, "[pgbouncer] admin_users", "-p 6434")
    assert warned(warnings, "[pgbouncer] stats_users", "read-only")
    assert doc["log_level"] == "debug"
    expected = {"pool_size": 25, "max_clients": 500, "pool_checkout_timeout": 30,
                "client_idle_timeout": 600.5}
    for name in ("server_lifetime", "server_idle_timeout", "idle_transaction_timeout"):
        if has_setting(name):  # the translator grows with gpooler's settings
            expected[name] = {"server_lifetime": 1800, "server_idle_timeout": 300,
                              "idle_transaction_timeout": 60}[name]
        else:
            assert warned(warnings, f"[pgbouncer] {name}: not supported by this gpooler version")
    assert doc["defaults"] == expected
    assert warned(warnings, "[pgbouncer] max_client_conn", "per (tenant, user)")


def test_tenants_and_users(translated):
    doc, warnings = translated
    tenants = doc["tenants"]
    assert list(tenants) == ["appdb", "reports", "legacy_db", "replicas"]
    appdb = tenants["appdb"]
    assert {k: v for k, v in appdb.items() if k != "users"} == {
        "host": "10.0.0.5", "port": 5433, "database": "app", "pool_size": 30}
    assert appdb["users"] == {
        "alice": {"password": "alice-pw", "pool_size": 5},  # plain: SCRAM, server_password derived
        "bob": {"password": md5("bob-pw", "bob"), "server_password": md5("bob-pw", "bob")},
        "carol": {"password": CAROL},  # a verifier: SCRAM, no server_password (reported)
        "admin": {"password": "adm$${in}pw"},
        "reporter": {"password": "reporter-pw"},
    }
    # user= forces the Postgres role; its password comes from the userlist
    reports = tenants["reports"]
    assert reports["database"] == "reports" and reports["port"] == 5432
    assert reports["users"]["alice"] == {"password": "alice-pw", "server_user": "reporter",
                                         "server_password": "reporter-pw", "pool_size": 5}
    assert reports["users"]["reporter"] == {"password": "reporter-pw"}
    assert warned(warnings, "[databases] reports user", "one pool per client user")
    assert warned(warnings, "[databases] reports connect_query", "not translated")
    # "legacy.db": sanitized id, Unix socket -> TCP 127.0.0.1
    assert tenants["legacy_db"]["host"] == "127.0.0.1"
    assert warned(warnings, "[databases] legacy.db", 'tenant id "legacy_db"')
    assert warned(warnings, "[databases] legacy.db", "Unix socket")
    # a host list: the first host
    assert tenants["replicas"]["host"] == "10.0.0.7"
    assert warned(warnings, "[databases] replicas host", "10.0.0.8")
    assert warned(warnings, "[databases] replicas client_encoding", "not translated")
    assert warned(warnings, "[databases] *", "no fallback database")
    assert warned(warnings, "[databases] appdb dbname", 'database "app"')


def test_userlist_problems_and_auth_notes(translated):
    _, warnings = translated
    assert warned(warnings, 'user "has space"', "whitespace")
    assert warned(warnings, 'user "broken"', "not a valid SCRAM-SHA-256 verifier", "left out")
    assert warned(warnings, 'user "carol"', "SCRAM verifier cannot log in to Postgres")
    assert warned(warnings, "md5 passwords", "bob", "options=-ctenant=ID")
    assert warned(warnings, "[users] ghost", "not in the userlist")
    assert warned(warnings, "[users] alice max_user_connections")


def test_untranslatable_settings_are_reported_once_each(translated):
    _, warnings = translated
    for key in ("logfile", "pidfile", "ignore_startup_parameters", "max_db_connections",
                "tcp_keepalive", "server_round_robin"):
        assert len(warned(warnings, f"[pgbouncer] {key}:")) == 1, key
    assert warned(warnings, "[pgbouncer] bogus_setting: unknown PgBouncer setting")
    # values that match what gpooler does anyway are not noise
    for key in ("server_reset_query", "log_connections", "so_reuseport", "auth_file",
                "listen_port", "default_pool_size", "query_wait_timeout", "verbose"):
        assert not warned(warnings, f"[pgbouncer] {key}:"), key
    # every warning names its place; ini lines come first, in order
    lines = [int(m[1]) for w in warnings if (m := re.match(r"pgbouncer\.ini:(\d+): ", w))]
    assert lines == sorted(lines) and lines


def test_result_passes_gpooler_check(translated, tmp_path):
    doc, warnings = translated
    assert not warned(warnings, "does not pass")
    parse_config(doc, {})
    path = tmp_path / "gpooler.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(str(path), environ={})
    assert config.admin.users["admin"] == "adm${in}pw"  # $${ is a literal ${
    assert config.tenants["reports"].users["bob"].server_user == "reporter"
    assert config.tenants["appdb"].users["bob"].auth_type == "md5"
    assert config.tenants["appdb"].users["alice"].auth_type == "scram-sha-256"


# ------------------------------------------------------------------------------- smaller cases


def small(pgbouncer: str = "", databases: str = "db = host=h", users: str = "") -> str:
    """A small pgbouncer.ini: the given lines in each section, listening on all addresses."""
    return (f"[databases]\n{databases}\n[users]\n{users}\n"
            f"[pgbouncer]\nlisten_addr = *\n{pgbouncer}\n")


def test_defaults_follow_pgbouncer_when_unset():
    doc, warnings = pi.translate(small(), '"u" "pw"', "/")
    # PgBouncer's defaults: session mode, port 6432, pool 20, 100 clients, 120 s wait
    assert doc["listen"] == [{"host": "0.0.0.0", "port": 6432, "mode": "session"},
                             {"host": "::", "port": 6432, "mode": "session"}]
    assert doc["defaults"] == {"pool_size": 20, "max_clients": 100, "pool_checkout_timeout": 120}
    assert doc["tenants"] == {"db": {"host": "h", "port": 5432, "database": "db",
                                     "users": {"u": {"password": "pw"}}}}
    assert warnings == []
    parse_config(doc, {})


def test_statement_mode_and_per_user_mode():
    doc, warnings = pi.translate(
        small("pool_mode = statement\nlisten_port = 7000", users="u = pool_mode=session"),
        '"u" "pw"', "/")
    assert {(e["port"], e["mode"]) for e in doc["listen"]} == {(7000, "transaction"),
                                                               (7001, "session")}
    assert warned(warnings, "[pgbouncer] pool_mode", "statement pooling is not supported")
    assert warned(warnings, "user u use session mode", "port 7001")


@pytest.mark.parametrize("auth_type, secret, expected, warning", [
    ("md5", "pw", None, None),  # plain under md5: gpooler's SCRAM default
    ("md5", md5("pw", "u"), None, None),
    ("md5", scram("pw"), None, None),
    ("scram-sha-256", "pw", None, None),
    ("scram-sha-256", md5("pw", "u"), None, "cannot check an md5 hash"),
    ("plain", "pw", "plain", None),
    ("plain", md5("pw", "u"), None, "needs a plain-text password"),
    ("trust", "pw", None, "[pgbouncer] auth_type: trust"),
    ("hba", md5("pw", "u"), None, "[pgbouncer] auth_type: hba"),
])
def test_auth_types(auth_type, secret, expected, warning):
    doc, warnings = pi.translate(small(f"auth_type = {auth_type}"), f'"u" "{secret}"', "/")
    user = doc["tenants"]["db"]["users"]["u"]
    assert user.get("auth_type") == expected
    if warning:
        assert warned(warnings, warning)
    else:
        assert not warned(warnings, "auth_type")
    parse_config(doc, {})


def test_tenant_ids_stay_unique():
    doc, warnings = pi.translate(small(databases='"a.b" = host=x\n"a b" = host=y\na_b = host=z'),
                                 '"u" "pw"', "/")
    assert list(doc["tenants"]) == ["a_b", "a_b_2", "a_b_3"]
    assert [t["database"] for t in doc["tenants"].values()] == ["a.b", "a b", "a_b"]
    parse_config(doc, {})


def test_forced_user_without_userlist():
    doc, warnings = pi.translate(small(databases="db = host=h user=app password=s3cret"),
                                 None, "/")
    assert doc["tenants"]["db"]["users"] == {"app": {"password": "s3cret"}}
    assert warned(warnings, "no userlist given")
    assert warned(warnings, "app becomes the only user")
    parse_config(doc, {})


def test_no_users_at_all_is_reported_not_fatal():
    doc, warnings = pi.translate(small(), None, "/")
    assert doc["tenants"] == {}
    assert warned(warnings, "[databases] db", "tenant left out")
    assert warned(warnings, "does not pass gpooler --check", "tenants")


def test_per_database_and_per_user_overrides():
    doc, warnings = pi.translate(
        small(databases="db = host=h pool_size=7 query_wait_timeout=5 min_pool_size=2",
              users="u = pool_size=3 client_idle_timeout=40 query_wait_timeout=-1 "
                    "max_user_client_connections=9"),
        '"u" "pw"\n"v" "pw2"', "/")
    tenant = doc["tenants"]["db"]
    assert tenant["pool_size"] == 7 and tenant["pool_checkout_timeout"] == 5
    assert tenant["users"]["u"] == {"password": "pw", "pool_size": 3, "client_idle_timeout": 40,
                                    "max_clients": 9}
    assert tenant["users"]["v"] == {"password": "pw2"}
    if not has_setting("min_pool_size"):
        assert warned(warnings, "[databases] db min_pool_size", "not supported")
    assert warned(warnings, "[users] u max_user_client_connections", "max_clients")
    parse_config(doc, {})


def test_client_tls(tmp_path):
    doc, warnings = pi.translate(
        small("client_tls_sslmode = require\nclient_tls_cert_file = tls/server.crt\n"
              "client_tls_key_file = /etc/ssl/server.key\nclient_tls_protocols = secure"),
        '"u" "pw"', str(tmp_path))
    assert doc["tls"]["cert_file"] == str(tmp_path / "tls" / "server.crt")
    assert doc["tls"]["key_file"] == "/etc/ssl/server.key"
    assert doc["defaults"]["enforce_ssl"] is True  # require: no plaintext clients
    assert not warned(warnings, "client_tls_sslmode")
    assert not warned(warnings, "client_tls_protocols")  # the default
    parse_config(doc, {})
    doc, warnings = pi.translate(
        small("client_tls_sslmode = verify-full\nclient_tls_cert_file = c\nclient_tls_key_file = k"),
        '"u" "pw"', "/")
    assert doc["defaults"]["enforce_ssl"] is True
    assert warned(warnings, "client_tls_sslmode", "verify-full", "certificates")
    doc, _ = pi.translate(small("client_tls_sslmode = prefer\nclient_tls_cert_file = c\n"
                                "client_tls_key_file = k"), '"u" "pw"', "/")
    assert "enforce_ssl" not in doc["defaults"]
    doc, _ = pi.translate(small("client_tls_cert_file = a\nclient_tls_key_file = b"),
                          '"u" "pw"', "/")
    assert "tls" not in doc  # sslmode disable (the default): PgBouncer ignores the files too


def test_server_tls(tmp_path):
    doc, warnings = pi.translate(
        small("server_tls_sslmode = verify-full\nserver_tls_ca_file = certs/root.crt\n"
              "server_tls_key_file = client.key\nserver_tls_protocols = secure"),
        '"u" "pw"', str(tmp_path))
    assert doc["defaults"]["server_tls"] == "verify-full"
    assert doc["defaults"]["server_tls_ca_file"] == str(tmp_path / "certs" / "root.crt")
    assert warned(warnings, "server_tls_key_file", "client certificate")
    assert not warned(warnings, "server_tls_sslmode") and not warned(warnings, "protocols")
    parse_config(doc, {})
    doc, warnings = pi.translate(small(), '"u" "pw"', "/")
    assert "server_tls" not in doc["defaults"]  # PgBouncer's default, prefer, is gpooler's too
    for mode, expected in (("disable", "disable"), ("prefer", None), ("allow", "prefer")):
        doc, warnings = pi.translate(small(f"server_tls_sslmode = {mode}"), '"u" "pw"', "/")
        assert doc["defaults"].get("server_tls") == expected, mode
        assert bool(warned(warnings, "server_tls_sslmode")) == (mode == "allow"), warnings


def test_settings_gpooler_gains_are_carried_over(monkeypatch):
    """The translator looks gpooler's settings up at run time: a new setting needs no change."""
    number = gpconfig.SETTINGS[0].parse  # any parser: only name, level and cascade matter here
    extra = (
        gpconfig.Setting("server_lifetime", "user", number, 3600.0, None, "x", cascade=True),
        gpconfig.Setting("query_timeout", "user", number, 0.0, None, "x", cascade=True),
        gpconfig.Setting("server_tls_key_file", "tenant", number, None, None, "x"),
    )
    monkeypatch.setattr(pi, "SETTINGS", gpconfig.SETTINGS + extra)
    doc, warnings = pi.translate(
        small("server_lifetime = 90.5\nserver_tls_key_file = k.pem",
              databases="db = host=h server_lifetime=30", users="u = query_timeout=12"),
        '"u" "pw"', "/")
    assert doc["defaults"]["server_lifetime"] == 90.5
    assert doc["tenants"]["db"]["server_lifetime"] == 30
    assert doc["tenants"]["db"]["server_tls_key_file"] == "k.pem"
    assert doc["tenants"]["db"]["users"]["u"]["query_timeout"] == 12
    assert not warned(warnings, "not supported")


def test_auth_query_settings_are_carried_over():
    doc, warnings = pi.translate(
        small("auth_user = pgb\nauth_query = SELECT usename, passwd FROM get_auth($1)\n"
              "auth_dbname = postgres", databases="db = host=h\nother = host=h2 auth_user=u"),
        '"u" "pw"\n"pgb" "pgb-pw"', "/")
    assert {k: doc["defaults"][k] for k in ("auth_user", "auth_query", "auth_dbname")} == {
        "auth_user": "pgb", "auth_query": "SELECT usename, passwd FROM get_auth($1)",
        "auth_dbname": "postgres"}
    assert doc["tenants"]["other"]["auth_user"] == "u"
    assert not warned(warnings, "auth_")
    tenants = parse_config(doc, {}).tenants
    assert (tenants["db"].auth_user, tenants["other"].auth_user) == ("pgb", "u")


def test_unusual_values_are_reported_not_fatal():
    doc, warnings = pi.translate(
        small("listen_port = banana\ndefault_pool_size = 0\nquery_wait_timeout = -3",
              databases="db = host=h port=99999 pool_size=zero pool_mode=bogus\n"
                        "bad = host='unterminated"),
        '"u" "pw"', "/")
    assert doc["listen"][0]["port"] == 6432 and doc["defaults"]["pool_size"] == 20
    assert doc["defaults"]["pool_checkout_timeout"] == 120
    assert doc["tenants"]["db"]["port"] == 5432 and "pool_size" not in doc["tenants"]["db"]
    for part in ("listen_port", "default_pool_size", "query_wait_timeout", "db port",
                 "db pool_size", "db pool_mode", "[databases] bad"):
        assert warned(warnings, part), part
    parse_config(doc, {})


# ------------------------------------------------------------------------- the documentation


def test_docs_cover_every_setting_the_importer_knows():
    text = (ROOT / "docs" / "pgbouncer.md").read_text()
    for key in (*pi.RULES, *pi.DATABASE_KEYS, *pi.USER_KEYS):
        assert re.search(rf"\| `{re.escape(key)}`", text) or f"`{key}`" in text, key
    assert "import-pgbouncer PGBOUNCER_INI" in (ROOT / "gpooler" / "cli.py").read_text()


@pytest.mark.skipif(not MAN_PAGE.exists(), reason="PgBouncer's man page is not installed")
def test_every_setting_of_the_installed_pgbouncer_is_known():
    """pgbouncer(5) of the PgBouncer on this machine: each setting has a rule (and so a row)."""
    section, missing = None, []
    for line in gzip.decompress(MAN_PAGE.read_bytes()).decode("utf-8", "replace").splitlines():
        if line.startswith(".SH "):
            section = line[4:].strip().strip('"')
        elif line.startswith(".SS ") and section:
            key = line[4:].strip().strip('"')
            if section.startswith("SECTION [DATABASES]"):
                known = pi.DATABASE_KEYS
            elif section.startswith("SECTION [USERS]"):
                known = pi.USER_KEYS
            elif "SETTINGS" in section or section.startswith(("CONSOLE", "CONNECTION",
                                                               "DANGEROUS")):
                known = pi.RULES
            else:
                continue
            if key not in known:
                missing.append(f"{section}: {key}")
    assert not missing


# ---------------------------------------------------------------------------- the command


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPOOLER_CONFIG"}
    return subprocess.run([sys.executable, "-m", "gpooler", *args], capture_output=True,
                          text=True, cwd=str(cwd), env=env, timeout=60)


def test_cli_end_to_end(tmp_path):
    (tmp_path / "pgbouncer.ini").write_text(INI)
    (tmp_path / "users.txt").write_text(USERLIST)
    result = run_cli("import-pgbouncer", "pgbouncer.ini", "users.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    assert doc == pi.translate(INI, USERLIST, str(tmp_path), userlist_name="users.txt")[0]
    out = tmp_path / "gpooler.yaml"
    out.write_text(result.stdout)
    load_config(str(out), environ={})
    check = run_cli("--check", "-c", str(out), cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "configuration OK" in check.stdout
    stderr = result.stderr.splitlines()
    for key in ("logfile", "pidfile", "max_db_connections", "bogus_setting"):
        assert warned(stderr, "pgbouncer.ini:", f"[pgbouncer] {key}:"), key
    assert warned(stderr, 'users.txt: user "has space"')
    assert "Traceback" not in result.stderr


def test_cli_reads_auth_file_when_no_userlist_is_given(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "pgbouncer.ini").write_text(small("auth_file = userlist.txt"))
    (tmp_path / "conf" / "userlist.txt").write_text('"u" "pw"\n')
    result = run_cli("import-pgbouncer", "conf/pgbouncer.ini", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["tenants"]["db"]["users"] == {"u": {"password": "pw"}}
    assert result.stderr == ""


def test_cli_unreadable_auth_file_is_a_warning(tmp_path):
    (tmp_path / "pgbouncer.ini").write_text(small("auth_file = /nonexistent/userlist.txt"))
    result = run_cli("import-pgbouncer", "pgbouncer.ini", cwd=tmp_path)
    assert result.returncode == 0
    assert "auth_file: cannot read /nonexistent/userlist.txt" in result.stderr


@pytest.mark.parametrize("files, args", [
    ({}, ["missing.ini"]),
    ({"pgbouncer.ini": "[pgbouncer]\nthis is not an ini line\n"}, ["pgbouncer.ini"]),
    ({"pgbouncer.ini": small()}, ["pgbouncer.ini", "missing-userlist.txt"]),
])
def test_cli_exits_1_when_the_input_cannot_be_read(tmp_path, files, args):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = run_cli("import-pgbouncer", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("gpooler import-pgbouncer: ")
    assert "Traceback" not in result.stderr


def test_cli_other_commands_unchanged(tmp_path):
    assert run_cli("--version", cwd=tmp_path).stdout.startswith("gpooler ")
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2 and "no configuration file" in result.stderr
    assert "import-pgbouncer" in run_cli("--help", cwd=tmp_path).stdout


def test_cli_import_does_not_load_gevent(tmp_path):
    (tmp_path / "pgbouncer.ini").write_text(small())
    code = ("import sys; from gpooler.cli import main; "
            "rc = main(['import-pgbouncer', 'pgbouncer.ini']); "
            "print('gevent' in sys.modules, file=sys.stderr); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=60)
    assert result.returncode == 0
    assert result.stderr.splitlines()[-1] == "False"


# ------------------------------------------------------------------------- it serves traffic


def test_translated_configuration_serves_traffic(pg, gpooler, tmp_path):
    """A PgBouncer setup for the test cluster, translated and run: SCRAM (plain userlist entry),
    md5 (hashed entry, plain login name + options tenant) and a SCRAM verifier (Postgres trusts
    the role), through a plain database and one with a forced user."""
    port = free_port()
    (tmp_path / "pgbouncer.ini").write_text(f"""\
[databases]
appdb = host={pg.host} port={pg.port} dbname=postgres
trust.db = host={pg.host} port={pg.port} dbname=postgres user=u_trust

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
auth_type = md5
auth_file = userlist.txt
pool_mode = transaction
default_pool_size = 2
logfile = pgbouncer.log
""")
    (tmp_path / "userlist.txt").write_text(
        f'"u_scram" "pw_u_scram"\n"u_md5" "{md5("pw_u_md5", "u_md5")}"\n'
        f'"u_trust" "{scram("pw_u_trust")}"\n')
    doc, warnings = pi.translate_files(str(tmp_path / "pgbouncer.ini"))
    assert warned(warnings, "[pgbouncer] logfile")
    assert not warned(warnings, "does not pass")
    assert doc["listen"] == [{"host": "127.0.0.1", "port": port, "mode": "transaction"}]
    h = gpooler(doc)

    def who(user: str, password: str, **extra) -> tuple:
        conn = psycopg2.connect(h.dsn(user, password, dbname="postgres", **extra))
        try:
            with conn.cursor() as cur:
                cur.execute("select current_user, current_database(), 40 + 2")
                row = cur.fetchone()
            conn.commit()
            return row
        finally:
            conn.close()

    assert who("u_scram.appdb", "pw_u_scram") == ("u_scram", "postgres", 42)
    assert who("u_md5", "pw_u_md5", options="-c tenant=appdb") == ("u_md5", "postgres", 42)
    assert who("u_trust.appdb", "pw_u_trust") == ("u_trust", "postgres", 42)
    # user= in the entry: every client logs in to Postgres as u_trust
    assert who("u_scram.trust_db", "pw_u_scram") == ("u_trust", "postgres", 42)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        who("u_scram.appdb", "wrong")
