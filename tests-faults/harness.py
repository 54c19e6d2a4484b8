"""The fault suite's own machinery (tests-faults/run.py): concurrent writers, subscribers
(centrifuge-python and raw WebSocket), proxies, and the end-of-case verification that every subscriber got
every row once, in offset order, matching history and the table.

Starting the system (database, migrate, writer, connectors, throwaway clusters) is the shared harness's,
tests-support/relaytest, as for every black-box suite; `Stack` and `Node` adapt it to asyncio and to a case.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import asyncpg
import websockets
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    ErrorContext,
    PublicationContext,
    StreamPosition,
    SubscribedContext,
    SubscribingContext,
    SubscriptionErrorContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)
from centrifuge.exceptions import OperationTimeoutError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests-support"))

import relaytest  # noqa: E402
from relaytest import free_port, http_get, tail  # noqa: E402,F401 - http_get is re-exported for cases.py
from relaytest.system import Connector, System  # noqa: E402

CHANNEL = "incoming-chat"
OUT_CHANNEL = "outgoing-chat"


def log(msg: str) -> None:
    print(f"[faults] {msg}", flush=True)


# ---- results ------------------------------------------------------------------------------------------


class Results(relaytest.Results):
    """Checks of the whole suite, and the figures the cases report (the shared counter, logging as [faults])."""

    def __init__(self) -> None:
        super().__init__(log)


# ---- small async helpers -----------------------------------------------------------------------------


async def metrics(base: str) -> dict[str, float]:
    status, body = await http_get(f"{base}/metrics", timeout=5)
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.splitlines():
        if line and not line.startswith("#"):
            parts = line.split()
            if len(parts) == 2:
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    pass
    return out


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# ---- processes --------------------------------------------------------------------------------------


class Node:
    """One connector process on a fixed port (restartable on the same port), with asyncio waits."""

    def __init__(self, service: Connector) -> None:
        self.service = service
        self.name = service.name
        self.port = service.port
        self.base = service.base
        self.ws_url = service.ws_url
        self.cfg_path = service.cfg_path

    @property
    def pid(self) -> int | None:
        return self.service.pid

    def alive(self) -> bool:
        return self.service.alive()

    async def start(self) -> str | None:
        """Starts and waits for /readyz; None when ready, else why not."""
        self.service.start()
        return await self.wait_ready()

    async def wait_ready(self, timeout: float = relaytest.process.READY_TIMEOUT_S) -> str | None:
        return await self.service.wait_http_async(f"{self.base}/readyz", timeout)

    def kill(self) -> None:
        self.service.kill()

    def sigterm(self) -> None:
        self.service.sigterm()

    async def wait_exit(self, timeout: float) -> int | None:
        return await self.service.wait_exit_async(timeout)

    async def stop(self) -> None:
        await self.service.stop_async()


def connector_config(db_url: str, port: int, writer_url: str, overrides: dict | None = None) -> dict:
    """The suite's own connector configuration (not the repository's config.json, which other work may
    change): the chat mapping and rule, pings rare enough not to matter, and recovery allowed far enough
    back that a client away during a fault recovers in full (the default, 300, would answer
    recovered=false after a restart under load - correct, but then completeness could not be checked)."""
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "database": {"url": db_url, "pool_size": 10},
        "stream": {"poll_interval_ms": 250, "batch_size": 1000},
        "client": {
            "allow_anonymous": True,
            "allow_publish": False,
            "ping_interval_secs": 25,
            "pong_timeout_secs": 10,
            "outbound_queue": 4096,
            "history_max_limit": 300,
            "recovery_max_publications": 50000,
            "max_pending_publishes": 64,
        },
        "mappings": [{"table": "chat_data", "operations": ["INSERT", "UPDATE"], "channel": CHANNEL}],
        "rules": [
            {
                "channel": OUT_CHANNEL,
                "target": {"type": "lambda", "function": "chat-writer", "endpoint": writer_url},
                "timeout_ms": 5000,
            }
        ],
        "shutdown_grace_secs": 10,
    }
    for section, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section].update(value)
        else:
            config[section] = value
    return config


class Stack:
    """A case's world: the shared harness's System (a fresh database on DATABASE_URL's server, or a given
    server; the writer) and connector nodes. Torn down always."""

    def __init__(self, case: str, results: Results, bin_dir: Path, art_root: Path, admin_url: str | None = None,
                 keep_db: bool = False) -> None:
        self.case = case
        self.results = results
        self.system = System(f"relay_faults_{case.replace('-', '_')}", art_root, bin_dir=bin_dir, server=admin_url,
                             keep_db=keep_db, random_bytes=3, log=log)
        self.bin_dir = self.system.bin_dir
        self.db_name = self.system.db_name
        self.db_url = self.system.db_url
        self.dir = self.system.dir
        self.env = self.system.env
        self.writer_url = self.system.writer_url
        self.nodes: list[Node] = []
        self.failed_before = results.failed
        self.client_extra: dict[str, Any] = {}

    @property
    def writer(self) -> relaytest.Service | None:
        return self.system.writer

    async def setup(self, writer: bool = True) -> bool:
        err = await asyncio.to_thread(self.system.create_database)
        if err:
            self.results.fail(f"{self.case}: create database", err)
            return False
        log(f"[{self.case}] database {self.db_name}; logs in {self.dir.relative_to(ROOT)}")
        cfg = self.write_config("migrate", free_port())
        err = await asyncio.to_thread(self.system.migrate, cfg)
        if err:
            self.results.fail(f"{self.case}: connector migrate", err)
            return False
        # Newer connectors limit publishes per connection (client.publish_rate_per_sec, default 10/s): the
        # publishers here publish faster on purpose, so lift the limit where the connector has it.
        probe = self.write_config("probe", 1, {"client": {"publish_rate_per_sec": 100000, "publish_burst": 100000}})
        if await asyncio.to_thread(self.system.accepts, probe):
            self.client_extra = {"publish_rate_per_sec": 100000, "publish_burst": 100000}
        if writer:
            err = await asyncio.to_thread(self.system.start_writer, {"WRITER_DB_MAX_CONNECTIONS": "8"})
            if err:
                self.results.fail(f"{self.case}: writer-lambda healthy", err)
                return False
        return True

    def write_config(self, name: str, port: int, overrides: dict | None = None, writer_url: str | None = None) -> Path:
        overrides = dict(overrides or {})
        overrides["client"] = {**self.client_extra, **overrides.get("client", {})}
        return self.system.write_config(
            f"config-{name}", connector_config(self.db_url, port, writer_url or self.writer_url, overrides))

    async def add_node(self, name: str = "connector", overrides: dict | None = None, writer_url: str | None = None,
                       port: int | None = None) -> Node | None:
        port = port or free_port()
        cfg = self.write_config(name, port, overrides, writer_url)
        node = Node(self.system.new_connector(cfg, port, name))
        self.nodes.append(node)
        err = await node.start()
        if err:
            self.results.fail(f"{self.case}: {name} ready", f"{err}\n{tail(node.service.logfile)}")
            return None
        return node

    async def teardown(self) -> None:
        if self.results.failed > self.failed_before:
            self.system.dump_logs(lines=40, writer_lines=15)
        await asyncio.to_thread(self.system.stop_processes)
        if self.system.db.created and not self.system.keep_db:
            # With wal capture, a database with a replication slot cannot be dropped: its slots go first.
            err = await asyncio.to_thread(self.system.db.drop, capture_mode() == "wal")
            if err:
                log(err)


class Cluster(relaytest.Cluster):
    """A throwaway cluster (the shared harness's), with wal_level = logical when this run captures from WAL."""

    def __init__(self, art_dir: Path, settings: tuple[str, ...] = ()) -> None:
        super().__init__(art_dir, logical=capture_mode() == "wal", log=log, settings=settings)


# ---- writers ----------------------------------------------------------------------------------------


@dataclass
class WriteLog:
    """What the writers did: rows whose commit succeeded, rows whose outcome is unknown (the connection
    failed during the transaction), and errors."""

    committed: dict[str, tuple[str, int, float]] = field(default_factory=dict)  # msg_id -> (writer, k, t_commit)
    unknown: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    txns: int = 0

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


INSERT_SQL = (
    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp) "
    "VALUES ($1, $2, $3, 'sql', $4)"
)


