"""The admin web app: server-rendered pages, ``/metrics``, ``/healthz`` and ``/readyz``.

Pages (role ``read``): ``/`` overview (listener, queues, jobs per state, recent jobs and
refusals), ``/jobs`` (filter by state; ``?state=failed`` lists failures with their reasons),
``/jobs/{id}`` (audit trail, outputs, deliveries, overlay thumbnail), ``/destinations``,
``/config`` (the effective configuration, secrets masked) and ``/metrics``. Actions (role
``admin``, POST from the page's own origin only): ``/jobs/{id}/retry``, ``/jobs/{id}/cancel``,
``/destinations/{name}/test`` and ``/queues/{name}/pause|resume|rate`` (Celery remote
control, :mod:`dermpacs.admin.control`). ``/healthz`` and ``/readyz`` need no credentials
(probes).

:func:`create_app` builds the app from the settings; its collaborators (job store,
publishers, probes) can be handed in, which the tests do to count what was published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from dermpacs import __version__
from dermpacs.admin.actions import Publish, cancel_job, retry_failed_job
from dermpacs.admin.auth import (
    AuthenticationRequired,
    Authenticator,
    Forbidden,
    Principal,
    Role,
    check_same_origin,
    require_role,
)
from dermpacs.admin.checks import (
    DestinationCheck,
    EchoResult,
    Readiness,
    check_destination,
    find_destination,
    listener_address,
    probe_listener,
    readiness,
)
from dermpacs.admin.metrics import JobStoreCollector
from dermpacs.admin.queues import QueueStatus, inspect_queues
from dermpacs.admin.redaction import effective_configuration
from dermpacs.admin.thumbnails import ThumbnailError, overlay_thumbnail
from dermpacs.config import ConfigError, Destination, Settings
from dermpacs.intake.refusals import RefusalLog
from dermpacs.jobs.models import (
    CANCELLABLE_STATES,
    RETRYABLE_STATES,
    JobState,
    ResultKind,
    utc_now,
)
from dermpacs.jobs.store import JobStore, UnknownJobError

logger = logging.getLogger(__name__)

REALM = "dermpacs admin"

# Notices shown after a retry or a cancel (the redirect carries a code, never free text).
RETRY_NOTICES = {
    "processing": "Retried: the job is queued for processing again.",
    "dispatch": "Retried: the results are being delivered again.",
    "unpublished": "Retried, but the broker is unavailable: the job is published when it returns.",
    "refused": "Not retried: only failed or cancelled jobs can be retried.",
    "cancelled": "Cancelled: no worker moves this job on; Retry starts it again.",
    "cancel-refused": "Not cancelled: only a job that is not finished can be cancelled.",
}
GOOD_NOTICES = {"processing", "dispatch", "cancelled"}
# Longest cancel reason kept in the audit trail (a form field).
MAX_REASON_LENGTH = 500
# Notices shown after a queue action on the overview (again a code, never free text).
QUEUE_NOTICES = {
    "paused": "Paused: workers stop taking from the queue; running tasks finish.",
    "resumed": "Resumed: workers take from the queue again.",
    "rate": "Rate limit set in the workers.",
    "no-workers": "Recorded, but no worker answered: workers apply it when they start.",
    "worker-error": "A worker refused the change; see its log.",
    "bad-rate": 'Not a rate limit: give a number per second, or per s, m or h ("10/m"), or none.',
    "unavailable": "Queue control needs the Redis broker: the embedded broker cannot reach "
    "workers in other processes.",
    "broker-down": "The broker is unavailable: nothing was changed in the workers.",
}


@dataclass
class AdminServices:
    """What the pages use; each can be replaced (tests, or a different deployment)."""

    settings: Settings
    store: JobStore
    refusals: RefusalLog
    authenticator: Authenticator
    publish_processing: Publish
    publish_dispatch: Publish
    queue_probe: Callable[[bool], list[QueueStatus]]
    listener_probe: Callable[[], EchoResult]
    destination_check: Callable[[Destination], DestinationCheck]
    readiness_probe: Callable[[], Readiness]


def signed_in(request: Request) -> Principal:
    """The principal the request's credentials prove (dependency of every page)."""
    services: AdminServices = request.app.state.services
    principal = services.authenticator.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


