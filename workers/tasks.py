"""The Celery tasks: thin wrappers over the stages. Messages carry a job id, nothing else."""

from __future__ import annotations

from celery import Task
from sqlalchemy.exc import SQLAlchemyError

from dermpacs import processing
from dermpacs.dispatch.outbox import deliver_job as deliver_job_stage
from workers.app import DISPATCH_TASK, PROCESS_TASK, app, current_settings, follow_up

# The job store away (a restart, a network blip): try the task again later rather than lose
# its message, with exponential backoff and jitter. The stages count their own attempts.
STORE_OUTAGE = {
    "autoretry_for": (SQLAlchemyError,),
    "retry_backoff": 5,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": None,
}


@app.task(name=PROCESS_TASK, bind=True, **STORE_OUTAGE)
def process_job(self: Task, job_id: int) -> str:
    """Read, analyse and write the results of one job, then publish its delivery."""
    settings = current_settings()
    return follow_up(self, processing.process_job(job_id, settings))


@app.task(name=DISPATCH_TASK, bind=True, **STORE_OUTAGE)
def deliver_job(self: Task, job_id: int) -> str:
    """Send one job's due result objects to its destinations; retry what failed later."""
    settings = current_settings()
    store = processing.shared_job_store(settings)
    return follow_up(self, deliver_job_stage(job_id, settings, store))
