#!/usr/bin/env python3
"""Upstream conformance: centrifuge-python's OWN test suite against the relay.

For one run this runner:
  1. fetches the pinned sdist of centrifuge-python (the same version tests-sdk/requirements.txt installs)
     with pip into target/upstream/, checks its sha256, and unpacks it (its tests/ are upstream's suite);
  2. creates a fresh database (relay_upstream_<random>), writes a connector configuration translated
     from the Centrifugo configuration upstream's CI runs its suite against (the sdist's
     docker-compose.yml; see `relay_config`), runs `connector migrate` and starts the connector on a
     free port (the shared harness, tests-support/relaytest: `System`);
  3. runs upstream's test module(s) with upstream's own runner (unittest) through driver.py, minus the
     cases in exclusions.txt (each with its reason), with a deadline per test and for the whole run:
     a test that hangs is killed, reported as failed, and the run goes on with the next one;
  4. stops the connector and drops the database, always;
and prints one line per case, the counts per file and `N passed, N failed` as its last line. Failures
listed in pending.txt are known failures: each is printed with the relay feature it waits for and
counted on its own line, not in the closing line's `failed`; any other failure fails the run. Exit code 0
only when no failure is outside pending.txt. Logs and the configuration are kept in artifacts/upstream-tests/<db>/.

centrifuge-js's own suite is not run here: no package of it on npm contains its tests. It runs by hand
from a source tree with tests-sdk/upstream/js/run_js.py (see the README, "Upstream conformance").

Usage: tests-sdk/upstream/run.py [--bin-dir DIR] [--keep-db] [-k SUBSTRING]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests-support"))

from relaytest import (  # noqa: E402
    System,
    free_port,
    install_sigterm,
    kill_group,
    prune_runs,
    read_reasons,
    require_psql,
    tail,
)
from relaytest.system import NO_RATE_LIMITS  # noqa: E402

# The pinned upstream release: the sdist carries tests/, client.proto and the CI's server config.
SDIST_NAME = "centrifuge-python"
SDIST_VERSION = "0.7.0"
SDIST_FILE = "centrifuge_python-0.7.0.tar.gz"
SDIST_SHA256 = "11252b45c3f6b6104cfb07fb0fcfc9d2d62832d2af14715dd16fdc5e9c6e5964"
# Upstream's modules that talk to a server. The sdist's other 23 test modules run the SDK against
# upstream's in-process fake server (tests/fake_server.py) or are unit tests: no relay is involved.
MODULES = ["tests.test_client"]
# A subtest is cancelled by the driver after SUBTEST_TIMEOUT_S (the test goes on with its next one); a
# test or subtest that still gives no sign of life after PER_TEST_TIMEOUT_S is killed with its driver.
SUBTEST_TIMEOUT_S = 10.0
PER_TEST_TIMEOUT_S = 20.0
# Driver processes at once: most of a failing case's time is the SDK waiting for its 5 s timeout.
WORKERS = 6
# Tests run alone after the parallel ones: upstream runs its suite one test at a time, and these count
# every event of user 42's personal channel `#42` (every test connects as user 42, so a test running
# beside them adds joins and leaves they do not expect).
SOLO = ("test_client.TestServerSideSubscriptions.",)
RUN_BUDGET_S = 110.0
CACHE = ROOT / "target" / "upstream"
PREFIX = "@@upstream "


def log(msg: str) -> None:
    print(f"[upstream] {msg}", flush=True)


# ---- the sdist -------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(python: str) -> Path:
    """The pinned sdist in target/upstream/, downloaded with pip (hash-checked by pip and here)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / SDIST_FILE
    if path.is_file() and sha256(path) == SDIST_SHA256:
        return path
    path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n")
        log(f"downloading {SDIST_FILE} with pip")
        r = subprocess.run(
            [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", SDIST_NAME, "--require-hashes", "-r", str(req), "-d", tmp],
            capture_output=True, text=True, timeout=300,
        )
        got = Path(tmp) / SDIST_FILE
        if r.returncode != 0 or not got.is_file():
            raise RuntimeError(f"pip download of {SDIST_NAME}=={SDIST_VERSION} failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-2000:]}")
        if sha256(got) != SDIST_SHA256:
            raise RuntimeError(f"{SDIST_FILE}: sha256 {sha256(got)} is not the pinned {SDIST_SHA256}")
        shutil.move(str(got), path)
    return path


def unpack(sdist: Path) -> Path:
    """A fresh copy of the sdist's tree; members must stay inside it (no links, no absolute paths)."""
    dest = CACHE / "src"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            p = Path(m.name)
            if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                raise RuntimeError(f"{SDIST_FILE}: unexpected member {m.name!r}")
        tar.extractall(dest, members=members)  # noqa: S202 - members checked above
    tree = dest / SDIST_FILE.removesuffix(".tar.gz")
    if not (tree / "tests" / "test_client.py").is_file():
        raise RuntimeError(f"{SDIST_FILE} has no tests/test_client.py")
    return tree


# ---- the configuration ----------------------------------------------------------------------------


def relay_config(port: int, db_url: str) -> dict:
    """The relay's translation of upstream's Centrifugo (docker-compose.yml in the sdist).

    Centrifugo                                          relay
    client.token.hmac_secret_key = "secret"             auth.hmac_secret_key: a random 48-character key
                                                        (env RELAY__AUTH__HMAC_SECRET_KEY; the relay
                                                        refuses keys under 32 bytes; driver.py signs
                                                        upstream's token claims with it)
    no anonymous connections (Centrifugo's default)     client.allow_anonymous = false
    subscribe with a subscription token (default)       channels[].subscribe = "token"
    allow_publish/history/presence_for_subscriber       channels[].publish/history/presence = "subscriber"
                                                        (+ client.allow_publish, so channels without a
                                                        rule or mapping are plain pub/sub)
    presence + join_leave (default namespace)           presence.channels "*" join_leave (also on
                                                        smallhistory:*: the relay has no per-pattern
                                                        "no presence" entry; nothing there asks for it)
    history_size 100 / 2 (smallhistory) / 300           retention.rules max_publications, max_age_secs 300
    (example), history_ttl 300s
    force_recovery                                      always: every subscription is recoverable
    subscribe_to_user_personal_channel                  client.personal_channel "#{user}" ("#*"
                                                        channels, user_limited)
    allowed_delta_types fossil, delta_publish           channels[].allowed_delta_types ["fossil"] (every
                                                        publication goes to delta subscribers as a delta
                                                        when it is smaller: no per-publish opt-in)
    force_push_join_leave                               presence.channels "*" force_push_join_leave
    no rate limits                                      the relay's per-connection / IP / user publish and
                                                        subscribe limits raised far above the suite's use
    """
    rules_common = {"subscribe": "token", "publish": "subscriber", "history": "subscriber",
                    "presence": "subscriber", "allowed_delta_types": ["fossil"]}
    return {
        "listen": f"127.0.0.1:{port}",
        "database": {"url": db_url, "pool_size": 10},
        "client": {
            "allow_anonymous": False,
            "personal_channel": "#{user}",
            "allow_publish": True,
            "history_max_limit": 300,
            **NO_RATE_LIMITS,
        },
        "channels": [
            dict(rules_common, channel="smallhistory:*"),
            dict(rules_common, channel="example:*"),
            dict(rules_common, channel="#*", user_limited=True),
            dict(rules_common, channel="*"),
        ],
        "presence": {"engine": "memory", "channels": [
            {"channel": "*", "join_leave": True, "force_push_join_leave": True}]},
        "retention": {"rules": [
            {"channel": "smallhistory:*", "max_publications": 2, "max_age_secs": 300},
            {"channel": "example:*", "max_publications": 300, "max_age_secs": 300},
            {"channel": "*", "max_publications": 100, "max_age_secs": 300},
        ]},
    }


# ---- exclusions and pending failures ------------------------------------------------------------


# ---- the run ----------------------------------------------------------------------------------------


class Case:
    def __init__(self, case: str, outcome: str, detail: str = "") -> None:
        self.case = case
        self.outcome = outcome
        self.detail = detail


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python = str(ROOT / "tests-sdk" / ".venv" / "bin" / "python")
        if not Path(self.python).exists():
            self.python = sys.executable
        self.system = System("relay_upstream", ROOT / "artifacts" / "upstream-tests", bin_dir=Path(args.bin_dir),
                             keep_db=args.keep_db, writer=False, log=log)
        self.dir = self.system.dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/connection/websocket"
        self.secret = secrets.token_hex(24)
        self.connector = None
        self.cases: list[Case] = []
        self.setup_failures: list[str] = []
        self.excluded = read_reasons(HERE / "exclusions.txt")
        self.pending = read_reasons(HERE / "pending.txt")
        self.relay_conns: dict[str, int] = {}
        self.durations: dict[str, float] = {}
        self.lock = threading.Lock()

    def setup(self) -> Path | None:
        system = self.system
        system.dir.mkdir(parents=True, exist_ok=True)
        prune_runs(self.dir.parent, "relay_upstream_*", keep=10)
        err = system.missing_binaries(("connector",))
        if err:
            self.setup_failures.append(err)
            return None
        try:
            tree = unpack(fetch_sdist(self.python))
        except (RuntimeError, OSError, subprocess.TimeoutExpired, tarfile.TarError) as e:
            self.setup_failures.append(f"upstream sdist: {e}")
            return None
        log(f"{SDIST_FILE} (sha256 {SDIST_SHA256[:16]}…) unpacked in {tree.relative_to(ROOT)}")
        err = system.create_database()
        if err:
            self.setup_failures.append(f"create database {err}")
            return None
        log(f"database {system.db_name}; artifacts in {self.dir.relative_to(ROOT)}")
        cfg_path = system.write_config("config", relay_config(self.port, system.db_url))
        key = {"RELAY__AUTH__HMAC_SECRET_KEY": self.secret}
        err = system.migrate(cfg_path, env=dict(system.env, RELAY_LISTEN=f"127.0.0.1:{self.port}", **key))
        if err:
            self.setup_failures.append(f"connector migrate: {err}")
            return None
        self.connector = system.new_connector(cfg_path, self.port, extra_env=key)
        self.connector.start()
        err = self.connector.wait_http(f"{self.base}/readyz")
        if err:
            self.setup_failures.append(f"connector ready: {err}\n{tail(self.connector.logfile)}")
            return None
        log(f"connector ready at {self.base}")
        return tree

    def teardown(self) -> None:
        self.system.teardown()

    # ---- the driver ---------------------------------------------------------------------------

    def driver(self, tree: Path, module: str, skip: set[str], n: int = 0, listing: bool = False) -> subprocess.Popen:
        skip_file = self.dir / f"skip-{n}.json"
        skip_file.write_text(json.dumps(sorted(skip)))
        argv = [self.python, str(HERE / "driver.py"), "--sdist", str(tree), "--module", module,
                "--relay-ws", self.ws, "--relay-http", self.base, "--skip", str(skip_file),
                "--subtest-timeout", str(SUBTEST_TIMEOUT_S)]
        if listing:
            argv.append("--list")
        err = open(self.dir / f"driver-{n}-stderr.log", "ab")
        proc = subprocess.Popen(argv, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, bufsize=1, start_new_session=True)
        err.close()
        assert proc.stdin is not None
        proc.stdin.write(self.secret + "\n")
        proc.stdin.close()
        return proc

    def list_tests(self, tree: Path, module: str) -> list[str]:
        proc = self.driver(tree, module, set(), listing=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(timeout=60)
        ids = [json.loads(line[len(PREFIX):])["test"] for line in out.splitlines() if line.startswith(PREFIX)]
        if proc.returncode != 0 or not ids:
            raise RuntimeError(f"listing {module} failed ({proc.returncode}):\n{tail(self.dir / 'driver-0-stderr.log')}")
        return ids

    def run_module(self, tree: Path, module: str, deadline: float) -> None:
        """Runs the module's tests, minus the exclusions, in WORKERS driver processes at once."""
        all_ids = self.list_tests(tree, module)
        known = set(all_ids)
        excluded = {k for k, _ in self.excluded}
        for k in sorted(excluded):
            if k.startswith(module.removeprefix("tests.") + ".") and k not in known:
                self.setup_failures.append(f"exclusions.txt names {k}, which {module} does not have (stale entry)")
        wanted = [t for t in all_ids if t not in excluded and (not self.args.k or self.args.k in t)]
        # Tests that must have the server to themselves run after the others, alone.
        solo = [t for t in wanted if any(t.startswith(p) for p in SOLO)]
        wanted = [t for t in wanted if t not in solo]
        # Round-robin over the classes' order, so the slow classes spread over the workers.
        buckets = [wanted[i::WORKERS] for i in range(WORKERS)]
        threads = [threading.Thread(target=self.worker, args=(i, tree, module, all_ids, b, deadline))
                   for i, b in enumerate(buckets) if b]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if solo:
            self.worker(WORKERS, tree, module, all_ids, solo, deadline)

    def worker(self, n: int, tree: Path, module: str, all_ids: list[str], wanted: list[str], deadline: float) -> None:
        """Runs `wanted` in a driver; a test that hangs is killed and the rest run in a new driver."""
        done: set[str] = set()
        while True:
            todo = [t for t in wanted if t not in done]
            if not todo:
                return
            if time.monotonic() >= deadline:
                for t in todo:
                    self.add(Case(t, "fail", f"not run: the run's budget of {RUN_BUDGET_S:.0f} s was spent"))
                return
            proc = self.driver(tree, module, set(all_ids) - set(todo), n)
            lines: queue.Queue[str | None] = queue.Queue()

            def pump(p: subprocess.Popen = proc, q: queue.Queue = lines) -> None:
                assert p.stdout is not None
                for line in p.stdout:
                    q.put(line.rstrip("\n"))
                q.put(None)

            threading.Thread(target=pump, daemon=True).start()
            current: str | None = None
            current_case: str | None = None
            started = test_started = time.monotonic()
            finished = False
            while True:
                limit = min(started + PER_TEST_TIMEOUT_S, deadline) if current else deadline
                try:
                    line = lines.get(timeout=max(0.05, limit - time.monotonic()))
                except queue.Empty:
                    kill_group(proc)
                    why = (f"timed out after {PER_TEST_TIMEOUT_S:.0f} s (killed; the test's later subtests, if any, "
                           "did not run)" if time.monotonic() < deadline
                           else f"killed at the end of the run's budget of {RUN_BUDGET_S:.0f} s")
                    if current:
                        self.add(Case(current_case or current, "fail", why))
                        done.add(current)
                    break
                if line is None:
                    break
                if not line.startswith(PREFIX):
                    continue
                ev = json.loads(line[len(PREFIX):])
                kind = ev.get("event")
                if kind == "start":
                    current, current_case, started = ev["test"], None, time.monotonic()
                    test_started = started
                elif kind == "subtest":  # each subtest has its own PER_TEST_TIMEOUT_S
                    current_case, started = ev["case"], time.monotonic()
                elif kind == "case":
                    self.add(Case(ev["case"], ev["outcome"], ev.get("detail", "")))
                elif kind == "end":
                    self.relay_conns[ev["test"]] = ev.get("relay_connections", 0)
                    self.durations[ev["test"]] = time.monotonic() - test_started
                    done.add(ev["test"])
                    current = None
                elif kind == "done":
                    finished = True
            if proc.poll() is None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
            if finished:
                return
            if current is None and proc.returncode not in (0, -signal.SIGKILL):
                with self.lock:
                    self.setup_failures.append(
                        f"driver {n} for {module} exited {proc.returncode}:\n"
                        f"{tail(self.dir / f'driver-{n}-stderr.log')}")
                return

    def add(self, c: Case) -> None:
        with self.lock:
            self.cases.append(c)
            self.print_case(c)

    def pending_for(self, case: str) -> str | None:
        for pattern, feature in self.pending:
            if fnmatch.fnmatchcase(case, pattern):
                return feature
        return None

    def print_case(self, c: Case) -> None:
        if c.outcome in ("pass", "skip"):
            note = self.pending_for(c.case)
            extra = f" (passes, although pending.txt's pattern for {note.split(':')[0]} covers it)" if note and c.outcome == "pass" else ""
            log(f"{c.outcome.upper()} {c.case}{extra}")
        else:
            note = self.pending_for(c.case)
            tag = f" [pending: {note}]" if note else ""
            first = c.detail.strip().splitlines()[-1] if c.detail.strip() else ""
            log(f"FAIL {c.case}{tag}: {first}")

    def main(self) -> int:
        try:
            tree = self.setup()
            if tree is not None:
                deadline = time.monotonic() + RUN_BUDGET_S
                for module in MODULES:
                    try:
                        self.run_module(tree, module, deadline)
                    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                        self.setup_failures.append(str(e))
        except KeyboardInterrupt:
            self.setup_failures.append("interrupted")
        finally:
            self.teardown()
        return self.report()

    def connector_warnings(self) -> None:
        """After a failure outside pending.txt: the connector's last warnings, errors and panics, each as a `DIAG`
        line (scripts/test repeats those at the end of its run with the FAIL lines)."""
        try:
            lines = (self.dir / "connector.log").read_text(errors="replace").splitlines()
        except OSError as e:
            log(f"DIAG connector.log unreadable: {e}")
            return
        noted = [line for line in lines if " WARN " in line or " ERROR " in line or " panicked at " in line]
        log(f"DIAG connector.log: {len(noted)} warnings, errors and panics" + (
            ", the last 10:" if len(noted) > 10 else (":" if noted else "")))
        for line in noted[-10:]:
            log(f"DIAG   {line[:300]}")

    def report(self) -> int:
        failed = [c for c in self.cases if c.outcome not in ("pass", "skip")]
        if failed:
            log("failures (details in the lines above and in " f"{self.dir.relative_to(ROOT)}/driver-*-stderr.log):")
            for c in failed:
                note = self.pending_for(c.case)
                log(f"  {c.case}" + (f"  [pending: {note}]" if note else "  [NOT pending: a relay bug or a missing exclusion]"))
                for line in c.detail.strip().splitlines()[-6:]:
                    log(f"      {line}")
        if any(not self.pending_for(c.case) for c in failed):
            self.connector_warnings()
        by_file: dict[str, list[int]] = {}
        for c in self.cases:
            f = c.case.split(".", 1)[0] + ".py"
            counts = by_file.setdefault(f, [0, 0, 0])
            counts[0 if c.outcome == "pass" else 2 if c.outcome == "skip" else 1] += 1
        for f, (p, fl, sk) in sorted(by_file.items()):
            log(f"{f}: {p} passed, {fl} failed, {sk} skipped by upstream")
        # Cases of tests that opened no WebSocket to the relay (upstream's unit tests, and its tests against
        # its own fake server, inside test_client.py) say nothing about the relay: counted apart here.
        sdk_only = [c for c in self.cases if self.relay_conns.get(c.case.split("[", 1)[0], -1) == 0]
        relay = [c for c in self.cases if c not in sdk_only]
        for label, group in (("against the relay", relay), ("SDK-only (no connection to the relay)", sdk_only)):
            p = sum(1 for c in group if c.outcome == "pass")
            fl = sum(1 for c in group if c.outcome not in ("pass", "skip"))
            log(f"  {label}: {p} passed, {fl} failed")
        slow = sorted(self.durations.items(), key=lambda kv: -kv[1])[:3]
        if slow:
            log("slowest tests that finished: " + ", ".join(f"{t} {d:.1f} s" for t, d in slow))
        log(f"excluded ({len(self.excluded)}, see tests-sdk/upstream/exclusions.txt):")
        for k, reason in self.excluded:
            log(f"  {k}: {reason}")
        for pattern, why in self.pending:
            if not any(fnmatch.fnmatchcase(c.case, pattern) for c in failed):
                log(f"pending.txt: `{pattern}` ({why.split(':')[0]}) matched no failure this run: remove it once "
                    "that is for good")
        known = [c for c in failed if self.pending_for(c.case)]
        if known:
            log(f"{len(known)} known failures, listed in pending.txt with the relay feature each waits for (or a "
                "known race in upstream's test); they do not fail the run, any other failure does")
        for msg in self.setup_failures:
            log(f"FAIL {msg}")
        passed = sum(1 for c in self.cases if c.outcome == "pass")
        nfailed = len(failed) - len(known) + len(self.setup_failures)
        if not self.cases and not self.setup_failures:
            nfailed += 1
            log("FAIL no case ran")
        print(f"{passed} passed, {nfailed} failed", flush=True)
        return 0 if nfailed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"), help="where the connector binary is")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database (for debugging)")
    parser.add_argument("-k", help="run only the tests whose id contains this")
    args = parser.parse_args()
    if not require_psql(log):
        print("0 passed, 1 failed", flush=True)
        return 1
    install_sigterm()
    return Runner(args).main()


if __name__ == "__main__":
    sys.exit(main())
