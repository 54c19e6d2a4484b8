"""The cases of the fault suite (see run.py). Each one builds its own world (harness.Stack), runs writers
and subscribers, injects its fault, and calls harness.verify; every case tears its world down."""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
import sys
import time
from dataclasses import dataclass
from array import array
from pathlib import Path
from typing import Any

import asyncpg

from fanout import open_client
from harness import (
    CHANNEL,
    Cluster,
    FlakyWriterProxy,
    PublishLog,
    RawSubscriber,
    Results,
    SdkSubscriber,
    Stack,
    TcpProxy,
    WriteLog,
    http_get,
    log,
    metrics,
    ms,
    percentile,
    rss_kib,
    sdk_publisher,
    sql_writer,
    fetch_history,
    verify,
    wait_drained,
)


@dataclass
class Ctx:
    results: Results
    bin_dir: Path
    art: Path
    keep_db: bool
    clients: int
    rate: int


def new_stack(ctx: Ctx, case: str, admin_url: str | None = None) -> Stack:
    return Stack(case, ctx.results, ctx.bin_dir, ctx.art, admin_url=admin_url, keep_db=ctx.keep_db)


async def start_subscribers(url: str, n_sdk: int, n_raw: int) -> list:
    subs: list[Any] = [SdkSubscriber(url, f"sdk-{i}") for i in range(n_sdk)]
    subs += [RawSubscriber(url, f"raw-{i}") for i in range(n_raw)]
    await asyncio.gather(*(s.start() for s in subs))
    return subs


async def close_all(subs: list) -> None:
    await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)


class Load:
    """Concurrent SQL writers and SDK publishers, started together and stopped together."""

    def __init__(self, db_url: str, ws_url: str, tag: str, writers: int = 4, rate: float = 600,
                 publishers: int = 2, pub_rate: float = 15, batches: tuple[int, ...] = (1, 1, 3, 5),
                 retry_publishes: bool = False) -> None:
        self.wl = WriteLog()
        self.plog = PublishLog()
        self.stop = asyncio.Event()
        # Cleared by `pause`: writers and publishers wait before their next transaction or message.
        self.gate = asyncio.Event()
        self.gate.set()
        self.tasks = [
            asyncio.create_task(sql_writer(db_url, tag, w, self.wl, self.stop, rate / writers, batches,
                                           gate=self.gate))
            for w in range(writers)
        ]
        self.tasks += [
            asyncio.create_task(sdk_publisher(ws_url, tag, j, self.plog, self.stop, pub_rate, retry=retry_publishes,
                                              gate=self.gate))
            for j in range(publishers)
        ]

    async def pause(self, settle: float) -> None:
        """Holds writers and publishers before their next transaction, then waits `settle` seconds (for
        what is in flight to commit and be captured)."""
        self.gate.clear()
        await asyncio.sleep(settle)

    def resume(self) -> None:
        self.gate.set()

    async def finish(self) -> None:
        self.stop.set()
        done = await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in done:
            if isinstance(r, BaseException):
                log(f"load task ended with {type(r).__name__}: {r}")

    def rows(self) -> int:
        return len(self.wl.committed)


