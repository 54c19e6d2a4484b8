#!/usr/bin/env python3
"""Upstream conformance, by hand: centrifuge-js's OWN test suite (jest) against the relay.

centrifuge-js publishes no tests in any npm package (README, "Upstream conformance"), so this runner
is not part of `scripts/test`: it takes a source tree of centrifuge-js that you extracted yourself
(`--checkout DIR`, e.g. `git --git-dir=<mirror> archive <commit> | tar -x -C DIR`) and:

  1. installs the checkout's devDependencies from its own lockfile: `yarn install --frozen-lockfile`
     for a yarn.lock (upstream's CI runs yarn; yarn 1.22.22 itself is installed from the npm registry
     into target/upstream-js/tools/, and the lockfile's packages are fetched from the npm registry),
     `npm ci` for a package-lock.json, else `npm install` (said in the log). Install scripts are not
     run (`--ignore-scripts`): upstream's `prepare` builds the bundles, which the tests do not use
     (they import src/ through ts-jest);
  2. creates a fresh database (relay_upstream_js_<random>) and writes a connector configuration
     translated from the checkout's centrifugo_test.json, the Centrifugo upstream's CI runs its suite
     against (see `relay_config`), then runs `connector migrate`;
  3. starts, in a network namespace of its own (`unshare -rn`, loopback only, brought up here), the
     connector listening on port 8000 — the address upstream's tests hard-code
     (ws://localhost:8000/connection/websocket, http://localhost:8000/connection/http_stream,
     /connection/sse, /emulation, /api) — reaching PostgreSQL through its unix socket, and runs
     upstream's jest there with upstream's own flags (`jest --detectOpenHandles --verbose`, its
     jest.config.js, ts-jest), unmodified, plus:
       --setupFilesAfterEnv bind.cjs   the run-time bindings of upstream's two short secrets (token
                                       key, API key) and a per-test count of traffic to the relay;
       --testPathIgnorePatterns / --testNamePattern   the files and tests of exclusions.txt;
       --json --outputFile             the results, read back here;
  4. stops the connector and drops the database, always;
and prints one line per case, the counts per file, and `N passed, N failed` as its last line
(exit 0 only when nothing failed). Cases of the run files that never touched the relay
(upstream's unit tests inside them) are counted apart as SDK-only. Logs, the configuration and
jest's JSON report are kept in artifacts/upstream-js/<db>/.

Needs: node and npm, psql, `unshare` and `ip` (util-linux, iproute2), user namespaces (or root),
PostgreSQL on its unix socket (trust for user postgres), and `cargo build -p connector --bins`.

Usage: tests-sdk/upstream/js/run_js.py --checkout DIR [--bin-dir DIR] [--keep-db] [--skip-install]
                                      [--pg-socket-dir DIR] [-t JEST_NAME_REGEX] [FILE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "tests-support"))

from relaytest import http_status, psql, read_reasons, tail  # noqa: E402
from relaytest.system import NO_RATE_LIMITS  # noqa: E402  (the shared harness's helpers)

TOOLS = ROOT / "target" / "upstream-js" / "tools"
ARTIFACTS = ROOT / "artifacts" / "upstream-js"
YARN_VERSION = "1.22.22"
NPM_REGISTRY = "https://registry.npmjs.org/"
RELAY_PORT = 8000  # the port upstream's tests hard-code; ours inside the network namespace
DEFAULT_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 900.0
JEST_BUDGET_S = 1200.0
DETAIL_LINES = 14
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(msg: str) -> None:
    print(f"[upstream-js] {msg}", flush=True)


# ---- the checkout -------------------------------------------------------------------------------


def check_checkout(tree: Path) -> dict:
    """The checkout's package.json, after checking that the tree is centrifuge-js with its suite."""
    pkg_path = tree / "package.json"
    if not pkg_path.is_file():
        raise RuntimeError(f"{tree}: no package.json (expected an extracted centrifuge-js source tree)")
    pkg = json.loads(pkg_path.read_text())
    if pkg.get("name") != "centrifuge":
        raise RuntimeError(f"{tree}: package {pkg.get('name')!r} is not centrifuge")
    for need in ("centrifugo_test.json", "jest.config.js", "src/centrifuge.test.ts"):
        if not (tree / need).is_file():
            raise RuntimeError(f"{tree}: no {need}")
    return pkg


