"""scripts/bench: pgbench direct vs PgBouncer vs gpooler (transaction mode, pool size 20).

Environment:
    BENCH_SECONDS          duration of each run (default 10)
    BENCH_SCALE            pgbench scale factor (default 10)
    BENCH_CLIENTS          clients of the multi-client runs (default 32)
    BENCH_GPOOLER_WORKERS  gpooler `workers` (default 1; PgBouncer is single-threaded too)
    BENCH_TARGETS          comma list out of direct,pgbouncer,gpooler (default: all)
    BENCH_REPLICA          0 to skip the read-replica run (default: run it)
    BENCH_ROUNDS           rounds of every workload, targets taking turns in each (default 1);
                           with more, each cell is the round with the median throughput, which
                           keeps one noisy moment on a shared machine from deciding a ratio
"""

import os
import shutil
import subprocess
import sys

import _common as c
from _common import cluster, say

POOL_SIZE = 20
USER, PASSWORD, DB, TENANT = "bench", "benchpw", "bench", "bench"


def env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        sys.exit(f"{name} must be an integer")


def start_pgbouncer(pg, workdir):
    """Start PgBouncer as the unprivileged account; returns (port, None) or (None, why)."""
    exe = c.find_pgbouncer()
    if not exe:
        return None, "PgBouncer not installed (apt-get install pgbouncer to compare); skipping"
    d = cluster.make_tempdir("gpooler-bench-pgbouncer-")
    c.on_exit(lambda: shutil.rmtree(d, ignore_errors=True))
    port = cluster.free_port()
    with open(os.path.join(d, "userlist.txt"), "w") as f:
        f.write(f'"{USER}" "{PASSWORD}"\n')
    ini = os.path.join(d, "pgbouncer.ini")
    with open(ini, "w") as f:
        f.write(f"""[databases]
{DB} = host=127.0.0.1 port={pg.port} dbname={DB}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 1000
logfile = {d}/pgbouncer.log
log_connections = 0
log_disconnections = 0
ignore_startup_parameters = extra_float_digits
""")
    cluster.chown_tree(d)
    log_path = os.path.join(d, "pgbouncer.stderr")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([exe, ini], stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, cwd=d, start_new_session=True,
                                **cluster.as_pg_user())
    c.on_exit(lambda: c.stop_process(proc))
    err = c.wait_ports(proc, [port], log_path)
    if err:
        return None, f"PgBouncer failed to start: {err}\n{c.tail(os.path.join(d, 'pgbouncer.log'))}"
    return port, None