class ReadyzMonitor:
    """Polls /readyz every 20 ms and keeps the statuses."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.samples: list[tuple[float, int | None]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            status, _ = await http_get(f"{self.base}/readyz", timeout=1)
            self.samples.append((time.monotonic(), status))
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    def not_ready(self) -> int:
        return sum(1 for _, s in self.samples if s != 200)


# ---- 1. LISTEN backend killed ------------------------------------------------------------------------


async def case_listen_kill(ctx: Ctx) -> None:
    case = "listen-kill"
    r = ctx.results
    stack = new_stack(ctx, case)
    subs: list = []
    try:
        if not await stack.setup():
            return
        node = await stack.add_node("connector")
        if node is None:
            return
        subs = await start_subscribers(node.ws_url, 4, 2)
        m0 = await metrics(node.base)
        tag = f"lk{secrets.token_hex(2)}"
        load = Load(stack.db_url, node.ws_url, tag, writers=4, rate=600, publishers=2)
        mon = ReadyzMonitor(node.base)
        await asyncio.sleep(1.0)
        admin = await asyncpg.connect(stack.db_url)
        kills = 0
        waits: list[float] = []
        try:
            for _ in range(10):
                t0 = time.monotonic()
                found = 0
                # The stream reconnects with backoff (100 ms, doubling up to 5 s while it fails to get ready).
                while not found and time.monotonic() - t0 < 8:
                    rows = await admin.fetch(
                        "SELECT pid, pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
                        "WHERE query ILIKE 'LISTEN relay_changes%' AND datname = $1", stack.db_name)
                    found = sum(1 for row in rows if row["ok"])
                    if not found:
                        await asyncio.sleep(0.02)
                waits.append(time.monotonic() - t0)
                kills += found
                await asyncio.sleep(0.3)
        finally:
            await admin.close()
        await asyncio.sleep(1.0)
        await load.finish()
        ready_after = await node.wait_ready(10)
        await mon.stop()
        m1 = await metrics(node.base)
        reconnects = m1.get("relay_stream_reconnects_total", 0) - m0.get("relay_stream_reconnects_total", 0)
        r.check(f"{case}: the connector's LISTEN backend was found and terminated 10 times", kills >= 10,
                f"{kills} terminated; longest wait for a new LISTEN backend {max(waits):.2f} s",
                f"only {kills} of 10 attempts found a LISTEN backend within 8 s")
        r.check(f"{case}: the stream reconnected after every kill (relay_stream_reconnects_total)", reconnects >= kills,
                f"{reconnects:.0f} reconnects", f"{reconnects:.0f} reconnects for {kills} kills")
        r.check(f"{case}: /readyz is 200 again after the kills", ready_after is None,
                f"{mon.not_ready()} of {len(mon.samples)} polls every 20 ms saw 503 during the kills", ready_after or "")
        r.figure(case, "readyz_polls_not_ready", mon.not_ready())
        r.figure(case, "readyz_polls", len(mon.samples))
        r.figure(case, "rows_written", load.rows())
        r.figure(case, "stream_reconnects", reconnects)
        v = await verify(r, case, stack.db_url, node.ws_url, subs, load.wl, tag=tag, plog=load.plog)
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "publications", v.history_top)
        r.figure(case, "subscribers", len(subs))
    finally:
        await close_all(subs)
        await stack.teardown()


# ---- 2. connector SIGKILLed and restarted --------------------------------------------------------------


async def case_sigkill(ctx: Ctx) -> None:
    case = "sigkill"
    r = ctx.results
    stack = new_stack(ctx, case)
    subs: list = []
    try:
        if not await stack.setup():
            return
        node = await stack.add_node("connector")
        if node is None:
            return
        subs = await start_subscribers(node.ws_url, 4, 2)
        tag = f"sk{secrets.token_hex(2)}"
        load = Load(stack.db_url, node.ws_url, tag, writers=4, rate=500, publishers=2)
        downtimes = []
        for i in range(3):
            await asyncio.sleep(1.5)
            node.kill()
            t0 = time.monotonic()
            await asyncio.sleep(0.3)
            err = await node.start()
            downtimes.append(round(time.monotonic() - t0, 2))
            if not r.check(f"{case}: connector ready again after SIGKILL #{i + 1}, same port", err is None, "", err or ""):
                break
        await asyncio.sleep(1.5)
        await load.finish()
        r.figure(case, "downtime_s", downtimes)
        r.figure(case, "rows_written", load.rows())
        sdk_reconnects = [len(s.connecting) for s in subs if isinstance(s, SdkSubscriber)]
        r.check(f"{case}: every SDK client noticed each kill and reconnected", all(n >= 3 for n in sdk_reconnects),
                f"reconnects per client {sdk_reconnects}")
        v = await verify(r, case, stack.db_url, node.ws_url, subs, load.wl, tag=tag, plog=load.plog)
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "publications", v.history_top)
    finally:
        await close_all(subs)
        await stack.teardown()


# ---- 3. PostgreSQL restarted -------------------------------------------------------------------------


async def case_pg_restart(ctx: Ctx) -> None:
    await pg_restarts(ctx, "pg-restart", crash=False)


async def case_pg_crash(ctx: Ctx) -> None:
    """PostgreSQL crashes twice during writes (`pg_ctl stop -m immediate`, then a start that runs crash
    recovery): what sat in the WAL buffers is lost, as in a real crash (in wal capture mode: history
    commits that had not reached the disk, which the slot must replay)."""
    await pg_restarts(ctx, "pg-crash", crash=True)


async def pg_restarts(ctx: Ctx, case: str, crash: bool) -> None:
    """PostgreSQL (a throwaway cluster) restarted twice during writes: `pg_ctl restart -m fast`, or with
    `crash` an immediate stop and a start."""
    how = "pg_ctl stop -m immediate + start" if crash else "pg_ctl restart -m fast"
    r = ctx.results
    # A crash loses what the WAL writer has not written yet. With its delay at 10 s (the default is
    # 0.2 s) and the load paused just before the crash (no synchronous commit flushes for it), the
    # commits of the last moments - in wal capture mode, the leader's asynchronous history commits -
    # are reliably among them.
    cluster = Cluster(ctx.art / f"{case}-cluster", settings=("wal_writer_delay=10s",) if crash else ())
    stack = None
    subs: list = []
    try:
        try:
            await cluster.start()
        except Exception as e:  # noqa: BLE001
            r.fail(f"{case}: throwaway cluster started", f"{e}")
            return
        r.ok(f"{case}: throwaway cluster started", f"PostgreSQL in {cluster.tmp} on port {cluster.port}")
        stack = new_stack(ctx, case, admin_url=cluster.url)
        if not await stack.setup():
            return
        node = await stack.add_node("connector")
        if node is None:
            return
        subs = await start_subscribers(node.ws_url, 4, 2)
        m0 = await metrics(node.base)
        tag = f"pr{secrets.token_hex(2)}"
        load = Load(stack.db_url, node.ws_url, tag, writers=4, rate=500, publishers=2)
        mon = ReadyzMonitor(node.base)
        restarts = []
        for _ in range(2):
            await asyncio.sleep(2.0)
            if crash:
                await load.pause(0.5)
            t0 = time.monotonic()
            try:
                await (cluster.crash_restart() if crash else cluster.restart())
            except Exception as e:  # noqa: BLE001
                r.fail(f"{case}: {how}", str(e))
                break
            finally:
                load.resume()
            restarts.append(round(time.monotonic() - t0, 2))
        await asyncio.sleep(2.0)
        await load.finish()
        ready_after = await node.wait_ready(20)
        await mon.stop()
        m1 = await metrics(node.base)
        reconnects = m1.get("relay_stream_reconnects_total", 0) - m0.get("relay_stream_reconnects_total", 0)
        r.check(f"{case}: PostgreSQL {'crashed and ' if crash else ''}restarted twice during the writes", len(restarts) == 2,
                f"{how} took {restarts} s")
        r.check(f"{case}: the stream reconnected after each restart", reconnects >= len(restarts), f"{reconnects:.0f} reconnects")
        r.check(f"{case}: /readyz is 200 again after the restarts", ready_after is None,
                f"{mon.not_ready()} of {len(mon.samples)} polls every 20 ms saw 503", ready_after or "")
        r.figure(case, "pg_crash_restart_s" if crash else "pg_restart_s", restarts)
        r.figure(case, "rows_written", load.rows())
        r.figure(case, "rows_unknown_outcome", len(load.wl.unknown))
        r.figure(case, "writer_errors", load.wl.errors)
        r.figure(case, "publish_outcomes", load.plog.outcomes())
        v = await verify(r, case, stack.db_url, node.ws_url, subs, load.wl, tag=tag, plog=load.plog)
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "publications", v.history_top)
    finally:
        await close_all(subs)
        if stack is not None:
            await stack.teardown()
        await cluster.destroy()


# ---- 4. graceful shutdown, clients move to a second node ---------------------------------------------


async def case_sigterm(ctx: Ctx) -> None:
    case = "sigterm"
    r = ctx.results
    stack = new_stack(ctx, case)
    subs: list = []
    proxy = None
    try:
        if not await stack.setup():
            return
        a = await stack.add_node("connector-a", {"shutdown_grace_secs": 10})
        b = await stack.add_node("connector-b", {"shutdown_grace_secs": 10})
        if a is None or b is None:
            return
        # The load balancer: new connections go to A until A is deregistered, then to B.
        proxy = TcpProxy(a.port)
        await proxy.start()
        url = f"ws://127.0.0.1:{proxy.port}/connection/websocket"
        subs = await start_subscribers(url, 4, 2)
        tag = f"st{secrets.token_hex(2)}"
        load = Load(stack.db_url, url, tag, writers=4, rate=500, publishers=4, pub_rate=30)
        await asyncio.sleep(2.5)
        proxy.target = b.port
        t0 = time.monotonic()
        a.sigterm()
        code = await a.wait_exit(30)
        exit_s = round(time.monotonic() - t0, 2)
        await asyncio.sleep(2.5)
        await load.finish()
        r.check(f"{case}: connector A exited 0 on SIGTERM within its grace (10 s)", code == 0 and exit_s <= 10.5,
                f"exit status {code} after {exit_s} s", f"exit status {code} after {exit_s} s")
        r.figure(case, "node_a_exit_s", exit_s)
        r.figure(case, "rows_written", load.rows())
        r.figure(case, "publish_outcomes", load.plog.outcomes())
        for s in subs:
            if isinstance(s, SdkSubscriber):
                codes = [c for _, c, _ in s.connecting]
            else:
                codes = [c for _, c, _ in s.closes]
            r.check(f"{case}: {s.name} was told 3001 (shutdown) and reconnected", codes[:1] == [3001] and len(s.subscribed) >= 2,
                    f"close codes {codes}", f"close codes {codes}, {len(s.subscribed)} subscribes")
        r.check(f"{case}: every client reconnected through the proxy to B",
                proxy.connections.get(b.port, 0) >= len(subs), f"connections per node {proxy.connections}")
        v = await verify(r, case, stack.db_url, b.ws_url, subs, load.wl, tag=tag, plog=load.plog)
        # A publish the connector handed to the target before the shutdown gets its reply before the 3001
        # close; one it never read is not written. So no publish may be written yet unanswered.
        r.check(f"{case}: no client publish was written without its reply reaching the client",
                not load.plog.unacked_written, f"{len(load.plog.attempts)} publishes, {load.plog.outcomes()}",
                f"written but unanswered: {load.plog.unacked_written[:5]}")
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "publications", v.history_top)
    finally:
        await close_all(subs)
        if proxy is not None:
            await proxy.close()
        await stack.teardown()


# ---- 5. offline past the retention window -------------------------------------------------------------


async def wait_sql(db_url: str, query: str, pred, timeout: float, *args) -> Any:
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            v = await conn.fetchval(query, *args)
            if pred(v) or time.monotonic() > deadline:
                return v
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def case_retention(ctx: Ctx) -> None:
    """History retention (config `retention`: incoming-chat keeps its newest 800 publications, pruned every
    second) while writes go on. A client away for fewer publications than are retained recovers in full;
    one away for more gets recovered=false and the current position - never the retained part presented as
    complete; subscribers that stay connected see nothing of the pruning. Then relay.reset_channel()
    (history reset, new epoch): every subscriber, connected or not, is told recovered=false with the new
    epoch, and goes on from the position it was given."""
    case = "retention"
    r = ctx.results
    stack = new_stack(ctx, case)
    subs: list = []
    keep = 800
    try:
        if not await stack.setup():
            return
        node = await stack.add_node("connector", {
            "retention": {"prune_interval_secs": 1,
                          "rules": [{"channel": "incoming-chat", "max_publications": keep, "max_age_secs": 3600}]},
        })
        if node is None:
            return
        online = await start_subscribers(node.ws_url, 2, 1)
        away_long = SdkSubscriber(node.ws_url, "sdk-away-long")
        away_short = SdkSubscriber(node.ws_url, "sdk-away-short")
        away_reset = SdkSubscriber(node.ws_url, "sdk-away-at-reset")
        await asyncio.gather(away_long.start(), away_short.start(), away_reset.start())
        subs = online + [away_long, away_short, away_reset]
        epoch0 = away_long.epoch
        tag = f"rt{secrets.token_hex(2)}"
        load = Load(stack.db_url, node.ws_url, tag, writers=3, rate=300, publishers=1, pub_rate=10)

        # Phase A: retention.
        await asyncio.sleep(1.0)
        await away_long.go_offline()
        left_at = away_long.last_offset()
        await asyncio.sleep(1.0)
        await away_short.go_offline()
        short_left_at = away_short.last_offset()
        await asyncio.sleep(0.3)
        short_top = await wait_sql(stack.db_url, "SELECT top_offset FROM relay.channels WHERE name = $1",
                                   lambda v: True, 1, "incoming-chat")
        short_ctx = await away_short.go_online()
        short_missed = (short_top or 0) - short_left_at
        r.check(f"{case}: a client away for fewer publications than retained recovers in full",
                short_ctx is not None and short_ctx.was_recovering and short_ctx.recovered,
                f"away from offset {short_left_at}, at least {short_missed} missed; resubscribe recovered="
                f"{getattr(short_ctx, 'recovered', None)}",
                f"resubscribe context {short_ctx}")
        # Wait until the publication after the away client's position has been pruned.
        first = await wait_sql(stack.db_url, 'SELECT min("offset") FROM relay.publications WHERE channel = $1',
                               lambda v: v is not None and v > left_at + 1, 30, "incoming-chat")
        r.check(f"{case}: pruning removed what the away client missed (oldest kept > its position + 1)",
                first is not None and first > left_at + 1, f"away at {left_at}, oldest kept {first}",
                f"away at {left_at}, oldest kept {first} after 30 s")
        top_before = await wait_sql(stack.db_url, "SELECT top_offset FROM relay.channels WHERE name = $1",
                                    lambda v: True, 1, "incoming-chat")
        long_ctx = await away_long.go_online()
        pos = long_ctx.stream_position if long_ctx else None
        ok = (long_ctx is not None and long_ctx.was_recovering and not long_ctx.recovered and pos is not None
              and pos.offset >= (top_before or 0) and pos.epoch == epoch0)
        r.check(f"{case}: a client away past the retention window gets recovered=false and the current position",
                ok, f"away at {left_at}; given position {pos} (top was {top_before} just before), epoch unchanged",
                f"away at {left_at}; resubscribe {long_ctx}; top before {top_before}; epoch before {epoch0}")
        await asyncio.sleep(0.5)
        got_old = [p.offset for p in away_long.pubs if p.type != "RESET" and left_at < p.offset <= (pos.offset if pos else 0)]
        r.check(f"{case}: nothing of the partly pruned range was delivered to it", not got_old,
                f"no publication in ({left_at}, {pos.offset if pos else '?'}]",
                f"delivered {len(got_old)} publications of the gap: {got_old[:10]}")

        # Phase B: history reset.
        await away_reset.go_offline()
        conn = await asyncpg.connect(stack.db_url)
        try:
            await conn.fetchval("SELECT relay.reset_channel($1)", "incoming-chat")
            epoch1 = await conn.fetchval("SELECT epoch FROM relay.channels WHERE name = $1", "incoming-chat")
        finally:
            await conn.close()
        await asyncio.sleep(1.0)
        reset_ctx = await away_reset.go_online()
        rpos = reset_ctx.stream_position if reset_ctx else None
        r.check(f"{case}: after relay.reset_channel() a returning client gets recovered=false and the new epoch",
                reset_ctx is not None and not reset_ctx.recovered and rpos is not None and rpos.epoch == epoch1 != epoch0,
                f"position {rpos}", f"resubscribe {reset_ctx}; new epoch {epoch1}, old {epoch0}")
        await asyncio.sleep(1.0)
        await load.finish()
        for s in online:
            resets = [p for p in s.pubs if p.type == "RESET"]
            r.check(f"{case}: {s.name} (connected throughout) was told once, at the reset, with the new epoch",
                    len(resets) == 1 and resets[0].msg_id == epoch1,
                    f"{len(resets)} recovered=false, epoch {resets[0].msg_id if resets else None}",
                    f"{len(resets)} recovered=false: {[(p.offset, p.msg_id) for p in resets]}")
        r.figure(case, "retained_publications", keep)
        r.figure(case, "short_absence_missed_at_least", short_missed)
        r.figure(case, "long_absence", {"left_at": left_at, "given_position": pos.offset if pos else None})
        r.figure(case, "rows_written", load.rows())
        v = await verify(r, case, stack.db_url, node.ws_url, subs, load.wl, tag=tag, plog=load.plog, pruned=True,
                         allow_not_recovered=tuple(s.name for s in subs))
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "history_after_reset", [v.history_first, v.history_top])
    finally:
        await close_all(subs)
        await stack.teardown()


# ---- 6. one client stops reading while many others receive a steady stream -----------------------------


def read_fanout_records(path: Path) -> list[tuple[int, int, int, array, array]]:
    out = []
    with open(path, "rb") as fh:
        while True:
            head = fh.read(struct.calcsize("<iiiq"))
            if len(head) < struct.calcsize("<iiiq"):
                break
            idx, sub_offset, close, n = struct.unpack("<iiiq", head)
            offs, times = array("q"), array("d")
            offs.frombytes(fh.read(8 * n))
            times.frombytes(fh.read(8 * n))
            out.append((idx, sub_offset, close, offs, times))
    return out


async def case_slow_client(ctx: Ctx) -> None:
    """N raw clients (tests-faults/fanout.py, a child process) and two SDK clients receive a steady stream
    (one writer, one row per transaction). Two seconds into it, two misbehaving clients join: one never
    reads after its subscribe reply, one reads a few KB every 250 ms (slower than the stream); both have
    small socket buffers, so the connector's writes to them block soon. Asserted: every other client got
    every row once, in order; the stalled one is dropped; the slow reader is closed with 3008; the
    connector's RSS stays under 1 GiB. Reported, never asserted: delivery latency (the writer's COMMIT
    returned -> bytes at the client) p50/p99 before the two joined, while they were connected, and after
    the stalled one was dropped; RSS over time."""
    case = "slow-client"
    r = ctx.results
    n_clients = ctx.clients
    # The slow reader's mailbox (queue / rate = 2.6 s of stream) fills while its session is still inside a
    # write that completes (its backlog drains at ~24 rows/s), so it is closed with 3008; the stalled one's
    # write never completes and ends after write_timeout_secs (the README default), without a close code.
    rate, seconds, payload, queue, write_timeout = ctx.rate, 18, 1000, 128, 10
    # A private cluster: the xid horizon is cluster-wide, so a long transaction anywhere on a shared server
    # (another test suite) would hold the stream back and release it as one burst - which, larger than the
    # small outbound_queue used here, disconnects readers that are not slow (see docs/faults.md).
    cluster = Cluster(ctx.art / f"{case}-cluster")
    stack = None
    subs: list = []
    swarm = None
    bad_clients: list = []
    tasks: list[asyncio.Task] = []
    try:
        await cluster.start()
        stack = new_stack(ctx, case, admin_url=cluster.url)
        if not await stack.setup(writer=False):
            return
        node = await stack.add_node("connector", {
            "client": {"outbound_queue": queue, "write_timeout_secs": write_timeout, "ping_interval_secs": 60},
        })
        if node is None or node.pid is None:
            return
        pid = node.pid
        rss: list[tuple[float, int]] = []
        conns: list[tuple[float, float]] = []

        async def sample() -> None:
            while True:
                v = rss_kib(pid)
                if v is not None:
                    rss.append((time.time(), v))
                m = await metrics(node.base)
                conns.append((time.time(), m.get("relay_connections", -1)))
                await asyncio.sleep(0.2)

        tasks.append(asyncio.create_task(sample()))
        await asyncio.sleep(0.5)
        rss_idle = rss[-1][1] if rss else None

        out_file = stack.dir / "fanout.bin"
        t_conn = time.monotonic()
        swarm = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("fanout.py")), node.ws_url, str(n_clients), CHANNEL, str(out_file),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert swarm.stdout is not None and swarm.stdin is not None
        line = (await asyncio.wait_for(swarm.stdout.readline(), 120)).decode().strip()
        connected = int(line.split()[1]) if line.startswith("READY") else 0
        connect_s = round(time.monotonic() - t_conn, 1)
        r.check(f"{case}: {n_clients} raw WebSocket clients connected and subscribed", connected == n_clients,
                f"in {connect_s} s", f"{line!r}")
        subs = await start_subscribers(node.ws_url, 2, 0)
        await asyncio.sleep(0.5)
        rss_connected = rss[-1][1] if rss else None

        tag = f"sc{secrets.token_hex(2)}"
        wl = WriteLog()
        stop = asyncio.Event()
        writer = asyncio.create_task(sql_writer(stack.db_url, tag, 0, wl, stop, rate, (1,), payload, max_rows=rate * seconds))
        await asyncio.sleep(2.0)
        stalled = await open_client(-1, node.ws_url, CHANNEL, stall=True)
        slow = await open_client(-2, node.ws_url, CHANNEL, throttle=0.25)
        bad_clients = [stalled, slow]
        await asyncio.wait_for(asyncio.gather(asyncio.shield(stalled.subscribed), asyncio.shield(slow.subscribed)), 20)
        t_join = time.time()
        await asyncio.sleep(0.5)
        while not any(t > t_join for t, _ in conns):
            await asyncio.sleep(0.1)
        with_both = max(c for t, c in conns if t > t_join)  # every client, the two misbehaving ones included
        await writer
        t_end = time.time()
        # Both misbehaving clients must be gone: wait for it (write_timeout_secs after a write blocked).
        deadline = time.monotonic() + 2 * write_timeout + 10
        while time.monotonic() < deadline and not (stalled.lost and slow.lost and conns[-1][1] <= with_both - 2):
            if slow.lost and not stalled.lost and conns[-1][1] <= with_both - 2:
                break
            await asyncio.sleep(0.2)
        dropped_at = next((t for t, c in conns if t > t_join and 0 <= c <= with_both - 2), None)
        first_gone = next((t for t, c in conns if t > t_join and 0 <= c <= with_both - 1), None)
        top = await wait_drained(stack.db_url)
        swarm.stdin.write(f"STOP {top}\n".encode())
        await swarm.stdin.drain()
        line = (await asyncio.wait_for(swarm.stdout.readline(), 60)).decode().strip()
        summary = json.loads(line[5:]) if line.startswith("DONE ") else {"error": line}
        await asyncio.wait_for(swarm.wait(), 30)
        swarm = None

        # The stalled client reads again: what did the connector do to it?
        assert stalled.transport is not None
        stalled.transport.resume_reading()
        try:
            await asyncio.wait_for(asyncio.shield(stalled.closed), 15)
        except asyncio.TimeoutError:
            pass
        r.check(f"{case}: the client that stopped reading was dropped",
                stalled.lost and dropped_at is not None,
                f"close code {stalled.close_code if stalled.close_code is not None else 'none: the connection was dropped'}; "
                f"both misbehaving clients gone {round(dropped_at - t_join, 1) if dropped_at else '?'} s after they joined; "
                f"{len(stalled.offsets)} rows were still waiting in its socket buffers",
                f"still connected (lost={stalled.lost}, close code {stalled.close_code}, connections {conns[-3:]})")
        r.check(f"{case}: the slow reader was closed with 3008 (slow)", slow.lost and slow.close_code == 3008,
                f"after reading {len(slow.offsets)} rows", f"lost={slow.lost}, close code {slow.close_code}")
        r.figure(case, "misbehaving_clients", {
            "stalled": {"close_code": stalled.close_code, "rows_in_its_buffers": len(stalled.offsets)},
            "slow_reader": {"close_code": slow.close_code, "rows_read": len(slow.offsets)},
            "first_gone_after_s": round(first_gone - t_join, 1) if first_gone else None,
            "both_gone_after_s": round(dropped_at - t_join, 1) if dropped_at else None})

        # Every other client got every row once, in order.
        recs = read_fanout_records(out_file)
        wrong = []
        for idx, sub_off, close, offs, _ in recs:
            if sub_off < 0 or list(offs) != list(range(sub_off + 1, top + 1)):
                wrong.append((idx, sub_off, close, len(offs)))
        r.check(f"{case}: each of the {n_clients} raw clients got every row once, in offset order",
                not wrong and len(recs) == n_clients,
                f"{summary.get('frames')} frames delivered, {top} rows",
                f"{len(wrong)} clients wrong, e.g. (idx, subscribe offset, close, frames) {wrong[:5]}; summary {summary}")

        # Latency: commit (the writer's COMMIT returned) -> bytes at the client, by the row's commit time.
        conn = await asyncpg.connect(stack.db_url)
        try:
            rows = await conn.fetch("""SELECT "offset", data->'row'->>'msg_id' AS m FROM relay.publications
                                       WHERE channel = $1""", CHANNEL)
        finally:
            await conn.close()
        commit_at = {row["offset"]: wl.committed[row["m"]][2] for row in rows if row["m"] in wl.committed}
        drop_t = dropped_at or t_end
        phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        for _, _, _, offs, times in recs:
            for o, t in zip(offs, times):
                c = commit_at.get(o)
                if c is not None:
                    phases["before" if c < t_join else ("during" if c < drop_t else "after")].append(t - c)
        lat = {k: {"deliveries": len(v), "p50_ms": ms(percentile(v, 50)), "p99_ms": ms(percentile(v, 99)),
                   "max_ms": ms(max(v) if v else None)} for k, v in phases.items()}
        r.figure(case, "clients", n_clients)
        r.figure(case, "stream", f"{rate} rows/s for {seconds} s, {payload}-byte rows, one row per transaction; "
                                 f"outbound_queue {queue}, write_timeout_secs {write_timeout}")
        r.figure(case, "latency_commit_to_client", lat)
        rss_vals = [v for _, v in rss]
        rss_max = max(rss_vals) if rss_vals else 0
        r.figure(case, "connector_rss_kib", {"idle": rss_idle, "clients_connected": rss_connected, "max": rss_max,
                                             "end": rss_vals[-1] if rss_vals else None})
        r.figure(case, "connect_seconds", connect_s)
        r.check(f"{case}: connector RSS stays bounded (< 1 GiB)", 0 < rss_max < 1024 * 1024,
                f"max {rss_max / 1024:.0f} MiB", f"max RSS {rss_max} KiB")
        if not wrong:
            out_file.unlink(missing_ok=True)  # ~10 MB of records; kept only when a client was wrong
        v = await verify(r, case, stack.db_url, node.ws_url, subs, wl, tag=tag)
        r.figure(case, "rows", v.history_top)
    finally:
        for t in tasks:
            t.cancel()
        if swarm is not None:
            swarm.kill()
            await swarm.wait()
        for c in bad_clients:
            if c.transport is not None:
                c.transport.abort()
        await close_all(subs)
        if stack is not None:
            await stack.teardown()
        await cluster.destroy()


# ---- 6b. one large transaction with many readers ---------------------------------------------------------


async def case_burst(ctx: Ctx) -> None:
    """One transaction of 3000 rows (3 x stream.batch_size) committed at once while 200 raw clients and two
    SDK clients, all reading as fast as they can, are subscribed, with the README's default
    client.outbound_queue (1024). Asserted: the SDK clients end with every row once, in order (recovering
    if they are disconnected); each raw client got a gapless prefix. Known defect (XFAIL while it holds):
    the burst fills every mailbox faster than any session can drain it, so readers that are not slow are
    closed with 3008 - all of them at once, and they all recover from history together."""
    case = "burst"
    r = ctx.results
    n_clients, rows, queue = 200, 3000, "default"
    cluster = Cluster(ctx.art / f"{case}-cluster")
    stack = None
    subs: list = []
    swarm = None
    try:
        await cluster.start()
        stack = new_stack(ctx, case, admin_url=cluster.url)
        if not await stack.setup(writer=False):
            return
        node = await stack.add_node("connector", {})
        if node is None:
            return
        out_file = stack.dir / "fanout.bin"
        swarm = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("fanout.py")), node.ws_url, str(n_clients), CHANNEL, str(out_file),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert swarm.stdout is not None and swarm.stdin is not None
        line = (await asyncio.wait_for(swarm.stdout.readline(), 120)).decode().strip()
        r.check(f"{case}: {n_clients} raw WebSocket clients connected and subscribed", line == f"READY {n_clients}", "", line)
        subs = await start_subscribers(node.ws_url, 2, 0)
        m0 = await metrics(node.base)
        tag = f"bu{secrets.token_hex(2)}"
        conn = await asyncpg.connect(stack.db_url)
        try:
            await conn.execute(
                "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp) "
                "SELECT $1 || '-w0-' || g, 'bulk', $1 || '-w0-' || g || ' ' || repeat('x', 200), 'sql', 0 "
                "FROM generate_series(0, $2 - 1) g", tag, rows)
        finally:
            await conn.close()
        wl = WriteLog()
        for k in range(rows):
            wl.committed[f"{tag}-w0-{k}"] = ("w0", k, time.time())
        wl.txns = 1
        top = await wait_drained(stack.db_url)
        swarm.stdin.write(f"STOP {top}\n".encode())
        await swarm.stdin.drain()
        line = (await asyncio.wait_for(swarm.stdout.readline(), 60)).decode().strip()
        await asyncio.wait_for(swarm.wait(), 30)
        swarm = None
        m1 = await metrics(node.base)
        recs = read_fanout_records(out_file)
        out_file.unlink(missing_ok=True)
        closed = [rec for rec in recs if rec[2] == 3008]
        gaps = [rec[0] for rec in recs if list(rec[3]) != list(range(rec[1] + 1, rec[1] + 1 + len(rec[3])))]
        complete = [rec for rec in recs if list(rec[3]) == list(range(rec[1] + 1, top + 1))]
        r.check(f"{case}: every raw client got a gapless prefix of the stream", not gaps, f"{len(recs)} clients",
                f"clients with a gap: {gaps[:10]}")
        slow = m1.get("relay_slow_disconnects_total", 0) - m0.get("relay_slow_disconnects_total", 0)
        r.figure(case, "burst", f"one transaction of {rows} rows, outbound_queue {queue}, {n_clients} raw + 2 SDK readers")
        r.figure(case, "readers_closed_3008", len(closed))
        r.figure(case, "readers_complete", len(complete))
        r.figure(case, "slow_disconnects_metric", slow)
        name = f"{case}: no reader that keeps reading is closed as slow by one large transaction"
        r.check(name, len(complete) == n_clients and slow == 0,
                f"all {n_clients} got the {rows} rows without a disconnect",
                f"{len(closed)} of {n_clients} raw readers closed with 3008 and {slow:.0f} slow disconnects "
                f"counted for a single {rows}-row transaction (default limits); see docs/faults.md")
        v = await verify(r, case, stack.db_url, node.ws_url, subs, wl, tag=tag)
        r.figure(case, "rows", v.history_top)
    finally:
        if swarm is not None:
            swarm.kill()
            await swarm.wait()
        await close_all(subs)
        if stack is not None:
            await stack.teardown()
        await cluster.destroy()


# ---- 7. a writer target that fails, then succeeds on retry -------------------------------------------


WRITER_FAULTS = ["500-before", "function-error", "500-after", "500-before", "function-error", "500-after", "timeout"]


def writer_fault(content: str) -> str:
    k = int(content.rsplit("-", 1)[1])
    return WRITER_FAULTS[k % len(WRITER_FAULTS)]


async def connector_accepts(stack: Stack, overrides: dict) -> bool:
    """Whether this connector's configuration knows the keys in `overrides` (unknown keys are errors)."""
    cfg = stack.write_config("probe", 1, overrides)
    # With the stack's environment: `check` also checks the mappings in DATABASE_URL's database.
    return await asyncio.to_thread(stack.system.accepts, cfg)


