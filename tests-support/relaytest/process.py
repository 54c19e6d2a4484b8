"""Processes and probes: free loopback ports, HTTP status probes (blocking and asyncio), log tails, and
`Service`, one restartable child process (the writer or a connector) that logs to a file."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root: processes run there, artifacts go under ROOT/artifacts."""

READY_TIMEOUT_S = 60
"""How long a process may take to answer 200 on its health or readiness URL."""

STOP_TIMEOUT_S = 35
"""How long a process may take to exit after SIGTERM (the connector's grace is 30 s at most)."""


def free_port() -> int:
    """A loopback port that was free a moment ago (bound to 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2) -> int | None:
    """The status of a GET on `url`, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


async def http_get(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    """GET on a loopback URL without leaving the event loop: (status or None, body)."""
    m = re.match(r"http://([^:/]+):(\d+)(/.*)?$", url)
    assert m, url
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None, ""
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, asyncio.TimeoutError):
        return None, ""
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, ""
    return status, body.decode(errors="replace")


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log, indented, for a failure report."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"    ({path} not readable)"
    return "\n".join("    " + line for line in text[-lines:])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child started with `start_new_session=True` and everything it started, then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def prune_runs(parent: Path, pattern: str, keep: int) -> None:
    """Keeps the newest `keep` run directories matching `pattern` in `parent` (by modification time)."""
    runs = sorted((d for d in parent.glob(pattern) if d.is_dir()), key=lambda d: d.stat().st_mtime)
    for old in runs[:-keep] if keep else runs:
        shutil.rmtree(old, ignore_errors=True)


def require_psql(log: Callable[[str], None]) -> bool:
    """False (and says why) when psql is not on PATH."""
    if shutil.which("psql") is None:
        log("psql is not on PATH (Debian: apt-get install postgresql-client)")
        return False
    return True


def install_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so a suite that is stopped still tears its world down."""

    def on_signal(signum, _frame):  # noqa: ANN001 - signal's handler signature
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)


class Service:
    """One child process (writer or connector), logging to a file, restartable on the same arguments."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logfile: Path,
                 log: Callable[[str], None] = print) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.logfile = logfile
        self.proc: subprocess.Popen | None = None
        self._log = log

    def start(self) -> None:
        """Starts the process; its output is appended to the log file after a header line."""
        fh = open(self.logfile, "ab")
        fh.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
        fh.flush()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
        )
        fh.close()

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def sigterm(self) -> None:
        """SIGTERM without waiting (a graceful shutdown begins)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL when the process is still there after STOP_TIMEOUT_S."""
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._log(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT_S} s; killing it")
            self.proc.kill()
            self.proc.wait(timeout=10)

    async def stop_async(self) -> None:
        """`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    def _exited(self, url: str) -> str:
        assert self.proc is not None
        return f"{self.name} exited with status {self.proc.returncode} before {url} answered 200"

    def wait_http(self, url: str, timeout: float = READY_TIMEOUT_S) -> str | None:
        """None when `url` answered 200 in time, else why not (also when the process exited)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                return self._exited(url)
            last = http_status(url)
            if last == 200:
                return None
            time.sleep(0.2)
        return f"{url} did not answer 200 within {timeout:.0f} s (last status: {last})"

    async def wait_http_async(self, url: str, timeout: float = READY_TIMEOUT_S, interval: float = 0.05) -> str | None:
        """`wait_http` on the event loop, polling every `interval` seconds."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                return self._exited(url)
            last, _ = await http_get(url, timeout=1)
            if last == 200:
                return None
            await asyncio.sleep(interval)
        return f"{url} did not answer 200 within {timeout:.0f} s (last status: {last})"

    async def wait_exit_async(self, timeout: float) -> int | None:
        """The exit status once the process has exited, or None when it still runs after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.proc
            if p is None or p.poll() is not None:
                return None if p is None else p.returncode
            await asyncio.sleep(0.05)
        return None
