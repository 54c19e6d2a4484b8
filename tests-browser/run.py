#!/usr/bin/env python3
"""The browser tests' launcher: the system from the shared harness (tests-support/relaytest), the
Playwright scripts as its scenarios.

Default (run.mjs, the chat page in headless Chromium):
  1. a fresh database (relay_browser_<random>) on DATABASE_URL's server; `connector migrate`;
  2. writer-lambda and the connector from target/debug on free ports, with config.json plus the demo token
     endpoint (a fresh HMAC key) and a server API key (a fresh one), waiting for /healthz and /readyz;
  3. `node run.mjs` with RELAY_BASE_URL, RELAY_DATABASE_URL, RELAY_API_KEY and BROWSER_ARTIFACTS; its
     PASS/FAIL lines are relayed and its `RESULT passed=N failed=N` counted;
  4. processes stopped and the database dropped, always.
With --oversized (oversized.mjs, an oversized message ends with close 1009 in Chromium): a fresh database
(relay_oversized_<random>) and the connector alone with config.json, no migrate (the script needs no table).

Prints `N passed, N failed` last (its own checks and the script's); exit code 0 only when nothing failed.
Logs, the configuration and screenshots: artifacts/browser/ (oversized: artifacts/browser/oversized/).

Usage: tests-browser/run.py [--oversized [--rounds N]] [--bin-dir DIR] [--keep-db]
(CHROMIUM=/path overrides /usr/bin/chromium; runs with the system's python3: the harness needs only the
standard library.)
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests-support"))

from relaytest import Results, System, install_sigterm, require_psql, run_scenario  # noqa: E402
from relaytest.system import point_rules_at, repository_config  # noqa: E402

ARTIFACTS = ROOT / "artifacts" / "browser"
SCRIPT_TIMEOUT_S = 900


def log(msg: str) -> None:
    print(f"[browser] {msg}", flush=True)


def chat_page(args: argparse.Namespace, results: Results) -> None:
    """The chat page (run.mjs) against writer + connector."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for f in ARTIFACTS.glob("*.log"):
        f.unlink()
    system = System("relay_browser", art_dir=ARTIFACTS, bin_dir=Path(args.bin_dir), keep_db=args.keep_db, log=log)
    try:
        err = system.missing_binaries() or system.create_database()
        if err:
            results.fail("setup", err)
            return
        log(f"database {system.db_name}; artifacts in artifacts/browser")
        port = system.free_port()
        config = repository_config()
        config["listen"] = f"127.0.0.1:{port}"
        config["database"] = dict(config.get("database", {}), url=system.db_url)
        point_rules_at(config, system.writer_url)
        # The page signs in with the demo token endpoint (off in the shipped configs); the server API closes
        # a user's connections for the terminal-disconnect check. Keys: fresh per run. Quick dead-link
        # detection is not needed: the proxy resets A's sockets, which the page sees at once.
        config["demo"] = {"token_endpoint": True}
        config["auth"] = dict(config.get("auth", {}), hmac_secret_key=secrets.token_hex(32))
        api_key = secrets.token_hex(24)
        config["api"] = dict(config.get("api", {}), key=api_key)
        cfg = system.write_config("config", config)
        err = system.migrate(cfg)
        if err:
            results.fail("setup", f"connector migrate: {err}")
            return
        results.ok("connector migrate")
        connector = system.new_connector(cfg, port)
        system.new_writer().start()
        connector.start()
        assert system.writer is not None
        err = system.writer.wait_http(f"{system.writer_url}/healthz") or connector.wait_http(f"{connector.base}/readyz")
        if err:
            results.fail("setup", err)
            system.dump_logs(lines=40, writer_lines=40)
            return
        results.ok("writer and connector ready", connector.base)
        env = dict(os.environ, RELAY_BASE_URL=connector.base, RELAY_DATABASE_URL=system.db_url, RELAY_API_KEY=api_key,
                   BROWSER_ARTIFACTS=str(ARTIFACTS))
        if not run_scenario(results, "browser", ["node", "run.mjs"], HERE, env, ARTIFACTS / "run-stderr.log",
                            SCRIPT_TIMEOUT_S):
            system.dump_logs(lines=60, writer_lines=20)
    finally:
        system.teardown()


def oversized(args: argparse.Namespace, results: Results) -> None:
    """An oversized message in Chromium (oversized.mjs) against a connector alone."""
    art = ARTIFACTS / "oversized"
    system = System("relay_oversized", art_dir=art, bin_dir=Path(args.bin_dir), keep_db=args.keep_db, writer=False,
                    random_bytes=6, log=log)
    try:
        err = system.missing_binaries(("connector",)) or system.create_database()
        if err:
            results.fail("setup", err)
            return
        port = system.free_port()
        config = repository_config()
        config["listen"] = f"127.0.0.1:{port}"
        config["database"] = dict(config.get("database", {}), url=system.db_url)
        connector = system.new_connector(system.write_config("config", config), port)
        connector.start()
        err = connector.wait_http(f"{connector.base}/readyz")
        if err:
            results.fail("setup", f"connector not ready: {err}")
            system.dump_logs(lines=40)
            return
        env = dict(os.environ, RELAY_BASE_URL=connector.base, OVERSIZED_ROUNDS=str(args.rounds))
        if not run_scenario(results, "oversized", ["node", "oversized.mjs"], HERE, env, art / "oversized-stderr.log",
                            SCRIPT_TIMEOUT_S):
            system.dump_logs(lines=40)
    finally:
        system.teardown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oversized", action="store_true", help="run oversized.mjs instead of the chat page")
    parser.add_argument("--rounds", type=int, default=12, help="oversized sends of oversized.mjs (default 12)")
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"), help="where connector and writer-lambda are")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database (for debugging)")
    args = parser.parse_args()
    results = Results(log)
    if not require_psql(log):
        print("0 passed, 1 failed", flush=True)
        return 1
    install_sigterm()
    try:
        (oversized if args.oversized else chat_page)(args, results)
    except KeyboardInterrupt:
        results.fail("run", "interrupted")
    return results.close()


if __name__ == "__main__":
    sys.exit(main())
