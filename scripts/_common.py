"""Shared plumbing for scripts/demo and scripts/bench: processes, cleanup, pgbench runs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import cluster  # noqa: E402  (tests/cluster.py, stdlib only)

_cleanups = []


def on_exit(fn):
    """Register a cleanup; run in reverse order by cleanup() (also on Ctrl+C / SIGTERM)."""
    _cleanups.append(fn)
    return fn


def cleanup():
    while _cleanups:
        fn = _cleanups.pop()
        try:
            fn()
        except Exception as e:  # keep cleaning up
            print(f"  (cleanup: {e})", file=sys.stderr)


def install_signal_handlers():
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def say(msg=""):
    print(msg, flush=True)


def tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def tcp_accepts(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_ports(proc, ports, log_path, timeout=15.0, host="127.0.0.1"):
    """Wait until all ports accept; returns None or an error message (process died / timed out)."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}:\n{tail(log_path)}"
        pending = [p for p in pending if not tcp_accepts(host, p)]
        if not pending:
            return None
        if time.monotonic() > deadline:
            return f"not listening on {pending} after {timeout:.0f}s:\n{tail(log_path)}"
        time.sleep(0.05)
    return None


def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def gpooler_command(config_path):
    exe = os.path.join(os.path.dirname(sys.executable), "gpooler")
    if os.access(exe, os.X_OK):
        return [exe, "-c", config_path]
    return [sys.executable, "-m", "gpooler", "-c", config_path]


def write_yaml(path, cfg):
    try:
        import yaml
        text = yaml.safe_dump(cfg, sort_keys=False)
    except ImportError:  # JSON is YAML
        import json
        text = json.dumps(cfg, indent=2)
    with open(path, "w") as f:
        f.write(text)


def start_gpooler(cfg, workdir, name="gpooler"):
    """Start gpooler with cfg (ports filled in); returns (proc, log_path, error_or_None)."""
    cluster.fill_ports(cfg)
    config_path = os.path.join(workdir, f"{name}.yaml")
    log_path = os.path.join(workdir, f"{name}.log")
    write_yaml(config_path, cfg)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as logf:
        try:
            proc = subprocess.Popen(gpooler_command(config_path), stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, env=env,
                                    start_new_session=True)
        except OSError as e:
            return None, log_path, str(e)
    on_exit(lambda: stop_process(proc))
    ports = [e["port"] for e in cfg["listen"]]
    return proc, log_path, wait_ports(proc, ports, log_path)


def pg_env(password=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    env["PGAPPNAME"] = "gpooler-script"
    return env


class PgbenchResult:
    def __init__(self, ok, tps=None, lat_avg=None, p99=None, error=None, output=""):
        self.ok, self.tps, self.lat_avg, self.p99 = ok, tps, lat_avg, p99
        self.error, self.output = error, output


def _percentile(values, q):
    if not values:
        return None
    values.sort()
    k = min(len(values) - 1, max(0, int(round(q / 100.0 * len(values) + 0.5)) - 1))
    return values[k]


def _log_latencies(prefix):
    """Per-transaction latencies (ms) from pgbench -l logs: files PREFIX.PID[.THREAD]."""
    lat = []
    d, base = os.path.split(prefix)
    for name in os.listdir(d):
        if not name.startswith(base + "."):
            continue
        with open(os.path.join(d, name)) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]) / 1000.0)
    return lat


def pgbench(bindir, args, host, port, user, password, dbname, timeout, log_prefix=None):
    """Run pgbench; parse tps / latency average; p99 from per-transaction logs when log_prefix."""
    cmd = [os.path.join(bindir, "pgbench"), "-h", host, "-p", str(port), "-U", user]
    if log_prefix:
        cmd += ["-l", f"--log-prefix={log_prefix}"]
    cmd += list(args) + [dbname]
    try:
        res = subprocess.run(cmd, env=pg_env(password), capture_output=True, text=True,
                             timeout=timeout, cwd=os.path.dirname(log_prefix) if log_prefix else None)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return PgbenchResult(False, error=f"timed out after {timeout}s", output=out)
    out = res.stdout + res.stderr
    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", out, re.M)
    lat = re.search(r"^latency average = ([\d.]+) ms", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    error = None
    if res.returncode != 0 or not tps or (failed and int(failed.group(1)) > 0):
        errs = [ln.strip() for ln in res.stderr.splitlines()
                if "error" in ln.lower() or "abort" in ln.lower() or "fatal" in ln.lower()]
        error = errs[0] if errs else f"pgbench exit code {res.returncode}"
        return PgbenchResult(False, error=error, output=out)
    p99 = None
    if log_prefix:
        p99 = _percentile(_log_latencies(log_prefix), 99)
    return PgbenchResult(True, float(tps.group(1)), float(lat.group(1)) if lat else None, p99,
                         output=out)


def psql(bindir, sql, host, port, user, password, dbname, timeout=30):
    """Run one SQL statement with psql; returns (ok, output)."""
    cmd = [os.path.join(bindir, "psql"), "-X", "-At", "-h", host, "-p", str(port), "-U", user,
           "-d", dbname, "-c", sql]
    try:
        res = subprocess.run(cmd, env=pg_env(password), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"psql timed out after {timeout}s"
    return res.returncode == 0, (res.stdout if res.returncode == 0 else res.stderr).strip()


def find_pgbouncer():
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer")
         if os.access(p, os.X_OK)), None)


def pgbench_init(bindir, scale, host, port, user, password, dbname, timeout=600):
    """pgbench -i -s SCALE; returns (ok, output)."""
    cmd = [os.path.join(bindir, "pgbench"), "-i", "-s", str(scale), "-q", "-h", host, "-p", str(port),
           "-U", user, dbname]
    try:
        res = subprocess.run(cmd, env=pg_env(password), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pgbench -i timed out after {timeout}s"
    return res.returncode == 0, res.stdout + res.stderr
