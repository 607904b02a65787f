"""The admin web app through FastAPI's TestClient, against a real job store.

Every page, role and endpoint; the job store holds jobs in every state (moved there through
the store's own API), on SQLite and, where the SQL differs, on PostgreSQL too. Publishing a
retried job is recorded by the test's publishers, except in the test that publishes to the
real embedded broker and reads the queue depth back.
"""

from __future__ import annotations

import html
import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dermpacs.admin.app import create_app
from dermpacs.admin.auth import (
    AuthenticationRequired,
    Authenticator,
    Forbidden,
    Role,
    check_same_origin,
    hash_password,
    verify_password,
)
from dermpacs.admin.checks import check_destination, find_destination
from dermpacs.admin.metrics import AuditTrailTally, CumulativeHistogram
from dermpacs.admin.queues import inspect_queues, store_queue_view
from dermpacs.admin.redaction import MASK, effective_configuration, mask_url_credentials
from dermpacs.config import ConfigError, Settings
from dermpacs.dispatch.destinations import peer_address
from dermpacs.dispatch.scu import PeerAddress, SenderTimeouts, echo
from dermpacs.intake.refusals import RefusalLog
from dermpacs.jobs.models import JobEvent, JobState, utc_now
from dermpacs.jobs.store import JobStore, make_engine
from tests import services
from tests.test_admin_support import (
    ADMIN_TOKEN,
    BOSS,
    DB_PASSWORD,
    OVERLAY_LEFT,
    OVERLAY_RIGHT,
    READ_TOKEN,
    READER,
    PopulatedJobs,
    basic,
    bearer,
    instance,
    make_settings,
    populate_jobs,
    use_broker,
)


class Published:
    """Publishers that record what they were asked to publish (or fail, when told to)."""

    def __init__(self) -> None:
        self.processing: list[int] = []
        self.dispatch: list[int] = []
        self.broker_down = False

    def publish_processing(self, job_id: int) -> None:
        if self.broker_down:
            raise ConnectionError("broker down")
        self.processing.append(job_id)

    def publish_dispatch(self, job_id: int) -> None:
        if self.broker_down:
            raise ConnectionError("broker down")
        self.dispatch.append(job_id)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.sqlite3'}")


@pytest.fixture
def store(settings: Settings):
    store = JobStore.from_settings(settings, actor="test")
    yield store
    store.dispose()


@pytest.fixture
def jobs(store: JobStore, tmp_path: Path) -> PopulatedJobs:
    return populate_jobs(store, tmp_path / "storage")


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture
def client(settings: Settings, store: JobStore, jobs: PopulatedJobs, published: Published):
    app = create_app(
        settings,
        store=store,
        publish_processing=published.publish_processing,
        publish_dispatch=published.publish_dispatch,
    )
    with TestClient(app) as client:
        yield client


