"""TLS towards clients (SSLRequest, direct TLS, SNI, enforce_ssl, certificate reload) and towards
Postgres (server_tls modes against a cluster started with ssl=on).

Certificates come from trustme: one CA for gpooler's own certificate (names "localhost",
"127.0.0.1" and the SNI names below), another for Postgres's, and a stranger CA nobody uses.
libpq sends SNI when the host is a name, so SNI tests connect with `host=<name>
hostaddr=127.0.0.1` (no DNS needed) and `sslmode=verify-full`, which also proves the name is
in the certificate gpooler presented.
"""

from __future__ import annotations

import copy
import io
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from contextlib import closing

import psycopg
import psycopg2
import pytest
import trustme
import yaml
from cryptography import x509

from cluster import DEFAULT_HBA, Cluster, base_config, connect_error, deep_merge
from gpooler.config import ConfigError, parse_config
from waiting import wait_until

SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
SNI_NAMES = ("acme.example.test", "globex.example.test", "db.initech.test")
MODES = ("transaction", "session")


# --------------------------------------------------------------------------------------------------
# certificates

class Certs:
    """Files for one test module: gpooler's CA and certificate, Postgres's, a stranger CA."""

    def __init__(self, directory):
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.cert_file, self.key_file = self.issue("server")
        self.pg_ca = trustme.CA()
        self.pg_ca_file = self._write("pg-ca.pem", self.pg_ca.cert_pem.bytes())
        # Postgres's certificate names "localhost" but not 127.0.0.1: verify-full to the address
        # fails on the name alone, verify-ca to it succeeds.
        self.pg_cert = self.pg_ca.issue_cert("localhost", "pg.example.test")
        self.stranger_ca_file = self._write("stranger-ca.pem", trustme.CA().cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def issue(self, stem: str) -> tuple[str, str]:
        """A fresh certificate for gpooler (its own serial) as <stem>.crt / <stem>.key."""
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", *SNI_NAMES)
        return (self._write(f"{stem}.crt", b"".join(b.bytes() for b in leaf.cert_chain_pems)),
                self._write(f"{stem}.key", leaf.private_key_pem.bytes()))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("tls"))


