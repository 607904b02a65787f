"""What a stage tells the task that ran it: the job's state and what to schedule next."""

from __future__ import annotations

import random
from dataclasses import dataclass

from dermpacs.jobs.models import JobState


@dataclass(frozen=True)
class StageOutcome:
    """The result of running one stage on a job.

    Attributes
    ----------
    job_id
        The job.
    state
        Its state afterwards.
    publish_dispatch
        Results are ready: a delivery task should be published.
    retry_in
        Run this stage again after so many seconds (a retry, or a lease held elsewhere).
    """

    job_id: int
    state: JobState
    publish_dispatch: bool = False
    retry_in: float | None = None


def backoff_delay(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, capped, with jitter.

    ``base * 2**(attempt - 1)`` capped at ``cap``, then "equal jitter": half of it fixed and
    half drawn uniformly, so that many jobs failing together do not retry together.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    delay = min(cap, base * 2.0 ** min(attempt - 1, 62))
    draw = (rng or random).random()
    return delay / 2.0 + draw * delay / 2.0
