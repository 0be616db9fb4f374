"""docs/configuration.md and conf/gpooler.yaml keep up with config.SETTINGS. Pure, no Postgres.

When one of these fails after a setting was added or changed: run scripts/gen-config-docs and
commit docs/configuration.md; add the setting, with a comment, to conf/gpooler.yaml.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpooler import config as cfg

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen-config-docs"
DOC = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "conf" / "gpooler.yaml"
STALE = "docs/configuration.md is stale: run scripts/gen-config-docs and commit the result"


def _load_generator():
    loader = importlib.machinery.SourceFileLoader("gen_config_docs", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no scripts/__pycache__
    try:
        loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


gen = _load_generator()


def _section_text(text: str, level: str) -> str:
    """The part of the reference that documents `level`: from its heading to the next one."""
    start = text.index(gen.heading(level) + "\n")
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + 1)
    return text[start:end.start() if end else len(text)]


def test_committed_reference_is_current():
    assert DOC.exists(), STALE
    committed = DOC.read_text(encoding="utf-8")
    assert committed == gen.render(), STALE + "\n" + gen.stale_diff(DOC, gen.render())


@pytest.mark.parametrize("setting", cfg.SETTINGS, ids=lambda s: f"{s.level}.{s.name}")
def test_every_setting_is_documented_with_its_default(setting):
    text = _section_text(DOC.read_text(encoding="utf-8"), setting.level)
    rows = [line for line in text.splitlines() if line.startswith(f"| `{setting.name}` |")]
    assert len(rows) == 1, f"{setting.level}.{setting.name} missing from {DOC.name}: {STALE}"
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[0])[1:-1]]
    assert cells[2] == gen._cell(gen.default(setting)), STALE
    assert gen._cell(setting.doc) in rows[0], STALE
    if setting.cascade:
        assert "`defaults`" in cells[3], f"{setting.name} cascades: say so"


def test_cascade_env_and_passwords_are_explained():
    text = DOC.read_text(encoding="utf-8")
    for needed in ("defaults -> tenant -> user", "${NAME}", "$${", "md5", "SCRAM-SHA-256$",
                   "seconds"):
        assert needed in text, needed


def test_durations_are_in_seconds():
    numbers = [s for s in cfg.SETTINGS if s.parse.__qualname__ == "_number"]
    assert numbers, "no duration settings? the _number parser was renamed: update the generator"
    for s in numbers:
        assert gen.kind(s) == (s.unit if s.unit is not None else "seconds")


def test_check_mode(tmp_path):
    assert os.access(SCRIPT, os.X_OK), "scripts/gen-config-docs must be executable"
    target = tmp_path / "configuration.md"

    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), "--file", str(target), *args],
                              capture_output=True, text=True, timeout=60)

    missing = run("--check")
    assert missing.returncode == 1 and not target.exists()
    wrote = run()
    assert wrote.returncode == 0, wrote.stderr
    assert target.read_text(encoding="utf-8") == gen.render()
    assert run("--check").returncode == 0

    target.write_text(gen.render().replace("| `pool_size` |", "| `poolsize` |"), encoding="utf-8")
    stale = run("--check")
    assert stale.returncode == 1
    assert "-| `poolsize` |" in stale.stdout and "+| `pool_size` |" in stale.stdout
    assert "stale" in stale.stderr


def test_runs_with_plain_python3_and_pythonpath(tmp_path):
    """The script also runs with the system python3 (it puts the repo on sys.path itself)."""
    target = tmp_path / "configuration.md"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(SCRIPT), "--file", str(target)], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert target.read_text(encoding="utf-8") == gen.render()


# ------------------------------------------------------------------- conf/gpooler.yaml
# tests/test_config.py::test_example_config_loads_and_shows_every_setting checks that every setting
# *name* appears somewhere in the example. Names repeat across levels (host and port are in five),
# so this checks each setting where it belongs: statsd.port, not just "some port".


def _keys_by_level(doc: dict) -> set[tuple[str, str]]:
    found = {("global", k) for k in doc}
    for entry in doc.get("listen") or []:
        found |= {("listen", k) for k in entry}
    for section in ("admin", "statsd", "tls"):
        found |= {(section, k) for k in doc.get(section) or {}}
    for tenant in (doc.get("tenants") or {}).values():
        found |= {("tenant", k) for k in tenant}
        for replica in tenant.get("replicas") or []:
            found |= {("replica", k) for k in replica}
        for user in (tenant.get("users") or {}).values():
            found |= {("user", k) for k in user}
    return found


def test_example_config_shows_every_setting_at_its_level():
    present = _keys_by_level(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    missing = [f"{s.level}.{s.name}" for s in cfg.SETTINGS if (s.level, s.name) not in present]
    assert not missing, f"conf/gpooler.yaml does not show: {', '.join(missing)}"