def serial_of(pem_path: str) -> int:
    with open(pem_path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


def presented_serial(host: str, port: int) -> int:
    """SSLRequest, "S", a handshake: the serial number of the certificate gpooler presents."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(sock) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def tls_config(pg, certs, **overrides) -> dict:
    cfg = base_config(pg, tls={"cert_file": certs.cert_file, "key_file": certs.key_file})
    return deep_merge(cfg, overrides)


def query(dsn: str, sql: str):
    with closing(psycopg2.connect(dsn)) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]


def ssl_in_use(dsn: str) -> tuple[bool, str | None]:
    with closing(psycopg2.connect(dsn)) as conn:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
        return conn.info.ssl_in_use, conn.info.ssl_attribute("protocol")


def refused(dsn: str) -> str:
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(dsn).close()
    return str(info.value)


def read_error(sock) -> dict:
    """Read one backend message that must be an ErrorResponse; its fields."""
    data = b""
    while len(data) < 5 or len(data) < 1 + int.from_bytes(data[1:5], "big"):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    assert data[:1] == b"E", data
    fields = {}
    for part in data[5:1 + int.from_bytes(data[1:5], "big")].split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def startup_packet(params: dict) -> bytes:
    body = struct.pack("!I", 3 << 16) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


# --------------------------------------------------------------------------------------------------
# towards clients

@pytest.mark.parametrize("mode", MODES)
def test_libpq_require_verify_full_and_plaintext(pg, gpooler, certs, mode):
    h = gpooler(tls_config(pg, certs))
    used, protocol = ssl_in_use(h.dsn("app.acme", "secret", mode, sslmode="require"))
    assert used and protocol in ("TLSv1.2", "TLSv1.3")
    used, _ = ssl_in_use(h.dsn("app.acme", "secret", mode, host="localhost", hostaddr="127.0.0.1",
                               sslmode="verify-full", sslrootcert=certs.ca_file))
    assert used
    # A certificate gpooler did not present does not verify: the client really checks it.
    text = refused(h.dsn("app.acme", "secret", mode, host="localhost", hostaddr="127.0.0.1",
                         sslmode="verify-full", sslrootcert=certs.stranger_ca_file))
    assert "certificate verify failed" in text
    h.wait_log("client TLS handshake failed: addr=127.0.0.1 reason=TLSV1_ALERT_UNKNOWN_CA")
    # The tenant does not insist: plaintext still works.
    assert ssl_in_use(h.dsn("app.acme", "secret", mode, sslmode="disable")) == (False, None)
    # Bulk data through TLS both ways: a 4 MB COPY out, then the same back in.
    with closing(psycopg2.connect(h.dsn("app.acme", "secret", mode, sslmode="require"))) as conn:
        with conn.cursor() as cur:
            out = io.StringIO()
            cur.copy_expert("copy (select g, repeat('x', 200) from generate_series(1, 20000) g) "
                            "to stdout", out)
            assert len(out.getvalue()) > 4_000_000
            cur.execute("create temp table t (g int, x text)")
            cur.copy_expert("copy t from stdin", io.StringIO(out.getvalue()))
            cur.execute("select count(*), sum(length(x)) from t")
            assert cur.fetchone() == (20000, 4_000_000)
    assert "Traceback" not in h.log()


def test_direct_tls_gssenc_and_encryption_requests(pg, gpooler, certs):
    h = gpooler(tls_config(pg, certs, log_level="debug"))
    host, port = h.hosts["transaction"], h.port()
    # PostgreSQL 17's direct TLS: no SSLRequest, a ClientHello at once, ALPN "postgresql".
    if psycopg2.__libpq_version__ >= 170000:
        assert ssl_in_use(h.dsn("app.acme", "secret", sslmode="require",
                                sslnegotiation="direct"))[0]
    with socket.create_connection((host, port), timeout=5) as sock:
        context = ssl.create_default_context(cafile=certs.ca_file)
        context.set_alpn_protocols(["postgresql"])
        with context.wrap_socket(sock, server_hostname="acme.example.test") as tls_sock:
            tls_sock.sendall(startup_packet({"user": "app", "database": "postgres"}))
            assert tls_sock.recv(1) == b"R"  # the startup went through: asked for a password
    # GSS encryption is never offered, SSL is after it.
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(GSSENC_REQUEST)
        assert sock.recv(1) == b"N"
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        context = ssl.create_default_context(cafile=certs.ca_file)
        with context.wrap_socket(sock, server_hostname="localhost") as tls_sock:
            tls_sock.sendall(SSL_REQUEST)  # again, inside TLS
            fields = read_error(tls_sock)
    assert fields["C"] == "08P01" and "encrypted connection" in fields["M"]
    # Direct TLS without ALPN is refused, inside TLS, as PostgreSQL 17 does.
    with socket.create_connection((host, port), timeout=5) as sock:
        context = ssl.create_default_context(cafile=certs.ca_file)
        with context.wrap_socket(sock, server_hostname="localhost") as tls_sock:
            fields = read_error(tls_sock)
    assert fields["C"] == "08P01" and "ALPN" in fields["M"]
    # A client that goes away before the handshake (a health probe) costs a debug line only.
    mark = h.log_mark()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
    assert "DEBUG" in h.wait_log("ended before startup: TLS handshake failed", since=mark)
    assert "INFO gpooler.tls" not in h.log()[mark:]
    assert ssl_in_use(h.dsn("app.acme", "secret", sslmode="require"))[0]
    assert "Traceback" not in h.log()


@pytest.mark.skipif(not hasattr(psycopg.Connection, "cancel_safe"), reason="psycopg < 3.2")
def test_cancel_request_inside_tls(pg, gpooler, certs):
    """libpq 17's PQcancelCreate (psycopg 3's cancel_safe) sends its CancelRequest inside TLS,
    and counts the cancel as failed unless gpooler ends that TLS session with close_notify."""
    h = gpooler(tls_config(pg, certs))
    sql = "select pg_sleep(10) /* tls cancel */"
    errors = []
    with psycopg.connect(h.dsn("app.acme", "secret", sslmode="require"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use

        def cancel():
            try:
                wait_until(lambda: pg.psql(f"select count(*) from pg_stat_activity "
                                           f"where query = '{sql}'") == "1", 10, "the sleep to start")
                conn.cancel_safe()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=cancel, daemon=True)
        thread.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(sql)
        thread.join(10)
        assert not errors and time.monotonic() - started < 5
        assert conn.execute("select 'usable'").fetchone() == ("usable",)


def test_enforce_ssl_refuses_plaintext_clients_of_that_tenant(pg, gpooler, certs):
    globex = {"host": pg.host, "port": pg.port,
              "users": {"app": {"password": "secret", "server_user": "u_trust"}}}
    h = gpooler(tls_config(pg, certs, tenants={"acme": {"enforce_ssl": True}, "globex": globex}))
    fields = connect_error(h.params("app.acme", "secret"), ssl_context=False)  # plaintext
    assert fields["C"] == "28000" and fields["S"] == "FATAL", fields
    assert "SSL required" in fields["M"] and '"acme"' in fields["M"]
    text = refused(h.dsn("app.acme", "secret", sslmode="disable"))
    assert "SSL required" in text and '"acme"' in text
    h.wait_log('refused: 28000 SSL required: tenant "acme"')
    # The same login inside TLS, and another tenant's plaintext clients, are fine.
    assert ssl_in_use(h.dsn("app.acme", "secret", "session", sslmode="require"))[0]
    assert query(h.dsn("app.globex", "secret", sslmode="disable"), "select current_user") == "u_trust"


def test_enforce_ssl_needs_tls(pg):
    cfg = base_config(pg, listen=[{"host": "127.0.0.1", "port": 6543, "mode": "session"}],
                      defaults={"enforce_ssl": True})
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, {})
    assert "tls: is required" in str(info.value) and "enforce_ssl (acme)" in str(info.value)


def test_sni_chooses_the_tenant(pg, gpooler, certs):
    def tenant(server_user, **extra):
        return {"host": pg.host, "port": pg.port, **extra,
                "users": {"app": {"password": "secret", "server_user": server_user,
                                  "server_password": "pw_" + server_user}}}

    cfg = tls_config(pg, certs)
    cfg["tenants"] = {"acme": tenant("u_scram"), "globex": tenant("u_md5"),
                      "initech": tenant("u_trust", sni_hostname="db.initech.test")}
    h = gpooler(cfg)

    def who(name, user="app", **extra):
        params = dict(host=name, hostaddr="127.0.0.1", sslmode="verify-full",
                      sslrootcert=certs.ca_file)
        params.update(extra)
        return query(h.dsn(user, "secret", **params), "select current_user")

    assert who("acme.example.test") == "u_scram"            # the first label
    assert who("globex.example.test") == "u_md5"
    assert who("db.initech.test") == "u_trust"              # a tenant's sni_hostname
    assert who("globex.example.test", "app.acme") == "u_scram"  # the user suffix comes first
    assert who("globex.example.test", options="-c tenant=initech") == "u_trust"
    # Without SNI there is nothing to choose by: refused, and told so inside TLS.
    text = refused(h.dsn("app", "secret", sslmode="require"))  # host 127.0.0.1: no SNI
    assert "no tenant given" in text
    text = refused(h.dsn("app", "secret", host="globex.example.test", hostaddr="127.0.0.1",
                         sslmode="require", sslsni="0"))
    assert "no tenant given" in text


def test_certificate_reload(pg, gpooler, certs, tmp_path):
    first_cert, first_key = certs.issue("reload-first")
    cfg = tls_config(pg, certs, tls={"cert_file": str(tmp_path / "gp.crt"),
                                     "key_file": str(tmp_path / "gp.key")})
    (tmp_path / "gp.crt").write_bytes(open(first_cert, "rb").read())
    (tmp_path / "gp.key").write_bytes(open(first_key, "rb").read())
    h = gpooler(cfg)
    host, port = h.hosts["transaction"], h.port()
    assert presented_serial(host, port) == serial_of(first_cert)
    with closing(psycopg2.connect(h.dsn("app.acme", "secret", sslmode="require"))) as kept:
        kept.autocommit = True  # idle between statements: SIGTERM below need not wait for it

        # A renewed certificate at the same paths: new handshakes present it.
        second_cert, second_key = certs.issue("reload-second")
        (tmp_path / "gp.crt").write_bytes(open(second_cert, "rb").read())
        (tmp_path / "gp.key").write_bytes(open(second_key, "rb").read())
        assert h.reload() == "reloaded"
        assert presented_serial(host, port) == serial_of(second_cert) != serial_of(first_cert)

        # A broken file is logged and the previous certificate kept.
        mark = h.log_mark()
        (tmp_path / "gp.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")
        assert h.reload() == "reloaded"
        h.wait_log("TLS certificate reload failed", since=mark)
        h.wait_log("keeping the previous certificate", since=mark)
        assert presented_serial(host, port) == serial_of(second_cert)
        assert ssl_in_use(h.dsn("app.acme", "secret", host="localhost", hostaddr="127.0.0.1",
                                sslmode="verify-full", sslrootcert=certs.ca_file))[0]

        # The client connected before all this never noticed.
        with kept.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)

        # Without tls: again, plaintext only.
        cfg.pop("tls")
        assert h.reload(cfg) == "reloaded"
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"N"

        # SIGTERM tells the idle TLS client from the daemon's greenlet, then exits cleanly.
        assert h.terminate() == 0
        with pytest.raises(psycopg2.OperationalError):
            with kept.cursor() as cur:
                cur.execute("select 1")
    log = h.log()
    assert "Traceback" not in log and "internal error" not in log


def test_check_reports_an_unusable_certificate(pg, tmp_path, certs):
    cfg = tls_config(pg, certs, listen=[{"host": "127.0.0.1", "port": 6543, "mode": "session"}])
    cfg["tls"]["key_file"] = certs.ca_file  # not the certificate's key
    path = tmp_path / "gpooler.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "gpooler", "--check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "tls:" in done.stderr and "private key" in done.stderr, done


# --------------------------------------------------------------------------------------------------
# towards Postgres

@pytest.fixture(scope="module")
def pg_ssl(certs):
    """A cluster with ssl=on where role u_ssl may log in over TLS only."""
    hba = [f"hostssl   all  u_ssl  {net}  scram-sha-256" for net in ("127.0.0.1/32", "::1/128")]
    hba += [f"hostnossl all  u_ssl  {net}  reject" for net in ("127.0.0.1/32", "::1/128")]
    cluster = Cluster(
        extra_conf={"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"},
        files={"server.crt": b"".join(b.bytes() for b in certs.pg_cert.cert_chain_pems),
               "server.key": certs.pg_cert.private_key_pem.bytes()},
        hba="\n".join(hba) + "\n" + DEFAULT_HBA,
    )
    try:
        cluster.start()
        cluster.psql("create role u_ssl login password 'pw_u_ssl'")
        yield cluster
    finally:
        cluster.stop()


def server_tls_config(pg_ssl, certs, **tenants) -> dict:
    """One tenant per entry: name -> (host, server_tls, CA file or None)."""
    cfg = base_config(pg_ssl)
    cfg["tenants"] = {
        name: {"host": host, "port": pg_ssl.port, "server_tls": mode,
               **({"server_tls_ca_file": ca} if ca else {}),
               "users": {"app": {"password": "secret", "server_user": "u_ssl",
                                 "server_password": "pw_u_ssl"}}}
        for name, (host, mode, ca) in tenants.items()
    }
    return cfg


SSL_USED = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


@pytest.mark.parametrize("mode", MODES)
def test_server_tls_modes_that_connect(pg_ssl, gpooler, certs, mode):
    h = gpooler(server_tls_config(
        pg_ssl, certs,
        prefer=("127.0.0.1", "prefer", None),
        require=("127.0.0.1", "require", None),
        verifyca=("127.0.0.1", "verify-ca", certs.pg_ca_file),
        verifyfull=("localhost", "verify-full", certs.pg_ca_file),
    ))
    for tenant in ("prefer", "require", "verifyca", "verifyfull"):
        dsn = h.dsn(f"app.{tenant}", "secret", mode)
        assert query(dsn, SSL_USED) is True, tenant
        assert query(dsn, "select current_user") == "u_ssl"
    # A new server_tls retires the pooled TLS connections: the next login is a plaintext one,
    # which Postgres refuses for u_ssl.
    cfg = copy.deepcopy(h.config)
    cfg["tenants"]["require"]["server_tls"] = "disable"
    assert h.reload(cfg) == "reloaded"
    fields = connect_error(h.params("app.require", "secret", mode))
    assert fields["C"] == "28000" and "no encryption" in fields["M"], fields
    assert h.terminate() == 0
    assert "Traceback" not in h.log()


def test_server_tls_failures_reach_the_client(pg, pg_ssl, gpooler, certs):
    cfg = server_tls_config(
        pg_ssl, certs,
        wrongca=("localhost", "verify-full", certs.stranger_ca_file),
        wrongname=("127.0.0.1", "verify-full", certs.pg_ca_file),
        plain=("127.0.0.1", "disable", None),
    )
    # The shared cluster runs without ssl: require must fail there, prefer fall back to plain.
    for name, server_tls in (("nossl", "require"), ("fallback", "prefer")):
        cfg["tenants"][name] = {"host": pg.host, "port": pg.port, "server_tls": server_tls,
                                "users": {"app": {"password": "secret", "server_user": "u_trust"}}}
    h = gpooler(cfg)

    fields = connect_error(h.params("app.wrongca", "secret"))
    assert fields["C"] == "08006", fields
    assert fields["M"] == (f"could not connect to server at localhost:{pg_ssl.port}: server "
                           "certificate verification failed (server_tls verify-full): unable to "
                           "get local issuer certificate")
    assert fields["M"] in refused(h.dsn("app.wrongca", "secret", "session"))

    fields = connect_error(h.params("app.wrongname", "secret"))
    assert fields["C"] == "08006" and "127.0.0.1" in fields["M"], fields
    assert "certificate verification failed" in fields["M"]

    fields = connect_error(h.params("app.nossl", "secret"))
    assert fields["C"] == "08006", fields
    assert "server does not support SSL, but server_tls is require" in fields["M"]

    # Postgres's own refusal of a plaintext login is passed through.
    fields = connect_error(h.params("app.plain", "secret"))
    assert fields["C"] == "28000" and "no encryption" in fields["M"], fields

    assert query(h.dsn("app.fallback", "secret"), SSL_USED) is False
    assert "Traceback" not in h.log()
