"""A local HTTP file server for download tests (127.0.0.1, threaded, never the internet).

Each route serves bytes in one of these modes:
  "range"    honours ``Range: bytes=S-`` with 206 / Content-Range (416 past the end)
  "norange"  ignores Range and always answers 200 with the whole file
  "corrupt"  like "range" but every byte is flipped
  ("cut", n) announces the full length but sends only ``n`` bytes, then hangs up
  ("redirect", path)  answers 302 to another route (data is ignored)
Every request is logged as a dict: path, range (header or None), status, sent (bytes).
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    def __init__(self):
        self.routes: dict[str, tuple[bytes, object]] = {}
        self.log: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server._serve(self)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def add(self, path: str, data: bytes, mode="range") -> str:
        self.routes[path] = (data, mode)
        return self.url(path)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        range_header = h.headers.get("Range")
        entry = {"path": h.path, "range": range_header, "status": None, "sent": 0}
        self.log.append(entry)
        if h.path not in self.routes:
            entry["status"] = 404
            h.send_error(404)
            return
        data, mode = self.routes[h.path]
        if isinstance(mode, tuple) and mode[0] == "redirect":
            entry["status"] = 302
            h.send_response(302)
            h.send_header("Location", self.url(mode[1]))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if mode == "corrupt":
            data = bytes(b ^ 0xFF for b in data)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and mode != "norange":
            start = int(match.group(1))
            if start >= len(data):
                entry["status"] = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start:]
        entry["status"] = 206 if start else 200
        h.send_response(entry["status"])
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if isinstance(mode, tuple) and mode[0] == "cut":
            body = body[: mode[1]]
        h.wfile.write(body)
        h.wfile.flush()
        entry["sent"] = len(body)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def unreachable_url(path: str = "/w.pth") -> str:
    """A URL on a local port that nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