async def case_writer_retry(ctx: Ctx) -> None:
    """The rule's target fails the first invocation of every logical message (500 before the write, a
    function error, a timeout, or 500 after the write) and passes the next. Clients retry a failed publish
    as an app would (a new publish). Every attempt gets an answer; every logical message ends written
    exactly once; the rows reach every subscriber as usual."""
    case = "writer-retry"
    r = ctx.results
    stack = new_stack(ctx, case)
    subs: list = []
    proxy = None
    try:
        if not await stack.setup():
            return
        proxy = FlakyWriterProxy(stack.writer_url, writer_fault, hold_s=2.0)
        rule = {"channel": "outgoing-chat", "timeout_ms": 1500,
                "target": {"type": "lambda", "function": "chat-writer", "endpoint": proxy.url}}
        # Connector-side retries (same message id) when this connector has them.
        with_retries = dict(rule, retries=2, retry_backoff_ms=100)
        connector_retries = await connector_accepts(stack, {"rules": [with_retries]})
        node = await stack.add_node("connector", {"rules": [with_retries if connector_retries else rule]})
        if node is None:
            return
        subs = await start_subscribers(node.ws_url, 3, 1)
        tag = f"wr{secrets.token_hex(2)}"
        load = Load(stack.db_url, node.ws_url, tag, writers=3, rate=300, publishers=0)
        plog = PublishLog()
        stop = asyncio.Event()
        pubs = [asyncio.create_task(sdk_publisher(node.ws_url, tag, j, plog, stop, rate=50, retry=True, max_messages=28))
                for j in range(4)]
        results = await asyncio.gather(*pubs, return_exceptions=True)
        for x in results:
            if isinstance(x, BaseException):
                r.fail(f"{case}: publisher ran", f"{type(x).__name__}: {x}")
        await load.finish()
        conn = await asyncpg.connect(stack.db_url)
        try:
            rows = await conn.fetch("SELECT msg_id, msg_data FROM chat_data WHERE client_id <> 'sql'")
        finally:
            await conn.close()
        per_content: dict[str, int] = {}
        for row in rows:
            per_content[row["msg_data"]] = per_content.get(row["msg_data"], 0) + 1
        by_mode: dict[str, dict[str, Any]] = {}
        for content, atts in plog.attempts.items():
            mode = writer_fault(content)
            m = by_mode.setdefault(mode, {"messages": 0, "rows": {}, "client_errors": 0, "not_ok": 0, "invocations": 0,
                                          "same_id_retries": 0})
            m["messages"] += 1
            n = per_content.get(content, 0)
            m["rows"][n] = m["rows"].get(n, 0) + 1
            m["client_errors"] += sum(1 for a in atts if a != "ok")
            m["not_ok"] += 0 if atts and atts[-1] == "ok" else 1
            calls = proxy.calls.get(content, [])
            m["invocations"] += len(calls)
            ids = [c[0] for c in calls]
            m["same_id_retries"] += len(ids) - len(set(ids))
        silent = sum(a.count("silence") for a in plog.attempts.values())
        r.figure(case, "connector_side_retries", connector_retries)
        r.figure(case, "by_fault", by_mode)
        r.figure(case, "publish_attempts", plog.outcomes())
        r.check(f"{case}: every publish attempt got an answer (success or error), never silence", silent == 0,
                f"{sum(len(a) for a in plog.attempts.values())} attempts: {plog.outcomes()}",
                f"{silent} attempts without an answer: {plog.outcomes()}")
        r.check(f"{case}: every logical message was finally acknowledged",
                all(m["not_ok"] == 0 for m in by_mode.values()) and len(plog.attempts) == 4 * 28,
                f"{len(plog.attempts)} logical messages", f"{by_mode}")
        r.check(f"{case}: the target saw a failed first invocation of every logical message",
                all(len(proxy.calls.get(c, [])) >= 2 for c in plog.attempts),
                "", f"{[c for c in plog.attempts if len(proxy.calls.get(c, [])) < 2][:5]}")
        for mode in ("500-before", "function-error", "timeout"):
            m = by_mode.get(mode, {"rows": {}})
            r.check(f"{case}: exactly one row per logical message when the first invocation fails by {mode}",
                    set(m["rows"]) == {1}, f"{m.get('messages', 0)} messages, rows per message {m['rows']}",
                    f"rows per message {m['rows']}")
        m = by_mode.get("500-after", {"rows": {}, "messages": 0})
        name = f"{case}: exactly one row per logical message when the answer is lost after the write (500-after)"
        if set(m["rows"]) == {1}:
            r.ok(name, f"{m['messages']} messages; the connector retried with the same message id "
                       f"{m.get('same_id_retries', 0)} times and the writer applied it once")
        elif connector_retries:
            r.fail(name, f"rows per message {m['rows']} although the connector retries ({m})")
        else:
            # Known limit of this connector: it does not retry a failed target itself, so the only retry is
            # the client's, a NEW publish with a new message id, which the writer cannot deduplicate.
            r.xfail(name, f"rows per message {m['rows']}: this connector does not retry the target with the same "
                          "message id (no `retries` in rules), so the client's retry writes the message again")
        v = await verify(r, case, stack.db_url, node.ws_url, subs, load.wl, tag=tag, plog=plog)
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "publications", v.history_top)
    finally:
        await close_all(subs)
        if proxy is not None:
            proxy.close()
        await stack.teardown()


