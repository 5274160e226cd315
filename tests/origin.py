"""A file server on 127.0.0.1 for the tests of URL inputs (--fetch-allow): canned answers by path, and a count
of the GETs it was sent."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STALL = "/files/stall"  # answers nothing until the server stops
CHUNK = 64 * 1024


class QuietHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that prints no traceback for a client that hung up: fluxd does so on purpose (a
    download past its limit, a request it cancelled), and the tests check what it did instead."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@dataclass
class Origin:
    """`routes` maps a path (with its query) to (status, headers, body); `gets` counts what was asked."""

    url: str = ""
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    gets: Counter[str] = field(default_factory=Counter)
    stopping: threading.Event = field(default_factory=threading.Event)


@contextmanager
def serving() -> Iterator[Origin]:
    served = Origin()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            served.gets[self.path] += 1
            if self.path.startswith(STALL):
                served.stopping.wait(60)
                return
            status, headers, body = served.routes.get(self.path, (404, {}, b"no such file"))
            chunked = headers.get("Transfer-Encoding") == "chunked"
            self.send_response(status)
            if not chunked:
                self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not chunked:
                self.wfile.write(body)
                return
            for start in range(0, len(body), CHUNK):
                piece = body[start : start + CHUNK]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.stopping.set()
        httpd.shutdown()
        httpd.server_close()
