"""Keeping a claim alive while the work runs.

A worker that claims a job (or takes deliveries for sending) holds a lease: the row's
``updated_at``. Another worker may take the job over once the lease is older than
``jobs.lease_timeout``. :class:`LeaseRenewal` refreshes it every third of that from a
background thread, so a long task keeps its job, and a worker that dies (its thread with it)
loses the job one lease later, whatever the task time limit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

logger = logging.getLogger(__name__)

# Renew this many times per lease: two renewals may fail before the lease runs out.
RENEWALS_PER_LEASE = 3


class LeaseRenewal:
    """Call ``renew`` every ``lease / 3`` seconds while the ``with`` block runs.

    Parameters
    ----------
    renew
        Refreshes the lease; may raise (a database hiccup), which is logged and retried at
        the next tick.
    lease
        The lease, in seconds (``jobs.lease_timeout``).
    what
        Names the claim in log lines (``job 12``).
    """

    def __init__(self, renew: Callable[[], object], *, lease: float, what: str) -> None:
        self._renew = renew
        self._interval = max(lease / RENEWALS_PER_LEASE, 0.05)
        self._what = what
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dermpacs-lease-{what}", daemon=True
        )

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._renew()
            except Exception as exc:  # the next tick tries again; the lease is long enough
                logger.warning("%s: lease not renewed (%s)", self._what, exc)

    def __enter__(self) -> LeaseRenewal:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self._thread.join(self._interval + 5.0)