def admin_action(request: Request) -> Principal:
    """An admin, posting from the page's own origin (dependency of every action)."""
    principal = signed_in(request)
    require_role(principal, Role.ADMIN)
    check_same_origin(request.method, request.headers)
    return principal


Reader = Annotated[Principal, Depends(signed_in)]
Admin = Annotated[Principal, Depends(admin_action)]


def _default_publishers(settings: Settings) -> tuple[Publish, Publish]:
    from workers.app import configure, publish_dispatch, publish_processing

    configure(settings)
    return publish_processing, publish_dispatch


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=PackageLoader("dermpacs.admin", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _format_when
    env.filters["age"] = _format_age
    env.filters["seconds"] = _format_seconds
    return Jinja2Templates(env=env)


def _format_when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _format_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


def _format_age(value: datetime | None) -> str:
    if value is None:
        return ""
    return _format_seconds(max(0.0, (utc_now() - value).total_seconds())) + " ago"


def create_app(
    settings: Settings,
    *,
    store: JobStore | None = None,
    publish_processing: Publish | None = None,
    publish_dispatch: Publish | None = None,
    queue_probe: Callable[[bool], list[QueueStatus]] | None = None,
    listener_probe: Callable[[], EchoResult] | None = None,
    destination_check: Callable[[Destination], DestinationCheck] | None = None,
    readiness_probe: Callable[[], Readiness] | None = None,
) -> FastAPI:
    """Build the admin app for ``settings``.

    Parameters
    ----------
    settings
        The configuration; ``[admin]`` must name at least one user or token.
    store
        The job store (default: the configured one).
    publish_processing, publish_dispatch
        How a retried job's task reaches the broker (default: the Celery app's publishers).
    queue_probe, listener_probe, destination_check, readiness_probe
        Replace the live checks (default: :mod:`dermpacs.admin.queues` and
        :mod:`dermpacs.admin.checks` against the configured broker and peers).

    Raises
    ------
    ConfigError
        No one could sign in.
    """
    authenticator = Authenticator(settings.admin)
    if not authenticator.configured:
        raise ConfigError(
            "admin: no [[admin.users]] or [[admin.tokens]] are configured, so no one could sign "
            "in (docs/operations.md shows how to add them)"
        )
    for name in authenticator.plain_text_users():
        logger.warning(
            "admin.users %r: the password is stored as plain text; store a hash from "
            "`dermpacs admin --hash-password` instead",
            name,
        )
    store = store or JobStore.from_settings(settings, actor="admin")
    if publish_processing is None or publish_dispatch is None:
        default_processing, default_dispatch = _default_publishers(settings)
        publish_processing = publish_processing or default_processing
        publish_dispatch = publish_dispatch or default_dispatch
    services = AdminServices(
        settings=settings,
        store=store,
        refusals=RefusalLog(store.engine),
        authenticator=authenticator,
        publish_processing=publish_processing,
        publish_dispatch=publish_dispatch,
        queue_probe=queue_probe
        or (lambda ask_workers: inspect_queues(settings, store, ask_workers=ask_workers)),
        listener_probe=listener_probe or (lambda: probe_listener(settings)),
        destination_check=destination_check or (lambda d: check_destination(d, settings)),
        readiness_probe=readiness_probe or (lambda: readiness(settings, store)),
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        JobStoreCollector(
            store,
            refusal_counts=services.refusals.counts_by_status,
            queue_probe=lambda: services.queue_probe(False),
            listener_probe=services.listener_probe,
        )
    )
    ProcessCollector(registry=registry)
    templates = _templates()

    app = FastAPI(title="dermpacs admin", version=__version__, docs_url=None, redoc_url=None)
    app.state.services = services
    app.mount("/static", StaticFiles(packages=[("dermpacs.admin", "static")]), name="static")

    @app.exception_handler(AuthenticationRequired)
    async def _unauthenticated(request: Request, exc: AuthenticationRequired) -> Response:
        return templates.TemplateResponse(
            request,
            "error.html",
            {"title": "Sign in required", "message": str(exc), "principal": None},
            status_code=401,
            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
        )

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return templates.TemplateResponse(
            request,
            "error.html",
            {
                "title": "Not allowed",
                "message": str(exc),
                "principal": getattr(request.state, "principal", None),
            },
            status_code=403,
        )

    def page(request: Request, name: str, principal: Principal, **context: Any) -> Response:
        context.update(
            principal=principal,
            can_act=principal.role >= Role.ADMIN,
            settings=settings,
            version=__version__,
            now=utc_now(),
        )
        return templates.TemplateResponse(request, name, context)

    # -- probes ---------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        """The process answers (liveness)."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        """The job store and the broker answer (readiness)."""
        result = services.readiness_probe()
        return JSONResponse(result.as_json(), status_code=200 if result.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics(_principal: Reader) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- pages ----------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, principal: Reader, queue_notice: str | None = None) -> Response:
        jobs = store.list_jobs(limit=settings.admin.recent_jobs)
        last_received = store.list_jobs(limit=1)
        return page(
            request,
            "overview.html",
            principal,
            listener=services.listener_probe(),
            listener_at="{}:{}".format(*listener_address(settings)),
            last_received=last_received[0].created_at if last_received else None,
            counts=store.counts_by_state(),
            queues=services.queue_probe(True),
            jobs=jobs,
            refusals=services.refusals.recent(10),
            queue_notice=QUEUE_NOTICES.get(queue_notice or ""),
            queue_notice_ok=queue_notice in {"paused", "resumed", "rate"},
        )

    @app.post("/queues/{name}/{action}")
    async def queue_action(request: Request, name: str, action: str, principal: Admin) -> Response:
        """Pause, resume or rate-limit a queue in the running workers."""
        from dermpacs.admin.control import (
            ControlResult,
            QueueControlUnavailable,
            set_paused,
            set_rate_limit,
        )

        if action not in ("pause", "resume", "rate"):
            return _not_found(request, principal, f"There is no queue action {action!r}.")
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        result: ControlResult
        try:
            if action == "rate":
                limit = (form.get("limit") or [""])[0]
                result = set_rate_limit(settings, store, name, limit, actor=principal.actor)
            else:
                result = set_paused(settings, store, name, action == "pause", actor=principal.actor)
        except QueueControlUnavailable:
            notice = "unavailable"
        except ConfigError as exc:
            if "no queue" in str(exc):
                return _not_found(request, principal, f"There is no queue {name!r}.")
            notice = "bad-rate"
        except Exception as exc:
            logger.warning("queue %s %s by %s failed: %s", name, action, principal.actor, exc)
            notice = "broker-down"
        else:
            if not result.answered:
                notice = "no-workers"
            elif result.errors:
                notice = "worker-error"
            else:
                notice = {"pause": "paused", "resume": "resumed", "rate": "rate"}[action]
        return RedirectResponse(f"/?queue_notice={notice}#queues", status_code=303)

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs_page(
        request: Request, principal: Reader, state: str | None = None, limit: int = 100
    ) -> Response:
        chosen = None
        if state:
            try:
                chosen = JobState(state)
            except ValueError:
                return page(request, "error.html", principal, title="Unknown state", message=state)
        listed = store.list_jobs(
            states=None if chosen is None else [chosen], limit=max(1, min(limit, 1000))
        )
        return page(
            request,
            "jobs.html",
            principal,
            jobs=listed,
            state=chosen,
            states=list(JobState),
            counts=store.counts_by_state(),
        )

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(
        request: Request, principal: Reader, job_id: int, notice: str | None = None
    ) -> Response:
        try:
            detail = store.get(job_id)
        except UnknownJobError:
            return _not_found(request, principal, f"There is no job {job_id}.")
        overlay = next((o for o in detail.outputs if o.kind is ResultKind.OVERLAY), None)
        return page(
            request,
            "job.html",
            principal,
            detail=detail,
            job=detail.job,
            overlay=overlay,
            notice=RETRY_NOTICES.get(notice or ""),
            notice_ok=notice in GOOD_NOTICES,
            retryable=detail.job.state in RETRYABLE_STATES,
            cancellable=detail.job.state in CANCELLABLE_STATES,
        )

    @app.get("/jobs/{job_id}/overlay.png")
    def job_overlay(job_id: int, _principal: Reader) -> Response:
        try:
            detail = store.get(job_id)
        except UnknownJobError:
            return Response(status_code=404)
        overlay = next((o for o in detail.outputs if o.kind is ResultKind.OVERLAY), None)
        if overlay is None:
            return Response("no overlay for this job", status_code=404, media_type="text/plain")
        try:
            png = overlay_thumbnail(overlay.path)
        except ThumbnailError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private"})

    @app.post("/jobs/{job_id}/retry")
    def job_retry(job_id: int, principal: Admin) -> Response:
        result = retry_failed_job(
            store,
            job_id,
            actor=principal.actor,
            publish_processing=services.publish_processing,
            publish_dispatch=services.publish_dispatch,
        )
        if not result.retried:
            notice = "refused"
        elif not result.published:
            notice = "unpublished"
        else:
            notice = str(result.stage)
        return RedirectResponse(f"/jobs/{job_id}?notice={notice}", status_code=303)

    @app.post("/jobs/{job_id}/cancel")
    async def job_cancel(request: Request, job_id: int, principal: Admin) -> Response:
        # The page's form is url-encoded (python-multipart, which FastAPI's Form needs, is
        # not a dependency for one field).
        fields = parse_qs((await request.body()).decode("utf-8", "replace"))
        reason = (fields.get("reason") or [""])[0].strip()[:MAX_REASON_LENGTH]
        result = cancel_job(store, job_id, actor=principal.actor, reason=reason)
        notice = "cancelled" if result.cancelled else "cancel-refused"
        return RedirectResponse(f"/jobs/{job_id}?notice={notice}", status_code=303)

    def destinations_page(
        request: Request, principal: Principal, check: DestinationCheck | None = None
    ) -> Response:
        return page(
            request,
            "destinations.html",
            principal,
            destinations=settings.destinations,
            delivery_counts=_delivery_counts(store),
            check=check,
        )

    @app.get("/destinations", response_class=HTMLResponse)
    def destinations(request: Request, principal: Reader) -> Response:
        return destinations_page(request, principal)

    @app.post("/destinations/{name}/test", response_class=HTMLResponse)
    def destination_test(request: Request, name: str, principal: Admin) -> Response:
        try:
            destination = find_destination(settings, name)
        except KeyError:
            return _not_found(request, principal, f"There is no destination {name!r}.")
        check = services.destination_check(destination)
        logger.info(
            "destination %s tested by %s: %s (%s)",
            name,
            principal.actor,
            "ok" if check.ok else "failed",
            check.detail,
        )
        return destinations_page(request, principal, check)

    @app.get("/config", response_class=HTMLResponse)
    def config_page(request: Request, principal: Reader) -> Response:
        import json

        tree = effective_configuration(settings)
        return page(
            request, "config.html", principal, config_json=json.dumps(tree, indent=2), tree=tree
        )

    def _not_found(request: Request, principal: Principal, message: str) -> Response:
        response = page(request, "error.html", principal, title="Not found", message=message)
        response.status_code = 404
        return response

    return app


def _delivery_counts(store: JobStore) -> dict[str, dict[str, int]]:
    """Result objects per destination and delivery state."""
    from sqlalchemy import func, select

    from dermpacs.jobs.models import Delivery

    counts: dict[str, dict[str, int]] = {}
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(
                Delivery.destination, Delivery.state
            )
        ).all()
    for destination, state, count in rows:
        counts.setdefault(destination, {})[getattr(state, "value", str(state))] = int(count)
    return counts
