"""``dermpacs destinations``: list the configured destinations, or test them (C-ECHO)."""

from __future__ import annotations

import argparse
import json

from dermpacs.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --config and -v also after the action (`dermpacs destinations test --config FILE`);
    # SUPPRESS keeps the value given before the action when they are not repeated.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML settings file")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="the configured destinations", parents=[common])
    listing.add_argument("--json", action="store_true")
    test = sub.add_parser(
        "test",
        help="C-ECHO each DICOM destination, write a test file into each folder one",
        parents=[common],
    )
    test.add_argument("names", nargs="*", help="only these destinations (default: all)")
    test.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.admin.checks import check_destination, find_destination

    if args.action == "list":
        if args.json:
            print(json.dumps([d.model_dump(mode="json") for d in settings.destinations], indent=2))
        else:
            for d in settings.destinations:
                where = f"{d.ae_title}@{d.host}:{d.port}" if d.kind == "dicom" else d.path
                print(f"{d.name:<16} {d.kind:<6} {where}  ({', '.join(d.objects)})")
        return 0
    try:
        chosen = (
            [find_destination(settings, name) for name in args.names]
            if args.names
            else list(settings.destinations)
        )
    except KeyError as exc:
        known = ", ".join(d.name for d in settings.destinations)
        print(f"dermpacs destinations: no destination {exc}; configured: {known}")
        return 2
    checks = [check_destination(d, settings) for d in chosen]
    if args.json:
        print(json.dumps([c.as_json() for c in checks], indent=2))
    else:
        for c in checks:
            status = "" if c.status is None else f" (0x{c.status:04X})"
            print(
                f"{c.name:<16} {'ok  ' if c.ok else 'FAIL'} {c.kind:<6} {c.address}: "
                f"{c.detail}{status}, {c.seconds * 1000:.0f} ms"
            )
    return 0 if all(c.ok for c in checks) else 1
