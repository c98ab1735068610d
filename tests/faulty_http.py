"""An HTTP server on 127.0.0.1 (in a thread) that serves a folder with Range support and
misbehaves on request: stalls, answers 5xx, or sends short bodies.

`server.faults[path]` is a list of what the next requests for `path` get, consumed one per
GET ("stall", "503", "short", "short-honest"); once empty, requests are served normally (HEAD
always is).
`"*"` applies to every path. Every request is recorded in `server.log` as (method, path, what).
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FaultyServer:
    def __init__(self, root: str | Path, *, stall_seconds: float = 30.0):
        self.root = Path(root)
        self.faults: dict[str, list[str]] = {}
        self.log: list[tuple[str, str, str]] = []
        self.stall_seconds = stall_seconds
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _fault(self) -> str:
                with server._lock:
                    for key in (self.path, "*"):
                        queue = server.faults.get(key)
                        if queue:
                            return queue.pop(0)
                return "ok"

            def _serve(self, body: bool) -> None:
                fault = self._fault() if body else "ok"  # HEAD answers honestly
                server.log.append((self.command, self.path, fault))
                if fault == "stall":
                    server._release.wait(server.stall_seconds)
                    self.close_connection = True
                    return
                if fault.isdigit():
                    self.send_response(int(fault))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                file = server.root / self.path.lstrip("/")
                if not file.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = file.read_bytes()
                first, last, status = 0, len(data), 200
                match = re.match(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
                if match:
                    a, b = match.groups()
                    if a:
                        first, last = int(a), min(len(data), int(b) + 1 if b else len(data))
                    else:
                        first = max(0, len(data) - int(b))
                    status = 206
                part = data[first:last]
                sent = part[:len(part) // 2] if fault.startswith("short") else part
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last - 1}/{len(data)}")
                # "short": promises the whole part, sends half, closes; "short-honest": says half
                self.send_header("Content-Length", str(len(sent) if fault == "short-honest" else len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self.wfile.write(sent)
                if fault.startswith("short"):
                    self.close_connection = True

            def do_GET(self):
                self._serve(True)

            def do_HEAD(self):
                self._serve(False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def requests(self, path: str | None = None) -> list[tuple[str, str, str]]:
        return [r for r in self.log if path is None or r[1] == path]

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        time.sleep(0.05)