# ---- wal mode: the walsender killed --------------------------------------------------------------------


async def case_walsender_kill(ctx: Ctx) -> None:
    """wal capture only: the leader's walsender terminated 10 times, every ~300 ms, during writes; the
    leader reconnects the slot from its stored position each time and nothing is lost or duplicated."""
    case = "walsender-kill"
    r = ctx.results
    stack = new_stack(ctx, case)
    subs: list = []
    try:
        if not await stack.setup():
            return
        node = await stack.add_node("connector")
        if node is None:
            return
        subs = await start_subscribers(node.ws_url, 4, 2)
        m0 = await metrics(node.base)
        tag = f"wk{secrets.token_hex(2)}"
        load = Load(stack.db_url, node.ws_url, tag, writers=4, rate=600, publishers=2)
        await asyncio.sleep(1.0)
        admin = await asyncpg.connect(stack.db_url)
        kills = 0
        waits: list[float] = []
        try:
            for _ in range(10):
                t0 = time.monotonic()
                found = 0
                while not found and time.monotonic() - t0 < 8:
                    rows = await admin.fetch(
                        "SELECT pid, pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
                        "WHERE backend_type = 'walsender' AND datname = $1", stack.db_name)
                    found = sum(1 for row in rows if row["ok"])
                    if not found:
                        await asyncio.sleep(0.02)
                waits.append(time.monotonic() - t0)
                kills += found
                await asyncio.sleep(0.3)
        finally:
            await admin.close()
        await asyncio.sleep(1.0)
        await load.finish()
        m1 = await metrics(node.base)
        errors = m1.get("relay_wal_stream_errors_total", 0) - m0.get("relay_wal_stream_errors_total", 0)
        r.check(f"{case}: the leader's walsender was found and terminated 10 times", kills >= 10,
                f"{kills} terminated; longest wait for a new walsender {max(waits):.2f} s",
                f"only {kills} of 10 attempts found a walsender within 8 s")
        r.check(f"{case}: the leader noticed every kill (relay_wal_stream_errors_total)", errors >= kills,
                f"{errors:.0f} stream errors", f"{errors:.0f} stream errors for {kills} kills")
        r.figure(case, "rows_written", load.rows())
        r.figure(case, "longest_walsender_gap_s", round(max(waits), 2))
        v = await verify(r, case, stack.db_url, node.ws_url, subs, load.wl, tag=tag, plog=load.plog)
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "publications", v.history_top)
    finally:
        await close_all(subs)
        await stack.teardown()


