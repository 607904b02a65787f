"""``dermpacs send``: send DICOM files by C-STORE, to a configured destination or a peer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dermpacs.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="DICOM files, or folders to send all files of")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="DESTINATION", help="a [[destinations]] name (DICOM)")
    target.add_argument("--host", help="peer host (with --port and --aet)")
    parser.add_argument("--port", type=int, help="peer port")
    parser.add_argument("--aet", help="peer (called) AE title")
    parser.add_argument(
        "--calling-aet", default="", help="our AE title (default: dispatch.calling_ae_title)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="with --host: DICOM over TLS (a destination given with --to says so itself)",
    )
    parser.add_argument("--tls-ca", default="", help="with --tls: PEM file of the CAs to trust")
    parser.add_argument("--tls-cert", default="", help="with --tls: our client certificate")
    parser.add_argument("--tls-key", default="", help="with --tls: its private key")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.dispatch.destinations import tls_client
    from dermpacs.dispatch.scu import PeerAddress, SenderTimeouts, TlsClient, send_instances

    calling = args.calling_aet or settings.dispatch.calling_ae_title
    if args.to:
        named = {d.name: d for d in settings.destinations}
        destination = named.get(args.to)
        if destination is None:
            print(f"dermpacs send: no destination {args.to!r}; configured: {', '.join(named)}")
            return 2
        if destination.kind != "dicom":
            print(f"dermpacs send: destination {args.to!r} is a {destination.kind}, not dicom")
            return 2
        peer = PeerAddress(
            destination.ae_title,
            destination.host,
            destination.port,
            calling,
            tls=tls_client(destination),
        )
    else:
        if args.port is None or not args.aet:
            print("dermpacs send: --host needs --port and --aet")
            return 2
        tls = TlsClient(args.tls_ca, args.tls_cert, args.tls_key) if args.tls else None
        peer = PeerAddress(args.aet, args.host, args.port, calling, tls=tls)
    files = _expand(args.files)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"dermpacs send: no such file: {', '.join(missing)}")
        return 2
    timeouts = SenderTimeouts(
        acse=settings.dispatch.acse_timeout,
        dimse=settings.dispatch.dimse_timeout,
        network=settings.dispatch.network_timeout,
    )
    try:
        results = send_instances(files, peer, timeouts)
    except Exception as exc:  # unreadable file
        print(f"dermpacs send: {exc}")
        return 2
    for path, result in zip(files, results, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "file": str(path),
                        "sop_instance_uid": result.sop_instance_uid,
                        "status": result.status,
                        "stored": result.stored,
                        "error": result.error,
                    }
                )
            )
        else:
            status = "-" if result.status is None else f"0x{result.status:04X}"
            print(f"{status}  {path}" + ("" if result.stored else f"  {result.error}"))
    sent = sum(r.stored for r in results)
    if not args.json:
        print(f"{sent} of {len(results)} stored by {peer.describe()}")
    return 0 if sent == len(results) else 1
