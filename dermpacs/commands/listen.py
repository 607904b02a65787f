"""``dermpacs listen``: the DICOM listener (C-ECHO, C-STORE) that feeds the job queue."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import threading
from typing import Any

from dermpacs.config import ConfigError, Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Receive photographs by C-STORE into the spool and the job store, and publish a "
        "processing task for each. Configured by [listener], [storage], [database], [broker]."
    )


def protect_patient_data() -> None:
    """Keep patient data out of the logs of a service process.

    pydicom's validation quotes the offending value in its warnings ("Invalid value for VR
    DA: '19700101x'"), and a value can be a birth date or a patient ID. The service only
    reads and copies values, so their validation is turned off (it changes no value, only
    whether a warning names it), and any remaining pydicom warning is dropped.
    """
    import warnings

    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def quiet_libraries(verbose: bool) -> None:
    """pynetdicom logs every association and highdicom every copied module at INFO; keep
    their warnings only unless asked. Patient data stays out of the logs either way."""
    from pynetdicom import _config as pynetdicom_config

    protect_patient_data()
    # pynetdicom's standard handlers describe every PDU and DIMSE message for its DEBUG and
    # INFO log, formatting them (and copying a received data set to see whether it is empty)
    # before the logger drops them; unless verbose they are not bound, and the listener
    # spends that CPU on photos (associations made after this call).
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
    if not verbose:
        for name in ("pynetdicom", "highdicom"):
            logging.getLogger(name).setLevel(logging.WARNING)


def start_intake(settings: Settings, *, verbose: bool = False) -> Any:
    """Configure the queue and start the intake service; raises ConfigError."""
    from dermpacs.admin.queues import broker_holds
    from dermpacs.intake.service import IntakeService
    from dermpacs.jobs.publisher import PublisherProcess
    from dermpacs.processing import model_version
    from workers.app import (
        broker_epoch,
        configure,
        processing_publisher,
        publish_dispatch,
        publish_processing,
        redelivery_grace,
    )

    version = model_version(settings)
    configure(settings)
    service = IntakeService(
        settings,
        model_version=version,
        publish_processing=publish_processing,
        publish_dispatch=publish_dispatch,
        queued_grace=redelivery_grace(settings),
        broker_epoch=broker_epoch,
        # Celery messages are built and sent in a child process, off the receiving threads'
        # interpreter lock (docs/benchmarks.md).
        publisher=PublisherProcess(settings, processing_publisher),
        broker_holds=lambda: broker_holds(settings, settings.queues.inference.name),
        prepare_receiver=functools.partial(quiet_libraries, verbose),
    )
    summary = service.start()
    log.info(
        "model %s; %d unfinished job(s) re-published at start-up",
        version,
        summary.total,
    )
    return service


def run(args: argparse.Namespace, settings: Settings) -> int:
    quiet_libraries(args.verbose)
    try:
        service = start_intake(settings, verbose=args.verbose)
    except ConfigError as exc:
        print(f"dermpacs listen: {exc}")
        return 2
    except OSError as exc:  # port in use, storage not writable
        print(f"dermpacs listen: cannot start: {exc}")
        return 1
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        stop.wait()
    finally:
        service.stop()
    return 0
