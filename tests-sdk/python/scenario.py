"""The chat scenario with the official centrifuge-python SDK (PyPI `centrifuge-python`, pinned in
tests-sdk/requirements.txt), run by tests-sdk/run.py against a real connector and writer.

Protocol with the orchestrator (one line each):
  stdout  PASS <check> | FAIL <check>: <why> | SKIP <check>: <why> | INFO <text>
  stdout  READY_FOR_RESTART <json>     the orchestrator may now SIGKILL and restart the connector
  stdin   RESTARTED <json>             {"msg_ids": [...]} rows inserted with SQL while it was down
  stdout  RESULT passed=N failed=M     last line; exit code 0 only when failed == 0
Environment: RELAY_WS_URL (required), SCENARIO_LABEL, STEP_TIMEOUT_MS (default 20000),
RESTART_TIMEOUT_MS (default 90000), FRAME_LOG (file that gets the SDK's debug log, which holds every
frame), RUN_TAG, SDK_PROTOCOL (`json`, the default, or `protobuf`: the client is created with
`use_protobuf=True`; publication data then travels as the bytes of its JSON, encoded and decoded here).

SDK callbacks only record events: they run on the SDK's read loop and must not await SDK calls.
"""

import asyncio
import json
import logging
import os
import secrets
import sys
import threading
import time

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

URL = os.environ.get("RELAY_WS_URL", "")
LABEL = os.environ.get("SCENARIO_LABEL", "python")
STEP_S = float(os.environ.get("STEP_TIMEOUT_MS", "20000")) / 1000
RESTART_S = float(os.environ.get("RESTART_TIMEOUT_MS", "90000")) / 1000
TAG = os.environ.get("RUN_TAG") or secrets.token_hex(4)
PROTOBUF = os.environ.get("SDK_PROTOCOL") == "protobuf"
IN_CHANNEL = "incoming-chat"
OUT_CHANNEL = "outgoing-chat"


def out(line: str) -> None:
    print(line, flush=True)


class CheckFailed(Exception):
    """An expectation of the scenario did not hold."""


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def describe(v) -> str:
    return json.dumps(v, default=str)