async def sql_writer(dsn: str, tag: str, w: int, wl: WriteLog, stop: asyncio.Event, rate: float,
                     batches: tuple[int, ...] = (1, 1, 3, 5), payload: int = 0, max_rows: int | None = None,
                     gate: asyncio.Event | None = None) -> None:
    """One writer connection: transactions of `batches` rows (cycled) at about `rate` rows/s, until `stop`
    or `max_rows`; while `gate` is given and not set, it waits before its next transaction. On any error
    the transaction's rows are 'unknown' and the writer reconnects."""
    name = f"w{w}"
    conn = None
    k = 0
    i = 0
    pad = "x" * payload
    per_txn = sum(batches) / len(batches)
    interval = per_txn / rate
    next_at = time.monotonic()
    try:
        while not stop.is_set() and (max_rows is None or k < max_rows):
            if conn is None:
                try:
                    conn = await asyncio.wait_for(asyncpg.connect(dsn), 5)
                except Exception as e:  # noqa: BLE001 - the database may be restarting
                    wl.error(e)
                    await asyncio.sleep(0.1)
                    continue
            if gate is not None and not gate.is_set():
                await gate.wait()
                next_at = time.monotonic()
            n = batches[i % len(batches)]
            i += 1
            ids = [f"{tag}-{name}-{k + j}" for j in range(n)]
            now_ms = int(time.time() * 1000)
            rows = [(mid, f"sql-{name}", f"{mid} t={time.time():.6f} {pad}", now_ms) for mid in ids]
            try:
                async with conn.transaction():
                    await conn.executemany(INSERT_SQL, rows)
                t = time.time()
                for j, mid in enumerate(ids):
                    wl.committed[mid] = (name, k + j, t)
                wl.txns += 1
            except Exception as e:  # noqa: BLE001 - outcome unknown; checked against the table later
                wl.error(e)
                wl.unknown.update(ids)
                try:
                    await asyncio.wait_for(conn.close(), 2)
                except Exception:  # noqa: BLE001
                    conn.terminate()
                conn = None
            k += n
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                next_at = time.monotonic()  # fell behind (an outage): don't burst to catch up
    finally:
        if conn is not None:
            conn.terminate()


