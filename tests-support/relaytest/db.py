"""PostgreSQL from the outside: psql, database URLs, and `Database`, a throwaway database on a server
(DATABASE_URL's by default), created for one run or case and dropped after it."""

from __future__ import annotations

import os
import secrets
import subprocess
from urllib.parse import urlsplit, urlunsplit

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
"""The server the suites use when DATABASE_URL is not set."""


def admin_url() -> str:
    """DATABASE_URL, or the default: a database on the server where this user may CREATE DATABASE."""
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` on the same server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def psql(url: str, sql: str, variables: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Runs `sql` with psql (stop on the first error; `variables` as psql's :'name' parameters); its
    unaligned output. Raises RuntimeError with psql's message on failure or when it timed out."""
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", url, "-f", "-"]
    for k, v in (variables or {}).items():
        cmd[1:1] = ["-v", f"{k}={v}"]
    try:
        r = subprocess.run(cmd, input=sql, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"psql timed out after {timeout:.0f} s") from e
    if r.returncode != 0:
        raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class Database:
    """A database named `<prefix>_<random hex>` on `server`'s server. The name is made of [a-z0-9_] only
    (the prefix is checked), so it can be quoted into CREATE / DROP DATABASE."""

    def __init__(self, prefix: str, server: str | None = None, random_bytes: int = 4) -> None:
        if not prefix or not all(c.islower() or c.isdigit() or c == "_" for c in prefix):
            raise ValueError(f"database prefix {prefix!r}: only a-z, 0-9 and _")
        self.server = server or admin_url()
        self.name = f"{prefix}_{secrets.token_hex(random_bytes)}"
        self.url = with_database(self.server, self.name)
        self.created = False

    def create(self) -> str | None:
        """CREATE DATABASE; None on success, else why not."""
        try:
            psql(self.server, f'CREATE DATABASE "{self.name}";')
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            return f"{self.name} on {self.server}: {e}"
        self.created = True
        return None

    def drop(self, drop_slots: bool = False) -> str | None:
        """DROP DATABASE ... WITH (FORCE) when it was created; with `drop_slots`, its replication slots
        first (a database with a slot cannot be dropped; a walsender may take a moment to exit). None on
        success, else why not."""
        if not self.created:
            return None
        try:
            if drop_slots:
                psql(self.server, (
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    f"WHERE database = '{self.name}' AND active_pid IS NOT NULL; SELECT pg_sleep(0.5); "
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    f"WHERE database = '{self.name}';"))
            psql(self.server, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE);')
        except Exception as e:  # noqa: BLE001 - reported by the caller, not fatal
            return f"could not drop database {self.name}: {e}"
        self.created = False
        return None
