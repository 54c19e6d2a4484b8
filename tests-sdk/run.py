#!/usr/bin/env python3
"""Black-box tests of the relay with the official, pinned Centrifugo SDKs.

For one run this orchestrator:
  1. creates a fresh database (relay_sdk_<random>) on DATABASE_URL's server,
  2. writes a connector config (the repository's config.json with free ports and the writer's URL),
  3. runs `connector migrate`, starts writer-lambda and the connector from target/debug,
     and waits for the writer's /healthz and the connector's /readyz,
  4. runs each SDK scenario (node/scenario.mjs with centrifuge-js, python/scenario.py with
     centrifuge-python; the chat scenario of each SDK once more in Protobuf mode, SDK_PROTOCOL=protobuf:
     centrifuge-js's `centrifuge/build/protobuf`, centrifuge-python's `use_protobuf=True`); when a scenario prints READY_FOR_RESTART it SIGKILLs the connector, inserts
     rows into chat_data with psql, restarts the connector on the same port and answers RESTARTED,
  5. stops the processes and drops the database, always, also on failure or Ctrl-C,
and prints `N passed, N failed` (scenario checks plus its own) as its last line. Exit code 0 only when
nothing failed. Logs, configs and wire frames of each run are kept in artifacts/sdk-tests/<database>/.

Usage: tests-sdk/run.py [--only node|python|chat|protobuf|sse] [--bin-dir DIR] [--keep-db]
(`--only chat` runs the chat permissions scenario only; `--only protobuf` the two Protobuf-mode chat
scenarios only; `--only sse` centrifuge-js's chat scenario over SSE and over HTTP-streaming, JSON and Protobuf.)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEYS = ROOT / "connector" / "tests" / "keys"  # test-only keys, also used by connector/tests/auth.rs
JWT_SECRET = "sdk-test-secret-sdk-test-secret-0123"
API_KEY = "sdk-test-api-key-0123456789"
NODE_TTL_SECS = 6
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT_S = 60
SCENARIO_TIMEOUT_S = 300
ROWS_WHILE_DOWN = 3


def log(msg: str) -> None:
    print(f"[sdk] {msg}", flush=True)


class Results:
    """Counts the checks of the orchestrator and of the scenarios."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        log(f"PASS {name}" + (f" ({detail})" if detail else ""))

    def fail(self, name: str, detail: str) -> None:
        self.failed += 1
        self.failures.append(f"{name}: {detail}")
        log(f"FAIL {name}: {detail}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def psql(url: str, sql: str, variables: dict[str, str] | None = None) -> str:
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", url, "-f", "-"]
    for k, v in (variables or {}).items():
        cmd[1:1] = ["-v", f"{k}={v}"]
    r = subprocess.run(cmd, input=sql, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"    ({path} not readable)"
    return "\n".join("    " + line for line in text[-lines:])


class Service:
    """One child process (writer or connector), logging to a file, restartable."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logfile: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.logfile = logfile
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        fh = open(self.logfile, "ab")
        fh.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
        fh.flush()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
        )
        fh.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=35)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM for 35 s; killing it")
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wait_http(self, url: str, timeout: float = READY_TIMEOUT_S) -> str | None:
        """None when `url` answered 200 in time, else why not."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                assert self.proc is not None
                return f"{self.name} exited with status {self.proc.returncode} before {url} answered 200"
            last = http_status(url)
            if last == 200:
                return None
            time.sleep(0.2)
        return f"{url} did not answer 200 within {timeout:.0f} s (last status: {last})"


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = Results()
        self.admin_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        self.db_name = f"relay_sdk_{secrets.token_hex(4)}"
        self.db_url = with_database(self.admin_url, self.db_name)
        self.db_created = False
        self.dir = ROOT / "artifacts" / "sdk-tests" / self.db_name
        self.bin_dir = Path(args.bin_dir).resolve()
        self.writer: Service | None = None
        self.connector: Service | None = None
        self.connector_port = free_port()
        self.writer_port = free_port()
        while self.writer_port == self.connector_port:
            self.writer_port = free_port()
        self.base = f"http://127.0.0.1:{self.connector_port}"
        self.ws_url = f"ws://127.0.0.1:{self.connector_port}/connection/websocket"

    # ---- setup and teardown ---------------------------------------------------------------------

    def prune_artifacts(self, keep: int = 20) -> None:
        """Keep the newest `keep` runs' logs; older ones go."""
        runs = sorted((d for d in self.dir.parent.glob("relay_sdk_*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
        for old in runs[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def setup(self) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prune_artifacts()
        for b in ("connector", "writer-lambda"):
            if not (self.bin_dir / b).is_file():
                self.results.fail("binaries built", f"{self.bin_dir / b} is missing: run `cargo build --workspace --bins`")
                return False
        try:
            psql(self.admin_url, f'CREATE DATABASE "{self.db_name}";')
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            self.results.fail("create database", f"{self.db_name} on {self.admin_url}: {e}")
            return False
        self.db_created = True
        log(f"database {self.db_name}; artifacts in {self.dir.relative_to(ROOT)}")

        config = json.loads((ROOT / "config.json").read_text())
        config["listen"] = f"127.0.0.1:{self.connector_port}"
        config.setdefault("database", {})["url"] = self.db_url
        writer_url = f"http://127.0.0.1:{self.writer_port}"
        for rule in config.get("rules", []):
            target = rule.get("target", {})
            if target.get("type") == "lambda":
                target["endpoint"] = writer_url
        client = config.setdefault("client", {})
        # Frequent server pings, so that centrifuge-python's ping-only liveness check is exercised.
        if "ping_interval_secs" in client:
            client["ping_interval_secs"] = 5
        if "pong_timeout_secs" in client:
            client["pong_timeout_secs"] = 4
        # Keys for the PyJWT scenario (anonymous connections stay allowed, as config.json has them).
        config["auth"] = dict(config.get("auth", {}), hmac_secret_key=JWT_SECRET,
                              rsa_public_key=str(KEYS / "rsa_public.pem"))
        # The server API, for the cent scenario; a short node TTL, so a killed node's members go quickly.
        config["api"] = {"key": API_KEY}
        config.setdefault("presence", {})["node_ttl_secs"] = NODE_TTL_SECS
        cfg_path = self.dir / "config.json"
        cfg_path.write_text(json.dumps(config, indent=2))

        env = dict(os.environ)
        env.update({"DATABASE_URL": self.db_url, "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1",
                    # The writer accepts only invocations the connector signs with this (issue 9, item 5).
                    "WRITER_SECRET": secrets.token_hex(32)})
        env_conn = dict(env, RELAY_LISTEN=f"127.0.0.1:{self.connector_port}")
        env_writer = dict(env, WRITER_LISTEN=f"127.0.0.1:{self.writer_port}")
        env_writer.pop("AWS_LAMBDA_RUNTIME_API", None)

        connector_bin = str(self.bin_dir / "connector")
        r = subprocess.run(
            [connector_bin, "--config", str(cfg_path), "migrate"],
            env=env_conn, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        (self.dir / "migrate.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            self.results.fail("connector migrate", f"exit {r.returncode}:\n{tail(self.dir / 'migrate.log')}")
            return False
        self.results.ok("connector migrate")

        self.writer = Service("writer-lambda", [str(self.bin_dir / "writer-lambda")], env_writer, self.dir / "writer.log")
        self.connector = Service("connector", [connector_bin, "--config", str(cfg_path)], env_conn, self.dir / "connector.log")
        self.writer.start()
        self.connector.start()
        err = self.writer.wait_http(f"{writer_url}/healthz")
        if err:
            self.results.fail("writer-lambda healthy", f"{err}\n{tail(self.writer.logfile)}")
            return False
        self.results.ok("writer-lambda healthy", writer_url)
        err = self.connector.wait_http(f"{self.base}/readyz")
        if err:
            self.results.fail("connector ready", f"{err}\n{tail(self.connector.logfile)}")
            return False
        if http_status(f"{self.base}/healthz") != 200:
            self.results.fail("connector ready", f"{self.base}/healthz is not 200 while /readyz is")
            return False
        self.results.ok("connector ready", self.base)
        return True

    def teardown(self) -> None:
        for svc in (self.connector, self.writer):
            if svc is not None:
                try:
                    svc.stop()
                except Exception as e:  # noqa: BLE001 - teardown goes on
                    log(f"stopping {svc.name}: {e}")
        if self.db_created and not self.args.keep_db:
            try:
                psql(self.admin_url, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE);')
                log(f"dropped database {self.db_name}")
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                log(f"could not drop database {self.db_name}: {e}")
        elif self.db_created:
            log(f"kept database {self.db_name} ({self.db_url})")

    # ---- the forced disconnect ------------------------------------------------------------------

    def restart_connector(self, label: str) -> list[str] | None:
        """SIGKILL the connector, write rows while it is down, start it again on the same port."""
        assert self.connector is not None
        self.connector.kill()
        log(f"[{label}] connector killed (SIGKILL)")
        tag = secrets.token_hex(3)
        ids = [f"sql-{label}-{tag}-{i}" for i in range(1, ROWS_WHILE_DOWN + 1)]
        sql = """
INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
VALUES (:'id1', 'sql-writer', 'written while the connector was down (1)', 'psql',
        (extract(epoch FROM now()) * 1000)::bigint);
BEGIN;
INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
VALUES (:'id2', 'sql-writer', 'written while the connector was down (2)', 'psql',
        (extract(epoch FROM now()) * 1000)::bigint);
INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
VALUES (:'id3', 'sql-writer', 'written while the connector was down (3)', 'psql',
        (extract(epoch FROM now()) * 1000)::bigint);
COMMIT;
"""
        try:
            psql(self.db_url, sql, {"id1": ids[0], "id2": ids[1], "id3": ids[2]})
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            self.results.fail(f"{label}: rows inserted while the connector is down", str(e))
            return None
        self.results.ok(f"{label}: rows inserted while the connector is down", ", ".join(ids))
        time.sleep(0.5)  # let the client see a refused reconnect or two
        self.connector.start()
        err = self.connector.wait_http(f"{self.base}/readyz")
        if err:
            self.results.fail(f"{label}: connector ready again after SIGKILL, same port", f"{err}\n{tail(self.connector.logfile)}")
            return None
        self.results.ok(f"{label}: connector ready again after SIGKILL, same port")
        return ids

    # ---- one SDK scenario -----------------------------------------------------------------------

    def scenario(self, label: str, argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> None:
        frames = self.dir / f"{label}-frames.log"
        stderr_path = self.dir / f"{label}-stderr.log"
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update({
            "RELAY_WS_URL": self.ws_url,
            "SCENARIO_LABEL": label,
            "FRAME_LOG": str(frames),
            "STEP_TIMEOUT_MS": os.environ.get("STEP_TIMEOUT_MS", "20000"),
            "RESTART_TIMEOUT_MS": "90000",
            "JWT_HMAC_SECRET": JWT_SECRET,
            "RELAY_API_URL": f"{self.base}/api",
            "RELAY_API_KEY": API_KEY,
            "RELAY_DATABASE_URL": self.db_url,
            "RELAY_NODE_TTL_SECS": str(NODE_TTL_SECS),
            "JWT_RSA_PRIVATE_KEY": str(KEYS / "rsa_private.pem"),
            # For jwt_scenario.py's second connector (JWKS): the run's configuration and binaries.
            "RELAY_CONFIG": str(self.dir / "config.json"),
            "RELAY_BIN_DIR": str(self.bin_dir),
        })
        log(f"[{label}] {' '.join(argv)}")
        with open(stderr_path, "wb") as err_fh:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_fh, text=True, bufsize=1
            )
            lines: queue.Queue[str | None] = queue.Queue()

            def pump() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.put(line.rstrip("\n"))
                lines.put(None)

            threading.Thread(target=pump, daemon=True).start()
            deadline = time.monotonic() + SCENARIO_TIMEOUT_S
            passed = failed = None
            scenario_failed = False
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    self.results.fail(f"{label}: scenario finished", f"no result after {SCENARIO_TIMEOUT_S} s; killed")
                    proc.kill()
                    break
                if line is None:
                    break
                print(f"[{label}] {line}", flush=True)
                if line.startswith("FAIL ") or line.startswith("SKIP "):
                    scenario_failed = True
                elif line.startswith("READY_FOR_RESTART"):
                    ids = self.restart_connector(label)
                    assert proc.stdin is not None
                    try:
                        if ids is None:
                            proc.stdin.close()
                        else:
                            proc.stdin.write("RESTARTED " + json.dumps({"msg_ids": ids}) + "\n")
                            proc.stdin.flush()
                    except (BrokenPipeError, OSError):
                        pass
                elif line.startswith("RESULT "):
                    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                    passed, failed = int(fields.get("passed", 0)), int(fields.get("failed", 0))
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if passed is None or failed is None:
            self.results.fail(f"{label}: scenario finished", f"exited {code} without a RESULT line\n{tail(stderr_path)}")
            scenario_failed = True
        else:
            self.results.passed += passed
            self.results.failed += failed
            if failed:
                self.results.failures.append(f"{label}: {failed} scenario check(s) failed")
            if code != 0 and failed == 0:
                self.results.fail(f"{label}: scenario exit code", f"{code} although every check passed\n{tail(stderr_path)}")
                scenario_failed = True
        if scenario_failed or (failed or 0) > 0:
            self.dump_logs(label, frames, stderr_path)

    def dump_logs(self, label: str, frames: Path, stderr_path: Path) -> None:
        log(f"[{label}] ---- last wire frames ({frames.relative_to(ROOT)}) ----\n{tail(frames, 60)}")
        if stderr_path.exists() and stderr_path.stat().st_size:
            log(f"[{label}] ---- scenario stderr ----\n{tail(stderr_path, 30)}")
        if self.connector:
            log(f"---- connector log ({self.connector.logfile.relative_to(ROOT)}) ----\n{tail(self.connector.logfile, 60)}")
        if self.writer:
            log(f"---- writer log ({self.writer.logfile.relative_to(ROOT)}) ----\n{tail(self.writer.logfile, 30)}")

    def main(self) -> int:
        try:
            if self.setup():
                only = self.args.only
                py = HERE / ".venv" / "bin" / "python"
                protobuf = {"SDK_PROTOCOL": "protobuf"}
                if only in (None, "node"):
                    self.scenario("node", ["node", "scenario.mjs"], HERE / "node")
                    # Presence and join/leave, a SIGKILLed client process.
                    self.scenario("node-presence", ["node", "presence.mjs"], HERE / "node")
                if only in (None, "node", "protobuf"):
                    # The chat scenario with centrifuge-js's Protobuf build (binary frames).
                    self.scenario("node-protobuf", ["node", "scenario.mjs"], HERE / "node", protobuf)
                if only in (None, "node", "sse"):
                    # The chat scenario over centrifuge-js's emulated transports (SSE, HTTP-streaming).
                    self.scenario("node-sse", ["node", "scenario.mjs"], HERE / "node", {"SDK_TRANSPORT": "sse"})
                    self.scenario("node-http-stream", ["node", "scenario.mjs"], HERE / "node",
                                  {"SDK_TRANSPORT": "http_stream"})
                    # centrifuge-js's Protobuf build over HTTP-streaming (length-delimited frames).
                    self.scenario("node-http-stream-protobuf", ["node", "scenario.mjs"], HERE / "node",
                                  {"SDK_TRANSPORT": "http_stream", "SDK_PROTOCOL": "protobuf"})
                if only in (None, "python", "protobuf"):
                    # The chat scenario with centrifuge-python in Protobuf mode (use_protobuf=True).
                    self.scenario("python-protobuf", [str(py if py.exists() else sys.executable), "scenario.py"],
                                  HERE / "python", protobuf)
                if only in (None, "python"):
                    self.scenario("python", [str(py if py.exists() else sys.executable), "scenario.py"], HERE / "python")
                    # Tokens minted by a third-party JWT library (PyJWT), through centrifuge-python.
                    self.scenario("python-jwt", [str(py if py.exists() else sys.executable), "jwt_scenario.py"],
                                  HERE / "python")
                    # The server API with cent, presence, notifications, relay.publish transactions.
                    self.scenario("python-api", [str(py if py.exists() else sys.executable), "api_scenario.py"],
                                  HERE / "python")
                if only in (None, "python", "chat"):
                    py = HERE / ".venv" / "bin" / "python"
                    # The chat's rooms and direct messages: permissions, with raw protocol clients.
                    self.scenario("chat-permissions", [str(py if py.exists() else sys.executable), "chat_permissions.py"],
                                  HERE / "python")
        except KeyboardInterrupt:
            self.results.fail("run", "interrupted")
        finally:
            self.teardown()
        if self.results.failures:
            log("failures:")
            for f in self.results.failures:
                log("  " + f.splitlines()[0])
        print(f"{self.results.passed} passed, {self.results.failed} failed", flush=True)
        return 0 if self.results.failed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["node", "python", "chat", "protobuf", "sse"],
                        help="run one SDK's scenarios, only the chat permissions, or only the Protobuf-mode ones")
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"), help="where connector and writer-lambda are")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database (for debugging)")
    args = parser.parse_args()
    if shutil.which("psql") is None:
        print("[sdk] psql is not on PATH (Debian: apt-get install postgresql-client)", flush=True)
        print("0 passed, 1 failed", flush=True)
        return 1

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
