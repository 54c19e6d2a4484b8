"""Counting checks, and running child scenarios.

Every suite ends with the line `N passed, N failed` (scripts/test adds these up). A child scenario (an
SDK scenario, a Playwright script) prints `PASS name` / `FAIL name: why` lines and, last,
`RESULT passed=N failed=N`; `run_scenario` relays its lines, adds its counts, kills it after a deadline,
and answers the requests it may print (e.g. READY_FOR_RESTART) through a callback."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .process import tail


class Results:
    """Checks of one suite run (its own and its scenarios'), known defects, and reported figures."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.passed = 0
        self.failed = 0
        self.xfailed = 0
        self.failures: list[str] = []
        self.figures: dict[str, dict[str, Any]] = {}
        self.log = log

    def ok(self, name: str, detail: str = "") -> None:
        """A check that passed."""
        self.passed += 1
        self.log(f"PASS {name}" + (f" ({detail})" if detail else ""))

    def fail(self, name: str, detail: str) -> None:
        """A check that failed, and why."""
        self.failed += 1
        self.failures.append(f"{name}: {detail}")
        self.log(f"FAIL {name}: {detail}")

    def check(self, name: str, cond: bool, detail: str = "", why: str = "") -> bool:
        """ok or fail by `cond`; `why` (else `detail`) says what was wrong."""
        if cond:
            self.ok(name, detail)
        else:
            self.fail(name, why or detail or "condition false")
        return cond

    def xfail(self, name: str, detail: str) -> None:
        """A known defect, described in docs/faults.md: reported, not counted as a failure."""
        self.xfailed += 1
        self.log(f"XFAIL {name}: {detail}")

    def figure(self, case: str, key: str, value: Any) -> None:
        """A measured figure of a case (kept in the run's figures.json by the fault suite)."""
        self.figures.setdefault(case, {})[key] = value
        self.log(f"FIGURE {case}: {key} = {json.dumps(value)}")

    def add(self, label: str, passed: int, failed: int) -> None:
        """A child scenario's counts."""
        self.passed += passed
        self.failed += failed
        if failed:
            self.failures.append(f"{label}: {failed} scenario check(s) failed")

    def close(self) -> int:
        """Lists the failures, prints the closing line `N passed, N failed`; the exit code."""
        if self.failures:
            self.log("failures:")
            for f in self.failures:
                self.log("  " + f.splitlines()[0][:300])
        print(f"{self.passed} passed, {self.failed} failed", flush=True)
        return 0 if self.failed == 0 else 1


def run_scenario(results: Results, label: str, argv: list[str], cwd: Path, env: dict[str, str],
                 stderr_path: Path, timeout: float,
                 requests: dict[str, Callable[[str], str | None]] | None = None) -> bool:
    """Runs one child scenario to its end (killed after `timeout` s), prefixing its lines with `[label]`,
    and adds its RESULT counts to `results`. A line starting with a key of `requests` is a request of the
    child: its handler's answer is written back on the child's stdin (None closes stdin). Returns False when
    the scenario did not pass cleanly (a FAIL or SKIP line, no RESULT line, a failing exit code), so the
    caller can dump its logs."""
    with open(stderr_path, "wb") as err_fh:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_fh,
                                text=True, bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        passed = failed = None
        clean = True
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                results.fail(f"{label}: scenario finished", f"no result after {timeout:.0f} s; killed")
                proc.kill()
                break
            if line is None:
                break
            print(f"[{label}] {line}", flush=True)
            if line.startswith("FAIL ") or line.startswith("SKIP "):
                clean = False
            elif line.startswith("RESULT "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                passed, failed = int(fields.get("passed", 0)), int(fields.get("failed", 0))
            else:
                handler = next((h for key, h in (requests or {}).items() if line.startswith(key)), None)
                if handler is not None:
                    answer = handler(line)
                    assert proc.stdin is not None
                    try:
                        if answer is None:
                            proc.stdin.close()
                        else:
                            proc.stdin.write(answer + "\n")
                            proc.stdin.flush()
                    except (BrokenPipeError, OSError):
                        pass
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    if passed is None or failed is None:
        results.fail(f"{label}: scenario finished", f"exited {code} without a RESULT line\n{tail(stderr_path)}")
        return False
    results.add(label, passed, failed)
    if code != 0 and failed == 0:
        results.fail(f"{label}: scenario exit code", f"{code} although every check passed\n{tail(stderr_path)}")
        return False
    return clean and failed == 0


def read_reasons(path: Path) -> list[tuple[str, str]]:
    """The `KEY | reason` lines of a list such as exclusions.txt or pending.txt (`#` comments and blank
    lines ignored), in file order. Raises RuntimeError naming the line that has no key or no reason."""
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, reason = line.rpartition(" | ")
        if not sep or not key.strip() or not reason.strip():
            raise RuntimeError(f"{path}:{n}: expected `KEY | reason`")
        out.append((key.strip(), reason.strip()))
    return out
