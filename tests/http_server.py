"""A real static HTTP server on 127.0.0.1 in a subprocess, for reading stores over HTTP in tests.

`RangeHTTPServer` (PyPI `rangehttpserver`) answers ranged GETs as nginx or S3 would; Python's
`http.server` ignores Range headers, which ser must survive too. Every request is logged, so
tests can count what reached the server.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


# Runs the server module under a watchdog: it exits when the test process that started it is
# gone (even after a SIGKILL) or after `lifetime` seconds, so no server outlives a test run.
WATCHED = """
import os, runpy, sys, threading, time
parent, deadline = os.getppid(), time.monotonic() + float(sys.argv[1])
def watch():
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StaticServer:
    """`python -m MODULE PORT --bind 127.0.0.1` serving `root` (loopback only); `stop()` ends it.

    Another server module runs the same way with its own `args` ("{port}" is replaced), e.g.
    an S3 or GCS emulator: `args` must bind it to 127.0.0.1 too."""

    def __init__(self, root: str | Path, *, module: str = "RangeHTTPServer", log: Path | None = None,
                 lifetime: float = 900.0, args: tuple[str, ...] = ("{port}", "--bind", "127.0.0.1"),
                 timeout: float = 10.0):
        self.root, self.module, self.lifetime, self.args = Path(root), module, lifetime, args
        self.log_path = log or self.root.parent / f"{module}-{id(self)}.log"
        self.proc: subprocess.Popen | None = None
        self.start(timeout=timeout)

    def start(self, *, timeout: float = 10.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "ab")
        args = [arg.format(port=self.port) for arg in self.args]
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", WATCHED, str(self.lifetime), self.module,
                                      *args], cwd=self.root,
                                     stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.module} did not start on port {self.port} in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._log.close()

    def requests(self) -> list[dict]:
        """Every request so far: method, path, status."""
        text = self.log_path.read_text(errors="replace")
        return [m.groupdict() for m in REQUEST.finditer(text)]

    def mark(self) -> int:
        """How many requests so far (pass it to `requests_since`)."""
        return len(self.requests())

    def requests_since(self, mark: int) -> list[dict]:
        return self.requests()[mark:]
