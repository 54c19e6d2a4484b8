"""`System`: the relay as a suite runs it - a throwaway database, configuration files in an artifacts
directory, `connector migrate`, the writer and connector processes with their ports and environment -
and its teardown. Each step returns None or why it failed; the suite counts and names its checks."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any, Callable

from .db import Database
from .process import ROOT, Service, free_port, http_status, tail


# `client` settings that lift the publish and subscribe rate limits, for the upstream suites, which run
# against a Centrifugo without any.
NO_RATE_LIMITS: dict[str, int] = {
    "publish_rate_per_sec": 1000, "publish_burst": 1000,
    "publish_rate_per_ip_per_sec": 1000, "publish_burst_per_ip": 1000,
    "publish_rate_per_user_per_sec": 1000, "publish_burst_per_user": 1000,
    "subscribe_rate_per_sec": 1000, "subscribe_burst": 1000,
}


def repository_config() -> dict[str, Any]:
    """The repository's config.json, parsed (a fresh copy to edit)."""
    return json.loads((ROOT / "config.json").read_text())


def point_rules_at(config: dict[str, Any], writer_url: str) -> None:
    """Every lambda rule of `config` invokes the writer at `writer_url`."""
    for rule in config.get("rules", []):
        target = rule.get("target", {})
        if target.get("type") == "lambda":
            target["endpoint"] = writer_url


class Connector(Service):
    """A connector process on a fixed port (restarts keep the port), with its configuration file."""

    def __init__(self, name: str, bin_dir: Path, cfg_path: Path, port: int, env: dict[str, str], logfile: Path,
                 log: Callable[[str], None] = print) -> None:
        super().__init__(name, [str(bin_dir / "connector"), "--config", str(cfg_path)],
                         dict(env, RELAY_LISTEN=f"127.0.0.1:{port}"), logfile, log)
        self.port = port
        self.cfg_path = cfg_path
        self.base = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/connection/websocket"

    def wait_ready(self) -> str | None:
        """None once /readyz answers 200 (and /healthz too), else why not."""
        err = self.wait_http(f"{self.base}/readyz")
        if err:
            return err
        if http_status(f"{self.base}/healthz") != 200:
            return f"{self.base}/healthz is not 200 while /readyz is"
        return None