def pgbouncer_version():
    try:
        out = subprocess.run([c.find_pgbouncer(), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.split()[1] if out.startswith("PgBouncer") else ""
    except (OSError, IndexError, subprocess.SubprocessError):
        return ""


def start_gpooler(pg, workdir, replicas=()):
    workers = os.environ.get("BENCH_GPOOLER_WORKERS", "1")
    cfg = {
        "listen": [{"host": "127.0.0.1", "mode": "transaction"}],
        "workers": int(workers) if workers.isdigit() else workers,
        "log_level": "warning",
        "tenants": {TENANT: {
            "host": "127.0.0.1", "port": pg.port, "database": DB,
            "replicas": [{"host": "127.0.0.1", "port": r.port} for r in replicas],
            "users": {USER: {"password": PASSWORD, "server_user": USER, "pool_size": POOL_SIZE,
                             "max_clients": 1000}},
        }},
    }
    proc, log_path, err = c.start_gpooler(cfg, workdir)
    if err:
        return None, f"gpooler failed to start ({err}); skipping"
    return cfg["listen"][0]["port"], None


def median_run(tries):
    """The run with the median throughput, or the first failure: one failed round fails the cell."""
    failed = [r for r in tries if not r.ok]
    if failed:
        return failed[0]
    return sorted(tries, key=lambda r: r.tps)[len(tries) // 2]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    c.install_signal_handlers()
    seconds = env_int("BENCH_SECONDS", 10)
    scale = env_int("BENCH_SCALE", 10)
    clients = env_int("BENCH_CLIENTS", 32)
    rounds = max(1, env_int("BENCH_ROUNDS", 1))
    wanted = [t.strip() for t in os.environ.get("BENCH_TARGETS", "direct,pgbouncer,gpooler").split(",")]

    say(f"== gpooler bench: {seconds}s per run, {rounds} round(s), pgbench scale {scale}, "
        f"pool size {POOL_SIZE} ==")
    pg = cluster.Cluster()
    c.on_exit(pg.stop)
    pg.start()
    bindir = pg.bindir
    pg.psql(f"SET password_encryption = 'scram-sha-256';\n"
            f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}';\n"
            f"CREATE DATABASE {DB} OWNER {USER};")
    say(f"Postgres {pg.psql('show server_version')} on 127.0.0.1:{pg.port}")
    workdir = cluster.make_tempdir("gpooler-bench-")
    c.on_exit(lambda: shutil.rmtree(workdir, ignore_errors=True))

    say(f"Loading pgbench tables (scale {scale}) directly ...")
    ok, out = c.pgbench_init(bindir, scale, "127.0.0.1", pg.port, USER, PASSWORD, DB)
    if not ok:
        say(f"pgbench -i failed:\n{out}")
        return 1
    pg.psql("VACUUM ANALYZE; CHECKPOINT;", dbname=DB)

    targets = []   # (name, port, user)
    if "direct" in wanted:
        targets.append(("direct", pg.port, USER))
    if "pgbouncer" in wanted:
        port, why = start_pgbouncer(pg, workdir)
        say(why or f"PgBouncer {pgbouncer_version()} on 127.0.0.1:{port}")
        targets.append(("pgbouncer", port, USER))
    if "gpooler" in wanted:
        port, why = start_gpooler(pg, workdir)
        say(why or f"gpooler on 127.0.0.1:{port}")
        targets.append(("gpooler", port, f"{USER}.{TENANT}"))

    usable = {}
    for name, port, user in targets:
        if port is None:
            continue
        ok, out = c.psql(bindir, "select count(*) from pgbench_branches", "127.0.0.1", port, user,
                         PASSWORD, DB)
        if ok:
            usable[name] = (port, user)
        else:
            say(f"{name}: a test query failed ({out}); skipping")

    workloads = [
        (f"select-only simple -c{clients}", ["-S", "-M", "simple", "-c", str(clients), "-j", "2"]),
        (f"select-only extended -c{clients}", ["-S", "-M", "extended", "-c", str(clients), "-j", "2"]),
        (f"select-only prepared -c{clients}", ["-S", "-M", "prepared", "-c", str(clients), "-j", "2"]),
        ("select-only simple -c1 (latency)", ["-S", "-M", "simple", "-c", "1", "-j", "1"]),
    ]
    names = [t[0] for t in targets]
    results = {}
    notes = []
    for wl, args in workloads:
        runs = {}
        for turn in range(rounds):
            for name in names:
                if name not in usable:
                    continue
                port, user = usable[name]
                print(f"  {wl:34} {name:10}", end="", flush=True)
                prefix = os.path.join(workdir, f"log_{name}_{len(results)}_{turn}")
                r = c.pgbench(bindir, args + ["-n", "-T", str(seconds)], "127.0.0.1", port, user,
                              PASSWORD, DB, timeout=seconds + 60, log_prefix=prefix)
                for f in os.listdir(workdir):
                    if f.startswith(os.path.basename(prefix) + "."):
                        os.unlink(os.path.join(workdir, f))
                runs.setdefault(name, []).append(r)
                if r.ok:
                    say(f"{r.tps:10,.0f} tps  avg {r.lat_avg:.3f} ms  p99 {fmt(r.p99, '.3f')} ms")
                else:
                    say(f"  failed: {r.error}")
                    notes.append(f"{name} / {wl}: {r.error}")
        for name, tries in runs.items():
            results[(wl, name)] = median_run(tries)

    def cell_tps(wl, name):
        r = results.get((wl, name))
        if name not in usable:
            return "n/a"
        return "failed" if r is None or not r.ok else f"{r.tps:,.0f}"

    def cell_lat(wl, name):
        r = results.get((wl, name))
        if name not in usable:
            return "n/a"
        return "failed" if r is None or not r.ok else f"{r.lat_avg:.2f}/{fmt(r.p99, '.2f')}"

    def ratio(wl):
        a, b = results.get((wl, "gpooler")), results.get((wl, "pgbouncer"))
        if a and b and a.ok and b.ok and b.tps:
            return f"{a.tps / b.tps:.2f}"
        return "-"

    header = ["workload", "direct tps", "pgbouncer tps", "gpooler tps", "gp/pgb",
              "direct ms avg/p99", "pgbouncer ms avg/p99", "gpooler ms avg/p99"]
    rows = [[wl, cell_tps(wl, "direct"), cell_tps(wl, "pgbouncer"), cell_tps(wl, "gpooler"),
             ratio(wl), cell_lat(wl, "direct"), cell_lat(wl, "pgbouncer"), cell_lat(wl, "gpooler")]
            for wl, _ in workloads]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    say("")
    say(f"Results ({seconds}s per run, {'median of ' + str(rounds) + ' rounds, ' if rounds > 1 else ''}"
        f"transaction pooling, pool size {POOL_SIZE}, "
        f"{os.cpu_count()} CPUs shared by Postgres, poolers and pgbench):")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    say(line)
    say("-" * len(line))
    for row in rows:
        say("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                      for i, (x, w) in enumerate(zip(row, widths))))
    if os.environ.get("BENCH_REPLICA", "1") != "0" and "gpooler" in usable:
        replica_reads(pg, workdir, bindir, seconds, clients,
                      results.get((workloads[0][0], "gpooler")))
    if notes:
        say("")
        say("Failures:")
        for n in notes:
            say(f"  {n}")
    return 0


def replica_reads(pg, workdir, bindir, seconds, clients, primary_only):
    """Reads through gpooler with one streaming replica beside the primary, against primary only."""
    say("")
    say("Read replicas: a streaming replica (pg_basebackup -R) and gpooler routing reads to both ...")
    replica = pg.make_replica()
    c.on_exit(replica.stop)
    port, why = start_gpooler(pg, workdir, replicas=[replica])
    if why:
        say(why)
        return
    args = ["-S", "-M", "simple", "-c", str(clients), "-j", "2", "-n", "-T", str(seconds)]
    r = c.pgbench(bindir, args, "127.0.0.1", port, f"{USER}.{TENANT}", PASSWORD, DB,
                  timeout=seconds + 60)
    if not r.ok:
        say(f"  failed: {r.error}")
        return
    base = f"{primary_only.tps:,.0f}" if primary_only and primary_only.ok else "-"
    gain = f"{r.tps / primary_only.tps:.2f}" if primary_only and primary_only.ok else "-"
    say(f"  select-only simple -c{clients}: primary only {base} tps, primary + 1 replica "
        f"{r.tps:,.0f} tps (x{gain}); on one machine both servers share the same CPUs")


if __name__ == "__main__":
    try:
        rc = main()
    except KeyboardInterrupt:
        rc = 130
    finally:
        c.cleanup()
    sys.exit(rc)
