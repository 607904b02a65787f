"""``dermpacs queues``: what waits in each queue, for how long, and who consumes it; and the
live changes of Celery's remote control (pause, resume, rate, pool)."""

from __future__ import annotations

import argparse
import json

from dermpacs.config import ConfigError, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Per queue: messages on the broker (Redis list lengths, or the embedded broker's rows), "
        "messages workers hold (Redis), jobs waiting by the job store and the oldest wait, "
        "throughput over five minutes, paused or rate-limited, and the workers consuming it. "
        "With an action, change the running workers through Celery's remote control (Redis "
        "broker only)."
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="do not ask the workers which queues they take (saves admin.inspect_timeout)",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: `dermpacs queues --json pause X` keeps the --json given before the action
        command.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
        )
        command.add_argument(
            "--worker",
            action="append",
            metavar="NAME",
            help="only this worker (its node name, as `dermpacs queues` lists; repeatable)",
        )
        return command

    pause = action(
        "pause",
        "stop every worker taking messages from QUEUE (running tasks finish); kept "
        "for workers that start later",
    )
    pause.add_argument("queue", help="queue name (or stage: inference, dispatch)")
    resume = action("resume", "let workers take messages from QUEUE again")
    resume.add_argument("queue", help="queue name (or stage: inference, dispatch)")
    rate = action(
        "rate",
        "set the rate limit of QUEUE's task in every worker; kept for workers that start later",
    )
    rate.add_argument("queue", help="queue name (or stage: inference, dispatch)")
    rate.add_argument("limit", help='Celery rate limit per worker ("10/m", "2/s"), or none')
    pool = action("pool", "add or stop pool processes in every worker (not kept)")
    pool.add_argument("direction", choices=["grow", "shrink"])
    pool.add_argument("processes", type=int, metavar="N")


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
    if args.action:
        return _control(args, settings)
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
            f"{'oldest':>7} {'backoff':>7} {'per min':>7} {'state':<7} {'rate':<7}  consumers"
        )
        for s in statuses:
            consumers = "unknown" if s.consumers is None else ", ".join(s.consumers) or "NONE"
            backoff = s.scheduled_jobs if s.stage == "dispatch" else None
            print(
                f"{s.name:<12} {s.stage:<9} {_cell(s.broker_depth):>6} {_cell(s.reserved):>5} "
                f"{s.waiting_jobs:>7} {_age(s.oldest_waiting_seconds):>7} {_cell(backoff):>7} "
                f"{s.done_per_minute:>7.1f} {'PAUSED' if s.paused else 'running':<7} "
                f"{s.rate_limit or '-':<7}  {consumers}"
            )
        errors = {s.broker_error for s in statuses if s.broker_error}
        for error in sorted(errors):
            print(f"broker unavailable: {error}")
    return 1 if any(s.broker_error for s in statuses) else 0


def _control(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.admin.control import (
        ControlResult,
        QueueControlUnavailable,
        resize_pool,
        set_paused,
        set_rate_limit,
    )
    from dermpacs.jobs.store import JobStore

    store = JobStore.from_settings(settings, actor="admin@cli")
    try:
        result: ControlResult
        if args.action in ("pause", "resume"):
            result = set_paused(
                settings,
                store,
                args.queue,
                args.action == "pause",
                actor="admin@cli",
                destination=args.worker,
            )
        elif args.action == "rate":
            result = set_rate_limit(
                settings, store, args.queue, args.limit, actor="admin@cli", destination=args.worker
            )
        else:
            result = resize_pool(
                settings,
                grow=args.direction == "grow",
                processes=args.processes,
                destination=args.worker,
            )
    except (ConfigError, QueueControlUnavailable) as exc:
        print(f"dermpacs queues {args.action}: {exc}")
        return 2
    except Exception as exc:  # the broker cannot be reached
        print(f"dermpacs queues {args.action}: broker unavailable: {type(exc).__name__}: {exc}")
        return 1
    finally:
        store.dispose()
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        what = f"{result.action} {result.target}" + (
            "" if result.value is None else f" {result.value}"
        )
        for worker, reply in sorted(result.replies.items()):
            print(f"{worker}: {reply.get('ok', '')}{reply.get('error', '')}")
        if not result.answered:
            kept = " (recorded: workers that start apply it)" if result.recorded else ""
            print(f"{what}: no worker answered{kept}")
        elif result.errors:
            print(f"{what}: {len(result.errors)} worker(s) refused")
        else:
            print(f"{what}: {len(result.replies)} worker(s) acknowledged")
    return 0 if result.answered and not result.errors else 1