def metrics_of(text: str) -> dict[str, float]:
    """Samples of an exposition as ``name{label=value,...}`` -> value."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


# ---------------------------------------------------------------------------------------------
# Authentication and roles


PAGES = ["/", "/jobs", "/jobs?state=failed", "/destinations", "/config", "/metrics"]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_credentials(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic realm=")
    wrong = client.get(path, headers=basic((READER[0], "not-the-password")))
    assert wrong.status_code == 401
    assert client.get(path, headers=bearer("unknown-token-0123456789")).status_code == 401


@pytest.mark.parametrize("path", PAGES)
@pytest.mark.parametrize(
    "headers",
    [basic(READER), basic(BOSS), bearer(READ_TOKEN), bearer(ADMIN_TOKEN)],
    ids=["reader", "boss", "read-token", "admin-token"],
)
def test_every_page_opens_for_each_role(
    client: TestClient, path: str, headers: dict[str, str]
) -> None:
    response = client.get(path, headers=headers)
    assert response.status_code == 200, response.text


def test_probes_need_no_credentials(client: TestClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "checks": {"job_store": "ok", "broker": "ok"}}


def test_readyz_says_which_dependency_is_down(settings: Settings, tmp_path: Path) -> None:
    down = JobStore(make_engine(f"postgresql://nobody@127.0.0.1:{services.free_port()}/none"))
    broken = settings.model_copy(deep=True)
    broken.broker.url = f"redis://127.0.0.1:{services.free_port()}/0"
    app = create_app(broken, store=down, publish_processing=print, publish_dispatch=print)
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert "OperationalError" in checks["job_store"]
    assert checks["broker"] != "ok"


def test_read_role_cannot_act(client: TestClient, jobs: PopulatedJobs, store: JobStore) -> None:
    for headers in (basic(READER), bearer(READ_TOKEN)):
        response = client.post(f"/jobs/{jobs.failed_processing}/retry", headers=headers)
        assert response.status_code == 403
        assert "read role only" in response.text
        assert client.post("/destinations/outbox/test", headers=headers).status_code == 403
    assert store.get(jobs.failed_processing).job.state is JobState.FAILED
    page = client.get("/jobs?state=failed", headers=basic(READER)).text
    assert '/retry"' not in page and "Retrying needs the admin role" in page


def test_cross_site_posts_are_refused(
    client: TestClient, jobs: PopulatedJobs, store: JobStore, published: Published
) -> None:
    for extra in (
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "null"},
    ):
        response = client.post(
            f"/jobs/{jobs.failed_processing}/retry", headers={**basic(BOSS), **extra}
        )
        assert response.status_code == 403, extra
    assert store.get(jobs.failed_processing).job.state is JobState.FAILED
    assert published.processing == []
    # The page's own origin, as a browser sends it, is let through.
    same = client.post(
        f"/jobs/{jobs.failed_processing}/retry",
        headers={**basic(BOSS), "Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        follow_redirects=False,
    )
    assert same.status_code == 303


def test_no_credentials_configured_is_a_configuration_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'j.sqlite3'}")
    settings.admin.users = []
    settings.admin.tokens = []
    with pytest.raises(ConfigError, match=r"admin\.users"):
        create_app(settings, publish_processing=print, publish_dispatch=print)


def test_passwords_hash_and_verify() -> None:
    stored = hash_password("correct horse", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert hash_password("correct horse", iterations=1000) != stored  # salted
    assert verify_password("plain-text-pw", "plain-text-pw")
    assert not verify_password("x", "pbkdf2_sha256$broken")
    with pytest.raises(ValueError):
        hash_password("")


def test_authenticator_roles_and_schemes(settings: Settings) -> None:
    auth = Authenticator(settings.admin)
    assert auth.plain_text_users() == [READER[0]]
    boss = auth.authenticate(basic(BOSS)["Authorization"])
    assert (boss.name, boss.role, boss.method, boss.actor) == (
        "boss",
        Role.ADMIN,
        "basic",
        "admin:boss",
    )
    token = auth.authenticate(bearer(READ_TOKEN)["Authorization"])
    assert (token.name, token.role) == ("prometheus", Role.READ)
    for header in (None, "", "Basic !!!", "Basic " + "eA==", "Digest x", "Bearer "):
        with pytest.raises(AuthenticationRequired):
            auth.authenticate(header)
    # a verified password is remembered; a wrong one still fails afterwards
    assert auth.authenticate(basic(BOSS)["Authorization"]).name == "boss"
    with pytest.raises(AuthenticationRequired):
        auth.authenticate(basic((BOSS[0], "boss-password-2"))["Authorization"])


def test_same_origin_rule() -> None:
    check_same_origin("GET", {"origin": "http://evil.example", "host": "admin:8080"})
    check_same_origin("POST", {"host": "admin:8080"})  # a script: no browser headers
    check_same_origin("POST", {"origin": "http://admin:8080", "host": "admin:8080"})
    check_same_origin(
        "POST",
        {
            "origin": "https://dermpacs.example",
            "host": "10.0.0.5:8080",
            "x-forwarded-host": "dermpacs.example",
        },
    )
    with pytest.raises(Forbidden):
        check_same_origin("POST", {"origin": "http://admin:8081", "host": "admin:8080"})
    with pytest.raises(Forbidden):
        check_same_origin("POST", {"sec-fetch-site": "same-site", "host": "admin:8080"})


# ---------------------------------------------------------------------------------------------
# Pages


def test_overview_shows_listener_queues_states_and_recent_jobs(
    client: TestClient, jobs: PopulatedJobs, settings: Settings
) -> None:
    page = client.get("/", headers=basic(READER)).text
    # nothing listens on the configured listener port
    assert "not answering" in page
    assert f"127.0.0.1:{settings.listener.port}" in page
    for state in JobState:
        assert f"/jobs?state={state.value}" in page
    assert "inference" in page and "dispatch" in page
    for job_id in jobs.ids():
        assert f'href="/jobs/{job_id}"' in page
    assert "association with PACS@127.0.0.1:4242 rejected" in page
    assert "atopic_dermatitis" in page
    # patient data never reaches the page
    assert "Test^Patient" not in page


def test_overview_lists_recent_refusals(client: TestClient, store: JobStore) -> None:
    log = RefusalLog(store.engine)
    log.record(0xC000, "Pixel Data truncated", calling_ae_title="CAM9", sop_instance_uid="1.2.3.9")
    page = client.get("/", headers=basic(READER)).text
    assert "Recently refused" in page
    assert "0xC000 cannot understand" in page and "Pixel Data truncated" in page


def test_failed_jobs_page_lists_reasons_and_retry_buttons(
    client: TestClient, jobs: PopulatedJobs
) -> None:
    page = client.get("/jobs?state=failed", headers=basic(BOSS)).text
    assert "Failed jobs" in page
    assert "PhotographError[undecodable]: the JPEG stream ends early" in page
    assert "pacs/seg: association with PACS@127.0.0.1:4242 rejected" in page
    for job_id in (jobs.failed_processing, jobs.failed_delivery):
        assert f'action="/jobs/{job_id}/retry"' in page
    assert f'href="/jobs/{jobs.delivered}"' not in page
    assert page.count('class="retry"') == 2


def test_jobs_page_filters_by_state(client: TestClient, jobs: PopulatedJobs) -> None:
    page = client.get("/jobs?state=delivered", headers=basic(READER)).text
    assert f'href="/jobs/{jobs.delivered}"' in page
    assert f'href="/jobs/{jobs.queued}"' not in page
    assert client.get("/jobs?state=lost", headers=basic(READER)).text.count("Unknown state") >= 1


def test_job_page_shows_audit_trail_outputs_deliveries_and_overlay(
    client: TestClient, jobs: PopulatedJobs, store: JobStore
) -> None:
    page = client.get(f"/jobs/{jobs.failed_delivery}", headers=basic(READER)).text
    detail = store.get(jobs.failed_delivery)
    for event in detail.events:
        assert event.reason.split(":")[0] in page
    assert "stored by CAM6" in page and "results written" in page
    assert f'src="/jobs/{jobs.failed_delivery}/overlay.png"' in page
    assert page.count("<td>pacs</td>") == 3
    assert detail.job.sop_instance_uid in page
    assert "Retrying needs the admin role" in page
    assert client.get("/jobs/99999", headers=basic(READER)).status_code == 404
    no_results = client.get(f"/jobs/{jobs.queued}", headers=basic(READER)).text
    assert "No results yet" in no_results


def test_overlay_thumbnail_is_the_overlay_image(client: TestClient, jobs: PopulatedJobs) -> None:
    response = client.get(f"/jobs/{jobs.delivered}/overlay.png", headers=basic(READER))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content)).convert("RGB")
    assert image.size == (80, 60)  # smaller than the thumbnail size: kept
    assert image.getpixel((5, 30)) == OVERLAY_LEFT
    assert image.getpixel((75, 30)) == OVERLAY_RIGHT
    missing = client.get(f"/jobs/{jobs.queued}/overlay.png", headers=basic(READER))
    assert missing.status_code == 404
    assert client.get(f"/jobs/{jobs.delivered}/overlay.png").status_code == 401


def test_overlay_thumbnail_is_scaled_down(tmp_path: Path) -> None:
    from dermpacs.admin.thumbnails import ThumbnailError, overlay_thumbnail
    from tests.test_admin_support import write_overlay

    path = write_overlay(tmp_path / "big.dcm", rows=600, columns=1000)
    image = Image.open(io.BytesIO(overlay_thumbnail(path, long_side=200)))
    assert image.size == (200, 120)
    with pytest.raises(ThumbnailError):
        overlay_thumbnail(tmp_path / "missing.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(ThumbnailError):
        overlay_thumbnail(tmp_path / "junk.dcm")


def test_retry_of_a_failed_delivery_goes_back_to_dispatch(
    client: TestClient, jobs: PopulatedJobs, store: JobStore, published: Published
) -> None:
    response = client.post(
        f"/jobs/{jobs.failed_delivery}/retry", headers=basic(BOSS), follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/jobs/{jobs.failed_delivery}?notice=dispatch"
    assert published.dispatch == [jobs.failed_delivery] and published.processing == []
    detail = store.get(jobs.failed_delivery)
    assert detail.job.state is JobState.RESULTS_READY
    last = detail.events[-1]
    assert (last.from_state, last.to_state, last.actor) == (
        JobState.FAILED,
        JobState.RESULTS_READY,
        "admin:boss",
    )
    page = client.get(response.headers["location"], headers=basic(BOSS)).text
    assert "the results are being delivered again" in page


def test_retry_of_a_failed_processing_goes_back_to_the_queue(
    client: TestClient, jobs: PopulatedJobs, store: JobStore, published: Published
) -> None:
    response = client.post(f"/jobs/{jobs.failed_processing}/retry", headers=bearer(ADMIN_TOKEN))
    assert response.status_code == 200  # followed the redirect
    assert "queued for processing again" in response.text
    assert published.processing == [jobs.failed_processing]
    detail = store.get(jobs.failed_processing)
    assert detail.job.state is JobState.QUEUED
    assert [e.to_state for e in detail.events[-2:]] == [JobState.RECEIVED, JobState.QUEUED]
    assert detail.events[-2].actor == "admin:ops"


def test_retry_of_a_job_that_did_not_fail_changes_nothing(
    client: TestClient, jobs: PopulatedJobs, store: JobStore, published: Published
) -> None:
    before = store.get(jobs.delivered)
    response = client.post(f"/jobs/{jobs.delivered}/retry", headers=basic(BOSS))
    assert "Not retried: only failed or cancelled jobs can be retried" in response.text
    assert store.get(jobs.delivered) == before
    assert published.processing == published.dispatch == []


def test_an_admin_cancels_an_unfinished_job_with_a_reason(
    client: TestClient, jobs: PopulatedJobs, store: JobStore, published: Published
) -> None:
    page = client.get(f"/jobs/{jobs.queued}", headers=basic(BOSS)).text
    assert f'action="/jobs/{jobs.queued}/cancel"' in page and 'name="reason"' in page
    response = client.post(
        f"/jobs/{jobs.queued}/cancel",
        headers=basic(BOSS),
        data={"reason": "sent to dermpacs by mistake"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/jobs/{jobs.queued}?notice=cancelled"
    detail = store.get(jobs.queued)
    assert detail.job.state is JobState.CANCELLED
    last = detail.events[-1]
    assert (last.from_state, last.to_state, last.actor, last.reason) == (
        JobState.QUEUED,
        JobState.CANCELLED,
        "admin:boss",
        "cancelled: sent to dermpacs by mistake",
    )
    assert published.processing == published.dispatch == []
    page = client.get(response.headers["location"], headers=basic(BOSS)).text
    assert "Cancelled: no worker moves this job on" in page
    # now it can be retried (an admin's undo), and no longer cancelled
    assert f'action="/jobs/{jobs.queued}/retry"' in page
    assert f'action="/jobs/{jobs.queued}/cancel"' not in page
    listed = client.get("/jobs?state=cancelled", headers=basic(BOSS)).text
    assert f'data-job="{jobs.queued}"' in listed and f'data-job="{jobs.cancelled}"' in listed
    retried = client.post(f"/jobs/{jobs.queued}/retry", headers=basic(BOSS))
    assert "queued for processing again" in retried.text
    assert published.processing == [jobs.queued]
    assert store.get(jobs.queued).job.state is JobState.QUEUED


def test_cancel_of_a_finished_job_is_refused_and_changes_nothing(
    client: TestClient, jobs: PopulatedJobs, store: JobStore
) -> None:
    for job_id in (jobs.delivered, jobs.failed_processing, jobs.cancelled):
        before = store.get(job_id)
        page = client.get(f"/jobs/{job_id}", headers=basic(BOSS)).text
        assert f'action="/jobs/{job_id}/cancel"' not in page
        response = client.post(f"/jobs/{job_id}/cancel", headers=basic(BOSS), data={"reason": "x"})
        assert "Not cancelled: only a job that is not finished can be cancelled" in response.text
        assert store.get(job_id) == before
    response = client.post("/jobs/99999/cancel", headers=basic(BOSS))
    assert "Not cancelled" in response.text or response.status_code == 404


def test_read_role_cannot_cancel(client: TestClient, jobs: PopulatedJobs, store: JobStore) -> None:
    for headers in (basic(READER), bearer(READ_TOKEN)):
        response = client.post(f"/jobs/{jobs.processing}/cancel", headers=headers)
        assert response.status_code == 403
    cross = client.post(
        f"/jobs/{jobs.processing}/cancel", headers={**basic(BOSS), "Origin": "http://evil.example"}
    )
    assert cross.status_code == 403
    assert store.get(jobs.processing).job.state is JobState.PROCESSING
    page = client.get(f"/jobs/{jobs.processing}", headers=basic(READER)).text
    assert "/cancel" not in page and "Cancelling needs the admin role" in page


def test_retry_with_the_broker_down_keeps_the_job_for_the_reconciler(
    client: TestClient, jobs: PopulatedJobs, store: JobStore, published: Published
) -> None:
    published.broker_down = True
    response = client.post(f"/jobs/{jobs.failed_processing}/retry", headers=basic(BOSS))
    assert "broker is unavailable" in response.text
    # received: the listener's reconciler publishes it once the broker answers
    assert store.get(jobs.failed_processing).job.state is JobState.RECEIVED


def test_destinations_page_and_tests(
    client: TestClient, jobs: PopulatedJobs, settings: Settings, tmp_path: Path
) -> None:
    page = client.get("/destinations", headers=basic(BOSS)).text
    pacs = find_destination(settings, "pacs")
    assert f"PACS@127.0.0.1:{pacs.port}" in page
    assert (
        'action="/destinations/outbox/test"' in page and 'action="/destinations/pacs/test"' in page
    )
    # pacs: 3 objects delivered (job delivered), 3 pending (results ready), 3 failed
    row = page.split("<td>pacs</td>")[1].split("</tr>")[0]
    assert [c.split("<")[0] for c in row.split('class="num">')[1:]] == ["3", "3", "3"]
    ok = client.post("/destinations/outbox/test", headers=basic(BOSS)).text
    assert 'class="notice ok"' in ok and "writable" in ok
    assert (tmp_path / "storage" / "outbox").is_dir()
    down = client.post("/destinations/pacs/test", headers=basic(BOSS)).text
    assert 'class="notice bad"' in down and "no answer" in down
    assert client.post("/destinations/nowhere/test", headers=basic(BOSS)).status_code == 404
    assert (
        "Testing destinations needs the admin role"
        in client.get("/destinations", headers=basic(READER)).text
    )


def test_config_page_masks_every_secret(tmp_path: Path, published: Published) -> None:
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
        broker={"url": f"redis://:{DB_PASSWORD}@127.0.0.1:6379/0"},
    )
    store = JobStore.from_settings(settings)
    app = create_app(
        settings,
        store=store,
        publish_processing=published.publish_processing,
        publish_dispatch=published.publish_dispatch,
    )
    with TestClient(app) as client:
        page = html.unescape(client.get("/config", headers=basic(READER)).text)
    store.dispose()
    for secret in (DB_PASSWORD, READER[1], READ_TOKEN, ADMIN_TOKEN, BOSS[1], "pbkdf2_sha256$"):
        assert secret not in page
    assert f"redis://:{MASK}@127.0.0.1:6379/0" in page
    assert '"name": "reader"' in page and '"role": "admin"' in page
    assert '"ae_title": "DERMPACS"' in page


def test_masking_rules() -> None:
    assert mask_url_credentials("postgresql://dermpacs:pw@db:5432/x") == (
        f"postgresql://dermpacs:{MASK}@db:5432/x"
    )
    assert mask_url_credentials("redis://:pw@redis:6379/0") == f"redis://:{MASK}@redis:6379/0"
    assert mask_url_credentials("https://ghp_abc@host/x") == f"https://{MASK}@host/x"
    assert mask_url_credentials("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    settings = Settings.model_validate(
        {"database": {"url": "postgresql+psycopg2://u:p%40ss@db/dermpacs"}}
    )
    tree = effective_configuration(settings)
    assert tree["database"]["url"] == f"postgresql+psycopg2://u:{MASK}@db/dermpacs"
    assert tree["listener"]["port"] == 11112


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_count_what_the_job_store_holds(
    client: TestClient, jobs: PopulatedJobs, store: JobStore
) -> None:
    RefusalLog(store.engine).record(
        0xA700, "disk full", calling_ae_title="CAM1", sop_instance_uid="1.2.3"
    )
    response = client.get("/metrics", headers=bearer(READ_TOKEN))
    assert response.headers["content-type"].startswith("text/plain")
    m = metrics_of(response.text)
    assert m["dermpacs_job_store_up{}"] == 1
    assert m["dermpacs_photos_received_total{}"] == 8
    assert m["dermpacs_photos_processed_total{}"] == 3  # ready, delivered, failed delivery
    assert m["dermpacs_jobs_cancelled_total{}"] == 1
    assert m["dermpacs_photos_delivered_total{}"] == 1
    assert m["dermpacs_photos_failed_total{stage=processing}"] == 1
    assert m["dermpacs_photos_failed_total{stage=delivery}"] == 1
    for state in JobState:
        assert m[f"dermpacs_jobs{{state={state.value}}}"] == (2 if state is JobState.FAILED else 1)
    assert m["dermpacs_deliveries{destination=pacs,state=pending}"] == 3
    assert m["dermpacs_photos_refused_total{reason=out_of_resources,status=0xA700}"] == 1
    assert m["dermpacs_photos_refused_total{reason=cannot_understand,status=0xC000}"] == 0
    assert m["dermpacs_receive_to_delivered_seconds_count{}"] == 1
    assert m["dermpacs_receive_to_delivered_seconds_bucket{le=+Inf}"] == 1
    # every job that left a state was timed in that stage
    # (the cancelled job left received, but its time queued was cut short: not counted)
    assert m["dermpacs_stage_seconds_count{stage=publish}"] == 7
    assert m["dermpacs_stage_seconds_count{stage=queue}"] == 5
    assert m["dermpacs_stage_seconds_count{stage=processing}"] == 4
    assert m["dermpacs_stage_seconds_count{stage=delivery}"] == 2
    # queues (embedded broker: nothing published in this test) and the listener (not running)
    assert m["dermpacs_broker_up{}"] == 1
    assert m["dermpacs_queue_depth{queue=inference}"] == 0
    assert m["dermpacs_queue_waiting_jobs{queue=inference}"] == 2  # received and queued
    assert m["dermpacs_queue_waiting_jobs{queue=dispatch}"] == 1
    assert m["dermpacs_queue_oldest_waiting_seconds{queue=inference}"] >= 0
    assert m["dermpacs_listener_up{}"] == 0


def test_metrics_counters_grow_with_new_events_and_never_count_twice(
    client: TestClient, jobs: PopulatedJobs, store: JobStore
) -> None:
    first = metrics_of(client.get("/metrics", headers=bearer(READ_TOKEN)).text)
    again = metrics_of(client.get("/metrics", headers=bearer(READ_TOKEN)).text)
    assert again["dermpacs_photos_received_total{}"] == first["dermpacs_photos_received_total{}"]
    assert again["dermpacs_stage_seconds_count{stage=queue}"] == 5
    for row in store.claim_due_deliveries(jobs.results_ready, lease=timedelta(minutes=5)):
        store.record_delivery(row.id, delivered=True)
    store.settle_delivery(jobs.results_ready)
    after = metrics_of(client.get("/metrics", headers=bearer(READ_TOKEN)).text)
    assert after["dermpacs_photos_delivered_total{}"] == 2
    assert after["dermpacs_receive_to_delivered_seconds_count{}"] == 2
    assert after["dermpacs_stage_seconds_count{stage=delivery}"] == 3
    assert after["dermpacs_jobs{state=delivered}"] == 2


def test_metrics_report_a_job_store_that_is_down(settings: Settings) -> None:
    down = JobStore(make_engine(f"postgresql://nobody@127.0.0.1:{services.free_port()}/none"))
    app = create_app(
        settings,
        store=down,
        publish_processing=print,
        publish_dispatch=print,
        queue_probe=lambda ask: [],
    )
    with TestClient(app) as client:
        m = metrics_of(client.get("/metrics", headers=bearer(READ_TOKEN)).text)
    assert m["dermpacs_job_store_up{}"] == 0
    assert "dermpacs_photos_received_total{}" not in m


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = CumulativeHistogram((1, 5))
    for value in (0.5, 1.0, 3, 7):
        histogram.observe(value)
    assert histogram.buckets() == [("1.0", 2.0), ("5.0", 3.0), ("+Inf", 4.0)]
    assert histogram.total == 11.5


def test_tally_counts_a_late_committed_event_once(store: JobStore) -> None:
    """An event committed late with a lower id (PostgreSQL sequences) is still counted."""
    first = store.record_received(instance(1), model_version="m")
    tally = AuditTrailTally(store)
    assert tally.update() == 1 and tally.received == 1
    now = utc_now()
    with store._session() as session:  # rows as a concurrent writer would leave them
        session.add(
            JobEvent(
                id=50,
                job_id=first.job_id,
                at=now,
                from_state=JobState.RECEIVED,
                to_state=JobState.QUEUED,
                reason="published",
                actor="t",
            )
        )
        session.commit()
    assert tally.update() == 1
    with store._session() as session:  # lower id, committed after id 50 was read
        session.add(
            JobEvent(
                id=20,
                job_id=first.job_id,
                at=now,
                from_state=None,
                to_state=JobState.RECEIVED,
                reason="late",
                actor="t",
            )
        )
        session.commit()
    assert tally.update() == 1 and tally.received == 2
    assert tally.update() == 0 and tally.received == 2
    # once settled, old ids are not read again, and nothing is counted twice
    assert tally.update(now=now + timedelta(minutes=5)) == 0
    assert tally._watermark == 50 and not tally._counted_above
    assert tally.update() == 0 and tally.received == 2


# ---------------------------------------------------------------------------------------------
# Queues, checks and both databases


def test_store_queue_view_on_both_databases(database_url: str, tmp_path: Path) -> None:
    store = JobStore(make_engine(database_url), actor="test")
    store.create_schema()
    try:
        jobs = populate_jobs(store, tmp_path)
        view = store_queue_view(store)
        assert view["inference"]["waiting_jobs"] == 2
        assert view["dispatch"]["waiting_jobs"] == 1
        assert view["dispatch"]["scheduled_jobs"] == 0
        assert 0 <= view["inference"]["oldest_waiting_seconds"] < 60
        # processing -> results ready or failed, results ready -> delivered or failed
        assert view["inference"]["done_per_minute"] == pytest.approx(4 / 5)
        assert view["dispatch"]["done_per_minute"] == pytest.approx(2 / 5)
        tally = AuditTrailTally(store)
        tally.update()
        assert (tally.received, tally.processed, tally.delivered) == (8, 3, 1)
        assert tally.cancelled == 1
        assert (
            tally.stages["processing"].counts[-1] + sum(tally.stages["processing"].counts[:-1]) == 4
        )
        assert store.get(jobs.delivered).job.state is JobState.DELIVERED
        log = RefusalLog(store.engine)
        log.record(0x0122, "not a photo", calling_ae_title="CT1", sop_instance_uid="1.2")
        log.start()
        log.record(0x0122, "not a photo", calling_ae_title="CT1", sop_instance_uid="1.3")
        log.stop()
        assert log.counts_by_status() == {0x0122: 2}
        assert [r.sop_instance_uid for r in log.recent()] == ["1.3", "1.2"]
    finally:
        store.dispose()


def test_queue_depth_on_the_embedded_broker_counts_published_retries(
    settings: Settings, store: JobStore, jobs: PopulatedJobs
) -> None:
    from workers.app import publish_processing

    use_broker(settings)
    app = create_app(settings, store=store)  # the real publishers
    with TestClient(app) as client:
        client.post(f"/jobs/{jobs.failed_processing}/retry", headers=basic(BOSS))
    publish_processing(jobs.queued)  # another message, as the listener would publish
    statuses = {s.stage: s for s in inspect_queues(settings, store)}
    assert statuses["inference"].broker_depth == 2
    assert statuses["inference"].consumers is None  # the embedded broker cannot broadcast
    assert statuses["inference"].reserved is None
    assert statuses["dispatch"].broker_depth == 0
    assert statuses["inference"].broker_error is None


@pytest.mark.integration
def test_queue_depth_and_consumers_on_redis(
    tmp_path: Path, redis_url: str, store: JobStore, jobs: PopulatedJobs
) -> None:
    import uuid

    from workers.app import publish_dispatch, publish_processing

    suffix = uuid.uuid4().hex[:8]
    settings = make_settings(
        tmp_path,
        str(store.engine.url),
        broker={"url": redis_url},
        queues={
            "inference": {"name": f"inference-{suffix}"},
            "dispatch": {"name": f"dispatch-{suffix}"},
        },
    )
    use_broker(settings)
    try:
        for job_id in (jobs.received, jobs.queued, jobs.processing):
            publish_processing(job_id)
        publish_dispatch(jobs.results_ready)
        statuses = {s.stage: s for s in inspect_queues(settings, store)}
        assert statuses["inference"].broker_depth == 3
        assert statuses["dispatch"].broker_depth == 1
        assert statuses["inference"].reserved == 0
        assert statuses["inference"].consumers == []  # no worker takes these queues
    finally:
        services.delete_redis_keys(f"*{suffix}*")


def test_c_echo_and_destination_check_against_a_real_scp(settings: Settings) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    scp.require_calling_aet = [settings.dispatch.calling_ae_title]
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        settings.destinations[1].port = port
        check = check_destination(find_destination(settings, "pacs"), settings)
        assert check.ok and check.status == 0 and check.detail == "success", check
        stranger = echo(
            PeerAddress(ae_title="PACS", host="127.0.0.1", port=port, calling_ae_title="NOBODY"),
            SenderTimeouts(acse=2, dimse=2, network=2),
        )
        assert not stranger.ok and stranger.reachable and "rejected" in stranger.detail
    finally:
        server.shutdown()
    closed = check_destination(find_destination(settings, "pacs"), settings)
    assert not closed.ok and closed.status is None


def start_tls_scp(tls: services.TlsFiles) -> Any:
    """A Verification SCP on loopback that speaks TLS only and wants a client certificate
    from our CA."""
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    context.load_cert_chain(str(tls.server_certificate), str(tls.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    return scp.start_server(("127.0.0.1", 0), block=False, ssl_context=context)


def test_c_echo_of_a_tls_destination_uses_its_tls_settings_as_delivery_does(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    from dermpacs.dispatch.destinations import open_destination

    tls = services.TlsFiles(tmp_path / "tls")
    server = start_tls_scp(tls)
    try:
        pacs = find_destination(settings, "pacs")
        pacs.port = server.server_address[1]
        plain = check_destination(pacs, settings)
        assert not plain.ok and plain.status is None  # a plain association to a TLS port
        pacs.tls = True
        pacs.tls_ca_certificates = str(tls.ca)
        pacs.tls_certificate = str(tls.client_certificate)
        pacs.tls_private_key = str(tls.client_key)
        check = check_destination(pacs, settings)
        assert check.ok and check.status == 0, check
        assert check.address == f"PACS@127.0.0.1:{pacs.port} (TLS)"
        # the delivery sender is built from the very same peer
        sender = open_destination(
            pacs, storage_root=Path(settings.storage.root), dispatch=settings.dispatch
        )
        assert getattr(sender, "peer", None) == peer_address(pacs, settings.dispatch)
        # the admin page's C-ECHO button
        page = client.post("/destinations/pacs/test", headers=basic(BOSS)).text
        assert 'class="notice ok" id="check-result"' in page and "(TLS)" in page
        assert "success" in page
        # a CA that did not sign the PACS certificate, or no client certificate: refused
        pacs.tls_ca_certificates = str(tls.stranger_ca)
        wrong_ca = check_destination(pacs, settings)
        assert not wrong_ca.ok and "TLS handshake" in wrong_ca.detail
        pacs.tls_ca_certificates = str(tls.ca)
        pacs.tls_certificate = pacs.tls_private_key = ""
        assert not check_destination(pacs, settings).ok
        pacs.tls_certificate = str(tmp_path / "missing.pem")
        unreadable = check_destination(pacs, settings)
        assert not unreadable.ok and unreadable.detail.startswith("cannot associate")
    finally:
        server.shutdown()


def test_destination_check_of_a_folder_that_cannot_be_written(
    settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    settings.destinations[0].path = str(blocker / "outbox")
    check = check_destination(settings.destinations[0], settings)
    assert not check.ok and "cannot write" in check.detail


@pytest.mark.integration
def test_queue_view_reads_a_password_protected_tls_redis_as_the_workers_do(
    tmp_path: Path, store: JobStore
) -> None:
    import json
    import secrets
    import shutil

    from dermpacs.admin.queues import redis_reserved

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make tools)")
    tls = services.TlsFiles(tmp_path / "tls")
    password = secrets.token_urlsafe(16)
    password_file = tmp_path / "redis-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    redis = services.RedisServer(tmp_path / "redis", password=password, tls=tls.server).start()
    try:
        client = redis.client()
        # what kombu keeps for a message a worker holds: [message, exchange, routing key]
        client.hset("unacked", "tag-1", json.dumps([{"body": ""}, "inference", "inference"]))
        client.hset("unacked", "tag-2", json.dumps([{"body": ""}, "dispatch", "dispatch"]))
        client.hset("unacked", "tag-3", json.dumps([{"body": ""}, "inference", "inference"]))
        client.rpush("inference", "message")
        client.close()
        settings = make_settings(
            tmp_path,
            str(store.engine.url),
            broker={
                "url": redis.url,
                "password_file": str(password_file),
                "tls_ca_certificates": str(tls.ca),
            },
        )
        assert redis_reserved(settings, ["inference", "dispatch"]) == {
            "inference": 2,
            "dispatch": 1,
        }
        statuses = {s.stage: s for s in inspect_queues(settings, store, ask_workers=False)}
        assert statuses["inference"].broker_error is None
        assert (statuses["inference"].broker_depth, statuses["inference"].reserved) == (1, 2)
        assert statuses["dispatch"].reserved == 1
        # without the password file, Redis refuses (the URL alone is not enough)
        anonymous = settings.model_copy(deep=True)
        anonymous.broker.password_file = ""
        with pytest.raises(Exception, match="(?i)auth"):
            redis_reserved(anonymous, ["inference"])
    finally:
        redis.stop()
