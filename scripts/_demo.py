"""scripts/demo: a throwaway Postgres, gpooler in front of it, pgbench through it."""

import os
import sys
import threading
import time

import _common as c
from _common import cluster, say

POOL_SIZE = 5
CLIENTS = 20


def main():
    c.install_signal_handlers()
    say("== gpooler demo ==")
    say("Starting a throwaway Postgres cluster ...")
    pg = cluster.Cluster()
    c.on_exit(pg.stop)
    pg.start()
    bindir = pg.bindir
    say(f"  Postgres {pg.psql('show server_version')} on 127.0.0.1:{pg.port} (data in {pg.dir})")
    pg.psql("SET password_encryption = 'scram-sha-256';\n"
            "CREATE ROLE app LOGIN PASSWORD 'secret';\n"
            "CREATE DATABASE demo OWNER app;")
    say("  created role app (SCRAM password 'secret') and database demo owned by it")

    workdir = cluster.make_tempdir("gpooler-demo-")
    c.on_exit(lambda: __import__("shutil").rmtree(workdir, ignore_errors=True))
    cfg = {
        "listen": [{"host": "127.0.0.1", "mode": "transaction"},
                   {"host": "127.0.0.1", "mode": "session"}],
        "log_level": "info",
        "tenants": {
            "demo": {
                "host": "127.0.0.1", "port": pg.port, "database": "demo",
                "users": {"app": {"password": "secret", "server_user": "app",
                                  "pool_size": POOL_SIZE}},
            },
        },
    }
    say("Starting gpooler ...")
    proc, log_path, err = c.start_gpooler(cfg, workdir)
    if err:
        say(f"gpooler failed to start: {err}")
        return 1
    tport, sport = cfg["listen"][0]["port"], cfg["listen"][1]["port"]
    say(f"  gpooler pid {proc.pid}: transaction mode on 127.0.0.1:{tport}, "
        f"session mode on 127.0.0.1:{sport}; tenant 'demo', pool_size {POOL_SIZE}")
    say(f"  config: {os.path.join(workdir, 'gpooler.yaml')}")

    say("Loading pgbench tables (scale 1) directly into Postgres ...")
    ok, out = c.pgbench_init(bindir, 1, "127.0.0.1", pg.port, "app", "secret", "demo")
    if not ok:
        say(f"pgbench -i failed:\n{out}")
        return 1
    say("  done")

    # watch the number of server connections Postgres sees while pgbench runs through gpooler
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            out = pg.psql("select count(*) from pg_stat_activity where usename = 'app'", check=False)
            if out.isdigit():
                peak[0] = max(peak[0], int(out))
            stop.wait(0.25)

    results = []
    for title, args in [
        (f"select-only, {CLIENTS} clients", ["-S", "-c", str(CLIENTS), "-j", "2", "-T", "5", "-n"]),
        ("TPC-B-like read/write, 10 clients", ["-c", "10", "-j", "2", "-T", "5", "-n"]),
    ]:
        say(f"Running pgbench through gpooler (transaction port {tport}, user app.demo): {title}, 5 s ...")
        peak[0] = 0
        stop.clear()
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        res = c.pgbench(bindir, args, "127.0.0.1", tport, "app.demo", "secret", "demo", timeout=60)
        stop.set()
        t.join()
        if res.ok:
            say(f"  {res.tps:,.0f} transactions/s, average latency {res.lat_avg:.2f} ms; "
                f"Postgres saw at most {peak[0]} connections from app")
        else:
            say(f"  failed: {res.error}\n{res.output[-2000:]}")
        results.append((title, res, peak[0]))

    say("Asking Postgres, through gpooler, how many connections role app has:")
    ok, out = c.psql(bindir, "select count(*) from pg_stat_activity where usename = 'app'",
                     "127.0.0.1", tport, "app.demo", "secret", "demo")
    say(f"  psql -h 127.0.0.1 -p {tport} -U app.demo demo -c \"select count(*) from pg_stat_activity "
        f"where usename='app'\"  ->  {out}")

    say("")
    say("What happened:")
    for title, res, pk in results:
        if res.ok:
            clients = CLIENTS if "20" in title else 10
            say(f"  - {title}: {clients} pgbench clients shared {pk} Postgres connection(s) "
                f"(pool_size {POOL_SIZE}) at {res.tps:,.0f} tps.")
        else:
            say(f"  - {title}: failed ({res.error}).")
    if ok:
        say(f"  - After the runs, Postgres holds {out} connection(s) for app: the pool stays "
            f"open and bounded by pool_size, however many clients come and go.")
    all_ok = ok and all(r.ok for _, r, _ in results)
    say("Stopping gpooler and Postgres, removing temporary files.")
    return 0 if all_ok else 1


if __name__ == "__main__":
    try:
        rc = main()
    except KeyboardInterrupt:
        rc = 130
    finally:
        c.cleanup()
    sys.exit(rc)