# ---- wal mode: the leader killed, two followers ----------------------------------------------------------


async def leaders(nodes: list) -> list:
    """The nodes whose /metrics say they are the wal leader now (a node that does not answer is not)."""
    found = []
    for n in nodes:
        if n.alive() and (await metrics(n.base)).get("relay_wal_leader") == 1:
            found.append(n)
    return found


async def wait_leader(nodes: list, timeout: float) -> Any:
    """The one leader among `nodes`, once there is exactly one; None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await leaders(nodes)
        if len(found) == 1 or time.monotonic() > deadline:
            return found[0] if len(found) == 1 else None
        await asyncio.sleep(0.05)


async def case_leader_kill(ctx: Ctx) -> None:
    """wal capture only: three nodes, subscribers on each; the leader is SIGKILLed twice during writes and
    client publishes. Each time one of its two followers takes over from the stored position, and the
    killed node comes back on its port as a follower. Every subscriber on every node gets every row once,
    in offset order, matching history, and every node serves the same history (identical offsets)."""
    case = "leader-kill"
    r = ctx.results
    stack = new_stack(ctx, case)
    subs: list = []
    try:
        if not await stack.setup():
            return
        nodes = []
        for name in ("connector-a", "connector-b", "connector-c"):
            node = await stack.add_node(name)
            if node is None:
                return
            nodes.append(node)
        first = await wait_leader(nodes, 30)
        if not r.check(f"{case}: exactly one of the three nodes leads", first is not None,
                       f"{first.name if first else None} leads", "no single leader within 30 s"):
            return
        for n in nodes:
            subs += [SdkSubscriber(n.ws_url, f"{n.name}-sdk-{i}") for i in range(2)]
            subs.append(RawSubscriber(n.ws_url, f"{n.name}-raw"))
        await asyncio.gather(*(s.start() for s in subs))
        tag = f"lk{secrets.token_hex(2)}"
        load = Load(stack.db_url, nodes[0].ws_url, tag, writers=4, rate=500, publishers=2)
        takeovers: list[float] = []
        for i in range(2):
            await asyncio.sleep(1.5)
            leader = await wait_leader(nodes, 10)
            if not r.check(f"{case}: a leader to kill (#{i + 1})", leader is not None, "", "no single leader"):
                break
            leader.kill()
            t0 = time.monotonic()
            others = [n for n in nodes if n is not leader]
            new = await wait_leader(others, 30)
            took = round(time.monotonic() - t0, 2)
            takeovers.append(took)
            if not r.check(f"{case}: a follower took over after leader kill #{i + 1}", new is not None,
                           f"{leader.name} killed, {new.name if new else None} leading after {took} s",
                           f"no follower of {leader.name} leading within 30 s"):
                break
            err = await leader.start()
            back = err is None and leader not in await leaders(nodes)
            r.check(f"{case}: the killed leader came back as a follower (#{i + 1})", back, f"{leader.name} ready",
                    err or f"{leader.name} leads again after its restart")
        await asyncio.sleep(1.5)
        await load.finish()
        r.figure(case, "takeover_s", takeovers)
        r.figure(case, "rows_written", load.rows())
        r.figure(case, "publish_outcomes", load.plog.outcomes())
        v = await verify(r, case, stack.db_url, nodes[1].ws_url, subs, load.wl, tag=tag, plog=load.plog)
        histories = [await fetch_history(n.ws_url) for n in nodes]
        offsets = [[(p.offset, p.type, p.msg_id) for p in h[2]] for h in histories]
        r.check(f"{case}: every node serves the same history (identical offsets)",
                all(o == offsets[0] for o in offsets) and len({h[0] for h in histories}) == 1,
                f"{len(offsets[0])} publications on each of {len(nodes)} nodes",
                f"publications per node {[len(o) for o in offsets]}, epochs {[h[0] for h in histories]}")
        r.figure(case, "rows_in_table", v.rows_in_table)
        r.figure(case, "publications", v.history_top)
    finally:
        await close_all(subs)
        await stack.teardown()


# The cases run by `--capture wal` when no --only is given: the core fault cases plus the wal ones.
WAL_CASES = ["listen-kill", "sigkill", "pg-restart", "pg-crash", "sigterm", "walsender-kill", "leader-kill"]
# The cases that need wal capture (left out of a trigger-mode run).
WAL_ONLY = {"walsender-kill", "leader-kill"}

CASES = [
    ("listen-kill", case_listen_kill),
    ("sigkill", case_sigkill),
    ("pg-restart", case_pg_restart),
    ("pg-crash", case_pg_crash),
    ("sigterm", case_sigterm),
    ("retention", case_retention),
    ("slow-client", case_slow_client),
    ("burst", case_burst),
    ("writer-retry", case_writer_retry),
    ("walsender-kill", case_walsender_kill),
    ("leader-kill", case_leader_kill),
]
