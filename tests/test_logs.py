"""Logs: one line per connect and disconnect with who, from where, how long and why; JSON lines;
level and format changed by a reload; no secret ever written."""

from __future__ import annotations

import json
import os
import subprocess

import psycopg2

from cluster import base_config, connect_error

CLIENT_PASSWORD = "Cl1ent-Pw-8f3a"
ADMIN_PASSWORD = "Adm1n-Pw-7c2e"
WRONG_PASSWORD = "Wr0ng-Pw-5d1b"
TIMEOUT = 10.0


def config(pg, **overrides) -> dict:
    cfg = base_config(pg, admin={"host": "127.0.0.1", "users": {"admin": ADMIN_PASSWORD}},
                      **overrides)
    for user in cfg["tenants"]["acme"]["users"].values():
        user["password"] = CLIENT_PASSWORD
    return cfg


def query(h, user: str = "app.acme", mode: str = "transaction") -> None:
    conn = psycopg2.connect(h.dsn(user, CLIENT_PASSWORD, mode=mode, connect_timeout=10))
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


def json_lines(h, since: int = 0) -> list[dict]:
    with open(h.log_path, "rb") as f:
        f.seek(since)
        data = f.read().decode()
    return [json.loads(line) for line in data[: data.rfind("\n") + 1].splitlines()]


def test_json_lines_carry_the_structured_fields(pg, gpooler):
    h = gpooler(config(pg, log_format="json"))
    query(h)
    h.wait_log('"reason": "client terminated the session"')
    assert connect_error(h.params("app.acme", WRONG_PASSWORD))["C"] == "28P01"
    assert connect_error(h.params("nobody.acme", CLIENT_PASSWORD))["C"] == "28000"
    h.wait_log('"user": "nobody.acme"')

    lines = json_lines(h)                      # every line of the file is one JSON object
    for entry in lines:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert entry["time"].endswith("Z") and entry["level"] in ("INFO", "DEBUG", "WARNING")
    connected = [e for e in lines if e["message"].startswith("client connected")]
    assert len(connected) == 1
    c = connected[0]
    assert (c["tenant"], c["user"], c["db"], c["mode"], c["logger"]) == \
        ("acme", "app", "postgres", "transaction", "gpooler.client")
    assert c["addr"].startswith("127.0.0.1:")
    gone = [e for e in lines if e["message"].startswith("client disconnected")]
    by_reason = {e["reason"].split(" ", 2)[1] if e["reason"].startswith("refused") else "ok": e
                 for e in gone}
    assert set(by_reason) == {"ok", "28P01", "28000"}, gone
    assert by_reason["ok"]["addr"] == c["addr"] and isinstance(by_reason["ok"]["duration"], float)
    wrong = by_reason["28P01"]                 # a failed login names the user and the address
    assert (wrong["tenant"], wrong["user"]) == ("acme", "app") and wrong["level"] == "INFO"
    unknown = by_reason["28000"]
    assert unknown["user"] == "nobody.acme" and unknown["addr"].startswith("127.0.0.1:")
    assert "tenant" not in unknown
    assert "user=nobody.acme addr=127.0.0.1:" in unknown["message"]


def test_reload_changes_level_and_format(pg, gpooler):
    h = gpooler(config(pg))
    query(h, "app.acme")
    h.wait_log("client disconnected: tenant=acme user=app")
    assert " DEBUG " not in h.log()
    assert "opened" not in h.log()             # pool.py's debug line for a new server connection

    mark = h.log_mark()
    assert h.reload(config(pg, log_level="debug", log_format="json")) == "reloaded"
    query(h, "md5user.acme")                   # a new pool: opens a server connection
    line = h.wait_log("opened", since=mark)
    entry = json.loads(line)
    assert entry["level"] == "DEBUG" and entry["logger"] == "gpooler.pool"
    after = json_lines(h, mark)                # everything after the reload is JSON
    assert any(e["message"].startswith("client connected") and e["user"] == "md5user"
               for e in after)

    mark = h.log_mark()
    assert h.reload(config(pg)) == "reloaded"
    query(h, "plainuser.acme")
    h.wait_log("client disconnected: tenant=acme user=plainuser", since=mark)
    assert "opened" not in open(h.log_path, "rb").read()[mark:].decode().split(
        "configuration reloaded", 1)[1]


def test_secrets_are_never_logged(pg, gpooler):
    h = gpooler(config(pg, log_level="debug"))
    query(h)
    query(h, "md5user.acme", mode="session")
    assert connect_error(h.params("app.acme", WRONG_PASSWORD))["C"] == "28P01"
    assert connect_error(h.params("trustuser.acme", WRONG_PASSWORD, mode="session"))["C"] == "28P01"
    env = dict(os.environ, PGPASSWORD=ADMIN_PASSWORD)
    psql = ["psql", "-X", "-h", "127.0.0.1", "-p", str(h.admin_port), "-U", "admin", "-d",
            "gpooler", "-c", "SHOW CONFIG"]
    done = subprocess.run(psql, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and ADMIN_PASSWORD not in done.stdout, done.stderr
    env["PGPASSWORD"] = WRONG_PASSWORD
    assert subprocess.run(psql, env=env, capture_output=True, timeout=30).returncode != 0
    assert h.reload(config(pg, log_level="debug", log_format="json")) == "reloaded"
    query(h)
    h.wait_log("admin disconnected: user=admin", since=0)
    h.wait_log('"reason": "client terminated the session"', since=0)
    log = h.log()
    for secret in (CLIENT_PASSWORD, ADMIN_PASSWORD, WRONG_PASSWORD, "pw_u_scram", "pw_u_md5"):
        assert secret not in log, f"{secret} appears in the log"


def test_a_client_cannot_forge_a_log_line(pg, gpooler):
    """A user name with a newline (the client chooses it) stays inside its own line."""
    h = gpooler(config(pg))
    forged = "x\n2030-01-01 00:00:00,000 INFO gpooler.client: client connected: tenant=acme"
    assert connect_error(h.params("app.acme", CLIENT_PASSWORD), user=forged)["C"] == "28000"
    line = h.wait_log("client disconnected: user=")
    assert "x\\x0a2030-01-01" in line
    assert not any(entry.startswith("2030-") for entry in h.log().splitlines())
