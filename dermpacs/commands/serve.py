"""``dermpacs serve``: listener and worker in one process (the embedded default).

With ``broker.url`` empty the queue is a SQLite file under ``storage.root``: no Redis, and
with the default folder destination no PACS either. The worker runs in threads of this
process, so the models load once.
"""

from __future__ import annotations

import argparse
import logging

from dermpacs.commands.listen import quiet_libraries, start_intake
from dermpacs.config import ConfigError, Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="worker threads (default: queues.inference.concurrency + queues.dispatch.concurrency)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from workers.app import start_worker

    quiet_libraries(args.verbose)
    try:
        service = start_intake(settings, verbose=args.verbose)
    except ConfigError as exc:
        print(f"dermpacs serve: {exc}")
        return 2
    except OSError as exc:
        print(f"dermpacs serve: cannot start: {exc}")
        return 1
    queues = [settings.queues.inference.name, settings.queues.dispatch.name]
    concurrency = args.concurrency or (
        settings.queues.inference.concurrency + settings.queues.dispatch.concurrency
    )
    log.info(
        "serving: DICOM on %s:%d as %s, results to %s",
        settings.listener.host,
        service.port,
        settings.listener.ae_title,
        ", ".join(f"{d.name} ({d.kind})" for d in settings.destinations),
    )
    try:
        # Blocks until SIGTERM or SIGINT (Celery's warm shutdown), then the listener stops.
        return start_worker(
            queues=queues, concurrency=concurrency, pool="threads", verbose=args.verbose
        )
    finally:
        service.stop()
