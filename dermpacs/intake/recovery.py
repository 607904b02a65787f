"""Record again the spooled photographs whose job rows a power cut took away.

The listener answers a C-STORE once the photo's spool file is fsync'd and its job row is
committed, but it commits that row lazily (:meth:`JobStore.record_received` with
``synchronous_commit=False``): the row reaches the disk with the next synchronous commit or
checkpoint, a fraction of a second later. The spool file is the intake's write-ahead log: a
row lost between the two is recorded again here, from the file's own header, when the
intake service starts (before unfinished jobs are published, so the recovered ones are too).

Only files written since shortly before the newest job row can have lost theirs, so only
those are read; a file whose key already has a job (a duplicate that a crash kept from being
discarded, or the earlier file of a job restarted by a resend) is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pydicom import dcmread

from dermpacs.intake.priority import PriorityRules, header_values
from dermpacs.intake.spool import Spool
from dermpacs.jobs.models import LEGACY_PRIORITY
from dermpacs.jobs.store import JobStore, ReceivedInstance

logger = logging.getLogger(__name__)

# Longer than any C-STORE handler runs between writing its spool file and committing its row
# (the listener's own timeouts are shorter), so a file whose row was lost is always looked at.
LOST_ROW_WINDOW = timedelta(minutes=10)


@dataclass
class SpoolRecovery:
    """What :func:`recover_spooled` found."""

    examined: int = 0
    recovered: list[int] = field(default_factory=list)  # job ids recorded again
    unreadable: list[Path] = field(default_factory=list)


def _instance_of(path: Path, rules: PriorityRules) -> ReceivedInstance:
    header = dcmread(path, stop_before_pixels=True)
    meta = header.file_meta
    # The listener writes the caller into the file meta (0002,0017) when it spools.
    caller = str(meta.get("SendingApplicationEntityTitle", "") or "")
    level = rules.level_for(
        calling_ae_title=caller,
        sop_class_uid=str(header.SOPClassUID),
        header=header_values(header, rules.keywords),
    )
    return ReceivedInstance(
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=str(header.SeriesInstanceUID),
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        calling_ae_title=caller,
        spool_path=str(path),
        priority=level,
    )


def recover_spooled(
    store: JobStore,
    spool: Spool,
    *,
    model_version: str,
    priority_rules: PriorityRules | None = None,
) -> SpoolRecovery:
    """Record a job for every recent spool file that no job row names, at the priority level
    that ``priority_rules`` choose for it (as the listener would have)."""
    rules = priority_rules or PriorityRules(rules=(), default_level=LEGACY_PRIORITY)
    result = SpoolRecovery()
    newest = store.newest_created_at()
    since = None if newest is None else newest - LOST_ROW_WINDOW
    candidates = spool.files_since(since)
    if not candidates:
        return result
    known = store.spool_paths_since(since - LOST_ROW_WINDOW) if since is not None else None
    for path in candidates:
        if known is not None and str(path) in known:
            continue
        result.examined += 1
        try:
            instance = _instance_of(path, rules)
        except Exception as exc:  # admitted once, so only a damaged disk gets here
            logger.error("spool file %s cannot be read (%s); left as it is", path, exc)
            result.unreadable.append(path)
            continue
        outcome = store.record_received(instance, model_version=model_version)
        if outcome.created:
            result.recovered.append(outcome.job_id)
            logger.warning(
                "job %d recorded again from spool file %s: its row was lost (power cut?)",
                outcome.job_id,
                path.name,
            )
    if result.recovered:
        logger.warning("start-up: %d job(s) recovered from the spool", len(result.recovered))
    return result
