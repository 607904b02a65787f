"""Admin web page, metrics and health.

:mod:`dermpacs.admin.app` (``create_app``) is the FastAPI app that ``dermpacs admin`` serves;
the other modules are usable alone, also by the ``dermpacs queues`` and ``dermpacs
destinations`` commands: :mod:`~dermpacs.admin.queues` (depth, age, consumers),
:mod:`~dermpacs.admin.checks` (C-ECHO, folder writes, readiness),
:mod:`~dermpacs.admin.metrics` (Prometheus collector over the job store),
:mod:`~dermpacs.intake.refusals` (refused C-STOREs), :mod:`~dermpacs.admin.actions` (retry),
:mod:`~dermpacs.admin.control` (pause, resume, rate limits, pool size of running workers),
:mod:`~dermpacs.admin.redaction` (secrets masked) and :mod:`~dermpacs.admin.auth`.
"""
