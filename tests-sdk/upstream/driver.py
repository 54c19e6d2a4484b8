#!/usr/bin/env python3
"""Runs test methods of centrifuge-python's own suite (from the pinned sdist) against the relay.

Started by tests-sdk/upstream/run.py, never by hand; it runs in tests-sdk/.venv (the pinned
centrifuge-python, websockets and protobuf) with upstream's runner, `unittest`, as upstream's CI does
(`python -m unittest discover -s tests`). Nothing in upstream's files is changed. Two bindings of
upstream's test module are pointed at the relay at run time, the way a config file would be
(see the README, "Upstream conformance"):

  - the address: upstream's tests hard-code Centrifugo at ws://localhost:8000 (tests/centrifugo.py,
    test_client.py); `Client(...)` given that address connects to the relay's address instead, and the
    start-up probe (tests.centrifugo.CENTRIFUGO_HTTP_URL) asks the relay;
  - the token key: upstream's docker-compose.yml gives Centrifugo the HMAC key "secret" and
    test_client.generate_jwt signs with it; the relay refuses HMAC keys under 32 bytes, so the same
    claims (`sub`, and `channel` for subscription tokens) are signed with the relay's key.

Output on stdout, one JSON object per line after the prefix `@@upstream `:
  {"event": "start", "test": ID}
  {"event": "subtest", "test": ID, "case": CASE_ID}   (a subtest begins)
  {"event": "case", "test": ID, "case": CASE_ID, "outcome": "pass"|"fail"|"error"|"skip", "detail": TEXT}
  {"event": "end", "test": ID, "relay_connections": N}
  {"event": "done"}
CASE_ID is the test id, with the subtest's parameters in brackets for subtests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import traceback
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests-support"))

from relaytest.tokens import hs256  # noqa: E402

PREFIX = "@@upstream "
UPSTREAM_WS = "ws://localhost:8000/connection/websocket"
DETAIL_MAX = 1500


def emit(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Counter:
    """Counts WebSocket connections the SDK opens to the relay, per test."""

    def __init__(self) -> None:
        self.n = 0


def bind(relay_ws: str, relay_http: str, secret: str, counter: Counter) -> None:
    """Points upstream's hard-coded server address and token key at the relay (see the module doc)."""
    import centrifuge
    import centrifuge.client
    import tests.centrifugo
    import tests.test_client

    tests.centrifugo.CENTRIFUGO_HTTP_URL = relay_http

    original_init = centrifuge.Client.__init__

    def init(self, address, *args, **kwargs):  # noqa: ANN001 - mirrors Client.__init__
        if address == UPSTREAM_WS:
            address = relay_ws
        original_init(self, address, *args, **kwargs)

    centrifuge.Client.__init__ = init

    def generate_jwt(user: str, channel: str = "") -> str:
        claims = {"sub": user}
        if channel:
            claims["channel"] = channel
        return hs256(claims, secret)

    tests.test_client.generate_jwt = generate_jwt

    ws = centrifuge.client.websockets
    original_connect = ws.connect

    def connect(uri, *args, **kwargs):  # noqa: ANN001 - mirrors websockets.connect
        if isinstance(uri, str) and uri.startswith(relay_ws):
            counter.n += 1
        return original_connect(uri, *args, **kwargs)

    ws.connect = connect


def case_id(test: unittest.TestCase, params: dict | None = None) -> str:
    tid = test.id()
    if tid.startswith("tests."):
        tid = tid[len("tests."):]
    if params:
        tid += "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]"
    return tid


def method_id(test: unittest.TestCase) -> str:
    return case_id(test)


def describe(err) -> str:  # noqa: ANN001 - exc_info triple
    text = "".join(traceback.format_exception(*err))
    return text[-DETAIL_MAX:]