# ---- SDK clients ------------------------------------------------------------------------------------


@dataclass
class Pub:
    offset: int
    type: str | None
    msg_id: str | None
    t: float


def _pub_fields(data: Any) -> tuple[str | None, str | None]:
    if not isinstance(data, dict):
        return None, None
    row = data.get("row") or {}
    return data.get("type"), row.get("msg_id")


class SdkSubscriber(ClientEventHandler):
    """A centrifuge-python client with a recoverable, positioned subscription to incoming-chat; it
    records every event with its time."""

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.pubs: list[Pub] = []
        self.subscribed: list[SubscribedContext] = []
        self.connecting: list[tuple[float, int, str]] = []
        self.disconnected: list[tuple[float, int, str]] = []
        self.unsubscribed: list[UnsubscribedContext] = []
        self.sub_errors: list[Any] = []
        self.start_offset: int | None = None
        self.epoch: str = ""
        self.changed = asyncio.Event()
        outer = self

        class SubEvents(SubscriptionEventHandler):
            async def on_subscribing(self, ctx: SubscribingContext) -> None:
                pass

            async def on_subscribed(self, ctx: SubscribedContext) -> None:
                outer.subscribed.append(ctx)
                pos = ctx.stream_position
                if outer.start_offset is None and pos is not None:
                    outer.start_offset = pos.offset
                elif not ctx.recovered and pos is not None:
                    # Told that the missed publications cannot be recovered: the sequence restarts here.
                    outer.pubs.append(Pub(pos.offset, "RESET", pos.epoch, time.time()))
                if pos is not None:
                    outer.epoch = pos.epoch
                outer.changed.set()

            async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
                outer.unsubscribed.append(ctx)

            async def on_error(self, ctx: SubscriptionErrorContext) -> None:
                outer.sub_errors.append(ctx)

            async def on_publication(self, ctx: PublicationContext) -> None:
                typ, mid = _pub_fields(ctx.pub.data)
                outer.pubs.append(Pub(ctx.pub.offset, typ, mid, time.time()))
                outer.changed.set()

        self.client = Client(url, events=self, name=name, timeout=10.0, min_reconnect_delay=0.1,
                             max_reconnect_delay=1.0, proxy=None)
        self.sub = self.client.new_subscription(CHANNEL, events=SubEvents(), recoverable=True, positioned=True)

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        if ctx.code != 0:  # 0: connect() called; the others are lost connections
            self.connecting.append((time.time(), ctx.code, ctx.reason))

    async def on_connected(self, ctx: ConnectedContext) -> None:
        pass

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.disconnected.append((time.time(), ctx.code, ctx.reason))

    async def on_error(self, ctx: ErrorContext) -> None:
        pass

    async def start(self, timeout: float = 20) -> None:
        await asyncio.wait_for(self.client.connect(), timeout)
        await asyncio.wait_for(self.sub.subscribe(), timeout)
        await self.wait_for(lambda: self.start_offset is not None, timeout)

    async def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True

    def last_offset(self) -> int:
        return self.pubs[-1].offset if self.pubs else (self.start_offset or 0)

    async def go_offline(self) -> None:
        await asyncio.wait_for(self.client.disconnect(), 10)

    async def go_online(self, timeout: float = 20) -> SubscribedContext | None:
        """Connects again; returns the resubscribe's context (the SDK recovers from its last position)."""
        n = len(self.subscribed)
        await asyncio.wait_for(self.client.connect(), timeout)
        if await self.wait_for(lambda: len(self.subscribed) > n, timeout):
            return self.subscribed[n]
        return None

    def summary(self) -> str:
        resubs = self.subscribed[1:]
        rec = sum(1 for c in resubs if c.recovered)
        codes = sorted({c for _, c, _ in self.connecting})
        n = sum(1 for p in self.pubs if p.type != "RESET")
        return (f"{n} pubs after offset {self.start_offset}; {len(self.connecting)} reconnects {codes}; "
                f"{len(resubs)} resubscribes, {rec} recovered")

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(), 5)
        except Exception:  # noqa: BLE001
            pass


