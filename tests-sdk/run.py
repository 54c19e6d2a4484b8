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
(steps 1-3 and 5 are the shared harness's, tests-support/relaytest: `System`)
and prints `N passed, N failed` (scenario checks plus its own) as its last line. Exit code 0 only when
nothing failed. Logs, configs and wire frames of each run are kept in artifacts/sdk-tests/<database>/.

With --capture wal the connectors run `capture.mode = wal` (RELAY__CAPTURE__MODE) on a throwaway cluster
with wal_level = logical started here (relaytest's `Cluster`), so every scenario also checks the logical
replication path; without it, trigger mode on DATABASE_URL's server.

Usage: tests-sdk/run.py [--only node|python|chat|protobuf|sse] [--capture trigger|wal] [--bin-dir DIR] [--keep-db]
(`--only chat` runs the chat permissions scenario only; `--only protobuf` the two Protobuf-mode chat
scenarios only; `--only sse` centrifuge-js's chat scenario over SSE and over HTTP-streaming, JSON and Protobuf.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests-support"))

from relaytest import (  # noqa: E402
    Cluster,
    Results,
    System,
    install_sigterm,
    prune_runs,
    psql,
    require_psql,
    run_scenario,
    tail,
)
from relaytest.system import point_rules_at, repository_config  # noqa: E402

KEYS = ROOT / "connector" / "tests" / "keys"  # test-only keys, also used by connector/tests/auth.rs
JWT_SECRET = "sdk-test-secret-sdk-test-secret-0123"
API_KEY = "sdk-test-api-key-0123456789"
NODE_TTL_SECS = 6
SCENARIO_TIMEOUT_S = 300
ROWS_WHILE_DOWN = 3


def log(msg: str) -> None:
    print(f"[sdk] {msg}", flush=True)


def sdk_config(port: int, db_url: str, writer_url: str) -> dict:
    """The repository's config.json for this run: its port, database and writer; frequent server pings
    (so that centrifuge-python's ping-only liveness check is exercised); the keys of the JWT scenarios
    (anonymous connections stay allowed, as config.json has them); the server API, for the cent scenario;
    a short node TTL, so a killed node's members go quickly."""
    config = repository_config()
    config["listen"] = f"127.0.0.1:{port}"
    config.setdefault("database", {})["url"] = db_url
    point_rules_at(config, writer_url)
    client = config.setdefault("client", {})
    if "ping_interval_secs" in client:
        client["ping_interval_secs"] = 5
    if "pong_timeout_secs" in client:
        client["pong_timeout_secs"] = 4
    config["auth"] = dict(config.get("auth", {}), hmac_secret_key=JWT_SECRET,
                          rsa_public_key=str(KEYS / "rsa_public.pem"))
    config["api"] = {"key": API_KEY}
    config.setdefault("presence", {})["node_ttl_secs"] = NODE_TTL_SECS
    return config


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = Results(log)
        self.system = System("relay_sdk", ROOT / "artifacts" / "sdk-tests", bin_dir=Path(args.bin_dir),
                             keep_db=args.keep_db, log=log)
        self.dir = self.system.dir
        self.port = self.system.free_port()
        self.connector = None

    # ---- setup and teardown ---------------------------------------------------------------------

    def setup(self) -> bool:
        system, r = self.system, self.results
        err = system.missing_binaries()
        if err:
            r.fail("binaries built", err)
            return False
        err = system.create_database()
        prune_runs(self.dir.parent, "relay_sdk_*", keep=20)
        if err:
            r.fail("create database", err)
            return False
        log(f"database {system.db_name}; artifacts in {self.dir.relative_to(ROOT)}")
        cfg = system.write_config("config", sdk_config(self.port, system.db_url, system.writer_url))
        err = system.migrate(cfg)
        if err:
            r.fail("connector migrate", err)
            return False
        r.ok("connector migrate")
        self.connector = system.new_connector(cfg, self.port)
        system.new_writer().start()
        self.connector.start()
        assert system.writer is not None
        err = system.writer.wait_http(f"{system.writer_url}/healthz")
        if err:
            r.fail("writer-lambda healthy", f"{err}\n{tail(system.writer.logfile)}")
            return False
        r.ok("writer-lambda healthy", system.writer_url)
        err = self.connector.wait_ready()
        if err:
            r.fail("connector ready", f"{err}\n{tail(self.connector.logfile)}")
            return False
        r.ok("connector ready", self.connector.base)
        return True

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
            psql(self.system.db_url, sql, {"id1": ids[0], "id2": ids[1], "id3": ids[2]})
        except (RuntimeError, OSError) as e:
            self.results.fail(f"{label}: rows inserted while the connector is down", str(e))
            return None
        self.results.ok(f"{label}: rows inserted while the connector is down", ", ".join(ids))
        time.sleep(0.5)  # let the client see a refused reconnect or two
        self.connector.start()
        err = self.connector.wait_http(f"{self.connector.base}/readyz")
        if err:
            self.results.fail(f"{label}: connector ready again after SIGKILL, same port",
                              f"{err}\n{tail(self.connector.logfile)}")
            return None
        self.results.ok(f"{label}: connector ready again after SIGKILL, same port")
        return ids

    # ---- one SDK scenario -----------------------------------------------------------------------

    def scenario(self, label: str, argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> None:
        assert self.connector is not None
        frames = self.dir / f"{label}-frames.log"
        stderr_path = self.dir / f"{label}-stderr.log"
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update({
            "RELAY_WS_URL": self.connector.ws_url,
            "SCENARIO_LABEL": label,
            "FRAME_LOG": str(frames),
            "STEP_TIMEOUT_MS": os.environ.get("STEP_TIMEOUT_MS", "20000"),
            "RESTART_TIMEOUT_MS": "90000",
            "JWT_HMAC_SECRET": JWT_SECRET,
            "RELAY_API_URL": f"{self.connector.base}/api",
            "RELAY_API_KEY": API_KEY,
            "RELAY_DATABASE_URL": self.system.db_url,
            "RELAY_NODE_TTL_SECS": str(NODE_TTL_SECS),
            "JWT_RSA_PRIVATE_KEY": str(KEYS / "rsa_private.pem"),
            # For jwt_scenario.py's second connector (JWKS): the run's configuration and binaries.
            "RELAY_CONFIG": str(self.dir / "config.json"),
            "RELAY_BIN_DIR": str(self.system.bin_dir),
        })
        log(f"[{label}] {' '.join(argv)}")

        def restart(_line: str) -> str | None:
            ids = self.restart_connector(label)
            return None if ids is None else "RESTARTED " + json.dumps({"msg_ids": ids})

        if not run_scenario(self.results, label, argv, cwd, env, stderr_path, SCENARIO_TIMEOUT_S,
                            {"READY_FOR_RESTART": restart}):
            self.dump_logs(label, frames, stderr_path)

    def dump_logs(self, label: str, frames: Path, stderr_path: Path) -> None:
        log(f"[{label}] ---- last wire frames ({frames.relative_to(ROOT)}) ----\n{tail(frames, 60)}")
        if stderr_path.exists() and stderr_path.stat().st_size:
            log(f"[{label}] ---- scenario stderr ----\n{tail(stderr_path, 30)}")
        self.system.dump_logs(lines=60, writer_lines=30)

    def main(self) -> int:
        try:
            if self.setup():
                only = self.args.only
                py = HERE / ".venv" / "bin" / "python"
                python = str(py if py.exists() else sys.executable)
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
                    self.scenario("python-protobuf", [python, "scenario.py"], HERE / "python", protobuf)
                if only in (None, "python"):
                    self.scenario("python", [python, "scenario.py"], HERE / "python")
                    # Tokens minted by a third-party JWT library (PyJWT), through centrifuge-python.
                    self.scenario("python-jwt", [python, "jwt_scenario.py"], HERE / "python")
                    # The server API with cent, presence, notifications, relay.publish transactions.
                    self.scenario("python-api", [python, "api_scenario.py"], HERE / "python")
                if only in (None, "python", "chat"):
                    # The chat's rooms and direct messages: permissions, with raw protocol clients.
                    self.scenario("chat-permissions", [python, "chat_permissions.py"], HERE / "python")
        except KeyboardInterrupt:
            self.results.fail("run", "interrupted")
        finally:
            self.system.teardown(drop_slots=self.args.capture == "wal")
        return self.results.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["node", "python", "chat", "protobuf", "sse"],
                        help="run one SDK's scenarios, only the chat permissions, or only the Protobuf-mode ones")
    parser.add_argument("--capture", choices=["trigger", "wal"], default="trigger",
                        help="capture mode of the connectors (default trigger; wal starts a logical cluster)")
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"), help="where connector and writer-lambda are")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database (for debugging)")
    args = parser.parse_args()
    if not require_psql(log):
        print("0 passed, 1 failed", flush=True)
        return 1
    install_sigterm()
    if args.capture == "trigger":
        return Run(args).main()
    # wal: every process of the run (System copies the environment) reads the mode and the cluster's URL.
    cluster = Cluster(ROOT / "artifacts" / "sdk-tests" / "wal-cluster", logical=True, log=log)
    try:
        asyncio.run(cluster.start())
    except Exception as e:  # noqa: BLE001 - reported
        log(f"wal: throwaway cluster with wal_level = logical: {e}")
        print("0 passed, 1 failed", flush=True)
        asyncio.run(cluster.destroy())
        return 1
    os.environ["RELAY__CAPTURE__MODE"] = "wal"
    os.environ["DATABASE_URL"] = cluster.url
    log(f"capture mode wal: cluster with wal_level = logical on port {cluster.port}")
    try:
        return Run(args).main()
    finally:
        asyncio.run(cluster.destroy())


if __name__ == "__main__":
    sys.exit(main())
