"""Who may talk to the listener, over real sockets on loopback; secrets from files.

* the IP allow-list closes a stranger's connection before any DICOM message is read;
* the called AE title must be ours; the calling AE allow-list is in test_intake_listener;
* DICOM over TLS (PS3.15 B.1) on a second port beside the plain one, with a certificate made
  in the test: server checked by the sender, client certificates required when configured,
  and a peer that connects and stays silent does not hold the acceptor;
* our own senders (dispatch, ``dermpacs send``) speak TLS to a TLS peer;
* passwords come from ``*_file`` keys or the environment, never from the repository.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dermpacs.config import ConfigError, IntakeSettings, ListenerSettings, Settings
from dermpacs.dispatch.scu import PeerAddress, TlsClient, send_instances
from dermpacs.intake import Spool
from dermpacs.intake.listener import Listener, host_allowed, parse_networks
from dermpacs.jobs import JobStore, make_engine
from dermpacs.jobs.store import database_url
from tests import services
from workers.app import broker_url, celery_config

REPO = Path(__file__).resolve().parents[1]


class SecureHarness:
    """A listener in this process with its own spool and job store."""

    def __init__(self, tmp_path: Path, **settings) -> None:
        self.store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
        self.store.create_schema()
        self.spool = Spool(tmp_path)
        self.settings = ListenerSettings(ae_title="DERMPACS", host="127.0.0.1", port=0, **settings)
        self.listener = Listener(
            self.settings,
            intake=IntakeSettings(),
            spool=self.spool,
            store=self.store,
            model_version="security-test",
            on_recorded=lambda job_id, level: None,
        )
        self.listener.start()

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.rglob("*.dcm"))

    def close(self) -> None:
        self.listener.shutdown()
        self.store.dispose()


def echo(port: int, *, called: str = "DERMPACS", calling: str = "CAMERA", tls=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)


def store_photo(port: int, photo: Path, *, tls=None) -> int | None:
    statuses = services.send_photos(port, [photo], tls=tls)
    return statuses[photo]


def client_context(tls: services.TlsFiles, *, ca: Path | None = None, cert: bool = False):
    context = ssl.create_default_context(cafile=str(ca or tls.ca))
    if cert:
        context.load_cert_chain(str(tls.client_certificate), str(tls.client_key))
    return context, "127.0.0.1"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> services.TlsFiles:
    return services.TlsFiles(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def photo(camera_template, tmp_path) -> Path:
    (path,) = services.clone_photos(camera_template, tmp_path / "camera", 1)
    return path


# --- who may connect -------------------------------------------------------------------------


def test_the_ip_allow_list_matches_addresses_networks_and_mapped_ipv4():
    networks = parse_networks(["10.1.2.0/24", "127.0.0.1", "::1"])
    assert host_allowed("10.1.2.77", networks) and host_allowed("127.0.0.1", networks)
    assert host_allowed("::ffff:10.1.2.3", networks) and host_allowed("::1", networks)
    assert not host_allowed("10.1.3.1", networks) and not host_allowed("not-an-ip", networks)
    assert host_allowed("192.0.2.1", ())  # no list: anyone
    with pytest.raises(ValueError, match="not an IP address"):
        ListenerSettings(allowed_hosts=["10.1.2.0/33"])


def test_a_host_outside_the_allow_list_is_disconnected_before_any_data(tmp_path, photo, caplog):
    harness = SecureHarness(tmp_path, allowed_hosts=["192.0.2.0/24"])
    try:
        with caplog.at_level(logging.WARNING, logger="dermpacs.intake.listener"):
            assoc = echo(harness.listener.port)
            assert not assoc.is_established and not assoc.is_rejected  # closed, not answered
            assert store_photo(harness.listener.port, photo) is None
        assert "127.0.0.1 refused: not in listener.allowed_hosts" in caplog.text
        assert harness.spooled() == [] and harness.store.list_jobs() == []
    finally:
        harness.close()
    allowed = SecureHarness(tmp_path / "allowed", allowed_hosts=["127.0.0.0/8"])
    try:
        assert store_photo(allowed.listener.port, photo) == 0x0000
    finally:
        allowed.close()


def test_an_association_to_another_called_ae_title_is_rejected(tmp_path, caplog):
    harness = SecureHarness(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="dermpacs.intake.listener"):
            assert echo(harness.listener.port, called="SOMEONE-ELSE").is_rejected
        assert "to SOMEONE-ELSE rejected: called AE title is not listener.ae_title" in caplog.text
        ours = echo(harness.listener.port)
        assert ours.is_established
        ours.release()
    finally:
        harness.close()
    lenient = SecureHarness(tmp_path / "lenient", require_called_aet=False)
    try:
        assoc = echo(lenient.listener.port, called="ANY-SCP")
        assert assoc.is_established
        assoc.release()
    finally:
        lenient.close()


# --- DICOM over TLS --------------------------------------------------------------------------


def test_plain_and_tls_listeners_side_by_side(tmp_path, tls, photo):
    harness = SecureHarness(
        tmp_path,
        tls_port=services.free_port(),
        tls_certificate=str(tls.server_certificate),
        tls_private_key=str(tls.server_key),
    )
    try:
        plain, secure = harness.listener.port, harness.listener.tls_port
        assert secure is not None and secure != plain
        assert store_photo(secure, photo, tls=client_context(tls)) == 0x0000
        assert store_photo(plain, photo) == 0x0000  # the same photo: a duplicate, success
        assert len(harness.store.list_jobs()) == 1
        # No TLS on the TLS port, TLS on the plain port, or a CA we do not trust: no talk.
        assert not echo(secure).is_established
        assert not echo(plain, tls=client_context(tls)).is_established
        assert not echo(secure, tls=client_context(tls, ca=tls.stranger_ca)).is_established
    finally:
        harness.close()


def test_a_silent_peer_on_the_tls_port_does_not_hold_the_others_up(tmp_path, tls):
    harness = SecureHarness(
        tmp_path,
        acse_timeout=30,
        tls_port=services.free_port(),
        tls_certificate=str(tls.server_certificate),
        tls_private_key=str(tls.server_key),
    )
    silent = socket.create_connection(("127.0.0.1", harness.listener.tls_port))
    try:
        started = time.monotonic()
        assoc = echo(harness.listener.tls_port, tls=client_context(tls))
        assert assoc.is_established and time.monotonic() - started < 5
        assoc.release()
    finally:
        silent.close()
        harness.close()


def test_client_certificates_are_required_when_a_ca_is_configured(tmp_path, tls, photo):
    harness = SecureHarness(
        tmp_path,
        tls_only=True,
        tls_port=services.free_port(),
        tls_certificate=str(tls.server_certificate),
        tls_private_key=str(tls.server_key),
        tls_ca_certificates=str(tls.ca),
    )
    try:
        port = harness.listener.tls_port
        assert harness.listener.port == port  # tls_only: no plain port
        assert not echo(port, tls=client_context(tls)).is_established  # no certificate
        assert store_photo(port, photo, tls=client_context(tls, cert=True)) == 0x0000
    finally:
        harness.close()


def test_tls_settings_are_checked_at_start():
    with pytest.raises(ValueError, match="tls_port needs tls_certificate"):
        ListenerSettings(tls_port=2762)
    with pytest.raises(ValueError, match="tls_only needs tls_port"):
        ListenerSettings(tls_only=True)


def test_our_senders_speak_tls_and_check_the_peer(tmp_path, tls, photo):
    harness = SecureHarness(
        tmp_path,
        tls_only=True,
        tls_port=services.free_port(),
        tls_certificate=str(tls.server_certificate),
        tls_private_key=str(tls.server_key),
    )
    try:
        port = harness.listener.tls_port
        peer = PeerAddress("DERMPACS", "127.0.0.1", port, "RESULTS", tls=TlsClient(str(tls.ca)))
        (result,) = send_instances([photo], peer)
        assert result.stored and "(TLS)" in peer.describe()
        stranger = PeerAddress(
            "DERMPACS", "127.0.0.1", port, "RESULTS", tls=TlsClient(str(tls.stranger_ca))
        )
        (refused,) = send_instances([photo], stranger)
        assert not refused.stored and refused.status is None
        # dermpacs send, as a person would try it
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "dermpacs.cli",
                "send",
                str(photo),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--aet",
                "DERMPACS",
                "--tls",
                "--tls-ca",
                str(tls.ca),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 of 1 stored by DERMPACS@127.0.0.1" in done.stdout and "(TLS)" in done.stdout
    finally:
        harness.close()


# --- secrets ---------------------------------------------------------------------------------


def test_passwords_come_from_files_and_are_url_quoted(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text("p@ss:w/rd%\n")
    secret.chmod(0o600)
    settings = Settings.model_validate(
        {
            "storage": {"root": str(tmp_path)},
            "broker": {"url": "redis://127.0.0.1:6390/2", "password_file": str(secret)},
            "database": {
                "url": "postgresql://dermpacs@db.example:5432/dermpacs",
                "password_file": str(secret),
            },
        }
    )
    assert broker_url(settings) == "redis://:p%40ss%3Aw%2Frd%25@127.0.0.1:6390/2"
    assert celery_config(settings)["broker_url"] == broker_url(settings)
    assert database_url(settings).password == "p@ss:w/rd%"
    missing = settings.model_copy(deep=True)
    missing.broker.password_file = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="broker.password_file: cannot read"):
        broker_url(missing)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    missing.broker.password_file = str(empty)
    with pytest.raises(ConfigError, match="broker.password_file: .* is empty"):
        broker_url(missing)


def test_rediss_urls_get_certificate_checks(tmp_path, tls):
    settings = Settings.model_validate(
        {
            "storage": {"root": str(tmp_path)},
            "broker": {"url": "rediss://127.0.0.1:6390/0", "tls_ca_certificates": str(tls.ca)},
        }
    )
    options = celery_config(settings)["broker_use_ssl"]
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED and options["ssl_check_hostname"]
    assert options["ssl_ca_certs"] == str(tls.ca)


def test_the_repository_configuration_holds_no_secret():
    from dermpacs.config import load_settings

    settings = load_settings(REPO / "config" / "dermpacs.toml", environ={})
    assert settings.broker.password_file == "" and settings.database.password_file == ""
    for url in (settings.broker.url, settings.database.url):
        assert "@" not in url  # no user:password@ in a URL
    assert settings.listener.tls_private_key == ""
    for destination in settings.destinations:
        assert destination.tls_private_key == ""