@dataclass
class PublishLog:
    """Client publishes through a rule: per logical message (its content), the attempts' outcomes."""

    attempts: dict[str, list[str]] = field(default_factory=dict)  # content -> ["ok" | "error 100" | "silence" | ...]
    latencies: list[float] = field(default_factory=list)
    unacked_written: list[str] = field(default_factory=list)  # set by verify()

    def record(self, content: str, outcome: str) -> None:
        self.attempts.setdefault(content, []).append(outcome)

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for atts in self.attempts.values():
            for a in atts:
                out[a] = out.get(a, 0) + 1
        return out


async def sdk_publisher(url: str, tag: str, idx: int, plog: PublishLog, stop: asyncio.Event, rate: float,
                        retry: bool = False, max_messages: int | None = None, attempt_timeout: float = 15,
                        gate: asyncio.Event | None = None) -> None:
    """A centrifuge-python client publishing chatMsg on outgoing-chat at about `rate`/s. Each outcome is
    recorded; with `retry`, a failed publish is retried (a new publish, as an app would) until it succeeds.
    While `gate` is given and not set, it waits before its next message."""
    client = Client(url, name=f"publisher-{idx}", timeout=attempt_timeout, min_reconnect_delay=0.1,
                    max_reconnect_delay=1.0, proxy=None)
    await asyncio.wait_for(client.connect(), 20)
    k = 0
    try:
        while not stop.is_set() and (max_messages is None or k < max_messages):
            if gate is not None:
                await gate.wait()
            content = f"{tag}-p{idx}-{k}"
            k += 1
            while True:
                t0 = time.monotonic()
                try:
                    await asyncio.wait_for(
                        client.publish(OUT_CHANNEL, {"name": "chatMsg", "data": {"username": f"pub-{idx}", "content": content}}),
                        attempt_timeout,
                    )
                    plog.record(content, "ok")
                    plog.latencies.append(time.monotonic() - t0)
                    break
                except (asyncio.TimeoutError, OperationTimeoutError):
                    plog.record(content, "silence")  # no answer at all in time
                except Exception as e:  # noqa: BLE001 - error reply, or the connection went away
                    code = getattr(e, "code", None)
                    plog.record(content, f"error {code}" if code is not None else type(e).__name__)
                if not retry or stop.is_set() and max_messages is None:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1 / rate)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), 5)
        except Exception:  # noqa: BLE001
            pass


async def fetch_history(url: str, page: int = 300) -> tuple[str, int, list[Pub], int]:
    """The channel's whole history through the protocol, paged with `since` (limit ≤ 300):
    (epoch, top offset, publications, largest page seen)."""
    client = Client(url, name="history-reader", timeout=20.0, proxy=None)
    await asyncio.wait_for(client.connect(), 20)
    try:
        pubs: list[Pub] = []
        pos = StreamPosition(offset=0, epoch="")
        epoch = ""
        top = 0
        largest = 0
        for _ in range(100000):
            h = await client.history(CHANNEL, limit=page, since=pos)
            epoch, top = h.epoch, h.offset
            largest = max(largest, len(h.publications))
            for p in h.publications:
                typ, mid = _pub_fields(p.data)
                pubs.append(Pub(p.offset, typ, mid, 0.0))
            if not h.publications or h.publications[-1].offset >= top:
                break
            pos = StreamPosition(offset=h.publications[-1].offset, epoch=epoch)
        return epoch, top, pubs, largest
    finally:
        await asyncio.wait_for(client.disconnect(), 5)


# ---- raw WebSocket subscriber ------------------------------------------------------------------------


