"""`Cluster`: a throwaway PostgreSQL server for tests that must restart PostgreSQL or need settings the
shared server does not have (wal_level = logical). The shared server is never reconfigured."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from .process import free_port


def pg_bindir() -> Path:
    """Where initdb and pg_ctl are: PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else pg_config's."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    r = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    return Path(r.stdout.strip())


class Cluster:
    """A PostgreSQL cluster in a temporary directory, on a free loopback port, trust auth, fsync off; run as
    the postgres user when we are root (initdb refuses root). With `logical`, wal_level = logical and room
    for 40 walsenders and slots; `settings` (`name=value`) are added to the server's options. The test may
    restart it at will; `destroy` keeps its log in `art_dir`.

    The methods are coroutines (the fault suite, its user, is asyncio); each runs its pg_ctl in a thread."""

    def __init__(self, art_dir: Path, logical: bool = False, log: Callable[[str], None] = print,
                 settings: tuple[str, ...] = ()) -> None:
        self.bindir = pg_bindir()
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-faults-pg-"))
        self.data = self.tmp / "data"
        self.logfile = self.tmp / "postgres.log"
        self.art_dir = art_dir
        self.logical = logical
        self.settings = settings
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.started = False
        self._opts = ""
        self._log = log

    def _argv(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    async def _run(self, *argv: str, timeout: float = 120) -> None:
        r = await asyncio.to_thread(subprocess.run, self._argv([str(self.bindir / argv[0]), *argv[1:]]),
                                    capture_output=True, text=True, timeout=timeout, cwd=self.tmp)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[-800:]}")

    async def start(self) -> None:
        """initdb, then pg_ctl start; raises RuntimeError with the tool's message on failure."""
        if os.geteuid() == 0:
            shutil.chown(self.tmp, "postgres", "postgres")
        await self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync", "--no-instructions")
        opts = (f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=200")
        if self.logical:
            opts += " -c wal_level=logical -c max_wal_senders=40 -c max_replication_slots=40"
        opts += "".join(f" -c {s}" for s in self.settings)
        self._opts = opts
        await self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-o", opts, "start")
        self.started = True

    async def restart(self) -> None:
        """`pg_ctl restart -m fast`: every backend terminated, the server back with the same options."""
        await self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-m", "fast",
                        "restart")

    async def crash_restart(self) -> None:
        """A crash: `pg_ctl stop -m immediate` (every process quits at once; what was in the WAL buffers and
        not yet written is lost, as in a server crash: asynchronous commits of the last moments, for
        instance), then a start with the same options, which runs crash recovery."""
        await self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "immediate", "stop")
        await self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-o",
                        self._opts, "start")

    async def destroy(self) -> None:
        """Stops the server (immediate), keeps its log in `art_dir`, removes the directory."""
        if self.started:
            try:
                await self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "immediate", "stop")
            except Exception as e:  # noqa: BLE001
                self._log(f"stopping the throwaway cluster: {e}")
        try:
            self.art_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.logfile, self.art_dir / "postgres.log")
        except OSError:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)
