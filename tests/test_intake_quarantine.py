"""The quarantine: refused data sets kept with their reason, bounded, never named by senders."""

from __future__ import annotations

import hashlib
import json
import logging

from dermpacs.intake import Quarantine, QuarantineRecord, Spool
from tests.test_intake_admission import photo
from tests.test_intake_listener import Harness


def record(reason: str = "bad", uid: str = "1.2.3") -> QuarantineRecord:
    return QuarantineRecord(stage="intake", status=0xC000, reason=reason, sop_instance_uid=uid)


def test_bytes_are_kept_with_their_reason_under_names_of_our_own(tmp_path):
    quarantine = Quarantine(tmp_path, max_bytes=2**20)
    kept = quarantine.keep(b"not dicom", record(uid="../../etc/passwd"))
    assert kept is not None and kept.read_bytes() == b"not dicom"
    assert kept.parent.parent == tmp_path / "quarantine" and ".." not in kept.name
    reason = json.loads(kept.with_suffix(".json").read_text())
    assert reason["status_hex"] == "0xC000" and reason["reason"] == "bad"
    assert reason["sop_instance_uid"] == "../../etc/passwd"  # in the JSON, as data only
    assert reason["sha256"] == hashlib.sha256(b"not dicom").hexdigest() and reason["size"] == 9
    assert [p for p, _ in quarantine.entries()] == [kept]
    assert not list((tmp_path / "quarantine").rglob("*.part"))


def test_the_quarantine_stops_keeping_at_its_bound(tmp_path, caplog):
    quarantine = Quarantine(tmp_path, max_bytes=100)
    assert quarantine.keep(b"x" * 60, record()) is not None
    with caplog.at_level(logging.WARNING, logger="dermpacs.intake.quarantine"):
        assert quarantine.keep(b"y" * 60, record()) is None
        assert quarantine.keep(b"z" * 60, record()) is None
    assert caplog.text.count("quarantine full") == 1
    assert quarantine.used_bytes() == 60
    # a restarted listener measures what is there
    assert Quarantine(tmp_path, max_bytes=100).used_bytes() == 60
    assert Quarantine(tmp_path, max_bytes=0).keep(b"a", record()) is None


def test_a_spool_file_is_set_aside_by_a_link(tmp_path):
    spool = Spool(tmp_path)
    path = spool.spool_received_instance(b"photo bytes", "1.2.3")
    kept = Quarantine(tmp_path, max_bytes=2**20).keep_file(path, record(reason="decoder said no"))
    assert kept is not None and kept.read_bytes() == b"photo bytes"
    assert kept.stat().st_ino == path.stat().st_ino  # the same blocks, no copy
    assert json.loads(kept.with_suffix(".json").read_text())["reason"] == "decoder said no"


def test_the_listener_keeps_what_it_refuses_but_not_what_a_full_disk_refuses(tmp_path):
    harness = Harness(tmp_path)
    quarantine = Quarantine(tmp_path, max_bytes=2**20)
    harness.listener.quarantine = quarantine
    try:
        short = photo(8, 10, pixel_bytes=60)
        (status,) = harness.send(short)
        assert status.Status == 0xC000
        ((kept, reason),) = quarantine.entries()
        assert reason["sop_instance_uid"] == short.SOPInstanceUID
        assert reason["calling_ae_title"] == "CAM1" and reason["peer_address"] == "127.0.0.1"
        assert reason["reason"].startswith(status.ErrorComment)  # the comment is cut at 64
        assert harness.listener.counters.quarantined == 1
        assert harness.spooled() == []
    finally:
        harness.close()
    full = Harness(tmp_path / "full", min_free_bytes=2**62)
    full.listener.quarantine = Quarantine(tmp_path / "full", max_bytes=2**20)
    try:
        (status,) = full.send(photo())
        assert status.Status == 0xA700
        assert full.listener.quarantine.entries() == []
    finally:
        full.close()