class RawSubscriber:
    """A plain WebSocket client speaking the JSON protocol itself: it records close codes exactly and
    reconnects with recovery from its last offset (as the SDKs do)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.pubs: list[Pub] = []
        self.subscribed: list[dict] = []
        self.closes: list[tuple[float, int | None, str]] = []
        self.unsub_pushes: list[dict] = []
        self.recoveries: list[tuple[float, int]] = []  # (seconds away, publications in the recovery reply)
        self.down_since: float | None = None
        self.start_offset: int | None = None
        self.epoch = ""
        self.offset = 0
        self.task: asyncio.Task | None = None
        self.stopping = False
        self.ready = asyncio.Event()

    async def start(self, timeout: float = 20) -> None:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.ready.wait(), timeout)

    def last_offset(self) -> int:
        return self.pubs[-1].offset if self.pubs else (self.start_offset or 0)

    async def go_offline(self) -> None:
        await asyncio.wait_for(self.client.disconnect(), 10)

    async def go_online(self, timeout: float = 20) -> SubscribedContext | None:
        """Connects again; returns the resubscribe's context (the SDK recovers from its last position)."""
        n = len(self.subscribed)
        await asyncio.wait_for(self.client.connect(), timeout)
        if await self.wait_for(lambda: len(self.subscribed) > n, timeout):
            return self.subscribed[n]
        return None

    def summary(self) -> str:
        resubs = self.subscribed[1:]
        rec = sum(1 for r in resubs if r.get("recovered"))
        n = sum(1 for p in self.pubs if p.type != "RESET")
        away = max((a for a, _ in self.recoveries), default=0)
        most = max((k for _, k in self.recoveries), default=0)
        return (f"{n} pubs after offset {self.start_offset}; {len(self.closes)} closes "
                f"{sorted({c[1] for c in self.closes}, key=str)}; {len(resubs)} resubscribes, {rec} recovered"
                + (f"; longest away {away:.2f} s, largest recovery {most} publications" if self.recoveries else ""))

    def _on_pub(self, pub: dict, t: float) -> None:
        typ, mid = _pub_fields(pub.get("data"))
        off = int(pub.get("offset", 0))
        self.pubs.append(Pub(off, typ, mid, t))
        self.offset = off

    async def _run(self) -> None:
        while not self.stopping:
            try:
                async with websockets.connect(self.url, max_size=None, proxy=None, open_timeout=5,
                                              ping_interval=None) as ws:
                    sub: dict[str, Any] = {"channel": CHANNEL, "recoverable": True, "positioned": True}
                    if self.start_offset is not None:
                        sub.update({"recover": True, "offset": self.offset, "epoch": self.epoch})
                    await ws.send(json.dumps({"id": 1, "connect": {"name": self.name}}) + "\n"
                                  + json.dumps({"id": 2, "subscribe": sub}))
                    async for frame in ws:
                        t = time.time()
                        for line in str(frame).split("\n"):
                            if not line:
                                continue
                            msg = json.loads(line)
                            if not msg:
                                await ws.send("{}")  # server ping -> pong
                            elif msg.get("id") == 2 and "subscribe" in msg:
                                res = msg["subscribe"]
                                self.subscribed.append(res)
                                if self.start_offset is not None and self.down_since is not None:
                                    # A resubscribe: how long the client was away, how much it recovered.
                                    self.recoveries.append((round(t - self.down_since, 3), len(res.get("publications", []))))
                                self.down_since = None
                                if self.start_offset is None:
                                    self.start_offset = int(res.get("offset", 0))
                                elif not res.get("recovered"):
                                    self.pubs.append(Pub(int(res.get("offset", 0)), "RESET", res.get("epoch"), t))
                                if not res.get("recovered"):
                                    self.offset = int(res.get("offset", 0))
                                self.epoch = res.get("epoch", "")
                                for p in res.get("publications", []):
                                    self._on_pub(p, t)
                                self.ready.set()
                            elif "push" in msg:
                                push = msg["push"]
                                if "pub" in push:
                                    self._on_pub(push["pub"], t)
                                elif "unsubscribe" in push:
                                    self.unsub_pushes.append(push["unsubscribe"])
                                    await ws.close()  # simplest correct reaction: reconnect and recover
                            elif "error" in msg:
                                self.closes.append((t, None, f"error reply {msg['error']}"))
                    rcvd = ws.close_code
                    self.closes.append((time.time(), rcvd, ws.close_reason or ""))
            except websockets.ConnectionClosed as e:
                self.closes.append((time.time(), e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else ""))
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake, websockets.InvalidStatus) as e:
                self.closes.append((time.time(), None, type(e).__name__))
            if self.down_since is None:
                self.down_since = self.closes[-1][0] if self.closes else time.time()
            if not self.stopping:
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        self.stopping = True
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


# ---- TCP proxy ----------------------------------------------------------------------------------------


