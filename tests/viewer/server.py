"""The OHIF viewer's prebuilt files and Orthanc's DICOMweb from one origin (standard library only).

OHIF reads studies over DICOMweb from the origin it is served from, so no CORS setup is needed
on Orthanc: this server hands out the files of OHIF's ``dist/`` (with ``index.html`` for the
viewer's own routes, as a single-page app needs), an ``app-config.js`` whose data source points
at ``/dicom-web`` and ``/wado`` of this same origin, and forwards those two paths to Orthanc.
The proxy forwards GET only: the viewer reads, it does not upload or delete.

Run as a script for a person to look (``make viewer-demo`` does this)::

    python tests/viewer/server.py --ohif DIST --orthanc http://127.0.0.1:8042 --port 3000
"""

from __future__ import annotations

import argparse
import http.client
import mimetypes
import shutil
import threading
import urllib.parse
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROXIED_PREFIXES = ("/dicom-web/", "/wado")
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded; the body is re-sent with a length.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
CONTENT_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming insists on it
    ".css": "text/css",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".html": "text/html; charset=utf-8",
}

APP_CONFIG = """\
/** Written by dermpacs tests/viewer/server.py: OHIF against Orthanc through this origin. */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (dermpacs)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


class ViewerHandler(BaseHTTPRequestHandler):
    """Static OHIF files, the generated app config, and a GET-only proxy to Orthanc."""

    server_version = "dermpacs-viewer"

    def __init__(self, *args: object, ohif_dist: Path, orthanc: str, quiet: bool, **kw: object):
        self.ohif_dist = ohif_dist
        self.orthanc = urllib.parse.urlsplit(orthanc)
        self.quiet = quiet
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        if not self.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(PROXIED_PREFIXES):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "text/javascript")
        else:
            self._static(path)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        root = self.ohif_dist.resolve()
        candidate = (root / urllib.parse.unquote(path).lstrip("/")).resolve()
        if not candidate.is_relative_to(root):
            self._send(403, b"forbidden", "text/plain")
            return
        if not candidate.is_file():
            # A route of the single-page app (/viewer, /segmentation...) or a missing file:
            # files have an extension, routes do not.
            if Path(path).suffix:
                self._send(404, b"not found", "text/plain")
                return
            candidate = root / "index.html"
        content_type = CONTENT_TYPES.get(candidate.suffix) or (
            mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        )
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(candidate.stat().st_size))
        self.end_headers()
        if self.command != "HEAD":
            with candidate.open("rb") as source:
                shutil.copyfileobj(source, self.wfile)

    def _proxy(self) -> None:
        connection = http.client.HTTPConnection(
            self.orthanc.hostname or "127.0.0.1", self.orthanc.port or 80, timeout=60
        )
        headers = {
            key: value
            for key, value in self.headers.items()
            if key.lower() not in HOP_BY_HOP and key.lower() != "accept-encoding"
        }
        # Orthanc's DICOMweb plugin builds BulkDataURIs from the Host header: keep the
        # viewer's own origin in it, so that those URIs come back through this proxy.
        try:
            connection.request(self.command, self.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except OSError as exc:
            self._send(502, f"Orthanc did not answer: {exc}".encode(), "text/plain")
            return
        finally:
            connection.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class ViewerServer:
    """The viewer server on ``127.0.0.1``, in a background thread.

    Parameters
    ----------
    ohif_dist
        OHIF's prebuilt ``dist/`` folder.
    orthanc
        Orthanc's HTTP root, e.g. ``http://127.0.0.1:8042``.
    port
        0 picks a free port.
    """

    def __init__(self, ohif_dist: Path, orthanc: str, *, port: int = 0, quiet: bool = True):
        if not (ohif_dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF build in {ohif_dist} (index.html missing)")
        handler = partial(ViewerHandler, ohif_dist=ohif_dist, orthanc=orthanc, quiet=quiet)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ViewerServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ohif", type=Path, required=True, help="OHIF dist/ folder")
    parser.add_argument("--orthanc", required=True, help="Orthanc HTTP root")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    server = ViewerServer(args.ohif, args.orthanc, port=args.port, quiet=False)
    print(f"OHIF on {server.url}, reading {args.orthanc}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