class Recorder:
    """Every SDK event and stdin line, with the time it arrived; waiters re-check on each event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object, float]] = []
        self.changed = asyncio.Event()
        self.stdin_lines: list[str] = []
        self.stdin_closed = False

    def record(self, kind: str, ctx: object) -> None:
        self.events.append((kind, ctx, time.monotonic()))
        self.changed.set()

    def since(self, t: float, kind: str) -> list:
        return [ctx for (k, ctx, at) in self.events if at >= t and k == kind]

    async def wait_for(self, what: str, pred, timeout: float = STEP_S):
        deadline = time.monotonic() + timeout
        while True:
            self.changed.clear()
            result = pred()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass


REC: Recorder


class ClientEvents(ClientEventHandler):
    async def on_connecting(self, ctx: ConnectingContext) -> None:
        REC.record("connecting", ctx)

    async def on_connected(self, ctx: ConnectedContext) -> None:
        REC.record("connected", ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        REC.record("disconnected", ctx)

    async def on_error(self, ctx: ErrorContext) -> None:
        REC.record("client-error", ctx)


class SubEvents(SubscriptionEventHandler):
    async def on_subscribing(self, ctx: SubscribingContext) -> None:
        REC.record("subscribing", ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        REC.record("subscribed", ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        REC.record("unsubscribed", ctx)

    async def on_error(self, ctx: SubscriptionErrorContext) -> None:
        REC.record("sub-error", ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        REC.record("pub", ctx)


def as_json(data) -> dict:
    """Publication data as a JSON object: a dict in JSON mode, the bytes of its JSON in Protobuf mode."""
    if isinstance(data, (bytes, bytearray)):
        data = json.loads(bytes(data).decode())
    return data if isinstance(data, dict) else {}


def encode_data(value):
    """Publication data as the SDK wants it: the value, or in Protobuf mode the bytes of its JSON."""
    return json.dumps(value).encode() if PROTOBUF else value


def pub_summary(ctx: PublicationContext) -> dict:
    data = as_json(ctx.pub.data)
    row = data.get("row") or {}
    return {
        "offset": ctx.pub.offset,
        "type": data.get("type"),
        "msg_id": row.get("msg_id"),
        "msg_data": row.get("msg_data"),
    }


def pub_data(ctx: PublicationContext) -> dict:
    return as_json(ctx.pub.data)


def start_stdin_reader(loop: asyncio.AbstractEventLoop) -> None:
    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(_stdin_line, line.rstrip("\n"))
        loop.call_soon_threadsafe(_stdin_closed)

    threading.Thread(target=reader, daemon=True).start()


def _stdin_line(line: str) -> None:
    REC.stdin_lines.append(line)
    REC.record("stdin", line)


def _stdin_closed() -> None:
    REC.stdin_closed = True
    REC.record("stdin-closed", None)


async def with_timeout(coro, what: str, timeout: float = STEP_S):
    try:
        return await asyncio.wait_for(coro, timeout=timeout)
    except asyncio.TimeoutError:
        raise CheckFailed(f"timed out after {timeout:.0f} s: {what}") from None


async def main() -> int:
    global REC
    REC = Recorder()
    if not URL:
        out("FAIL setup: RELAY_WS_URL is not set")
        out("RESULT passed=0 failed=1")
        return 2

    frame_log = os.environ.get("FRAME_LOG")
    if frame_log:
        handler = logging.FileHandler(frame_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        for name in ("centrifuge", "websockets.client"):
            lg = logging.getLogger(name)
            lg.setLevel(logging.DEBUG)
            lg.addHandler(handler)
            lg.propagate = False

    start_stdin_reader(asyncio.get_running_loop())

    client = Client(
        URL,
        events=ClientEvents(),
        name=f"sdk-test-{LABEL}",
        timeout=5.0,
        min_reconnect_delay=0.2,
        max_reconnect_delay=1.0,
        use_protobuf=PROTOBUF,
    )
    sub = client.new_subscription(IN_CHANNEL, events=SubEvents(), recoverable=True, positioned=True)

    state: dict = {}
    username = f"{LABEL}-alice-{TAG}"
    content = f"hello from {LABEL} {TAG}"
    edited_content = f"edited by {LABEL} {TAG}"
    live_content = f"after restart {LABEL} {TAG}"

    def find_insert(text: str, after: float = 0.0):
        for ctx in REC.since(after, "pub"):
            d = pub_data(ctx)
            if d.get("type") == "INSERT" and (d.get("row") or {}).get("msg_data") == text:
                return ctx
        return None

    async def step_connect():
        await with_timeout(client.connect(), "client.connect()")
        c = await REC.wait_for("connected event", lambda: (REC.since(0, "connected") or [None])[0])
        expect(isinstance(c.client, str) and c.client != "", f"connected ctx has no client id: {c!r}")
        state["client_id"] = c.client
        return f"client id {c.client}"

    async def step_subscribe():
        await with_timeout(sub.subscribe(), "sub.subscribe()")
        s = await REC.wait_for("subscribed event", lambda: (REC.since(0, "subscribed") or [None])[0])
        expect(s.recoverable is True, f"subscribed.recoverable is {s.recoverable}, want True")
        expect(s.positioned is True, f"subscribed.positioned is {s.positioned}, want True")
        pos = s.stream_position
        expect(pos is not None and isinstance(pos.offset, int) and pos.offset >= 0, f"no or bad stream position: {s!r}")
        state["start"] = StreamPosition(offset=pos.offset, epoch=pos.epoch or "")
        return f"position {pos}"

    async def step_epoch():
        expect(
            state["start"].epoch != "",
            f"subscribe reply has no epoch (position {state['start']}); Centrifuge always sends the stream's epoch "
            "to a recoverable subscription, and without it the client cannot detect a reset stream on recovery",
        )

    async def step_publish_chat():
        await with_timeout(
            client.publish(OUT_CHANNEL, encode_data({"name": "chatMsg", "data": {"username": username, "content": content}})),
            "publish chatMsg reply",
        )

    async def step_insert():
        p = await REC.wait_for(f"INSERT publication with msg_data={content!r}", lambda: find_insert(content))
        d = pub_data(p)
        row = d.get("row") or {}
        expect(d.get("schema") == "public" and d.get("table") == "chat_data", f"schema/table: {describe(d)}")
        expect(row.get("username") == username, f"row.username {row.get('username')!r}, want {username!r}")
        expect(row.get("is_edited") is False, f"row.is_edited {row.get('is_edited')!r}, want false")
        expect(isinstance(row.get("msg_id"), str) and row["msg_id"] != "", f"row.msg_id missing: {describe(row)}")
        start = state["start"].offset
        expect(p.pub.offset > 0 and p.pub.offset > start, f"offset {p.pub.offset} must be > 0 and > subscribe offset {start}")
        state["msg_id"] = row["msg_id"]
        state["insert_offset"] = p.pub.offset
        return f"msg_id {row['msg_id']} offset {p.pub.offset}"

    async def step_identity():
        row = pub_data(find_insert(content)).get("row") or {}
        expect(
            row.get("client_id") == state["client_id"],
            f"row.client_id {row.get('client_id')!r}, want the connection's client id {state['client_id']!r}",
        )

    async def step_publish_edit():
        await with_timeout(
            client.publish(
                OUT_CHANNEL,
                encode_data(
                    {
                        "name": "editedMsg",
                        "data": {"username": username, "content": edited_content, "msgIdToEdit": state["msg_id"]},
                    }
                ),
            ),
            "publish editedMsg reply",
        )

    async def step_update():
        def find():
            for ctx in REC.since(0, "pub"):
                d = pub_data(ctx)
                if d.get("type") == "UPDATE" and (d.get("row") or {}).get("msg_id") == state["msg_id"]:
                    return ctx
            return None

        p = await REC.wait_for(f"UPDATE publication for msg_id {state['msg_id']}", find)
        d = pub_data(p)
        row = d.get("row") or {}
        old = d.get("old") or {}
        expect(d.get("table") == "chat_data", f"table: {describe(d)}")
        expect(row.get("msg_data") == edited_content, f"row.msg_data {row.get('msg_data')!r}, want {edited_content!r}")
        expect(row.get("is_edited") is True, f"row.is_edited {row.get('is_edited')!r}, want true")
        expect(old.get("msg_data") == content, f"old.msg_data should be the text before the edit: {describe(d.get('old'))}")
        want = state["insert_offset"] + 1
        expect(p.pub.offset == want, f"UPDATE offset {p.pub.offset}, want {want} (INSERT offset + 1)")
        state["update_offset"] = p.pub.offset
        return f"offset {p.pub.offset}"

    async def step_history():
        h = await with_timeout(sub.history(limit=10, since=state["start"]), "history since subscribe position")
        got = [
            {"offset": p.offset, "type": as_json(p.data).get("type"), "msg_id": (as_json(p.data).get("row") or {}).get("msg_id")}
            for p in h.publications
        ]
        expect(len(got) == 2, f"history since {state['start']}: {len(got)} publications, want 2: {describe(got)}")
        want = [
            {"offset": state["insert_offset"], "type": "INSERT", "msg_id": state["msg_id"]},
            {"offset": state["update_offset"], "type": "UPDATE", "msg_id": state["msg_id"]},
        ]
        expect(got == want, f"history {describe(got)}, want {describe(want)}")
        expect(not state["start"].epoch or h.epoch == state["start"].epoch, f"history epoch {h.epoch!r}, want {state['start'].epoch!r}")
        expect(bool(h.epoch), f"history reply has no epoch (offset {h.offset})")
        state["epoch"] = h.epoch
        expect(h.offset == state["update_offset"], f"history top offset {h.offset}, want {state['update_offset']}")
        allh = await with_timeout(sub.history(limit=10), "history limit 10")
        offs = [p.offset for p in allh.publications]
        expect(0 < len(offs) <= 10, f"history(limit=10) returned {len(offs)} publications")
        expect(all(o > 0 for o in offs) and offs == sorted(set(offs)), f"history(limit=10) offsets not increasing: {offs}")
        return f"offsets {[g['offset'] for g in got]}"

    async def step_kill_noticed():
        state["t_kill"] = time.monotonic()
        out("READY_FOR_RESTART " + describe({"offset": state["update_offset"], "epoch": state["start"].epoch}))
        c = await REC.wait_for(
            "connecting event (transport closed) after the kill",
            lambda: (REC.since(state["t_kill"], "connecting") or [None])[0],
        )
        return f"connecting code={c.code} reason={c.reason!r}"

    async def step_restarted():
        def next_line():
            if REC.stdin_lines:
                return REC.stdin_lines.pop(0)
            if REC.stdin_closed:
                raise CheckFailed("stdin closed without RESTARTED")
            return None

        line = await REC.wait_for("RESTARTED line on stdin", next_line, RESTART_S)
        expect(line.startswith("RESTARTED "), f"unexpected orchestrator line {line!r}")
        info = json.loads(line[len("RESTARTED "):])
        state["missed"] = info.get("msg_ids")
        expect(isinstance(state["missed"], list) and state["missed"], f"no msg_ids in {line!r}")
        return f"rows inserted while away: {state['missed']}"

    async def step_recovered():
        s = await REC.wait_for(
            "subscribed event after the restart",
            lambda: (REC.since(state["t_kill"], "subscribed") or [None])[0],
            RESTART_S,
        )
        expect(s.was_recovering is True, f"was_recovering {s.was_recovering}, want True: {s!r}")
        expect(s.recovered is True, f"recovered {s.recovered}, want True: {s!r}")
        epoch = state["start"].epoch or state.get("epoch", "")
        expect(
            not epoch or (s.stream_position is not None and s.stream_position.epoch == epoch),
            f"epoch changed: {s.stream_position}, want epoch {epoch!r}",
        )

    async def step_missed():
        want = state["missed"]

        def all_there():
            ids = {pub_summary(c)["msg_id"] for c in REC.since(state["t_kill"], "pub")}
            return all(i in ids for i in want)

        await REC.wait_for(f"publications of the {len(want)} rows inserted while away", all_there)
        await asyncio.sleep(1.0)  # anything duplicated would arrive now
        got = [pub_summary(c) for c in REC.since(state["t_kill"], "pub")]
        ids = [g["msg_id"] for g in got]
        expect(ids == want, f"msg_ids received after the kill {ids}, want exactly {want}")
        want_offsets = [state["update_offset"] + 1 + i for i in range(len(want))]
        expect([g["offset"] for g in got] == want_offsets, f"offsets {[g['offset'] for g in got]}, want {want_offsets}")
        expect(all(g["type"] == "INSERT" for g in got), f"types {[g['type'] for g in got]}, want all INSERT")
        state["last_offset"] = want_offsets[-1]
        return f"offsets {want_offsets}"

    async def step_live():
        t = time.monotonic()
        await with_timeout(
            client.publish(OUT_CHANNEL, encode_data({"name": "chatMsg", "data": {"username": username, "content": live_content}})),
            "publish chatMsg reply",
        )
        p = await REC.wait_for("INSERT publication after the restart", lambda: find_insert(live_content, t))
        want = state["last_offset"] + 1
        expect(p.pub.offset == want, f"offset {p.pub.offset}, want {want}")
        state["last_offset"] = p.pub.offset

    async def step_history_after():
        h = await with_timeout(sub.history(limit=10, since=state["start"]), "history since subscribe position")
        offs = [p.offset for p in h.publications]
        want = list(range(state["insert_offset"], state["last_offset"] + 1))
        expect(offs == want, f"history offsets {offs}, want {want}")
        expect(h.offset == state["last_offset"], f"history top offset {h.offset}, want {state['last_offset']}")

    # (name, step, critical): a failed critical step skips the rest (they build on it).
    steps = [
        ("connect", step_connect, True),
        ("subscribe incoming-chat recoverable+positioned", step_subscribe, True),
        ("subscribe reply carries the stream epoch", step_epoch, False),
        ("publish chatMsg on outgoing-chat", step_publish_chat, True),
        ("receive INSERT row with offset", step_insert, True),
        ("INSERT row carries the connection identity as client_id", step_identity, False),
        ("publish editedMsg on outgoing-chat", step_publish_edit, True),
        ("receive UPDATE row (is_edited) at the next offset", step_update, True),
        ("history(limit 10) returns both in order", step_history, False),
        ("client notices the killed connector", step_kill_noticed, True),
        ("orchestrator restarted the connector", step_restarted, True),
        ("resubscribed with wasRecovering and recovered", step_recovered, True),
        ("missed rows delivered once, in order", step_missed, True),
        ("publish and receive live after the restart", step_live, False),
        ("history agrees after the restart", step_history_after, False),
    ]

    passed = failed = 0
    aborted = None
    for name, fn, critical in steps:
        if aborted:
            failed += 1
            out(f'SKIP {name}: not run, "{aborted}" failed')
            continue
        try:
            detail = await fn()
            passed += 1
            out(f"PASS {name}" + (f" ({detail})" if detail else ""))
        except Exception as e:  # noqa: BLE001 - every error fails the check, with its message
            failed += 1
            if critical:
                aborted = name
            msg = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
            out(f"FAIL {name}: {msg}")

    if failed:
        out("INFO last SDK events:")
        for kind, ctx, _ in REC.events[-15:]:
            shown = pub_summary(ctx) if kind == "pub" else ctx
            out(f"INFO   {kind} {shown!r}")
    try:
        await asyncio.wait_for(client.disconnect(), timeout=5)
    except Exception as e:  # noqa: BLE001 - the result is already decided
        out(f"INFO disconnect: {type(e).__name__}: {e}")
    out(f"RESULT passed={passed} failed={failed}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
