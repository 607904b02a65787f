"""The disk fills: C-STOREs are refused with 0xA700, nothing half-written stays, intake
resumes when space returns.

* Past the watermark (portable, no privileges): ``storage.min_free_mb`` is set 1.5 GiB below
  the free space of the test's file system, then a 3 GiB ballast file (``posix_fallocate``,
  real blocks) takes free space 1.5 GiB below it. The listener measures free space on every
  C-STORE, so nothing is faked: it sees the disk as it is.
* A disk that is really full (root only, a 4 MiB tmpfs as the storage root, no watermark):
  the spool write fails with ENOSPC part-way, and the partial file is removed.

In both, the refused photos leave no spool file, no partial file, no job and no quarantine
entry, and the same photos are taken as soon as space returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests import services
from tests.photos import make_img2dcm_photo, skin_photo_rgb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GIB = 2**30
MIB = 2**20


def spool_state(root: Path) -> tuple[list[Path], list[Path]]:
    """The spool's complete files and the partial files left in ``.incoming``."""
    spool = root / "spool"
    complete = sorted(p for p in spool.rglob("*.dcm"))
    partial = sorted((spool / ".incoming").glob("*"))
    return complete, partial


def quarantined(root: Path) -> list[Path]:
    return sorted((root / "quarantine").rglob("*.dcm"))


def listener_stack(tmp_path: Path, plumbing_model: dict, **storage) -> services.Stack:
    return services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url="",
        broker=None,  # embedded: the listener alone, no worker needed to see intake
        destinations=[{"name": "outbox", "kind": "folder", "path": "outbox"}],
        overrides={"storage": storage},
    )


def test_past_the_free_space_watermark_c_stores_are_refused_until_space_returns(
    tmp_path, plumbing_model, camera_template
):
    free = shutil.disk_usage(tmp_path).free
    if free < 4 * GIB:
        pytest.skip(f"needs 4 GiB free on {tmp_path}, has {free // MIB} MiB")
    watermark_mb = (free - GIB - GIB // 2) // MIB
    first, *refused_photos = services.clone_photos(camera_template, tmp_path / "camera", 4)
    stack = listener_stack(
        tmp_path, plumbing_model, root=str(tmp_path / "var"), min_free_mb=watermark_mb
    )
    ballast = tmp_path / "ballast"
    try:
        listener = stack.start_listener()
        assert services.send_photos(stack.port, [first]) == {first: 0x0000}

        with open(ballast, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, 3 * GIB)
        full_free = shutil.disk_usage(tmp_path).free
        assert full_free < watermark_mb * MIB, "the ballast did not take the space"
        refused = services.send_photos(stack.port, refused_photos)
        assert set(refused.values()) == {0xA700}, refused
        log = listener.log()
        assert log.count("intake refused until free space returns") == 1
        assert log.count("refused 0xA700: free space") == len(refused_photos)
        complete, partial = spool_state(stack.root)
        assert len(complete) == 1 and partial == []
        assert quarantined(stack.root) == []  # a full disk is not bad input
        store = stack.store()
        try:
            assert len(store.list_jobs(limit=None)) == 1

            ballast.unlink()
            space_back = time.monotonic()
            resumed = services.send_photos(stack.port, refused_photos)
            resumed_after = time.monotonic() - space_back
            assert set(resumed.values()) == {0x0000}, resumed
            assert "intake resumed" in listener.log()
            assert len(store.list_jobs(limit=None)) == 1 + len(refused_photos)
        finally:
            store.dispose()
        complete, partial = spool_state(stack.root)
        assert len(complete) == 1 + len(refused_photos) and partial == []
        services.record_figures(
            "disk_watermark",
            {
                "watermark_mb": watermark_mb,
                "free_mb_before": free // MIB,
                "free_mb_with_ballast": full_free // MIB,
                "c_stores_refused_a700": sum(1 for s in refused.values() if s == 0xA700),
                "partial_files_left": len(partial),
                "jobs_for_refused_photos": 0,
                "refused_photos_taken_after_space_returned": len(resumed),
                "first_success_after_space_returned_s": round(resumed_after, 2),
            },
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            ballast.unlink()
        stack.stop()


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_really_full_disk_refuses_with_a700_and_leaves_no_partial_file(tmp_path, plumbing_model):
    template = make_img2dcm_photo(tmp_path / "large", skin_photo_rgb(600, 800, seed=11), quality=97)
    size = template.stat().st_size
    first, second = services.clone_photos(template, tmp_path / "camera", 2)
    with small_tmpfs(tmp_path / "small", "4m") as root:
        stack = listener_stack(tmp_path, plumbing_model, root=str(root), min_free_mb=0)
        ballast = root / "ballast"
        try:
            listener = stack.start_listener()
            assert services.send_photos(stack.port, [first]) == {first: 0x0000}
            # Leave less room than one photo: the spool write runs out part-way.
            free = shutil.disk_usage(root).free
            with open(ballast, "wb") as handle:
                handle.write(b"\0" * max(0, free - size // 2))
            refused = services.send_photos(stack.port, [second])
            assert refused == {second: 0xA700}, refused
            assert "No space left on device" in listener.log()
            complete, partial = spool_state(root)
            assert len(complete) == 1 and partial == []
            ballast.unlink()
            assert services.send_photos(stack.port, [second]) == {second: 0x0000}
            complete, partial = spool_state(root)
            assert len(complete) == 2 and partial == []
            services.record_figures(
                "disk_really_full",
                {
                    "tmpfs": "4 MiB",
                    "photo_bytes": size,
                    "free_bytes_left": free - max(0, free - size // 2),
                    "status": "0xA700",
                    "partial_files_left": 0,
                    "taken_after_space_returned": True,
                },
            )
        finally:
            stack.stop()
