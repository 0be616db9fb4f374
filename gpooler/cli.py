"""Command line: run the daemon, check a configuration, print the version."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gpooler import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpooler", description="Multi-tenant Postgres pooler")
    parser.add_argument(
        "-c", "--config", default=os.environ.get("GPOOLER_CONFIG"),
        help="YAML configuration file (default: $GPOOLER_CONFIG)",
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"gpooler {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.config:
        print("gpooler: no configuration file: use -c FILE or set GPOOLER_CONFIG", file=sys.stderr)
        return 2
    # Patch before anything opens a socket, so every blocking call yields to other clients.
    from gevent import monkey

    monkey.patch_all()
    from gpooler.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.check:
        print(f"{args.config}: configuration OK")
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.workers > 1:
        from gpooler.supervisor import Supervisor

        return Supervisor(args.config, config).run()
    from gpooler.daemon import Daemon

    return Daemon(args.config, config).run()
