"""``dermpacs queues``: what waits in each queue, for how long, and who consumes it."""

from __future__ import annotations

import argparse
import json

from dermpacs.config import ConfigError, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Per queue: messages on the broker (Redis list lengths, or the embedded broker's rows), "
        "messages workers hold (Redis), jobs waiting by the job store and the oldest wait, "
        "throughput over five minutes, and the workers consuming it."
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="do not ask the workers which queues they take (saves admin.inspect_timeout)",
    )


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.admin.queues import inspect_queues
    from dermpacs.jobs.store import JobStore

    store = JobStore.from_settings(settings, actor="admin@cli")
    try:
        statuses = inspect_queues(settings, store, ask_workers=not args.no_workers)
    except ConfigError as exc:
        print(f"dermpacs queues: {exc}")
        return 2
    finally:
        store.dispose()
    if args.json:
        print(json.dumps([s.as_json() for s in statuses], indent=2))
    else:
        print(
            f"{'queue':<12} {'stage':<9} {'broker':>6} {'held':>5} {'waiting':>7} "
            f"{'oldest':>7} {'backoff':>7} {'per min':>7}  consumers"
        )
        for s in statuses:
            consumers = "unknown" if s.consumers is None else ", ".join(s.consumers) or "NONE"
            backoff = s.scheduled_jobs if s.stage == "dispatch" else None
            print(
                f"{s.name:<12} {s.stage:<9} {_cell(s.broker_depth):>6} {_cell(s.reserved):>5} "
                f"{s.waiting_jobs:>7} {_age(s.oldest_waiting_seconds):>7} {_cell(backoff):>7} "
                f"{s.done_per_minute:>7.1f}  {consumers}"
            )
        errors = {s.broker_error for s in statuses if s.broker_error}
        for error in sorted(errors):
            print(f"broker unavailable: {error}")
    return 1 if any(s.broker_error for s in statuses) else 0
