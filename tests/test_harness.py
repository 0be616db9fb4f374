"""The test harness itself: the throwaway cluster and the gpooler fixture plumbing.

gpooler's behaviour is tested elsewhere, through the same fixtures.
"""

import psycopg2
import pytest

from cluster import PASSWORDS, ROLES, base_config, connect_error, fill_ports


def test_cluster_is_up(pg):
    with psycopg2.connect(pg.dsn()) as conn, conn.cursor() as cur:
        cur.execute("select current_user, setting from pg_settings where name = 'max_connections'")
        assert cur.fetchone() == ("postgres", "300")
    assert pg.psql("select datname from pg_database where datname = 'app'") == "app"
    assert pg.psql("select pg_get_userbyid(datdba) from pg_database where datname = 'app'") == "u_scram"


def test_ipv6_listen(pg):
    if not pg.ipv6:
        pytest.skip("no ::1 on this machine")
    psycopg2.connect(pg.dsn(host="::1")).close()


@pytest.mark.parametrize("role", sorted(ROLES))
def test_role_uses_its_hba_method(pg, role):
    rows = pg.psql(f"select auth_method from pg_hba_file_rules "
                   f"where type = 'host' and '{role}' = any(user_name) and address = '127.0.0.1'")
    assert rows == ROLES[role]


@pytest.mark.parametrize("role", ["u_md5", "u_scram", "u_plain"])
def test_password_roles(pg, role):
    conn = psycopg2.connect(pg.dsn(role, PASSWORDS[role]))
    with conn.cursor() as cur:
        cur.execute("select current_user")
        assert cur.fetchone()[0] == role
    conn.close()
    err = connect_error(host=pg.host, port=pg.port, user=role, password="wrong")
    assert err["C"] == "28P01", err
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(pg.dsn(role, "wrong"))


def test_md5_role_has_md5_hash(pg):
    # an md5 hba line upgrades to SCRAM when the stored secret is SCRAM; ours must stay md5
    assert pg.psql("select left(rolpassword, 3) from pg_authid where rolname = 'u_md5'") == "md5"
    assert pg.psql("select left(rolpassword, 13) from pg_authid where rolname = 'u_scram'") == \
        "SCRAM-SHA-256"


def test_trust_role_needs_no_password(pg):
    psycopg2.connect(pg.dsn("u_trust")).close()


def test_scram_owns_app_database(pg):
    with psycopg2.connect(pg.dsn("u_scram", "pw_u_scram", dbname="app")) as conn, conn.cursor() as cur:
        cur.execute("create table if not exists harness_t (x int)")
    conn.close()


def test_base_config_shape(pg):
    cfg = base_config(pg, defaults={"pool_size": 2}, log_level="debug")
    assert cfg["defaults"]["pool_size"] == 2 and cfg["log_level"] == "debug"
    assert cfg["tenants"]["acme"]["port"] == pg.port
    assert set(cfg["tenants"]["acme"]["users"]) == {"app", "md5user", "trustuser", "plainuser"}
    fill_ports(cfg)
    ports = [e["port"] for e in cfg["listen"]]
    assert len(set(ports)) == 2 and all(ports)
    assert "log_level" not in base_config(pg, log_level=None)
