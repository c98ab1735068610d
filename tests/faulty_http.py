"""An HTTP server on 127.0.0.1 (in a thread) that serves a folder with Range support and
misbehaves on request: stalls, answers 5xx, sends short, endless, dripping or compressed bodies,
other bytes than asked for, or redirects where it should not.

`server.faults[path]` is a list of what the next requests for `path` get, consumed one per
GET; once empty, requests are served normally (HEAD always is, but with the size in
`server.head_sizes[path]` when there is one). The faults:
- "stall": nothing, until the server stops; a status ("503"): that status and no body;
- "short": promises the whole part, sends half, closes; "short-honest": says half, sends half;
- "endless": 200 (whatever the Range), the whole file, then zeros without end (no length);
- "other-range": a 206 of the bytes 16 before those asked for, saying so in Content-Range;
- "gzip": the right bytes, gzip-compressed, with Content-Encoding: gzip;
- "drip": the right answer, its body one byte per 0.1 s;
- "drip-head": the status line, then one byte per 0.1 s of a header without end;
- "redirect-loop", "redirect-file": a 302 to itself, or to file:///etc/passwd;
- "from:/OTHER/PATH": the file at /OTHER/PATH instead (a store that changed on the server).
`"*"` applies to every path. Every request is recorded in `server.log` as (method, path, what).
"""

from __future__ import annotations

import gzip
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FaultyServer:
    def __init__(self, root: str | Path, *, stall_seconds: float = 30.0):
        self.root = Path(root)
        self.faults: dict[str, list[str]] = {}
        self.head_sizes: dict[str, int] = {}
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
                if fault.isdigit() or fault.startswith("redirect"):
                    self.send_response(302 if fault.startswith("redirect") else int(fault))
                    if fault.startswith("redirect"):
                        self.send_header("Location", self.path if fault == "redirect-loop" else "file:///etc/passwd")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "drip-head":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                    self._drip(b"x" * 10**6)
                    return
                file = server.root / (fault[5:] if fault.startswith("from:") else self.path).lstrip("/")
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
                if fault == "endless":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    try:
                        self.wfile.write(data)
                        while True:
                            self.wfile.write(bytes(2**16))
                    except OSError:  # the client hung up: what it must do
                        return
                if fault == "other-range" and status == 206:
                    first, last = max(0, first - 16), max(0, first - 16) + last - first
                part = data[first:last]
                sent = part[:len(part) // 2] if fault.startswith("short") else part
                sent = gzip.compress(sent) if fault == "gzip" else sent
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last - 1}/{len(data)}")
                if fault == "gzip":
                    self.send_header("Content-Encoding", "gzip")
                # "short": promises the whole part, sends half, closes; "short-honest": says half
                size = server.head_sizes.get(self.path, len(part)) if not body else len(part)
                self.send_header("Content-Length", str(len(sent) if fault in ("short-honest", "gzip") else size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body and fault == "drip":
                    self._drip(sent)
                elif body:
                    self.wfile.write(sent)
                if fault.startswith("short"):
                    self.close_connection = True

            def _drip(self, data: bytes) -> None:
                self.close_connection = True
                try:
                    for i in range(len(data)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        if server._release.wait(0.1):
                            return
                except OSError:  # the client hung up: what it must do
                    pass

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
