"""``dermpacs admin``: the admin web page, ``/metrics``, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys

from dermpacs.config import ConfigError, Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the admin web page (listener, queues, jobs, failures and retries, destinations, "
        "configuration), Prometheus /metrics and the /healthz and /readyz probes. Configured by "
        "[admin]; users and tokens must be configured there first."
    )
    parser.add_argument("--host", default=None, help="listen address (default: admin.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: admin.port)")
    parser.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password (prompt, or one line of standard input) and print the hash to "
        "put in [[admin.users]] password; serves nothing",
    )


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.hash_password:
        from dermpacs.admin.auth import hash_password

        try:
            print(hash_password(_read_password()))
        except ValueError as exc:
            print(f"dermpacs admin: {exc}", file=sys.stderr)
            return 2
        return 0

    import uvicorn

    from dermpacs.admin.app import create_app
    from dermpacs.commands.listen import quiet_libraries

    quiet_libraries(args.verbose)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"dermpacs admin: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.admin.host
    port = settings.admin.port if args.port is None else args.port
    log.info("admin page on http://%s:%d/", host, port)
    # One process: the metrics tally lives in memory; uvicorn handles SIGTERM and SIGINT.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="debug" if args.verbose else "info",
        access_log=args.verbose,
        proxy_headers=True,
        server_header=False,
    )
    return 0