class System:
    """One run's (or one case's) relay: a fresh database named `<prefix>_<random>` on `server` (DATABASE_URL's
    server by default), artifacts in `art_dir` (default: <art_root>/<database name>), binaries from
    `bin_dir` (target/debug by default).

    The environment every process gets: DATABASE_URL (the run's database), RUST_LOG (info unless set),
    NO_COLOR, no AWS_LAMBDA_RUNTIME_API (the writer serves the invoke path locally), and with a writer a
    fresh WRITER_SECRET that the connector signs invocations with and the writer demands."""

    def __init__(self, prefix: str, art_root: Path | None = None, art_dir: Path | None = None,
                 bin_dir: Path | None = None, server: str | None = None, keep_db: bool = False, writer: bool = True,
                 random_bytes: int = 4, log: Callable[[str], None] = print) -> None:
        self.db = Database(prefix, server, random_bytes)
        if art_dir is None:
            assert art_root is not None, "System needs art_root or art_dir"
            art_dir = art_root / self.db.name
        self.dir = art_dir
        self.bin_dir = (bin_dir or ROOT / "target" / "debug").resolve()
        self.keep_db = keep_db
        self.log = log
        self.env = dict(os.environ)
        self.env.update({"DATABASE_URL": self.db.url, "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1"})
        if writer:
            self.env["WRITER_SECRET"] = secrets.token_hex(32)
        self.env.pop("AWS_LAMBDA_RUNTIME_API", None)
        self.writer: Service | None = None
        self.writer_port = free_port()
        self.writer_url = f"http://127.0.0.1:{self.writer_port}"
        self.connectors: list[Connector] = []

    @property
    def db_name(self) -> str:
        """The run's database."""
        return self.db.name

    @property
    def db_url(self) -> str:
        """The URL of the run's database."""
        return self.db.url

    # ---- setup ---------------------------------------------------------------------------------------

    def free_port(self) -> int:
        """A free loopback port other than the writer's, for a connector."""
        port = free_port()
        while port == self.writer_port:
            port = free_port()
        return port

    def missing_binaries(self, names: tuple[str, ...] = ("connector", "writer-lambda")) -> str | None:
        """None when every binary is built, else which one is missing."""
        for b in names:
            if not (self.bin_dir / b).is_file():
                return f"{self.bin_dir / b} is missing: run `cargo build --workspace --bins`"
        return None

    def create_database(self) -> str | None:
        """Creates the artifacts directory and the database; None on success, else why not."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.db.create()

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        """Writes `config` as <art_dir>/<name>.json; its path."""
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def connector_cli(self, cfg_path: Path, *command: str, timeout: float = 120,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`connector --config CFG COMMAND...` (migrate, check, ...), run to its end."""
        return subprocess.run([str(self.bin_dir / "connector"), "--config", str(cfg_path), *command],
                              env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def migrate(self, cfg_path: Path, env: dict[str, str] | None = None) -> str | None:
        """`connector migrate` (output in <art_dir>/migrate.log); None on success, else why not."""
        r = self.connector_cli(cfg_path, "migrate", env=env)
        (self.dir / "migrate.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            return f"exit {r.returncode}:\n{tail(self.dir / 'migrate.log')}"
        return None

    def accepts(self, cfg_path: Path) -> bool:
        """Whether `connector check` accepts the configuration (e.g. knows every key in it)."""
        return self.connector_cli(cfg_path, "check", timeout=60).returncode == 0

    def new_writer(self, extra_env: dict[str, str] | None = None) -> Service:
        """The writer on its port (not started); its log is <art_dir>/writer.log."""
        env = dict(self.env, WRITER_LISTEN=f"127.0.0.1:{self.writer_port}", **(extra_env or {}))
        self.writer = Service("writer-lambda", [str(self.bin_dir / "writer-lambda")], env, self.dir / "writer.log",
                              self.log)
        return self.writer

    def start_writer(self, extra_env: dict[str, str] | None = None) -> str | None:
        """Starts the writer and waits for its /healthz; None when healthy, else why not (with its log)."""
        writer = self.new_writer(extra_env)
        writer.start()
        err = writer.wait_http(f"{self.writer_url}/healthz")
        return f"{err}\n{tail(writer.logfile)}" if err else None

    def new_connector(self, cfg_path: Path, port: int, name: str = "connector",
                      extra_env: dict[str, str] | None = None) -> Connector:
        """A connector on `port` (not started); its log is <art_dir>/<name>.log; stopped at teardown."""
        node = Connector(name, self.bin_dir, cfg_path, port, dict(self.env, **(extra_env or {})),
                         self.dir / f"{name}.log", self.log)
        self.connectors.append(node)
        return node

    # ---- teardown ------------------------------------------------------------------------------------

    def stop_processes(self) -> None:
        """Stops every connector, then the writer (SIGTERM, SIGKILL after the deadline)."""
        for svc in [*self.connectors, self.writer]:
            if svc is None:
                continue
            try:
                svc.stop()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                self.log(f"stopping {svc.name}: {e}")

    def drop_database(self, drop_slots: bool = False) -> None:
        """Drops the database unless kept (`keep_db`), saying what happened."""
        if not self.db.created:
            return
        if self.keep_db:
            self.log(f"kept database {self.db.name} ({self.db.url})")
            return
        err = self.db.drop(drop_slots)
        self.log(err or f"dropped database {self.db.name}")

    def teardown(self, drop_slots: bool = False) -> None:
        """Processes stopped, database dropped: always, also after a failure."""
        self.stop_processes()
        self.drop_database(drop_slots)

    def dump_logs(self, lines: int = 60, writer_lines: int = 30) -> None:
        """The tails of every process's log, for a failure report."""
        for node in self.connectors:
            self.log(f"---- {node.name} log ({_rel(node.logfile)}) ----\n{tail(node.logfile, lines)}")
        if self.writer is not None:
            self.log(f"---- writer log ({_rel(self.writer.logfile)}) ----\n{tail(self.writer.logfile, writer_lines)}")


def _rel(path: Path) -> Path:
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path
