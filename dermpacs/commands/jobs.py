"""``dermpacs jobs``: list jobs, show one with its audit trail, retry failed or cancelled
ones, cancel unfinished ones."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from dermpacs.config import ConfigError, Settings
from dermpacs.jobs.models import JobState, utc_now

if TYPE_CHECKING:
    from dermpacs.jobs.store import JobStore

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="jobs, newest first")
    listing.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in JobState],
        help="only jobs in this state (repeatable)",
    )
    listing.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="SECONDS",
        help="only jobs unchanged for at least this long",
    )
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one job: identifiers, audit trail, outputs, deliveries")
    show.add_argument("job_id", type=int)
    show.add_argument("--json", action="store_true")
    retry = sub.add_parser("retry", help="start failed or cancelled jobs again")
    retry.add_argument("job_ids", type=int, nargs="+")
    retry.add_argument("--json", action="store_true")
    cancel = sub.add_parser(
        "cancel", help="stop unfinished jobs (received, queued, processing or results_ready)"
    )
    cancel.add_argument("job_ids", type=int, nargs="+")
    cancel.add_argument(
        "--reason", default="", help="why (written to the audit trail with your name)"
    )
    cancel.add_argument("--json", action="store_true")


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.jobs.store import JobStore, JobStoreError, UnknownJobError

    try:
        store = JobStore.from_settings(settings, actor=cli_actor())
    except ConfigError as exc:
        print(f"dermpacs jobs: {exc}")
        return 2
    try:
        if args.action == "list":
            before = (
                None if args.older_than is None else utc_now() - timedelta(seconds=args.older_than)
            )
            jobs = store.list_jobs(
                states=[JobState(s) for s in args.state] if args.state else None,
                updated_before=before,
                limit=args.limit,
            )
            if args.json:
                print(json.dumps([j.as_json() for j in jobs], indent=2))
                return 0
            print(
                f"{'id':>6}  {'state':<13} {'priority':<8} {'att':>3}  {'updated (UTC)':<19}  "
                f"{'caller':<16}  finding / last error"
            )
            for j in jobs:
                print(
                    f"{j.id:>6}  {j.state.value:<13} {j.priority:<8} {j.attempts:>3}  "
                    f"{j.updated_at:%Y-%m-%d %H:%M:%S}  {j.calling_ae_title:<16}  "
                    f"{j.finding or _short(j.last_error)}"
                )
            return 0
        if args.action == "show":
            try:
                detail = store.get(args.job_id)
            except UnknownJobError as exc:
                print(f"dermpacs jobs: {exc}")
                return 1
            if args.json:
                print(json.dumps(detail.as_json(), indent=2))
                return 0
            job = detail.job
            print(
                f"job {job.id}: {job.state.value} (attempts {job.attempts}, "
                f"priority {job.priority})"
            )
            for key in (
                "study_instance_uid",
                "series_instance_uid",
                "sop_instance_uid",
                "sop_class_uid",
                "transfer_syntax_uid",
                "calling_ae_title",
                "model_version",
                "finding",
                "last_error",
                "spool_path",
            ):
                print(f"  {key:<20} {getattr(job, key) or ''}")
            print("  audit trail:")
            for e in detail.events:
                before_state = e.from_state.value if e.from_state else "-"
                print(
                    f"    {e.at:%Y-%m-%d %H:%M:%S.%f}  {before_state:>13} -> "
                    f"{e.to_state.value:<13} {e.actor}: {e.reason}"
                )
            for o in detail.outputs:
                print(f"  output {o.kind.value:<8} {o.sop_instance_uid}  {o.path}")
            for d in detail.deliveries:
                print(
                    f"  delivery {d.destination}/{d.kind.value}: {d.state.value} "
                    f"(attempts {d.attempts}) {_short(d.last_error)}"
                )
            return 0
        if args.action == "cancel":
            return _cancel(store, args)
        # retry
        from dermpacs.jobs.store import RetryStage
        from workers.app import configure, publish_dispatch, publish_processing

        try:
            configure(settings)
        except ConfigError as exc:
            print(f"dermpacs jobs: {exc}")
            return 2
        failures = 0
        report = []
        for job_id in args.job_ids:
            try:
                stage = store.retry(job_id)
            except (JobStoreError, UnknownJobError) as exc:
                failures += 1
                report.append({"job_id": job_id, "retried": False, "error": str(exc)})
                continue
            published = True
            try:
                if stage is RetryStage.DISPATCH:
                    publish_dispatch(job_id)
                else:
                    publish_processing(job_id)
                    store.mark_queued([job_id], reason="re-published by an admin retry")
            except Exception:  # broker down: the reconciler publishes it later
                published = False
            report.append(
                {"job_id": job_id, "retried": True, "stage": stage.value, "published": published}
            )
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for r in report:
                if r["retried"]:
                    note = "" if r["published"] else " (broker down: published later)"
                    print(f"job {r['job_id']}: {r['stage']} again{note}")
                else:
                    print(f"job {r['job_id']}: {r['error']}")
        return 1 if failures else 0
    finally:
        store.dispose()


def cli_actor() -> str:
    """Who runs the command, for the audit trail (``admin@cli:<login>``)."""
    import getpass

    try:
        login = getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "admin@cli"
    return f"admin@cli:{login}"


def _cancel(store: JobStore, args: argparse.Namespace) -> int:
    from dermpacs.jobs.store import JobStoreError

    actor = store.actor
    report = []
    for job_id in args.job_ids:
        try:
            store.cancel(job_id, reason=args.reason)
        except JobStoreError as exc:  # unknown, or delivered / failed / cancelled already
            logger.warning("job %d not cancelled: %s", job_id, exc)
            report.append({"job_id": job_id, "cancelled": False, "error": str(exc)})
            continue
        logger.info("job %d cancelled by %s: %s", job_id, actor, args.reason or "no reason")
        report.append({"job_id": job_id, "cancelled": True})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in report:
            print(f"job {r['job_id']}: {'cancelled' if r['cancelled'] else r['error']}")
    return 0 if all(r["cancelled"] for r in report) else 1
