"""A real `search serve` process for tests that must talk to it as a client would (raw bytes over a socket:
TestClient fills in and normalises headers an attacker chooses), with its output in a file and its memory in /proc."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import high_water_mark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    @property
    def detail(self) -> str:
        import json

        return json.loads(self.body)["detail"]


def exchange(port: int, request: bytes, timeout: float = 30) -> Answer:
    """Send raw request bytes (which should say `Connection: close`) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return parse_answer(data)


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body)


def get(port: int, path: str, host: str | None = None, headers: str = "") -> Answer:
    host = f"127.0.0.1:{port}" if host is None else host
    return exchange(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode())


class LiveServer:
    """`search serve ARGS` in its own process group on a free port, on the embedded server of `home` (module
    fixtures start before the autouse fixture sets RIS_HOME), its output in `log`; waits until it answers."""

    def __init__(self, *args: str, home: Path, log: Path):
        self.port = free_port()
        self.log = log
        command = [str(Path(sys.executable).parent / "search"), "serve", "--port", str(self.port), *args]
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("RIS_SERVE_")}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**env, "RIS_HOME": str(home)})
        deadline = time.monotonic() + 120
        while True:
            try:
                get(self.port, "/api/status")  # any answer will do (a server with a token says 401)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"search serve did not start: {self.output()}")
                time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def link(self) -> str:
        """The address `search serve` printed when it started."""
        return re.search(r" at (http://\S+) ", self.output())[1]

    def peak_rss_mb(self) -> float:
        """The most memory the server process has held so far (VmHWM)."""
        return high_water_mark(self.proc.pid) / 2**20

    def io_bytes(self) -> tuple[int, int]:
        """(bytes read, bytes written) by the server process so far, sockets and files alike (rchar, wchar)."""
        fields = dict(line.split(": ") for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines())
        return int(fields["rchar"]), int(fields["wchar"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()
