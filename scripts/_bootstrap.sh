# Sourced by scripts/test, scripts/demo and scripts/bench: make sure Postgres server binaries and
# the project's virtualenv exist, then cd to the repository root. Defines $ROOT and $PY.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

_have_pg_bindir() {
    local d
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then return 0; fi
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then return 0; fi
    done
    return 1
}

_as_root_apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: $* is missing and installing it needs root:" >&2
        echo "       sudo apt-get install -y $*" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null; then
        echo "error: $* is missing and this is not a Debian/Ubuntu machine; install it by hand" >&2
        exit 1
    fi
    echo "installing $* (apt-get) ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq "$@" >&2
}

ensure_postgres() {
    _have_pg_bindir && return 0
    _as_root_apt_install postgresql
    # the Debian package starts a system cluster on 5432; we never use it, tests make their own
    _have_pg_bindir || { echo "error: postgresql installed but initdb not found" >&2; exit 1; }
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv ..." >&2
        if ! python3 -m venv .venv >&2; then
            rm -rf .venv
            _as_root_apt_install python3-venv
            python3 -m venv .venv >&2
        fi
    fi
    local stamp=.venv/.gpooler-installed
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "installing gpooler and test dependencies into .venv ..." >&2
        if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' \
                >.venv/pip-install.log 2>&1; then
            cat .venv/pip-install.log >&2
            echo "error: pip install failed (log: .venv/pip-install.log)" >&2
            exit 1
        fi
        touch "$stamp"
    fi
    PY="$ROOT/.venv/bin/python"
}

bootstrap() {
    ensure_postgres
    ensure_venv
}
