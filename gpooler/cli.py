"""Command line: run the daemon, check a configuration, print the version, import PgBouncer's."""

from __future__ import annotations

import argparse
import os
import sys

from gpooler import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpooler", description="Multi-tenant Postgres pooler",
        epilog="gpooler import-pgbouncer PGBOUNCER_INI [USERLIST_TXT]: print the gpooler YAML "
               "equivalent of a PgBouncer configuration",
    )
    parser.add_argument(
        "-c", "--config", default=os.environ.get("GPOOLER_CONFIG"),
        help="YAML configuration file (default: $GPOOLER_CONFIG)",
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"gpooler {__version__}")
    return parser


def _import_pgbouncer(argv: list[str]) -> int:
    """`gpooler import-pgbouncer`: YAML on stdout, what could not be translated on stderr."""
    parser = argparse.ArgumentParser(
        prog="gpooler import-pgbouncer",
        description="Print the gpooler YAML equivalent of a PgBouncer configuration on stdout, "
                    "and what could not be translated on stderr.",
    )
    parser.add_argument("ini", metavar="PGBOUNCER_INI", help="pgbouncer.ini")
    parser.add_argument("userlist", metavar="USERLIST_TXT", nargs="?",
                        help="userlist.txt (default: the ini's auth_file)")
    args = parser.parse_args(argv)
    import yaml

    from gpooler.pgbouncer_import import PgBouncerIniError, translate_files

    try:
        document, warnings = translate_files(args.ini, args.userlist)
    except PgBouncerIniError as exc:
        print(f"gpooler import-pgbouncer: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(f"# gpooler configuration translated from {args.ini} by gpooler "
                     f"import-pgbouncer {__version__}\n")
    sys.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    for warning in warnings:
        print(warning, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import-pgbouncer"]:
        return _import_pgbouncer(argv[1:])
    args = _parser().parse_args(argv)
    if not args.config:
        print("gpooler: no configuration file: use -c FILE or set GPOOLER_CONFIG", file=sys.stderr)
        return 2
    # Patch before anything opens a socket, so every blocking call yields to other clients.
    from gevent import monkey

    monkey.patch_all()
    from gpooler.config import ConfigError, load_config
    from gpooler.tls import TlsError, check_files

    try:
        config = load_config(args.config)
        check_files(config)
    except (ConfigError, TlsError) as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.check:
        print(f"{args.config}: configuration OK")
        return 0
    from gpooler import logs

    logs.setup(config)
    if config.workers > 1:
        from gpooler.supervisor import Supervisor

        return Supervisor(args.config, config).run()
    from gpooler.daemon import Daemon

    return Daemon(args.config, config).run()
