"""A fault-injecting HTTP proxy on loopback, for object-storage tests: it forwards every request to a real
server (the moto S3 server of ``tests/s3server.py``) and, when armed, answers one ranged ``GET`` with a short
``206``: the first half of the body the server returned, with a ``Content-Length`` that matches the short
body (the failure of ray-project/ray#66011). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


@dataclass
class FaultPlan:
    """Which request to cut: the ``nth`` ranged GET (1-based) after arming; ``cut`` is set once done.

    Attributes:
        nth: the ranged GET to answer short (0: none).
        ranged_gets: ranged GETs seen since arming.
        cut: requests answered short, as ``(path, Range header, bytes sent, bytes the server returned)``.
    """

    nth: int = 0
    ranged_gets: int = 0
    cut: list[tuple[str, str, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, nth: int) -> None:
        with self.lock:
            self.nth, self.ranged_gets = nth, 0
            self.cut.clear()

    def take(self, method: str, range_header: str | None) -> bool:
        """Count a request; True when this one is to be answered short."""
        if method != "GET" or not range_header:
            return False
        with self.lock:
            self.ranged_gets += 1
            if self.nth and self.ranged_gets == self.nth:
                self.nth = 0
                return True
        return False


def _handler(upstream: str, plan: FaultPlan) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection = http.client.HTTPConnection(target.hostname or LOOPBACK, target.port, timeout=30)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            finally:
                connection.close()
            short = response.status == 206 and plan.take(self.command, self.headers.get("Range"))
            sent = payload[: len(payload) // 2] if short else payload
            if short:
                plan.cut.append((self.path, self.headers.get("Range", ""), len(sent), len(payload)))
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            upstream_length = response.getheader("Content-Length", str(len(payload)))
            self.send_header("Content-Length", upstream_length if self.command == "HEAD" else str(len(sent)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(sent)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


@contextmanager
def fault_proxy(upstream: str) -> Iterator[tuple[str, FaultPlan]]:
    """Run the proxy in front of ``upstream`` (``http://host:port``); yields its endpoint URL and plan."""
    plan = FaultPlan()
    server = ThreadingHTTPServer((LOOPBACK, 0), _handler(upstream, plan))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}", plan
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
