"""``dermpacs worker``: a Celery worker for the queues named in the configuration."""

from __future__ import annotations

import argparse
import logging

from dermpacs.config import ConfigError, Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queues",
        default="",
        help="comma-separated queue names (default: queues.inference.name and "
        "queues.dispatch.name)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="worker processes (default: the sum of the taken queues' concurrency)",
    )
    parser.add_argument(
        "--pool",
        choices=["prefork", "threads", "solo"],
        default="prefork",
        help="Celery pool (default prefork: one process per slot, models loaded in each)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.commands.listen import quiet_libraries
    from dermpacs.jobs.store import database_url
    from workers.app import configure, start_worker

    quiet_libraries(args.verbose)
    configured = {q.name: q for q in (settings.queues.inference, settings.queues.dispatch)}
    queues = [q for q in args.queues.split(",") if q] or list(configured)
    unknown = [q for q in queues if q not in configured]
    if unknown:
        print(
            f"dermpacs worker: unknown queue(s) {', '.join(unknown)}; configured: "
            f"{', '.join(configured)}"
        )
        return 2
    concurrency = args.concurrency or sum(configured[q].concurrency for q in queues)
    try:
        configure(settings)
        database_url(settings)  # a password file that cannot be read stops us here
    except ConfigError as exc:
        print(f"dermpacs worker: {exc}")
        return 2
    return start_worker(
        queues=queues, concurrency=concurrency, pool=args.pool, verbose=args.verbose
    )