class Result(unittest.TestResult):
    """Emits a line per case as soon as it is decided."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter
        self.subtests_seen: set[str] = set()

    def startTest(self, test):  # noqa: N802, ANN001
        super().startTest(test)
        self.counter.n = 0
        emit({"event": "start", "test": method_id(test)})

    def stopTest(self, test):  # noqa: N802, ANN001
        super().stopTest(test)
        emit({"event": "end", "test": method_id(test), "relay_connections": self.counter.n})

    def _case(self, test, outcome: str, detail: str = "", params: dict | None = None) -> None:  # noqa: ANN001
        emit({"event": "case", "test": method_id(test), "case": case_id(test, params), "outcome": outcome,
              "detail": detail})

    def addSuccess(self, test):  # noqa: N802, ANN001
        super().addSuccess(test)
        # A test made of subtests passed: its subtests were reported one by one.
        if method_id(test) not in self.subtests_seen:
            self._case(test, "pass")

    def addFailure(self, test, err):  # noqa: N802, ANN001
        super().addFailure(test, err)
        self._case(test, "fail", describe(err))

    def addError(self, test, err):  # noqa: N802, ANN001
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._case(test, "error", describe(err))
        else:  # a module or class fixture (setUpModule, setUpClass) failed
            emit({"event": "case", "test": str(test), "case": str(test), "outcome": "error",
                  "detail": describe(err)})

    def addSkip(self, test, reason):  # noqa: N802, ANN001
        super().addSkip(test, reason)
        self._case(test, "skip", reason)

    def addExpectedFailure(self, test, err):  # noqa: N802, ANN001
        super().addExpectedFailure(test, err)
        self._case(test, "pass", "expected failure (upstream's own @expectedFailure)")

    def addUnexpectedSuccess(self, test):  # noqa: N802, ANN001
        super().addUnexpectedSuccess(test)
        self._case(test, "fail", "unexpected success of an @expectedFailure test")

    def addSubTest(self, test, subtest, err):  # noqa: N802, ANN001
        super().addSubTest(test, subtest, err)
        self.subtests_seen.add(method_id(test))
        params = dict(subtest.params) if getattr(subtest, "params", None) else {"subtest": subtest._message}
        if err is None:
            self._case(test, "pass", params=params)
        else:
            outcome = "fail" if issubclass(err[0], test.failureException) else "error"
            self._case(test, outcome, describe(err), params=params)


def where_waiting(task: asyncio.Task) -> str:
    """Where in upstream's test package a task waits (the innermost frame there on its await chain),
    as ` while waiting at test_client.py:LINE `SOURCE``, so that a timed-out subtest names the push
    or reply it never got; "" when no frame of the package is on the chain."""
    import linecache

    spots = []
    coro = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and Path(frame.f_code.co_filename).parent.name == "tests":
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            spots.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} `{line}`")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f" while waiting at {spots[-1]}" if spots else ""


def announce_subtests(timeout: float) -> None:
    """Emits each subtest's parameters as it begins (so that the runner can name a hung one), and gives
    each subtest of an async test `timeout` seconds: then its task is cancelled and the subtest fails
    with "timed out", and the test goes on with its next subtest (upstream's tests await futures
    without a deadline, so a missing push would otherwise hang the whole test)."""
    original = unittest.TestCase.subTest

    @contextlib.contextmanager
    def sub_test(self, msg=unittest.case._subtest_msg_sentinel, **params):  # noqa: ANN001
        emit({"event": "subtest", "test": method_id(self), "case": case_id(self, params or {"subtest": msg})})
        with original(self, msg, **params):
            try:
                task = asyncio.current_task()
            except RuntimeError:  # no running loop: a synchronous test
                task = None
            fired: list[str] = []
            handle = None
            if task is not None:
                def expire() -> None:
                    fired.append(where_waiting(task))
                    task.cancel()

                handle = asyncio.get_running_loop().call_later(timeout, expire)
            try:
                yield
            except asyncio.CancelledError:
                if not fired:
                    raise
                if hasattr(task, "uncancel"):
                    task.uncancel()
                raise self.failureException(
                    f"subtest timed out after {timeout:.0f} s (cancelled by the harness){fired[0]}") from None
            finally:
                if handle is not None:
                    handle.cancel()

    unittest.TestCase.subTest = sub_test


def flatten(suite) -> list[unittest.TestCase]:  # noqa: ANN001
    out = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(flatten(item))
        else:
            out.append(item)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", required=True, help="the extracted sdist (holds tests/)")
    parser.add_argument("--module", required=True, help="upstream test module, e.g. tests.test_client")
    parser.add_argument("--relay-ws", required=True)
    parser.add_argument("--relay-http", required=True)
    parser.add_argument("--skip", required=True, help="JSON file: test ids not to run")
    parser.add_argument("--subtest-timeout", type=float, default=10.0, help="seconds per subtest")
    parser.add_argument("--list", action="store_true", help="print the module's test ids and exit")
    args = parser.parse_args()
    secret = sys.stdin.readline().strip()  # the relay's HMAC key: never on the command line
    if not args.list and len(secret) < 32:
        print("driver: the relay's HMAC key must come on stdin", file=sys.stderr)
        return 2

    # upstream's `tests` package from the sdist; the SDK itself is the pinned, installed one.
    sys.path.append(args.sdist)
    import centrifuge

    if "site-packages" not in (centrifuge.__file__ or ""):
        print(f"driver: centrifuge imported from {centrifuge.__file__}, not the pinned install", file=sys.stderr)
        return 2
    import tests as upstream_tests

    if not str(upstream_tests.__file__).startswith(args.sdist):
        print(f"driver: `tests` imported from {upstream_tests.__file__}, not from the sdist", file=sys.stderr)
        return 2
    counter = Counter()
    tests = flatten(unittest.defaultTestLoader.loadTestsFromName(args.module))
    if args.list:
        for t in tests:
            emit({"event": "test", "test": method_id(t)})
        return 0
    bind(args.relay_ws, args.relay_http, secret, counter)
    announce_subtests(args.subtest_timeout)
    with open(args.skip) as fh:
        skip = set(json.load(fh))
    suite = unittest.TestSuite(t for t in tests if method_id(t) not in skip)
    suite.run(Result(counter))
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
