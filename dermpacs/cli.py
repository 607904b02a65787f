"""The ``dermpacs`` command.

Each sub-command lives in the stage that owns it, as a module with ``add_arguments(parser)``
and ``run(args, settings) -> int``. Only the chosen command's module is imported, so that
``dermpacs send`` does not pay for loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dermpacs import __version__
from dermpacs.config import ConfigError, load_settings

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dermpacs.commands.serve", "listener and worker in one process (embedded default)"),
    "listen": ("dermpacs.commands.listen", "run the DICOM listener (C-ECHO, C-STORE)"),
    "worker": ("dermpacs.commands.worker", "run a Celery worker for the configured queues"),
    "send": ("dermpacs.commands.send", "send DICOM files to a configured destination"),
    "process": ("dermpacs.commands.process", "run the method on DICOM files, write results"),
    "synth": ("dermpacs.commands.synth", "generate a synthetic annotated photo set"),
    "train": ("dermpacs.commands.train", "train the segmentation network or the classifier"),
    "evaluate": ("dermpacs.commands.evaluate", "evaluate the models on an annotated set"),
    "jobs": ("dermpacs.commands.jobs", "list, show, retry and cancel jobs"),
    "queues": ("dermpacs.commands.queues", "queue depths; pause, resume, rate-limit, resize"),
    "destinations": ("dermpacs.commands.destinations", "list destinations, test them (C-ECHO)"),
    "admin": ("dermpacs.commands.admin", "serve the admin web page, /metrics and health probes"),
}


def _command_parser(name: str, module: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dermpacs {name}", description=COMMANDS[name][1])
    parser.add_argument("--config", help="TOML settings file (default: $DERMPACS_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser


def _usage() -> str:
    lines = [f"dermpacs {__version__}", "", "usage: dermpacs COMMAND [--config FILE] ...", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dermpacs: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    args = _command_parser(name, module).parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # highdicom logs every module it copies at INFO: a dozen lines per result object.
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"dermpacs: {exc}", file=sys.stderr)
        return 2
    return int(module.run(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
