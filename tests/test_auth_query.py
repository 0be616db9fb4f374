"""auth_query: roles not listed in the YAML log in with the secret Postgres holds for them, and
gpooler logs in to Postgres as them with what the client proved (SCRAM pass-through, md5 hash).

One cluster for the module, with `log_connections = on`: Postgres logs how each server connection
authenticated (`connection authenticated: identity="r" method=scram-sha-256`), which is the proof
that gpooler's own connections went through SCRAM with no password in its configuration. Roles of
the cluster: gp_auth (superuser, runs the default query), gp_lookup (no privileges, runs a SECURITY
DEFINER function that also counts its calls), aq_* (what clients log in as; aq_md5 has an md5
hash and md5 in pg_hba.conf, the others SCRAM verifiers and scram-sha-256).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import threading

import asyncpg
import pg8000.native
import psycopg2
import pytest
import scramp

from cluster import DEFAULT_HBA, Cluster, connect_error
from gpooler import tls
from waiting import wait_until

HBA_LINES = [
    "host    all          aq_md5     127.0.0.1/32   md5",
    "host    all          aq_md5b    127.0.0.1/32   md5",
    "host    all          aq_md5c    127.0.0.1/32   md5",
]

ROLES_SQL = """
CREATE ROLE gp_auth LOGIN SUPERUSER PASSWORD 'pw_gp_auth';
CREATE ROLE gp_lookup LOGIN PASSWORD 'pw_gp_lookup';
CREATE ROLE aq_scram LOGIN PASSWORD 'pw_aq_scram';
CREATE ROLE aq_async LOGIN PASSWORD 'pw_aq_async';
CREATE ROLE aq_expired LOGIN PASSWORD 'pw_aq_expired' VALID UNTIL '2001-01-01';
CREATE ROLE aq_future LOGIN PASSWORD 'pw_aq_future' VALID UNTIL '2999-01-01';
CREATE ROLE aq_nologin NOLOGIN PASSWORD 'pw_aq_nologin';
CREATE ROLE aq_nopass LOGIN;
CREATE ROLE aq_plain LOGIN PASSWORD 'pw_aq_plain';
CREATE ROLE aq_slow LOGIN PASSWORD 'pw_aq_slow';
CREATE ROLE aq_rate LOGIN PASSWORD 'pw_aq_rate';
SET password_encryption = 'md5';
CREATE ROLE aq_md5 LOGIN PASSWORD 'pw_aq_md5';
CREATE ROLE aq_md5b LOGIN PASSWORD 'pw_aq_md5b';
CREATE TABLE auth_calls (role name, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION gpooler_lookup(p_role name, OUT rolname name, OUT rolpassword text)
RETURNS SETOF record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO public.auth_calls (role) VALUES (p_role);
    SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
    FROM pg_authid WHERE rolname = p_role AND rolcanlogin;
$$;
REVOKE ALL ON FUNCTION gpooler_lookup(name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION gpooler_lookup(name) TO gp_lookup;
CREATE FUNCTION slow_lookup(p_role name, OUT rolname name, OUT rolpassword text)
RETURNS SETOF record LANGUAGE plpgsql AS $$
BEGIN
    IF p_role = 'aq_slow' THEN
        PERFORM pg_sleep(10);
    END IF;
    RETURN QUERY SELECT a.rolname, a.rolpassword::text FROM pg_authid a WHERE a.rolname = p_role;
END $$;
"""


@pytest.fixture(scope="module")
def aq():
    cluster = Cluster(extra_conf={"log_connections": "on"},
                      hba="\n".join(HBA_LINES) + "\n" + DEFAULT_HBA)
    try:
        cluster.start()
        cluster.psql(ROLES_SQL)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def role(aq):
    """Factory: role(name, password, encryption) creates a login role, dropped after the test."""
    made = []

    def make(name: str, password: str, encryption: str = "scram-sha-256") -> str:
        aq.psql(f"SET password_encryption = '{encryption}'; "
                f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        made.append(name)
        return name

    yield make
    for name in made:
        aq.psql(f"DROP ROLE {name}")


def config(cluster: Cluster, **tenant) -> dict:
    """One tenant, acme, whose only listed user is the auth_user (gp_auth, a superuser)."""
    acme = {
        "host": cluster.host, "port": cluster.port, "auth_user": "auth",
        "users": {"auth": {"password": "client-pw-auth", "server_user": "gp_auth",
                           "server_password": "pw_gp_auth"}},
    }
    acme.update(tenant)
    return {
        "listen": [{"host": "127.0.0.1", "mode": "transaction"},
                   {"host": "127.0.0.1", "mode": "session"}],
        "log_level": "debug",
        "defaults": {"pool_size": 3},
        "tenants": {"acme": acme},
    }


def who(params: dict) -> str:
    conn = psycopg2.connect(**params)
    try:
        with conn.cursor() as cur:
            cur.execute("select current_user")
            return cur.fetchone()[0]
    finally:
        conn.close()


def refused(params: dict) -> str | None:
    """The SQLSTATE a login is refused with, or None when it succeeds."""
    try:
        return connect_error(params)["C"]
    except AssertionError:
        return None


def authenticated(cluster: Cluster, role: str) -> list[str]:
    """The methods Postgres logged for connections that authenticated as role."""
    return re.findall(rf'connection authenticated: identity="{role}" method=(\S+)', cluster.log())


def set_password(cluster: Cluster, role: str, password: str, encryption: str = "scram-sha-256"):
    cluster.psql(f"SET password_encryption = '{encryption}'; "
                 f"ALTER ROLE {role} PASSWORD '{password}'")


# ------------------------------------------------------------------------------------- logging in


def test_scram_role_with_psycopg2_and_asyncpg_through_scram_pass_through(aq, gpooler):
    h = gpooler(config(aq))
    assert authenticated(aq, "aq_scram") == []
    assert who(h.params("aq_scram.acme", "pw_aq_scram")) == "aq_scram"
    assert who(h.params("aq_scram.acme", "pw_aq_scram", mode="session")) == "aq_scram"

    async def via_asyncpg():
        conn = await asyncpg.connect(host=h.hosts["session"], port=h.port("session"),
                                     user="aq_async.acme", password="pw_aq_async",
                                     database="postgres")
        try:
            return await conn.fetchval("select current_user")
        finally:
            await conn.close()

    assert asyncio.run(via_asyncpg()) == "aq_async"
    # gpooler's server connections logged in by SCRAM, with keys it never had in its YAML: the
    # roles have SCRAM verifiers and pg_hba.conf asks scram-sha-256 of them.
    assert authenticated(aq, "aq_scram") and set(authenticated(aq, "aq_scram")) == {
        "scram-sha-256"}
    assert set(authenticated(aq, "aq_async")) == {"scram-sha-256"}
    line = h.wait_log("client connected: tenant=acme user=aq_scram")
    assert "mode=transaction" in line


def test_md5_role_logs_in_under_its_own_name_and_with_cleartext(aq, gpooler):
    h = gpooler(config(aq))
    # md5(password + role): the client must log in as the role itself (the tenant is the only one
    # here; options=-ctenant=acme would do too).
    assert who(h.params("aq_md5", "pw_aq_md5")) == "aq_md5"
    assert who(h.params("aq_md5", "pw_aq_md5", options="-c tenant=acme")) == "aq_md5"
    assert set(authenticated(aq, "aq_md5")) == {"md5"}
    # As aq_md5.acme the client's md5 answer is salted with "aq_md5.acme": refused, with a hint.
    error = connect_error(h.params("aq_md5.acme", "pw_aq_md5"))
    assert (error["C"], error["M"]) == ("28P01",
                                        'password authentication failed for user "aq_md5.acme"')
    h.wait_log("role aq_md5 has an md5 password, which a client logging in as aq_md5.acme cannot")

    # auth_type: plain asks for the password itself, checked against the hash (or verifier).
    h.reload(config(aq, auth_type="plain"))
    assert who(h.params("aq_md5b.acme", "pw_aq_md5b")) == "aq_md5b"
    assert who(h.params("aq_scram.acme", "pw_aq_scram", mode="session")) == "aq_scram"
    assert set(authenticated(aq, "aq_md5b")) == {"md5"}
    error = connect_error(h.params("aq_md5b.acme", "wrong"))
    assert error["C"] == "28P01"


@pytest.mark.parametrize("user, password", [
    ("aq_expired.acme", "pw_aq_expired"),  # VALID UNTIL in the past
    ("aq_nologin.acme", "pw_aq_nologin"),  # NOLOGIN: the default query skips it
    ("aq_nopass.acme", "anything"),  # no password at all
    ("nosuchrole.acme", "anything"),
    ("aq_scram.acme", "wrong"),
])
def test_refused_as_postgres_refuses(aq, gpooler, user, password):
    h = gpooler(config(aq))
    error = connect_error(h.params(user, password))
    assert (error["C"], error["M"]) == ("28P01",
                                        f'password authentication failed for user "{user}"')
    assert who(h.params("aq_future.acme", "pw_aq_future")) == "aq_future"


def test_unknown_role_gets_the_same_exchange_as_a_wrong_password(aq, gpooler, monkeypatch):
    """No telling unknown roles from known ones: SCRAM is asked, with the same salt each time."""
    h = gpooler(config(aq))
    seen = []
    real = scramp.ScramClient.set_server_first

    def spy(self, message):  # pg8000 does its SCRAM with scramp
        seen.append(message)
        return real(self, message)

    monkeypatch.setattr(scramp.ScramClient, "set_server_first", spy)

    def server_first(user):
        seen.clear()
        assert connect_error(h.params(user, "wrong"))["C"] == "28P01"
        (message,) = seen
        return dict(part.split("=", 1) for part in message.split(","))

    first, again = server_first("nosuchrole.acme"), server_first("nosuchrole.acme")
    assert first["s"] == again["s"] and first["i"] == again["i"] == "4096"
    assert server_first("otherrole.acme")["s"] != first["s"]


def test_listed_users_keep_their_passwords(aq, gpooler):
    cfg = config(aq)
    cfg["tenants"]["acme"]["users"]["app"] = {"password": "app-secret", "server_user": "aq_plain",
                                              "server_password": "pw_aq_plain"}
    h = gpooler(cfg)
    assert who(h.params("app.acme", "app-secret")) == "aq_plain"
    assert connect_error(h.params("app.acme", "pw_aq_plain"))["C"] == "28P01"
    # the auth_user is a listed user like any other
    assert who(h.params("auth.acme", "client-pw-auth")) == "gp_auth"


# ------------------------------------------------------------------------------- password changes


def test_scram_password_change_is_picked_up_without_restart(aq, gpooler, role):
    role("aq_change", "old-pw")
    h = gpooler(config(aq, auth_query_cache_ttl=3600, auth_query_refetch_interval=0))
    holder = psycopg2.connect(**h.params("aq_change.acme", "old-pw", mode="session"))
    try:
        set_password(aq, "aq_change", "new-pw")
        # The cached verifier still has the old salt, which the client's proof is bound to: the
        # first login with the new password fails, and makes gpooler ask again...
        assert connect_error(h.params("aq_change.acme", "new-pw"))["C"] == "28P01"
        before = len(authenticated(aq, "aq_change"))
        # ...so the next one succeeds, on a new server connection opened with the new keys (the
        # old session still holds the first one).
        assert who(h.params("aq_change.acme", "new-pw", mode="session")) == "aq_change"
        assert authenticated(aq, "aq_change")[before:] == ["scram-sha-256"]
        assert connect_error(h.params("aq_change.acme", "old-pw"))["C"] == "28P01"
        with holder.cursor() as cur:  # the session opened with the old password goes on
            cur.execute("select current_user")
            assert cur.fetchone() == ("aq_change",)
    finally:
        holder.close()


def test_md5_password_change_is_picked_up_at_the_first_login(aq, gpooler, role):
    role("aq_md5c", "old-pw", "md5")
    h = gpooler(config(aq, auth_query_cache_ttl=3600, auth_query_refetch_interval=0))
    assert who(h.params("aq_md5c", "old-pw", mode="session")) == "aq_md5c"
    set_password(aq, "aq_md5c", "new-pw", "md5")
    # An md5 answer is salted with the role name only: checked again against the new hash.
    assert who(h.params("aq_md5c", "new-pw", mode="session")) == "aq_md5c"
    assert connect_error(h.params("aq_md5c", "old-pw"))["C"] == "28P01"
    assert set(authenticated(aq, "aq_md5c")) == {"md5"}


@pytest.mark.parametrize("ttl, refetch", [(0, 3600), (1, 3600)])
def test_new_password_without_a_failed_login(aq, gpooler, role, ttl, refetch):
    """With no cache, the first login with a new SCRAM password works; with a short one, the old
    password is refused once the cached verifier expires."""
    name = role(f"aq_ttl{ttl}", "old-pw")
    h = gpooler(config(aq, auth_query_cache_ttl=ttl, auth_query_refetch_interval=refetch))
    assert who(h.params(f"{name}.acme", "old-pw")) == name
    set_password(aq, name, "new-pw")
    if ttl:
        wait_until(lambda: refused(h.params(f"{name}.acme", "old-pw")) == "28P01",
                   what="the old password refused once the cached verifier expired")
    assert who(h.params(f"{name}.acme", "new-pw", mode="session")) == name
    assert connect_error(h.params(f"{name}.acme", "old-pw"))["C"] == "28P01"


# -------------------------------------------------------------------- how often Postgres is asked


def lookup_config(cluster: Cluster, **tenant) -> dict:
    """The auth_user is gp_lookup, which may only call gpooler_lookup (SECURITY DEFINER)."""
    return config(cluster, users={"lookup": {"password": "client-pw-lookup",
                                             "server_user": "gp_lookup",
                                             "server_password": "pw_gp_lookup"}},
                  auth_user="lookup", auth_query="SELECT * FROM gpooler_lookup($1)", **tenant)


def calls(cluster: Cluster, role: str) -> int:
    return int(cluster.psql(f"SELECT count(*) FROM auth_calls WHERE role = '{role}'"))


def test_secrets_are_cached_and_refetches_rate_limited(aq, gpooler):
    aq.psql("DELETE FROM auth_calls")
    h = gpooler(lookup_config(aq, auth_query_cache_ttl=3600, auth_query_refetch_interval=3600))
    for _ in range(3):
        assert who(h.params("aq_rate.acme", "pw_aq_rate")) == "aq_rate"
    assert calls(aq, "aq_rate") == 1  # the TTL: asked once
    for _ in range(3):
        assert connect_error(h.params("aq_rate.acme", "wrong"))["C"] == "28P01"
    assert calls(aq, "aq_rate") == 1  # failures ask again at most once per refetch interval
    for _ in range(2):
        assert connect_error(h.params("ghost.acme", "wrong"))["C"] == "28P01"
    assert calls(aq, "ghost") == 1  # an unknown role is cached too

    h2 = gpooler(lookup_config(aq, auth_query_cache_ttl=3600, auth_query_refetch_interval=0))
    aq.psql("DELETE FROM auth_calls")
    assert who(h2.params("aq_rate.acme", "pw_aq_rate")) == "aq_rate"
    for _ in range(3):
        assert connect_error(h2.params("aq_rate.acme", "wrong"))["C"] == "28P01"
    assert calls(aq, "aq_rate") == 4  # once for the login, once per failure
    h2.wait_log("tenant acme: auth_query for role aq_rate: a SCRAM verifier")


# -------------------------------------------------------------------------- when auth_query fails


@pytest.mark.parametrize("change, sqlstate, message", [
    ({"users": {"auth": {"password": "x", "server_user": "gp_auth", "server_password": "bad"}}},
     "08006", 'password authentication failed for user "gp_auth"'),
    ({"auth_query": "SELECT rolname, rolpassword FROM no_such_table WHERE rolname = $1"},
     "42P01", 'relation "no_such_table" does not exist'),
    ({"auth_dbname": "no_such_db"}, "08006", 'database "no_such_db" does not exist'),
    ({"users": {"lookup": {"password": "x", "server_user": "gp_lookup",
                           "server_password": "pw_gp_lookup"}}, "auth_user": "lookup"},
     "42501", "permission denied for table pg_authid"),
])
def test_auth_query_errors_refuse_the_client_with_the_cause(aq, gpooler, change, sqlstate,
                                                             message):
    h = gpooler(config(aq, **change))
    error = connect_error(h.params("aq_scram.acme", "pw_aq_scram"))
    assert error["C"] == sqlstate
    assert error["M"].startswith("auth_query failed: ") and message in error["M"]
    h.wait_log("tenant acme: auth_query failed: ")


@pytest.mark.parametrize("query", [
    "SELECT rolname, 'pw_aq_scram' FROM pg_authid WHERE rolname = $1",  # plain text: no
    "SELECT rolname, 'SCRAM-SHA-256$x' FROM pg_authid WHERE rolname = $1",
    "SELECT rolpassword FROM pg_authid WHERE rolname = $1",  # one column
])
def test_a_query_giving_no_usable_secret_refuses_and_says_so(aq, gpooler, query):
    h = gpooler(config(aq, auth_query=query))
    error = connect_error(h.params("aq_scram.acme", "pw_aq_scram"))
    assert (error["C"], error["M"]) == ("28P01",
                                        'password authentication failed for user "aq_scram.acme"')
    h.wait_log("auth_query gave role aq_scram no md5 hash or SCRAM-SHA-256 verifier in its "
               "second column: refused")


def test_unreachable_or_silent_server_refuses_in_time(aq, gpooler):
    from cluster import free_port

    h = gpooler(config(aq, port=free_port()))
    error = connect_error(h.params("aq_scram.acme", "pw_aq_scram"))
    assert error["C"] == "08006" and error["M"].startswith(
        f'auth_query failed: could not connect to {aq.host}:{h.config["tenants"]["acme"]["port"]} '
        'as "gp_auth": ')

    h = gpooler(config(aq, auth_query="SELECT * FROM slow_lookup($1)"))
    error = connect_error(h.params("aq_slow.acme", "pw_aq_slow"), timeout=20)
    assert (error["C"], error["M"]) == ("08006", f"auth_query failed: no answer from "
                                                 f"{aq.host}:{aq.port} within 5s")
    # the connection it gave up on is closed, and the next login asks on a new one
    assert who(h.params("aq_scram.acme", "pw_aq_scram")) == "aq_scram"


# ----------------------------------------------------------------------------------------- reload


def test_reload_keeps_unlisted_pools_and_can_turn_auth_query_off(aq, gpooler):
    h = gpooler(config(aq))
    conn = psycopg2.connect(**h.params("aq_scram.acme", "pw_aq_scram"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("select 1")
            h.reload(config(aq, pool_size=4))
            cur.execute("select current_user")
            assert cur.fetchone() == ("aq_scram",)
        cfg = config(aq)
        del cfg["tenants"]["acme"]["auth_user"]
        h.reload(cfg)
        error = connect_error(h.params("aq_scram.acme", "pw_aq_scram"))
        assert (error["C"], error["M"]) == ("28000", 'unknown user "aq_scram" in tenant "acme"')
    finally:
        conn.close()


def test_reload_while_a_lookup_runs_stops_nobody(aq, gpooler):
    """A reload that changes the auth_query while a lookup waits on it: the old connection is
    closed only once its query is over, and every other client goes on meanwhile."""
    h = gpooler(config(aq, auth_query="SELECT * FROM slow_lookup($1)"))
    slow = threading.Thread(target=refused, args=(h.params("aq_slow.acme", "pw_aq_slow"),),
                            daemon=True)
    slow.start()
    wait_until(lambda: aq.psql("select count(*) from pg_stat_activity where state = 'active' "
                               "and application_name = 'gpooler auth_query'") == "1", 10,
               "the slow lookup to run")
    assert h.reload(config(aq)) == "reloaded"
    assert who(h.params("auth.acme", "client-pw-auth")) == "gp_auth"
    assert who(h.params("aq_scram.acme", "pw_aq_scram")) == "aq_scram"  # on a new connection
    slow.join(15)


# ---------------------------------------------------------------------------- secrets stay secret


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scram_secrets(verifier: str, password: str) -> list[str]:
    """The verifier and every key in it or derived from the password, base64 and hex."""
    head, keys = verifier[len("SCRAM-SHA-256$"):].split("$", 1)
    iterations, salt = head.split(":", 1)
    stored_key, server_key = keys.split(":", 1)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                 int(iterations))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return [verifier, stored_key, server_key, b64(client_key), client_key.hex(),
            base64.b64decode(stored_key).hex(), base64.b64decode(server_key).hex()]


def test_no_secret_reaches_the_log_at_debug_level(aq, gpooler, monkeypatch):
    cfg = config(aq)
    cfg["tenants"]["acme"]["users"].update({
        "lst_plain": {"password": "listed-plain-pw", "server_user": "aq_plain",
                      "server_password": "pw_aq_plain"},
        "lst_md5": {"password": "md5" + hashlib.md5(b"listed-md5-pwlst_md5.acme").hexdigest(),
                    "server_user": "aq_md5", "server_password": "pw_aq_md5"},
    })
    h = gpooler(cfg)
    proofs = []
    real = scramp.ScramClient.get_client_final

    def spy(self):  # pg8000 does its SCRAM with scramp: keep the proofs it sends
        message = real(self)
        proofs.append(message.rsplit("p=", 1)[1])
        return message

    monkeypatch.setattr(scramp.ScramClient, "get_client_final", spy)
    for user, password in [("aq_scram.acme", "pw_aq_scram"), ("aq_scram.acme", "wrong-pw-1"),
                           ("aq_md5", "pw_aq_md5"), ("aq_md5", "wrong-pw-2"),
                           ("lst_plain.acme", "listed-plain-pw"), ("lst_plain.acme", "wrong-pw-3"),
                           ("lst_md5.acme", "listed-md5-pw"), ("nosuch.acme", "wrong-pw-4")]:
        try:
            conn = pg8000.native.Connection(user, host=h.hosts["transaction"],
                                            port=h.port(), password=password, database="postgres")
            conn.run("select 1")
            conn.close()
        except pg8000.native.DatabaseError:
            pass
    h.reload(config(aq, auth_type="plain"))
    assert who(h.params("aq_scram.acme", "pw_aq_scram")) == "aq_scram"
    assert connect_error(h.params("aq_md5.acme", "wrong-pw-5"))["C"] == "28P01"
    assert len(proofs) == 5  # the SCRAM logins: aq_scram twice, lst_plain twice, nosuch
    verifiers = dict(line.split("|", 1) for line in aq.psql(
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN "
        "('aq_scram', 'aq_md5', 'gp_auth')").splitlines())
    secrets = ["pw_aq_scram", "pw_aq_md5", "pw_gp_auth", "pw_aq_plain", "client-pw-auth",
               "listed-plain-pw", "listed-md5-pw", cfg["tenants"]["acme"]["users"]["lst_md5"][
                   "password"], verifiers["aq_md5"], verifiers["aq_md5"][3:]]
    secrets += [f"wrong-pw-{i}" for i in range(1, 6)] + proofs
    secrets += scram_secrets(verifiers["aq_scram"], "pw_aq_scram")
    secrets += scram_secrets(verifiers["gp_auth"], "pw_gp_auth")
    text = h.log()
    assert "auth_query for role aq_scram" in text  # the debug lines are there
    leaked = [s for s in secrets if s in text]
    assert leaked == []


# -------------------------------------------------------------------------------------- pure bits


def test_libpq_tls_parameters_follow_server_tls():
    assert tls.libpq_params(tls.ServerTls("disable")) == {"sslmode": "disable"}
    assert tls.libpq_params(tls.ServerTls("require", "ca.pem")) == {"sslmode": "require"}
    assert tls.libpq_params(tls.ServerTls("verify-ca", "ca.pem")) == {
        "sslmode": "verify-ca", "sslrootcert": "ca.pem"}
    assert tls.libpq_params(tls.ServerTls("verify-full")) == {
        "sslmode": "verify-full", "sslrootcert": "system"}
