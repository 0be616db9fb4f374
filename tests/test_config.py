"""Unit tests for gpooler.config: pure, no Postgres."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import pickle
from pathlib import Path

import pytest
import yaml

from gpooler import config as cfg
from gpooler.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {"GPOOLER_ADMIN_PASSWORD": "admin-secret"}
MD5 = "md5" + "0123456789abcdef" * 2
SCRAM = ("SCRAM-SHA-256$4096:Z3Bvb2xlci1leGFtcGxlIQ==$rkpAczkbeMOIAVy/9hacPmh8YyjPJPE/Uh9/kw388ws="
         ":TjTerxoXHukRzEcr/7qDAJQkO67wFwhlDR3By5fRnDI=")


def minimal(**top) -> dict:
    doc = {
        "listen": [{"host": "127.0.0.1", "port": 6543, "mode": "transaction"}],
        "tenants": {"acme": {"host": "db", "users": {"app": {"password": "secret"}}}},
    }
    doc.update(top)
    return doc


def parse(doc: dict, environ: dict | None = None) -> cfg.Config:
    return parse_config(doc, environ or {})


def errors_of(doc: object, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, environ or {})
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def with_tenant(**tenant) -> dict:
    doc = minimal()
    doc["tenants"]["acme"].update(tenant)
    return doc


def with_user(**user) -> dict:
    doc = minimal()
    doc["tenants"]["acme"]["users"]["app"].update(user)
    return doc


# ----------------------------------------------------------------------------- defaults


def test_minimal_defaults():
    c = parse(minimal())
    assert c.listen == (cfg.ListenConfig("127.0.0.1", 6543, "transaction"),)
    assert (c.admin, c.statsd, c.tls) == (None, None, None)
    assert (c.workers, c.shutdown_timeout, c.log_level) == (1, 30, "info")
    t = c.tenants["acme"]
    assert (t.id, t.host, t.port, t.database, t.replicas) == ("acme", "db", 5432, "postgres", ())
    assert t.allow_list == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert (t.default, t.sni_hostname, t.session_features) == (False, None, "pin")
    assert (t.load_balance, t.max_replica_lag, t.read_your_writes, t.health_check_interval) == (
        "random", 10, False, 1)
    u = t.users["app"]
    assert u == cfg.UserConfig(
        name="app", password="secret", server_user="app", server_password="secret",
        auth_type="scram-sha-256", pool_size=15, max_clients=1000, pool_checkout_timeout=60,
        client_idle_timeout=0, client_heartbeat_interval=60, max_prepared_statements=200,
        idle_transaction_timeout=0, query_timeout=0, server_idle_timeout=600, server_lifetime=3600,
        min_pool_size=0, server_check_delay=30, server_login_retry=15)
    assert (t.auth_failure_limit, t.auth_failure_window, t.auth_lockout) == (10, 60, 300)


def test_sections_defaults():
    c = parse(minimal(admin={"users": {"root": "pw"}}, statsd={}, tls={"cert_file": "c",
                                                                    "key_file": "k"}))
    assert c.admin == cfg.AdminConfig("127.0.0.1", 6544, cfg.FrozenDict({"root": "pw"}))
    assert c.statsd == cfg.StatsdConfig("127.0.0.1", 8125, "gpooler", 10)
    assert c.tls == cfg.TlsConfig("c", "k")  # parse_config keeps paths as written


def test_optional_sections_may_be_null():
    c = parse(minimal(admin=None, statsd=None, tls=None))
    assert (c.admin, c.statsd, c.tls) == (None, None, None)


def test_workers_auto():
    assert parse(minimal(workers="auto")).workers == (os.cpu_count() or 1)
    assert parse(minimal(workers=4)).workers == 4


def test_result_is_frozen_hashable_and_picklable():
    c = parse(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.workers = 2
    with pytest.raises(TypeError):
        c.tenants["x"] = None
    assert hash(c) == hash(parse(minimal()))
    assert pickle.loads(pickle.dumps(c)) == c


# ----------------------------------------------------------------------------- cascade


def test_cascade_defaults_tenant_user():
    doc = minimal(defaults={"pool_size": 5, "max_clients": 50, "client_idle_timeout": 9,
                            "port": 6000, "database": "d0", "allow_list": ["10.0.0.0/8"]})
    doc["tenants"]["acme"].update(pool_size=7, database="d1")
    doc["tenants"]["acme"]["users"]["app"]["pool_size"] = 9
    doc["tenants"]["acme"]["users"]["other"] = {"password": "x"}
    doc["tenants"]["beta"] = {"host": "db2", "port": 7000, "users": {"b": {"password": "y"}}}
    t = parse(doc).tenants
    assert (t["acme"].port, t["acme"].database) == (6000, "d1")
    assert t["acme"].allow_list == (ipaddress.ip_network("10.0.0.0/8"),)
    assert (t["beta"].port, t["beta"].database) == (7000, "d0")
    assert t["acme"].users["app"].pool_size == 9         # user wins
    assert t["acme"].users["other"].pool_size == 7       # then the tenant
    assert t["beta"].users["b"].pool_size == 5           # then defaults
    assert t["beta"].users["b"].max_clients == 50
    assert t["acme"].users["app"].client_idle_timeout == 9
    assert t["beta"].users["b"].client_heartbeat_interval == 60   # then the built-in default


def test_host_from_defaults():
    doc = minimal(defaults={"host": "shared"})
    del doc["tenants"]["acme"]["host"]
    assert parse(doc).tenants["acme"].host == "shared"


def test_replica_port_defaults_to_tenant_port():
    c = parse(with_tenant(port=6000, replicas=[{"host": "r1"}, {"host": "r2", "port": 7000}]))
    assert c.tenants["acme"].replicas == (cfg.ServerAddress("r1", 6000),
                                          cfg.ServerAddress("r2", 7000))


def test_allow_list_entries():
    given = ["10.0.0.0/8", "::1/128", "192.168.1.7", "10.1.2.3/16", "fe80::1"]
    c = parse(with_tenant(allow_list=given))
    assert [str(n) for n in c.tenants["acme"].allow_list] == [
        "10.0.0.0/8", "::1/128", "192.168.1.7/32", "10.1.0.0/16", "fe80::1/128"]
    assert parse(with_tenant(allow_list=[])).tenants["acme"].allow_list == ()


# ------------------------------------------------------------------- derived user settings


def test_derived_from_plain_password():
    u = parse(with_user(password="pw")).tenants["acme"].users["app"]
    assert (u.auth_type, u.server_user, u.server_password) == ("scram-sha-256", "app", "pw")


def test_derived_from_md5_password():
    u = parse(with_user(password=MD5)).tenants["acme"].users["app"]
    assert (u.auth_type, u.server_password) == ("md5", None)


def test_derived_from_scram_verifier():
    u = parse(with_user(password=SCRAM)).tenants["acme"].users["app"]
    assert (u.auth_type, u.server_password) == ("scram-sha-256", None)


def test_explicit_server_user_and_password():
    doc = with_user(password=SCRAM, server_user="role", server_password="pw",
                    auth_type="scram-sha-256")
    u = parse(doc).tenants["acme"].users["app"]
    assert (u.server_user, u.server_password) == ("role", "pw")


def test_auth_query_is_off_by_default():
    t = parse(minimal()).tenants["acme"]
    assert (t.auth_user, t.auth_query, t.auth_dbname) == (None, cfg.DEFAULT_AUTH_QUERY, None)
    assert (t.auth_query_cache_ttl, t.auth_query_refetch_interval) == (60, 1)
    assert t.unlisted_user is None
    assert cfg.find_user(t, "app") is t.users["app"]
    assert cfg.find_user(t, "bob") is None


def test_unlisted_users_get_the_cascade():
    doc = minimal(defaults={"auth_user": "app", "pool_size": 5, "max_clients": 50,
                            "auth_query_cache_ttl": 0})
    doc["tenants"]["acme"].update(pool_size=7, auth_type="plain", auth_dbname="meta")
    t = parse(doc).tenants["acme"]
    assert (t.auth_user, t.auth_dbname, t.auth_query_cache_ttl) == ("app", "meta", 0)
    bob = cfg.find_user(t, "bob")
    listed = t.users["app"]
    assert (bob.name, bob.server_user, bob.password, bob.server_password) == ("bob", "bob", "",
                                                                              None)
    assert (bob.pool_size, bob.max_clients, bob.auth_type) == (7, 50, "plain")
    assert dataclasses.replace(bob, name="app", server_user="app", password="secret",
                               server_password="secret") == listed
    assert cfg.find_user(t, "app") is listed


def test_auth_user_must_be_a_listed_user_with_a_usable_password():
    assert errors_of(with_tenant(auth_user="nobody")) == [
        'tenants.acme.auth_user: "nobody" is not one of this tenant\'s users']
    assert errors_of(minimal(defaults={"auth_user": "nobody"})) == [
        'tenants.acme.auth_user: "nobody" is not one of this tenant\'s users (set at '
        'defaults.auth_user)']
    doc = with_tenant(auth_user="app")
    doc["tenants"]["acme"]["users"]["app"]["server_password"] = MD5
    assert errors_of(doc) == [
        'tenants.acme.auth_user: the server_password of "app" is an md5 hash, which auth_query '
        'cannot log in with: give it in plain text']
    assert errors_of(with_tenant(auth_query="", auth_query_cache_ttl=-1)) == [
        "tenants.acme.auth_query: must not be empty",
        "tenants.acme.auth_query_cache_ttl: must be >= 0"]


@pytest.mark.parametrize("auth_type", ["md5", "plain", "scram-sha-256"])
def test_plain_password_suits_every_auth_type(auth_type):
    assert parse(with_user(auth_type=auth_type)).tenants["acme"].users["app"].auth_type == auth_type


def test_password_kind():
    assert cfg.password_kind("secret") == "plain"
    assert cfg.password_kind(MD5) == "md5"
    assert cfg.password_kind(SCRAM) == "scram"
    assert cfg.password_kind("md5short") == "plain"


# ----------------------------------------------------------------------------- environment


def test_env_expansion_in_any_string():
    doc = with_user(password="${PW}", server_password="pre-${PW}-post")
    doc["listen"][0]["host"] = "${HOST}"
    c = parse(doc, {"PW": "s3", "HOST": "0.0.0.0"})
    assert c.listen[0].host == "0.0.0.0"
    u = c.tenants["acme"].users["app"]
    assert (u.password, u.server_password) == ("s3", "pre-s3-post")
    assert type(u.password) is str


def test_env_escape():
    u = parse(with_user(password="a$${B}c$$d")).tenants["acme"].users["app"]
    assert u.password == "a${B}c$$d"


def test_env_numbers_and_booleans():
    doc = with_tenant(port="${PORT}", default="${DEF}", pool_checkout_timeout="${T}")
    t = parse(doc, {"PORT": "6000", "DEF": "true", "T": "2.5"}).tenants["acme"]
    assert (t.port, t.default, t.users["app"].pool_checkout_timeout) == (6000, True, 2.5)
    assert errors_of(doc, {"PORT": "x", "DEF": "true", "T": "1"}) == [
        "tenants.acme.port: must be an integer"]


def test_env_unset_is_reported_once_with_path():
    doc = with_user(password="${GPOOLER_X}")
    doc["listen"][0]["port"] = "${NOPE}"
    assert errors_of(doc) == [
        "listen[0].port: environment variable NOPE is not set",
        "tenants.acme.users.app.password: environment variable GPOOLER_X is not set",
    ]


def test_env_bad_references():
    assert errors_of(with_user(password="${A B}")) == [
        "tenants.acme.users.app.password: invalid environment variable name 'A B'"]
    assert errors_of(with_user(password="x${OPEN")) == [
        "tenants.acme.users.app.password: unterminated ${ (write $${ for a literal ${)"]


def test_env_in_list_item_and_admin_users():
    doc = minimal(admin={"users": {"root": "${A}"}})
    doc["tenants"]["acme"]["allow_list"] = ["${NET}"]
    assert errors_of(doc) == ["tenants.acme.allow_list[0]: environment variable NET is not set",
                              "admin.users.root: environment variable A is not set"]
    c = parse(doc, {"A": "pw", "NET": "10.0.0.0/8"})
    assert c.admin.users["root"] == "pw"


# ----------------------------------------------------------------------------- validation


def T(doc: dict) -> dict:
    """The tenant "acme" of a minimal() document."""
    return doc["tenants"]["acme"]


def U(doc: dict) -> dict:
    """The user "app" of tenant "acme" of a minimal() document."""
    return doc["tenants"]["acme"]["users"]["app"]



@pytest.mark.parametrize("mutate, expected", [
    # types
    (lambda d: d["listen"][0].update(port="6543"), "listen[0].port: must be an integer"),
    (lambda d: d["listen"][0].update(port=True), "listen[0].port: must be an integer"),
    (lambda d: d.update(shutdown_timeout="1s"), "shutdown_timeout: must be a number"),
    (lambda d: d.update(shutdown_timeout=float("inf")), "shutdown_timeout: must be a number"),
    (lambda d: T(d).update(default="yes"),
     "tenants.acme.default: must be true or false"),
    (lambda d: T(d).update(host=5), "tenants.acme.host: must be a string"),
    (lambda d: d.update(listen={"port": 1}), "listen: must be a list"),
    (lambda d: d["listen"].append("x"), "listen[1]: must be a mapping"),
    (lambda d: d.update(workers="many"), 'workers: must be an integer or "auto"'),
    (lambda d: d.update(tenants=[]), "tenants: must be a mapping"),
    (lambda d: d["tenants"].update(acme="x"), "tenants.acme: must be a mapping"),
    (lambda d: T(d)["users"].update(app="x"), "tenants.acme.users.app: must be a mapping"),
    (lambda d: T(d).update(allow_list="10.0.0.0/8"),
     "tenants.acme.allow_list: must be a list"),
    # ranges
    (lambda d: d["listen"][0].update(port=0), "listen[0].port: must be between 1 and 65535"),
    (lambda d: d["listen"][0].update(port=65536), "listen[0].port: must be between 1 and 65535"),
    (lambda d: d.update(workers=0), "workers: must be >= 1"),
    (lambda d: d.update(shutdown_timeout=-1), "shutdown_timeout: must be >= 0"),
    (lambda d: d.update(statsd={"interval": 0}), "statsd.interval: must be > 0"),
    (lambda d: d.update(defaults={"pool_size": 0}), "defaults.pool_size: must be > 0"),
    (lambda d: T(d).update(max_clients=-5),
     "tenants.acme.max_clients: must be > 0"),
    (lambda d: U(d).update(pool_size=0),
     "tenants.acme.users.app.pool_size: must be > 0"),
    (lambda d: U(d).update(client_idle_timeout=-0.5),
     "tenants.acme.users.app.client_idle_timeout: must be >= 0"),
    (lambda d: U(d).update(pool_checkout_timeout=-1),
     "tenants.acme.users.app.pool_checkout_timeout: must be >= 0"),
    (lambda d: U(d).update(client_heartbeat_interval=-1),
     "tenants.acme.users.app.client_heartbeat_interval: must be >= 0"),
    # choices
    (lambda d: d["listen"][0].update(mode="statement"),
     "listen[0].mode: must be one of: session, transaction"),
    (lambda d: d.update(log_level="trace"),
     "log_level: must be one of: debug, info, warning, error"),
    (lambda d: U(d).update(auth_type="trust"),
     "tenants.acme.users.app.auth_type: must be one of: scram-sha-256, md5, plain"),
    # required / empty
    (lambda d: d.pop("listen"), "listen: is required"),
    (lambda d: d.update(listen=[]), "listen: must not be empty"),
    (lambda d: d["listen"][0].pop("port"), "listen[0].port: is required"),
    (lambda d: d["listen"][0].pop("mode"), "listen[0].mode: is required"),
    (lambda d: d.pop("tenants"), "tenants: is required"),
    (lambda d: d.update(tenants={}), "tenants: must not be empty"),
    (lambda d: T(d).pop("host"), "tenants.acme.host: is required"),
    (lambda d: T(d).pop("users"), "tenants.acme.users: is required"),
    (lambda d: T(d).update(users={}), "tenants.acme.users: must not be empty"),
    (lambda d: U(d).pop("password"),
     "tenants.acme.users.app.password: is required"),
    (lambda d: U(d).update(password=""),
     "tenants.acme.users.app.password: must not be empty"),
    (lambda d: U(d).update(password=None),
     "tenants.acme.users.app.password: must be a string"),
    (lambda d: d.update(tls={"cert_file": "c"}), "tls.key_file: is required"),
    (lambda d: d.update(admin={}), "admin.users: is required"),
    (lambda d: d.update(admin={"users": {}}), "admin.users: must not be empty"),
    (lambda d: T(d).update(replicas=[{"port": 5}]),
     "tenants.acme.replicas[0].host: is required"),
    # unknown and misplaced keys
    (lambda d: T(d).update(pool_sise=1),
     "tenants.acme.pool_sise: unknown setting (did you mean pool_size?)"),
    (lambda d: d.update(frobnicate=1), "frobnicate: unknown setting"),
    (lambda d: d["listen"][0].update(tls=True), "listen[0].tls: unknown setting"),
    (lambda d: d.update(pool_size=1),
     "pool_size: can only be set in defaults or per tenant or per user"),
    (lambda d: d.update(defaults={"password": "x"}), "defaults.password: can only be set per user"),
    (lambda d: d.update(defaults={"sni_hostname": "x"}),
     "defaults.sni_hostname: can only be set per tenant"),
    (lambda d: T(d).update(server_user="x"),
     "tenants.acme.server_user: can only be set per user"),
    (lambda d: U(d).update(port=1),
     "tenants.acme.users.app.port: can only be set in defaults or per tenant"),
    (lambda d: T(d).update(workers=1), "tenants.acme.workers: can only be set at the top level"),
    # names
    (lambda d: d["tenants"].update({"a.b": T(d)}), 'tenants."a.b": must not contain "."'),
    (lambda d: d["tenants"].update({"a b": T(d)}), 'tenants."a b": must not contain whitespace'),
    (lambda d: d["tenants"].update({"": T(d)}), 'tenants."": must not be empty'),
    (lambda d: d["tenants"].update({7: T(d)}), "tenants.7: must be a string (quote it)"),
    (lambda d: T(d)["users"].update({"bad user": {"password": "x"}}),
     'tenants.acme.users."bad user": must not contain whitespace'),
    (lambda d: d.update(admin={"users": {"ad min": "x"}}),
     'admin.users."ad min": must not contain whitespace'),
    (lambda d: T(d).update(sni_hostname="a b"),
     "tenants.acme.sni_hostname: must not contain whitespace"),
    # addresses
    (lambda d: T(d).update(allow_list=["10.0.0.0/8", "nope"]),
     "tenants.acme.allow_list[1]: must be an IP address or network, like 10.0.0.0/8"),
    (lambda d: T(d).update(allow_list=["10.0.0.0/33"]),
     "tenants.acme.allow_list[0]: must be an IP address or network, like 10.0.0.0/8"),
    # passwords
    (lambda d: U(d).update(password="SCRAM-SHA-256$4096:c2FsdA==$abc"),
     "tenants.acme.users.app.password: is not a valid SCRAM-SHA-256 verifier "
     "(want SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"),
    (lambda d: U(d).update(password=SCRAM.replace("4096", "0")),
     "tenants.acme.users.app.password: is not a valid SCRAM-SHA-256 verifier "
     "(want SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"),
    (lambda d: U(d).update(password=MD5.upper()),
     'tenants.acme.users.app.password: '
     'is not a valid md5 hash (want "md5" + 32 lowercase hex digits)'),
    (lambda d: U(d).update(password="md5" + "A" * 32),
     'tenants.acme.users.app.password: '
     'is not a valid md5 hash (want "md5" + 32 lowercase hex digits)'),
    (lambda d: U(d).update(server_password=SCRAM),
     "tenants.acme.users.app.server_password: must be plain text or an md5 hash: "
     "a SCRAM verifier cannot log in to Postgres"),
    (lambda d: d.update(admin={"users": {"root": "SCRAM-SHA-256$bad"}}),
     "admin.users.root: is not a valid SCRAM-SHA-256 verifier "
     "(want SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"),
    # auth_type against the password
    (lambda d: U(d).update(password=SCRAM, auth_type="md5"),
     "tenants.acme.users.app.auth_type: md5 needs a plain-text or md5 password"),
    (lambda d: U(d).update(password=MD5, auth_type="scram-sha-256"),
     "tenants.acme.users.app.auth_type: "
     "scram-sha-256 needs a plain-text password or a SCRAM verifier"),
    (lambda d: U(d).update(password=MD5, auth_type="plain"),
     "tenants.acme.users.app.auth_type: plain needs a plain-text password"),
    (lambda d: (d.update(defaults={"auth_type": "md5"}),
                U(d).update(password=SCRAM)),
     "tenants.acme.users.app.auth_type: md5 needs a plain-text or md5 password "
     "(set at defaults.auth_type)"),
    # cross-record rules
    (lambda d: d["listen"].append({"host": "127.0.0.1", "port": 6543, "mode": "session"}),
     "listen[1]: same host and port as listen[0]"),
    (lambda d: d.update(admin={"port": 6543, "users": {"a": "b"}}),
     "admin.port: already used by listen[0]"),
    (lambda d: (T(d).update(default=True),
                d["tenants"].update(beta=dict(T(d)))),
     "tenants.beta.default: only one tenant may be the default, tenants.acme already is"),
    (lambda d: (T(d).update(sni_hostname="DB.example"),
                d["tenants"].update(beta=dict(T(d)))),
     "tenants.beta.sni_hostname: already used by tenants.acme"),
])
def test_single_error(mutate, expected):
    doc = minimal()
    mutate(doc)
    assert errors_of(doc) == [expected]


def test_all_errors_are_reported_together():
    doc = minimal(log_level="loud", defaults={"pool_size": -1})
    doc["listen"][0]["port"] = 0
    doc["tenants"]["acme"]["users"]["app"]["max_clients"] = 0
    doc["tenants"]["beta"] = {"users": {"u": {}}}
    assert errors_of(doc) == [
        "listen[0].port: must be between 1 and 65535",
        "log_level: must be one of: debug, info, warning, error",
        "defaults.pool_size: must be > 0",
        "tenants.acme.users.app.max_clients: must be > 0",
        "tenants.beta.host: is required",
        "tenants.beta.users.u.password: is required",
    ]


def test_bad_default_value_is_reported_once_not_per_user():
    doc = minimal(defaults={"max_clients": "many"})
    doc["tenants"]["acme"]["users"]["other"] = {"password": "x"}
    assert errors_of(doc) == ["defaults.max_clients: must be an integer"]


def test_document_must_be_a_mapping():
    assert errors_of(["listen"]) == ["(top level): must be a mapping of settings"]
    assert errors_of(None) == ["listen: is required", "tenants: is required"]


def test_settings_table_matches_dataclasses():
    classes = {"global": cfg.Config, "tenant": cfg.TenantConfig, "user": cfg.UserConfig,
               "listen": cfg.ListenConfig, "admin": cfg.AdminConfig, "statsd": cfg.StatsdConfig,
               "tls": cfg.TlsConfig, "replica": cfg.ServerAddress}
    implicit = {"global": {"defaults"}, "tenant": {"id", "unlisted_user"}, "user": {"name"}}
    for level, cls in classes.items():
        names = {s.name for s in cfg.SETTINGS if s.level == level}
        fields = {f.name for f in dataclasses.fields(cls)}
        assert names - implicit.get(level, set()) == fields - implicit.get(level, set()), level
    cascading = [s for s in cfg.SETTINGS if s.level in ("global", "tenant", "user")]
    assert len({s.name for s in cascading}) == len(cascading), "names must be unique across levels"
    assert all(s.doc for s in cfg.SETTINGS)


# ----------------------------------------------------------------------------- files


def test_example_config_loads_and_shows_every_setting():
    c = load_config(str(ROOT / "conf" / "gpooler.yaml"), ENV)
    assert c.admin.users["admin"] == "admin-secret"
    assert c.tls.cert_file == str(ROOT / "conf" / "server.crt")   # relative to the file
    acme = c.tenants["acme"]
    assert {u.auth_type for u in acme.users.values()} == {"scram-sha-256", "md5"}
    assert acme.users["reporting"].pool_size == 20    # from the tenant

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    present = set(keys(yaml.safe_load((ROOT / "conf" / "gpooler.yaml").read_text())))
    assert {s.name for s in cfg.SETTINGS} <= present


def test_example_config_needs_its_env_var():
    with pytest.raises(ConfigError) as info:
        load_config(str(ROOT / "conf" / "gpooler.yaml"), {})
    assert info.value.errors == [
        "admin.users.admin: environment variable GPOOLER_ADMIN_PASSWORD is not set"]


def test_demo_config():
    c = load_config(str(ROOT / "conf" / "demo.yaml"), {})
    assert {(e.port, e.mode) for e in c.listen} == {(6543, "transaction"), (6542, "session")}
    demo = c.tenants["demo"]
    assert (demo.host, demo.port, demo.users["app"].password) == ("127.0.0.1", 5432, "secret")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  - {host: a, port: 1\ntenants: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    [message] = info.value.errors
    assert message.startswith(f"{path}:3:")


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("tenants:\n  acme: {host: a}\n  acme: {host: b}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.errors == [f"{path}:3:3: duplicate key 'acme'"]


def test_yaml_merge_keys_still_work(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "listen: [{host: 127.0.0.1, port: 6543, mode: session}]\n"
        "tenants:\n"
        "  acme: &t {host: a, users: {app: {password: x}}}\n"
        "  beta: {<<: *t, host: b}\n")
    c = load_config(str(path), {})
    assert (c.tenants["acme"].host, c.tenants["beta"].host) == ("a", "b")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.yaml"), {})
    missing = tmp_path / "missing.yaml"
    assert info.value.errors == [f"{missing}: cannot read: No such file or directory"]


def test_load_config_uses_os_environ(tmp_path, monkeypatch):
    path = tmp_path / "env.yaml"
    doc = copy.deepcopy(minimal())
    doc["tenants"]["acme"]["users"]["app"]["password"] = "${GPOOLER_TEST_PW}"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("GPOOLER_TEST_PW", "from-env")
    assert load_config(str(path)).tenants["acme"].users["app"].password == "from-env"
