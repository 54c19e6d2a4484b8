#!/usr/bin/env python3
"""The fault suite: black-box, real PostgreSQL, real connector and writer processes, official SDK clients.

Each case writes thousands of rows from concurrent writers (SQL straight into chat_data, and client
publishes on outgoing-chat through the writer) while a fault happens, then checks that every subscriber
(centrifuge-python clients with recoverable subscriptions, and raw WebSocket clients) got every row
once, in offset order, matching history (read through the protocol in pages of at most 300) and the
table. The cases (tests-faults/cases.py):

  listen-kill   the LISTEN backend terminated 10 times, every ~300 ms, during writes
  sigkill       the connector SIGKILLed and restarted on the same port, 3 times, during writes
  pg-restart    PostgreSQL (a throwaway cluster started here) restarted with pg_ctl during writes
  sigterm       two connectors; A gets SIGTERM, clients get 3001 and reconnect through a proxy to B
  retention     a client offline past the retention window gets recovered=false and a new position
  slow-client   one client stops reading while N raw clients receive a steady stream
  writer-retry  the writer target fails each message's first invocation; clients retry

Every case gets a fresh database on DATABASE_URL's server (pg-restart: its own cluster), and is torn
down whatever happens. Prints `N passed, N failed` last; exit code 0 only when nothing failed. Logs and
configs of each run are kept in artifacts/fault-tests/<run>/ (the newest 10 runs).

Usage: tests-faults/run.py [--only CASE[,CASE]] [--bin-dir DIR] [--clients N] [--keep-db]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402
from harness import ROOT, Results, log  # noqa: E402

CASE_TIMEOUT_S = 180


async def amain(args: argparse.Namespace) -> int:
    results = Results()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    art = ROOT / "artifacts" / "fault-tests" / run_id
    art.mkdir(parents=True, exist_ok=True)
    runs = sorted((d for d in art.parent.iterdir() if d.is_dir()), key=lambda d: d.name)
    for old in runs[:-10]:
        shutil.rmtree(old, ignore_errors=True)
    ctx = cases.Ctx(results=results, bin_dir=Path(args.bin_dir).resolve(), art=art, keep_db=args.keep_db,
                    clients=args.clients, rate=args.rate)
    for b in ("connector", "writer-lambda"):
        if not (ctx.bin_dir / b).is_file():
            results.fail("binaries built", f"{ctx.bin_dir / b} is missing: run `cargo build --workspace --bins`")
            print(f"{results.passed} passed, {results.failed} failed", flush=True)
            return 1
    wanted = args.only.split(",") if args.only else [name for name, _ in cases.CASES]
    unknown = [w for w in wanted if w not in dict(cases.CASES)]
    if unknown:
        results.fail("arguments", f"unknown case(s) {unknown}; known: {[n for n, _ in cases.CASES]}")
    t_all = time.monotonic()
    for name, fn in cases.CASES:
        if name not in wanted:
            continue
        t0 = time.monotonic()
        log(f"==== case {name}")
        try:
            await asyncio.wait_for(fn(ctx), CASE_TIMEOUT_S)
        except asyncio.TimeoutError:
            results.fail(f"{name}: finished", f"did not finish within {CASE_TIMEOUT_S} s")
        except Exception as e:  # noqa: BLE001 - a broken case is a failed case; the others still run
            import traceback

            traceback.print_exc()
            results.fail(f"{name}: ran", f"{type(e).__name__}: {e}")
        results.figure(name, "case_seconds", round(time.monotonic() - t0, 1))
    (art / "figures.json").write_text(json.dumps(results.figures, indent=2))
    log(f"figures in {(art / 'figures.json').relative_to(ROOT)}; suite took {time.monotonic() - t_all:.0f} s")
    if results.xfailed:
        log(f"{results.xfailed} known defect(s) reported as XFAIL (see docs/faults.md)")
    if results.failures:
        log("failures:")
        for f in results.failures:
            log("  " + f.splitlines()[0][:300])
    print(f"{results.passed} passed, {results.failed} failed", flush=True)
    return 0 if results.failed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"), help="where connector and writer-lambda are")
    parser.add_argument("--clients", type=int, default=1000, help="raw WebSocket clients of slow-client (default 1000)")
    parser.add_argument("--rate", type=int, default=50, help="rows/s of the slow-client stream (default 50)")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the databases (debugging)")
    args = parser.parse_args()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("0 passed, 1 failed", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