class TcpProxy:
    """Forwards each new loopback TCP connection to the current `target` port (a load balancer in front of
    connector nodes). Switching the target affects new connections only."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.connections: dict[int, int] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.target
        self.connections[target] = self.connections.get(target, 0) + 1
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", target), 5)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                try:
                    w.close()
                except OSError:
                    pass

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    async def close(self) -> None:
        if self.server:
            self.server.close()


class FlakyWriterProxy:
    """An HTTP proxy in front of the writer's Lambda Invoke API that makes the FIRST invocation of each
    logical message fail, and passes every later one. The logical message is the chat content (a client
    retry is a new publish, with a new message id assigned by the connector; a connector-side retry keeps
    the id). How the first invocation fails is chosen by `mode_of(content)`:

      500-before      HTTP 500, not forwarded (nothing written)
      function-error  200 with X-Amz-Function-Error: Unhandled, not forwarded (a function error)
      timeout         held past the rule's timeout, then 504, not forwarded
      500-after       forwarded (the row IS written), then HTTP 500: the answer is lost
    """

    def __init__(self, writer_url: str, mode_of: Callable[[str], str], hold_s: float = 2.0) -> None:
        import http.server
        import threading
        import urllib.error
        import urllib.request

        self.writer_url = writer_url.rstrip("/")
        self.mode_of = mode_of
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.calls: dict[str, list[tuple[str, str]]] = {}  # content -> [(message id, what the proxy did)]
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes) -> tuple[int, bytes, dict[str, str]]:
                # The signature travels with the body: the writer runs only signed invocations.
                signature = {"X-Relay-Signature": self.headers["X-Relay-Signature"]} if self.headers.get("X-Relay-Signature") else {}
                req = urllib.request.Request(proxy.writer_url + self.path, data=body, method="POST",
                                             headers={"Content-Type": "application/json", **signature})
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        fe = resp.headers.get("X-Amz-Function-Error")
                        return resp.status, resp.read(), ({"X-Amz-Function-Error": fe} if fe else {})
                except urllib.error.HTTPError as e:
                    return e.code, e.read(), {}

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    msg = json.loads(body)["messages"][0]
                    data = json.loads(msg["data"]) if isinstance(msg["data"], str) else msg["data"]
                    content, mid = str(data["content"]), str(msg["id"])
                except (ValueError, KeyError, IndexError, TypeError):
                    content, mid = "", ""
                with proxy.lock:
                    seen = proxy.calls.setdefault(content, [])
                    first = not seen and content != ""
                    mode = proxy.mode_of(content) if first else "pass"
                    seen.append((mid, mode))
                if mode == "500-before":
                    self._answer(500, b'{"message":"injected failure before the write"}')
                elif mode == "function-error":
                    self._answer(200, b'{"errorMessage":"injected function error","errorType":"Injected"}',
                                 {"X-Amz-Function-Error": "Unhandled"})
                elif mode == "timeout":
                    time.sleep(proxy.hold_s)
                    try:
                        self._answer(504, b'{"message":"injected timeout"}')
                    except OSError:
                        pass
                elif mode == "500-after":
                    self._forward(body)
                    self._answer(500, b'{"message":"injected failure after the write"}')
                else:
                    status, out, headers = self._forward(body)
                    self._answer(status, out, headers)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- verification -----------------------------------------------------------------------------------


def capture_mode() -> str:
    """The capture mode the connectors of this run use (`RELAY__CAPTURE__MODE`, set by run.py --capture)."""
    return os.environ.get("RELAY__CAPTURE__MODE", "trigger")


async def wait_drained(db_url: str, timeout: float = 30) -> int:
    """Waits until everything committed so far is in the history (trigger mode: the changelog is empty;
    wal mode: the leader's stored position passed a marker message emitted now); returns the channel's
    top offset."""
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + timeout
        mark = None
        if capture_mode() == "wal":
            mark = await conn.fetchval("SELECT pg_logical_emit_message(true, 'relay-heartbeat', '')::text")
        while time.monotonic() < deadline:
            if mark is None:
                done = await conn.fetchval("SELECT count(*) = 0 FROM relay.changelog")
            else:
                done = await conn.fetchval("SELECT coalesce(lsn >= $1::text::pg_lsn, false) FROM relay.wal_state", mark)
            if done:
                break
            await asyncio.sleep(0.1)
        top = await conn.fetchval("SELECT top_offset FROM relay.channels WHERE name = $1", CHANNEL)
        return int(top or 0)
    finally:
        await conn.close()


async def wait_caught_up(subs: list, top: int, timeout: float = 30) -> list:
    """Waits until every subscriber's last offset reaches `top`; returns those that did not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.last_offset() >= top for s in subs):
            return []
        await asyncio.sleep(0.1)
    return [s for s in subs if s.last_offset() < top]


def describe_sequence(offsets: list[int], first: int, top: int) -> str:
    """What is wrong with a delivered offset sequence that should be first..top exactly once, in order."""
    seen: dict[int, int] = {}
    for o in offsets:
        seen[o] = seen.get(o, 0) + 1
    missing = [o for o in range(first, top + 1) if o not in seen]
    dups = sorted(o for o, n in seen.items() if n > 1)
    extra = sorted(o for o in seen if o < first or o > top)
    disorder = next((i for i in range(1, len(offsets)) if offsets[i] <= offsets[i - 1]), None)
    parts = [f"{len(offsets)} delivered, want {max(0, top - first + 1)} ({first}..{top})"]
    if missing:
        parts.append(f"missing {len(missing)}: {missing[:10]}{'...' if len(missing) > 10 else ''}")
    if dups:
        parts.append(f"duplicated {len(dups)}: {dups[:10]}")
    if extra:
        parts.append(f"outside the range: {extra[:10]}")
    if disorder is not None:
        parts.append(f"out of order at index {disorder}: {offsets[max(0, disorder - 2):disorder + 2]}")
    return "; ".join(parts)


def check_sequence(entries: list[Pub], start: int, top: int) -> tuple[list[str], int]:
    """Walks what a subscriber received: publications, and RESET markers (a subscribe answered
    recovered=false, offset = the position it returned). Every publication must be the next offset; a
    RESET may only move the position forward (told so, never a silent gap) and restarts the count.
    Returns (problems, number of resets)."""
    problems: list[str] = []
    expected = start + 1
    resets = 0
    offsets: list[int] = []
    seg_start = expected
    for e in entries:
        if e.type == "RESET":
            resets += 1
            if e.offset < expected - 1:
                problems.append(f"recovered=false returned position {e.offset}, behind the {expected - 1} already delivered")
            if offsets != list(range(seg_start, expected)):
                problems.append(describe_sequence(offsets, seg_start, expected - 1))
            expected = e.offset + 1
            seg_start = expected
            offsets = []
            continue
        offsets.append(e.offset)
        expected = max(expected, e.offset + 1)
    if offsets != list(range(seg_start, top + 1)):
        problems.append(describe_sequence(offsets, seg_start, top))
    return problems, resets


@dataclass
class Verdict:
    rows_in_table: int = 0
    history_top: int = 0
    history_first: int = 0


async def verify(results: Results, case: str, db_url: str, ws_url: str, subs: list, wl: WriteLog | None,
                 tag: str = "", plog: PublishLog | None = None, exactly_once_publishes: bool = False,
                 pruned: bool = False, allow_not_recovered: tuple[str, ...] = ()) -> Verdict:
    """The invariants, after the writes stopped:
      - history (protocol, pages of at most 300 via since) is contiguous up to the top, one epoch, starts
        at offset 1 (unless `pruned`), and equals relay.publications;
      - every row in chat_data has exactly one INSERT publication in history (rows whose publication was
        pruned excepted), and history has no INSERT of a row that is not in the table; every committed
        write is in the table; each SQL writer's rows appear in its commit order;
      - client publishes: every acknowledged one is in the table, every attempt got an answer, and (when
        asked) exactly one row per logical message;
      - every subscriber got every publication after its subscribe position exactly once, in offset
        order, each equal to history's; a resubscribe answered recovered=false is a failure, except for
        the subscribers named in `allow_not_recovered`, for which it restarts the sequence at the
        position it returned (never backwards).
    """
    v = Verdict()
    top = await wait_drained(db_url)
    behind = await wait_caught_up(subs, top)
    await asyncio.sleep(0.5)  # a duplicate would arrive now
    epoch, htop, hist, largest = await fetch_history(ws_url)
    v.history_top = htop
    hoffs = [p.offset for p in hist]
    first_hist = hoffs[0] if hoffs else top + 1
    v.history_first = first_hist
    results.check(
        f"{case}: history is contiguous up to the top, in pages of at most 300",
        htop == top and hoffs == list(range(first_hist, top + 1)) and largest <= 300 and (pruned or first_hist == 1),
        f"{len(hist)} publications, offsets {first_hist}..{htop}, epoch {epoch}, largest page {largest}",
        f"history top {htop} (sequencer top {top}), largest page {largest}: {describe_sequence(hoffs, first_hist, top)}",
    )
    conn = await asyncpg.connect(db_url)
    try:
        sql_hist = await conn.fetch(
            """SELECT "offset", data->>'type' AS type, data->'row'->>'msg_id' AS msg_id
               FROM relay.publications WHERE channel = $1 ORDER BY "offset" """, CHANNEL)
        table = {r["msg_id"]: r["msg_data"] for r in await conn.fetch("SELECT msg_id, msg_data FROM chat_data")}
    finally:
        await conn.close()
    same = [(r["offset"], r["type"], r["msg_id"]) for r in sql_hist] == [(p.offset, p.type, p.msg_id) for p in hist]
    results.check(f"{case}: protocol history equals relay.publications", same, f"{len(sql_hist)} rows",
                  f"{len(sql_hist)} rows in relay.publications vs {len(hist)} from history calls")
    v.rows_in_table = len(table)
    by_offset = {p.offset: p for p in hist}

    # The table against history.
    inserts: dict[str, int] = {}
    for p in hist:
        if p.type == "INSERT" and p.msg_id is not None:
            inserts[p.msg_id] = inserts.get(p.msg_id, 0) + 1
    no_pub = [m for m in table if inserts.get(m, 0) == 0]
    twice = [m for m, n in inserts.items() if n > 1]
    phantom = [m for m in inserts if m not in table]
    results.check(
        f"{case}: every row in the table has exactly one INSERT publication" + (" (unless pruned)" if pruned else ""),
        (pruned or not no_pub) and not twice and not phantom,
        f"{len(table)} rows" + (f", {len(no_pub)} of them pruned from history" if pruned else ""),
        f"{len(table)} rows; without publication {len(no_pub)} {no_pub[:5]}; published twice {len(twice)} {twice[:5]}; "
        f"published but not in the table {len(phantom)} {phantom[:5]}",
    )
    if wl is not None:
        lost = [m for m in wl.committed if m not in table]
        unknown_in = sum(1 for m in wl.unknown if m in table)
        results.check(
            f"{case}: every committed write is in the table",
            not lost,
            f"{len(wl.committed)} rows committed in {wl.txns} transactions; {len(wl.unknown)} of unknown outcome "
            f"({unknown_in} of them in the table); writer errors {wl.errors or 'none'}",
            f"{len(lost)} committed rows missing: {lost[:5]}",
        )
        # Each writer's transactions do not overlap, so its rows must appear in its commit order.
        pattern = re.compile(rf"^{re.escape(tag)}-(w\d+)-(\d+)$")
        last_k: dict[str, int] = {}
        bad = []
        for p in hist:
            m = pattern.match(p.msg_id or "") if p.type == "INSERT" else None
            if not m:
                continue
            w, k = m.group(1), int(m.group(2))
            if k <= last_k.get(w, -1):
                bad.append((p.offset, p.msg_id))
            last_k[w] = k
        results.check(f"{case}: each SQL writer's rows are in its commit order in the stream", not bad,
                      f"{len(last_k)} writers", f"out of order: {bad[:5]}")
    if plog is not None and plog.attempts:
        contents: dict[str, int] = {}
        for text in table.values():
            key = text.split(" ", 1)[0]
            contents[key] = contents.get(key, 0) + 1
        ok_missing = [c for c, atts in plog.attempts.items() if "ok" in atts and contents.get(c, 0) == 0]
        multi = [c for c in plog.attempts if contents.get(c, 0) > 1]
        silent = sum(a.count("silence") for a in plog.attempts.values())
        unacked = [c for c, atts in plog.attempts.items() if "ok" not in atts]
        unacked_written = [c for c in unacked if contents.get(c, 0) > 0]
        detail = (f"{len(plog.attempts)} logical messages; attempts {plog.outcomes()}; of the {len(unacked)} never "
                  f"acknowledged, {len(unacked_written)} were written")
        plog.unacked_written = unacked_written
        results.check(f"{case}: every acknowledged client publish is in the table", not ok_missing, detail,
                      f"{len(ok_missing)} acknowledged but absent: {ok_missing[:5]}; {detail}")
        results.check(f"{case}: every client publish got an answer (success or error), never silence", silent == 0,
                      detail, f"{silent} attempts got no answer in time; {detail}")
        if exactly_once_publishes:
            results.check(f"{case}: exactly one row per logical message", not multi,
                          f"{len(plog.attempts)} logical messages",
                          f"{len(multi)} logical messages written more than once: {multi[:5]}")

    # Every subscriber.
    for s in subs:
        problems: list[str] = []
        if s.start_offset is None:
            problems.append("never subscribed")
        else:
            seq_problems, resets = check_sequence(s.pubs, s.start_offset, top)
            problems += seq_problems
            if resets and s.name not in allow_not_recovered:
                problems.append(f"{resets} resubscribes answered recovered=false")
            real = [p for p in s.pubs if p.type != "RESET"]
            mism = [p.offset for p in real if p.offset in by_offset
                    and (by_offset[p.offset].msg_id, by_offset[p.offset].type) != (p.msg_id, p.type)]
            if mism:
                problems.append(f"{len(mism)} publications differ from history, e.g. offsets {mism[:5]}")
        info = s.summary()
        if s in behind:
            problems.append(f"did not catch up to {top} within 30 s")
        results.check(f"{case}: {s.name} got every row once, in offset order, matching history", not problems,
                      info, "; ".join(problems) + f" [{info}]")
    return v