def yarn_binary() -> Path:
    """yarn 1.x, installed once from the npm registry with npm into target/upstream-js/tools/."""
    yarn = TOOLS / "node_modules" / ".bin" / "yarn"
    if yarn.exists():
        return yarn
    TOOLS.mkdir(parents=True, exist_ok=True)
    log(f"installing yarn {YARN_VERSION} with npm into {TOOLS.relative_to(ROOT)}")
    r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix", str(TOOLS),
                        f"yarn@{YARN_VERSION}"], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if r.returncode != 0 or not yarn.exists():
        raise RuntimeError(f"npm install yarn@{YARN_VERSION} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return yarn


def install(tree: Path, logfile: Path) -> str:
    """Installs the checkout's dependencies from its lockfile; returns how (for the summary)."""
    if (tree / "yarn.lock").is_file():
        how = f"yarn {YARN_VERSION} install --frozen-lockfile --ignore-scripts (yarn.lock)"
        argv = [str(yarn_binary()), "install", "--frozen-lockfile", "--non-interactive", "--ignore-scripts",
                "--registry", NPM_REGISTRY]
    elif (tree / "package-lock.json").is_file():
        how = "npm ci --ignore-scripts (package-lock.json)"
        argv = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
    else:
        how = "npm install --ignore-scripts (the checkout has no lockfile: versions are resolved now)"
        argv = ["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"]
    log(f"installing the checkout's devDependencies: {how}")
    with open(logfile, "w") as out:
        r = subprocess.run(argv, cwd=tree, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S)
    if r.returncode != 0:
        raise RuntimeError(f"dependency install failed ({r.returncode}); see {logfile}\n{tail(logfile)}")
    if not (tree / "node_modules" / "jest" / "bin" / "jest.js").is_file():
        raise RuntimeError("dependency install left no node_modules/jest")
    return how


# ---- the configuration ----------------------------------------------------------------------------


def duration_secs(text: str | int | float) -> int:
    """Centrifugo durations ("300s", "5m", "1h", or seconds as a number) in whole seconds."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text.strip())
    if not m:
        raise RuntimeError(f"centrifugo_test.json: duration {text!r} not understood")
    n, unit = int(m.group(1)), m.group(2)
    return {"ms": n // 1000, "s": n, "m": n * 60, "h": n * 3600}[unit]


# Keys of a stream namespace the translation understands (anything else stops the run: a new
# upstream option must be looked at, not silently dropped).
STREAM_NS_KEYS = {
    "name", "subscription_type", "presence", "join_leave", "force_push_join_leave", "allowed_delta_types",
    "delta_publish", "history_size", "history_ttl", "force_recovery", "allow_subscribe_for_client",
    "allow_publish_for_subscriber", "allow_publish_for_client", "allow_history_for_subscriber",
    "allow_history_for_client", "allow_presence_for_subscriber", "allow_presence_for_client",
}
TOP_KEYS = {"client", "log", "http_stream", "sse", "map_broker", "shared_poll", "proxies", "http_api", "channel"}


def relay_config(upstream: dict, db_url: str) -> tuple[dict, dict, list[str]]:
    """The relay's translation of upstream's centrifugo_test.json.

    Returns (config, secrets, notes): `secrets` holds upstream's token key and API key (bound at run
    time by bind.cjs: the relay refuses HMAC keys under 32 bytes and API keys under 16 characters, so
    the relay runs with random keys of its own, given in the environment), `notes` what is not
    translated and why.

    Centrifugo (centrifugo_test.json)              relay
    client.insecure: true                          client.allow_anonymous; every channel entry
    (connect without a token; subscribe, publish,  subscribe/publish/history/presence "anyone";
    history and presence skip permission checks)   client.allow_publish (pub/sub without a rule)
    client.token.hmac_secret_key                   auth.hmac_secret_key: a random 48-character key
                                                   (RELAY__AUTH__HMAC_SECRET_KEY); bind.cjs re-signs
                                                   tokens that upstream's key signed
    http_api.key                                   api.key: a random 40-character key
                                                   (RELAY__API__KEY); bind.cjs swaps upstream's key
    http_stream / sse enabled                      always served (/connection/http_stream, /sse,
                                                   /emulation)
    channel.namespaces[] of the stream type        channels[] entry "NAME:*", first; retention rule
      history_size / history_ttl                   max_publications / max_age_secs
      allowed_delta_types, delta_publish           allowed_delta_types (every publication goes to a
                                                   delta subscriber as a delta when smaller)
      presence (+ join_leave, force_push_…)        presence.channels entry
      force_recovery                               always: every relay subscription is recoverable
    channel.without_namespace                      the last entries, pattern "*"
    map / shared_poll namespaces, map_broker,      not translated: the relay has no map or
    shared_poll, proxies                           shared-poll subscriptions (exclusions.txt)
    client.concurrency, log                        not translated (no behaviour a test observes)
    no rate limits                                 the relay's publish/subscribe limits raised far
                                                   above the suite's use
    """
    notes: list[str] = []
    unknown = set(upstream) - TOP_KEYS
    if unknown:
        raise RuntimeError(f"centrifugo_test.json: top-level keys not translated: {sorted(unknown)}")
    client = upstream.get("client", {})
    insecure = bool(client.get("insecure"))
    upstream_hmac = client.get("token", {}).get("hmac_secret_key", "")
    upstream_api_key = upstream.get("http_api", {}).get("key", "")
    if not upstream_hmac or not upstream_api_key:
        raise RuntimeError("centrifugo_test.json: expected client.token.hmac_secret_key and http_api.key")
    for key in ("http_stream", "sse"):
        if not upstream.get(key, {}).get("enabled"):
            notes.append(f"{key} is not enabled upstream; the relay serves it anyway")

    channel = upstream.get("channel", {})
    namespaces = list(channel.get("namespaces", []))
    default_ns = dict(channel.get("without_namespace", {}), name="")

    def access(ns: dict, what: str) -> str:
        if insecure:
            return "anyone"
        if ns.get(f"allow_{what}_for_client"):
            return "anyone"
        if what != "subscribe" and ns.get(f"allow_{what}_for_subscriber"):
            return "subscriber"
        return "token" if what == "subscribe" else "nobody"

    entries, retention, presence = [], [], []
    for ns in namespaces + [default_ns]:
        name = ns["name"]
        kind = ns.get("subscription_type", "stream")
        if kind != "stream":
            notes.append(f"namespace {name!r} ({kind}) not translated: the relay has no {kind} subscriptions")
            continue
        unknown = set(ns) - STREAM_NS_KEYS
        if unknown:
            raise RuntimeError(f"centrifugo_test.json: namespace {name or 'without_namespace'!r}: keys not "
                               f"translated: {sorted(unknown)}")
        pattern = f"{name}:*" if name else "*"
        entries.append({
            "channel": pattern,
            "subscribe": access(ns, "subscribe"),
            "publish": access(ns, "publish"),
            "history": access(ns, "history"),
            "presence": access(ns, "presence"),
            "allowed_delta_types": list(ns.get("allowed_delta_types", [])),
        })
        if ns.get("history_size"):
            retention.append({"channel": pattern, "max_publications": int(ns["history_size"]),
                              "max_age_secs": duration_secs(ns.get("history_ttl", "300s"))})
        if ns.get("presence"):
            presence.append({"channel": pattern, "join_leave": bool(ns.get("join_leave")),
                             "force_push_join_leave": bool(ns.get("force_push_join_leave"))})
        elif name:
            notes.append(f"namespace {name!r} has no presence upstream; the relay's presence rule \"*\" "
                         "covers it (the relay has no per-pattern \"no presence\" entry)")
        if ns.get("history_size") and not ns.get("force_recovery"):
            notes.append(f"namespace {name!r}: recovery is always on in the relay")
    for key in ("map_broker", "shared_poll", "proxies"):
        if key in upstream:
            notes.append(f"{key} not translated (map / shared-poll subscriptions only)")

    config = {
        "listen": f"[::]:{RELAY_PORT}",
        "database": {"url": db_url, "pool_size": 10},
        "client": {
            "allow_anonymous": insecure,
            "allow_publish": True,
            "history_max_limit": 300,
            **NO_RATE_LIMITS,
        },
        "channels": entries,
        "presence": {"engine": "memory", "channels": presence},
        "retention": {"rules": retention},
    }
    return config, {"hmac": upstream_hmac, "api_key": upstream_api_key}, notes


# ---- exclusions -----------------------------------------------------------------------------------


def read_exclusions(path: Path) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """(files, tests): `FILE | reason` and `FILE :: FULL NAME | reason` lines."""
    files: dict[str, str] = {}
    tests: dict[tuple[str, str], str] = {}
    for key, reason in read_reasons(path):
        file, sep, name = key.partition(" :: ")
        if sep:
            tests[(file.strip(), name.strip())] = reason
        else:
            files[file.strip()] = reason
    return files, tests


# ---- inside the network namespace -------------------------------------------------------------------


def inner(state_path: Path) -> int:
    """Runs in the network namespace: loopback up, the connector on :8000, upstream's jest."""
    st = json.loads(state_path.read_text())
    run_dir = Path(st["dir"])
    r = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"ip link set lo up: {r.stderr.strip()}", file=sys.stderr)
        return 3
    env = dict(os.environ)
    env.update({"RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1"})
    conn_log = open(run_dir / "connector.log", "w")
    connector = subprocess.Popen([st["connector"], "--config", st["config"]], env=env, stdout=conn_log,
                                 stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while http_status(f"http://127.0.0.1:{RELAY_PORT}/readyz") != 200:
            if connector.poll() is not None or time.monotonic() > deadline:
                print(f"connector not ready (exit {connector.poll()}):\n{tail(run_dir / 'connector.log')}",
                      file=sys.stderr)
                return 4
            time.sleep(0.2)
        # Node resolves `localhost` to 127.0.0.1 here (/etc/hosts); the connector listens on [::] for both.
        print(f"connector ready on port {RELAY_PORT} in the namespace", flush=True)
        with open(run_dir / "jest.log", "w") as out:
            jest = subprocess.Popen(st["jest"], cwd=st["checkout"], env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                rc = jest.wait(timeout=st["budget"])
            except subprocess.TimeoutExpired:
                jest.kill()
                jest.wait()
                print(f"jest killed after {st['budget']:.0f} s", file=sys.stderr)
                rc = 124
        return 0 if rc in (0, 1) else rc  # 1: some test failed (the outer run reads the report)
    finally:
        connector.send_signal(signal.SIGTERM)
        try:
            connector.wait(timeout=20)
        except subprocess.TimeoutExpired:
            connector.kill()
            connector.wait()
        conn_log.close()


# ---- the run ----------------------------------------------------------------------------------------


class Case:
    def __init__(self, file: str, name: str, outcome: str, seconds: float = 0.0, detail: str = "",
                 relay_traffic: int | None = None) -> None:
        self.file = file
        self.name = name
        self.outcome = outcome  # pass | fail | excluded | skipped
        self.seconds = seconds
        self.detail = detail
        self.relay_traffic = relay_traffic


def jest_regex_literal(text: str) -> str:
    return re.escape(text)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tree = Path(args.checkout).resolve()
        self.bin_dir = Path(args.bin_dir).resolve()
        self.admin_url = os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_URL
        self.db_name = f"relay_upstream_js_{secrets.token_hex(4)}"
        self.dir = ARTIFACTS / self.db_name
        self.db_created = False
        self.failures: list[str] = []

    def run(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        old = sorted((d for d in ARTIFACTS.glob("relay_upstream_js_*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
        for d in old[:-10]:
            shutil.rmtree(d, ignore_errors=True)
        try:
            return self.run_inner()
        finally:
            if self.db_created and not self.args.keep_db:
                try:
                    psql(self.admin_url, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE);')
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                    log(f"dropping {self.db_name}: {e}")

    def run_inner(self) -> int:
        pkg = check_checkout(self.tree)
        log(f"checkout {self.tree}: centrifuge {pkg.get('version')}; artifacts in {self.dir.relative_to(ROOT)}")
        connector = self.bin_dir / "connector"
        if not connector.is_file():
            raise RuntimeError(f"{connector} is missing: run `cargo build -p connector --bins`")
        for tool in ("node", "psql", "unshare", "ip"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not on PATH")
        socket_dir = Path(self.args.pg_socket_dir)
        if not any(socket_dir.glob(".s.PGSQL.*")):
            raise RuntimeError(f"no PostgreSQL unix socket in {socket_dir} (--pg-socket-dir)")
        if self.args.skip_install and (self.tree / "node_modules" / "jest").is_dir():
            how = "already installed (--skip-install)"
        else:
            how = install(self.tree, self.dir / "install.log")
        log(f"dependencies: {how}")

        psql(self.admin_url, f'CREATE DATABASE "{self.db_name}";')
        self.db_created = True
        db_url = f"postgres:///{self.db_name}?host={socket_dir}&user=postgres"
        upstream_cfg = json.loads((self.tree / "centrifugo_test.json").read_text())
        config, upstream_secrets, notes = relay_config(upstream_cfg, db_url)
        cfg_path = self.dir / "config.json"
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")
        log(f"database {self.db_name} (unix socket {socket_dir}); configuration translated from "
            f"centrifugo_test.json into {cfg_path.relative_to(ROOT)}")
        for note in notes:
            log(f"  note: {note}")

        relay_hmac = secrets.token_hex(24)
        relay_api_key = secrets.token_hex(20)
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": db_url,
            "RELAY_LISTEN": f"[::]:{RELAY_PORT}",
            "RELAY__AUTH__HMAC_SECRET_KEY": relay_hmac,
            "RELAY__API__KEY": relay_api_key,
            "RELAY_UPSTREAM_JS_CHECKOUT": str(self.tree),
            "RELAY_UPSTREAM_JS_UPSTREAM_HMAC": upstream_secrets["hmac"],
            "RELAY_UPSTREAM_JS_RELAY_HMAC": relay_hmac,
            "RELAY_UPSTREAM_JS_UPSTREAM_API_KEY": upstream_secrets["api_key"],
            "RELAY_UPSTREAM_JS_RELAY_API_KEY": relay_api_key,
            "RELAY_UPSTREAM_JS_CONNS": str(self.dir / "connections.jsonl"),
            "FORCE_COLOR": "0",
        })
        r = subprocess.run([str(connector), "--config", str(cfg_path), "migrate"], env=env, capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        (self.dir / "migrate.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"connector migrate: exit {r.returncode}\n{tail(self.dir / 'migrate.log')}")

        excluded_files, excluded_tests = read_exclusions(HERE / "exclusions.txt")
        report = self.dir / "jest.json"
        # Test path patterns first: jest's array options (--setupFilesAfterEnv, …) take what follows.
        jest = ["node", str(self.tree / "node_modules" / "jest" / "bin" / "jest.js"), *self.args.files,
                # upstream's `yarn test`:
                "--detectOpenHandles", "--verbose",
                # the runner's additions (see the module doc):
                f"--setupFilesAfterEnv={HERE / 'bind.cjs'}", "--json", f"--outputFile={report}"]
        ignore = ["/node_modules/"] + [re.escape(f) + "$" for f in excluded_files]
        jest.append("--testPathIgnorePatterns=" + "|".join(ignore))
        names = [n for (_f, n) in excluded_tests]
        if self.args.t:
            jest.append(f"--testNamePattern={self.args.t}")
        elif names:
            alt = "|".join(jest_regex_literal(n) for n in names)
            jest.append(f"--testNamePattern=^(?!(?:{alt})$)")
        state = {"dir": str(self.dir), "connector": str(connector), "config": str(cfg_path), "jest": jest,
                 "checkout": str(self.tree), "budget": self.args.budget}
        state_path = self.dir / "state.json"
        state_path.write_text(json.dumps(state, indent=2))
        log("running upstream's jest in a network namespace of its own (port 8000 is the relay's there): "
            + " ".join(a if " " not in a else repr(a) for a in jest[1:]))
        started = time.monotonic()
        ns_log = self.dir / "namespace.log"
        with open(ns_log, "w") as out:
            proc = subprocess.Popen(["unshare", "--net", "--map-root-user", sys.executable,
                                     str(Path(__file__).resolve()), "--inner", str(state_path)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=self.args.budget + 120)
            except BaseException:
                # the namespace's processes (runner, connector, jest) are one process group
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                raise
        for line in ns_log.read_text(errors="replace").strip().splitlines():
            log(f"  ns: {line}")
        log(f"jest finished in {time.monotonic() - started:.0f} s (exit {rc}); log "
            f"{(self.dir / 'jest.log').relative_to(ROOT)}, connector log {(self.dir / 'connector.log').relative_to(ROOT)}")
        if rc != 0:
            self.failures.append(f"the namespace run exited {rc}")
        if not report.is_file():
            self.failures.append(f"jest wrote no report:\n{tail(self.dir / 'jest.log', 60)}")
            return self.summary([], excluded_files, excluded_tests)
        return self.summary(self.cases(report, excluded_tests), excluded_files, excluded_tests)

    def cases(self, report: Path, excluded_tests: dict[tuple[str, str], str]) -> list[Case]:
        data = json.loads(report.read_text())
        conns: dict[tuple[str, str], int] = {}
        conn_file = self.dir / "connections.jsonl"
        if conn_file.is_file():
            for line in conn_file.read_text().splitlines():
                rec = json.loads(line)
                key = (os.path.relpath(rec["file"], self.tree), rec["test"])
                conns[key] = conns.get(key, 0) + int(rec["relay_traffic"])
        out: list[Case] = []
        for tr in sorted(data.get("testResults", []), key=lambda t: t["name"]):
            file = os.path.relpath(tr["name"], self.tree)
            results = tr.get("assertionResults", [])
            if not results and tr.get("status") == "failed":
                out.append(Case(file, "(test file)", "fail", detail=ANSI.sub("", tr.get("message", ""))))
                continue
            for a in results:
                name = a.get("fullName") or " ".join(a.get("ancestorTitles", []) + [a.get("title", "")])
                status = a.get("status")
                secs = (a.get("duration") or 0) / 1000.0
                if status == "passed":
                    outcome = "pass"
                elif status == "failed":
                    outcome = "fail"
                elif (file, name) in excluded_tests:
                    outcome = "excluded"
                else:
                    outcome = "skipped"
                detail = ANSI.sub("", "\n".join(a.get("failureMessages") or []))
                out.append(Case(file, name, outcome, secs, detail, conns.get((file, name))))
        return out

    def summary(self, cases: list[Case], excluded_files: dict[str, str],
                excluded_tests: dict[tuple[str, str], str]) -> int:
        log("cases:")
        for c in cases:
            where = ""
            if c.outcome in ("pass", "fail") and c.relay_traffic == 0:
                where = " [SDK-only: never touched the relay]"
            log(f"  {c.outcome.upper():8} {c.file} :: {c.name} ({c.seconds:.1f} s){where}")
            if c.outcome == "fail":
                lines = [ln for ln in c.detail.splitlines() if ln.strip()][:DETAIL_LINES]
                for ln in lines:
                    log(f"           | {ln}")
        skip_why = "not selected by -t / test paths" if (self.args.t or self.args.files) else "by upstream"
        log("per file:")
        for file in sorted({c.file for c in cases}):
            fc = [c for c in cases if c.file == file]
            counts = {k: sum(1 for c in fc if c.outcome == k) for k in ("pass", "fail", "excluded", "skipped")}
            log(f"  {file}: {counts['pass']} passed, {counts['fail']} failed, {counts['excluded']} excluded, "
                f"{counts['skipped']} skipped ({skip_why})")
        relay = [c for c in cases if c.outcome in ("pass", "fail") and c.relay_traffic != 0]
        sdk_only = [c for c in cases if c.outcome in ("pass", "fail") and c.relay_traffic == 0]
        for label, group in (("against the relay", relay), ("SDK-only (never touched the relay)", sdk_only)):
            log(f"  {label}: {sum(c.outcome == 'pass' for c in group)} passed, "
                f"{sum(c.outcome == 'fail' for c in group)} failed")
        log(f"excluded (exclusions.txt): {len(excluded_files)} files, {len(excluded_tests)} tests")
        for f, why in excluded_files.items():
            log(f"  {f}: {why}")
        for (f, n), why in excluded_tests.items():
            log(f"  {f} :: {n}: {why}")
        for (f, n) in excluded_tests:
            if not self.args.t and not self.args.files and not any(c.file == f and c.name == n for c in cases):
                log(f"  exclusions.txt: `{f} :: {n}` matched no test of this checkout")
        for msg in self.failures:
            log(f"FAIL {msg}")
        passed = sum(c.outcome == "pass" for c in cases)
        failed = sum(c.outcome == "fail" for c in cases) + len(self.failures)
        if not cases and not self.failures:
            failed += 1
            log("FAIL no case ran")
        print(f"{passed} passed, {failed} failed", flush=True)
        return 0 if failed == 0 else 1


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        def stop(signum, _frame):  # noqa: ANN001 - the outer runner was interrupted: stop the connector
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, stop)
        return inner(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, help="an extracted centrifuge-js source tree")
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"), help="where the connector binary is")
    parser.add_argument("--pg-socket-dir", default="/var/run/postgresql", help="PostgreSQL's unix socket directory")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database (for debugging)")
    parser.add_argument("--skip-install", action="store_true", help="reuse the checkout's node_modules")
    parser.add_argument("--budget", type=float, default=JEST_BUDGET_S, help="seconds for the whole jest run")
    parser.add_argument("-t", help="jest --testNamePattern (replaces the per-test exclusions)")
    parser.add_argument("files", nargs="*", help="jest test path patterns (default: every file not excluded)")
    args = parser.parse_args()

    def on_signal(signum, _frame):  # noqa: ANN001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    runner = Runner(args)
    try:
        return runner.run()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        log(f"FAIL {e}")
        print("0 passed, 1 failed", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
