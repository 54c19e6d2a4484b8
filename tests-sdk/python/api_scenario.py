"""The server API with `cent` (PyPI, pinned), as a backend calls it, together with presence and user
notifications seen through centrifuge-python; run by tests-sdk/run.py against a real connector.

Protocol with the orchestrator: stdout `PASS <check>` | `FAIL <check>: <why>` | `INFO <text>`, and
`RESULT passed=N failed=M` last (exit code 0 only when failed == 0).
Environment: RELAY_WS_URL, RELAY_API_URL (…/api), RELAY_API_KEY, RELAY_DATABASE_URL (for psql),
JWT_HMAC_SECRET, STEP_TIMEOUT_MS (default 20000).

Checks: a wrong key is refused; info, channels; presence and presence_stats (cent and the SDK agree),
join and leave pushes, and a client whose process is SIGKILLed leaves within a few seconds; a
publication to the rule channel goes through the writer; broadcast and relay.notify_users() reach
both connections of a user and not another user; history and history_remove; relay.publish() in a
rolled-back transaction delivers nothing and in a committed one exactly once, between the
transaction's row changes; disconnect closes every connection of a user; when the connector is
SIGKILLed (READY_FOR_RESTART, as in scenario.py) and restarted, the members it served leave within the
node TTL, announced to the reconnected watcher.
"""

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time

import jwt
from cent import (
    BroadcastRequest,
    CentApiResponseError,
    CentUnauthorizedError,
    ChannelsRequest,
    Client as Cent,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
)
from centrifuge import (
    Client,
    ClientEventHandler,
    DisconnectedContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    SubscriptionEventHandler,
)

WS = os.environ.get("RELAY_WS_URL", "")
API = os.environ.get("RELAY_API_URL", "")
KEY = os.environ.get("RELAY_API_KEY", "")
DB = os.environ.get("RELAY_DATABASE_URL", "")
SECRET = os.environ.get("JWT_HMAC_SECRET", "")
NODE_TTL_S = float(os.environ.get("RELAY_NODE_TTL_SECS", "15"))
STEP_S = float(os.environ.get("STEP_TIMEOUT_MS", "20000")) / 1000
CHAT = "incoming-chat"
# A SIGKILLed client's socket is reset by the OS: the connector sees it at once. The bound leaves room
# for a loaded machine.
LEAVE_WITHIN_S = 5.0

passed = 0
failed = 0


def out(line: str) -> None:
    print(line, flush=True)


def ok(name: str, detail: str = "") -> None:
    global passed
    passed += 1
    out(f"PASS {name}" + (f" ({detail})" if detail else ""))


def bad(name: str, why: str) -> None:
    global failed
    failed += 1
    out(f"FAIL {name}: {why}")


class Failed(Exception):
    pass


def expect(cond: bool, why: str) -> None:
    if not cond:
        raise Failed(why)


async def check(name: str, fn) -> None:
    try:
        detail = await fn()
        ok(name, detail if isinstance(detail, str) else "")
    except Exception as e:  # noqa: BLE001 - every failure is reported
        bad(name, f"{type(e).__name__}: {e}")


def psql(sql: str) -> str:
    r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", DB, "-f", "-"],
                       input=sql, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise Failed(f"psql: {r.stderr.strip()}")
    return r.stdout


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


class Events(SubscriptionEventHandler):
    """Records joins, leaves and publications; callbacks never await SDK calls."""

    def __init__(self) -> None:
        self.joins: list[tuple[str, dict, float]] = []
        self.leaves: list[tuple[str, float]] = []
        self.pubs: list[tuple[int, object]] = []

    async def on_join(self, ctx: JoinContext) -> None:
        self.joins.append((ctx.info.client, ctx.info.chan_info or {}, time.monotonic()))

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.leaves.append((ctx.info.client, time.monotonic()))

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.pubs.append((ctx.pub.offset, ctx.pub.data))


class ClientEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.disconnected: list[tuple[int, str]] = []

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.disconnected.append((ctx.code, ctx.reason))


async def until(pred, what: str, timeout: float = STEP_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise Failed(f"{what}: not within {timeout:.0f} s")


async def child() -> None:
    """`api_scenario.py --child NAME`: a client that joins the chat's presence and waits to be killed."""
    c = Client(WS)
    sub = c.new_subscription(CHAT, data={"username": sys.argv[2]})
    await c.connect()
    await sub.subscribe()
    await sub.ready()
    out(f"CHILD {c._client_id if hasattr(c, '_client_id') else ''}")
    await asyncio.sleep(3600)


async def main() -> None:
    cent = Cent(API, KEY, timeout=10)

    async def wrong_key():
        try:
            Cent(API, "wrong-" + KEY).info(InfoRequest())
        except CentUnauthorizedError:
            return "401"
        raise Failed("a wrong key was accepted")

    await check("cent: a wrong API key is refused", wrong_key)

    async def info():
        nodes = cent.info(InfoRequest()).nodes
        expect(len(nodes) >= 1 and nodes[0].uid, f"nodes {nodes}")
        return f"{len(nodes)} node(s), {nodes[0].num_clients} client(s)"

    await check("cent: info lists the connector nodes", info)

    # Presence through the SDK and the API.
    watcher_events = Events()
    watcher = Client(WS)
    wsub = watcher.new_subscription(CHAT, events=watcher_events, join_leave=True, recoverable=True,
                                    positioned=True, data={"username": "py-watcher"})
    await watcher.connect()
    await wsub.subscribe()
    await wsub.ready()

    async def own_join_and_presence():
        await until(lambda: watcher_events.joins, "own join push")
        me = watcher_events.joins[0][0]
        sdk = await wsub.presence()
        expect(me in sdk.clients, f"SDK presence {sdk.clients}")
        expect((sdk.clients[me].chan_info or {}).get("username") == "py-watcher", f"{sdk.clients[me]}")
        api = cent.presence(PresenceRequest(channel=CHAT)).presence
        expect(set(api) == set(sdk.clients), f"cent {set(api)} vs SDK {set(sdk.clients)}")
        stats = cent.presence_stats(PresenceStatsRequest(channel=CHAT))
        sdk_stats = await wsub.presence_stats()
        expect(stats.num_clients == sdk_stats.num_clients == len(api), f"{stats} / {sdk_stats}")
        return f"{stats.num_clients} member(s)"

    await check("presence: own join push; SDK and cent presence/presence_stats agree", own_join_and_presence)

    async def killed_client_leaves():
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, __file__, "--child", "py-doomed"], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ))
        try:
            await until(lambda: any(j[1].get("username") == "py-doomed" for j in watcher_events.joins
                                    if j[2] >= t0), "join of the child process")
            doomed = next(j[0] for j in watcher_events.joins if j[1].get("username") == "py-doomed")
            expect(doomed in cent.presence(PresenceRequest(channel=CHAT)).presence, "child not in presence")
        finally:
            proc.kill()
            proc.wait()
        killed = time.monotonic()
        await until(lambda: any(c == doomed for c, _ in watcher_events.leaves), "leave of the killed client",
                    LEAVE_WITHIN_S)
        took = next(t for c, t in watcher_events.leaves if c == doomed) - killed
        expect(doomed not in cent.presence(PresenceRequest(channel=CHAT)).presence, "still in presence")
        return f"leave {took * 1000:.0f} ms after SIGKILL"

    await check("presence: a SIGKILLed client process leaves at once (leave push, gone from presence)",
                killed_client_leaves)

    async def channels():
        chans = cent.channels(ChannelsRequest()).channels
        expect(CHAT in chans and chans[CHAT].num_clients >= 1, f"{chans}")
        none = cent.channels(ChannelsRequest(pattern="nothing-like-this*")).channels
        expect(not none, f"{none}")

    await check("cent: channels (with pattern)", channels)

    async def publish_through_rule():
        text = f"from the backend {secrets.token_hex(3)}"
        cent.publish(PublishRequest(channel="outgoing-chat",
                                    data={"name": "chatMsg", "data": {"username": "backend", "content": text}}))
        await until(lambda: any(isinstance(d, dict) and d.get("row", {}).get("msg_data") == text
                                for _, d in watcher_events.pubs), "the writer's row on incoming-chat")
        row = next(d["row"] for _, d in watcher_events.pubs
                   if isinstance(d, dict) and d.get("row", {}).get("msg_data") == text)
        expect(row["client_id"] == "api", f"client_id {row['client_id']}")

    await check("cent: publish on the rule channel goes through the writer (row comes back live)",
                publish_through_rule)

    async def refused_edit():
        # A row written by someone else: the API's identity ("api") is not its author.
        victim = f"victim-{secrets.token_hex(4)}"
        psql("INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp) "
             f"VALUES ('{victim}', 'bob', 'original', 'bob-client', 0)")
        try:
            cent.publish(PublishRequest(channel="outgoing-chat", data={
                "name": "editedMsg",
                "data": {"username": "x", "content": "FORGED", "msgIdToEdit": victim}}))
        except CentApiResponseError as e:
            expect(e.code == 420, f"error code {e.code} ({e.message}), want 420")
            expect("author" in e.message, f"message {e.message!r} should be the writer's reason")
        else:
            raise AssertionError("the forged edit was answered with a result (success)")
        expect(psql(f"SELECT msg_data FROM chat_data WHERE msg_id = '{victim}'").strip() == "original",
               "the row was changed")

    await check("cent: a refused edit (not the author) is an API error 420 with the writer's reason; "
                "nothing written", refused_edit)

    # Notifications: alice on two connections, bob on one.
    alice_ev = [Events(), Events()]
    alice_cl = [ClientEvents(), ClientEvents()]
    alices = [Client(WS, events=alice_cl[i], token=token("alice")) for i in range(2)]
    bob_ev = Events()
    bob = Client(WS, token=token("bob"))
    subs = [a.new_subscription("notifications#alice", events=alice_ev[i]) for i, a in enumerate(alices)]
    bob_sub = bob.new_subscription("notifications#bob", events=bob_ev)
    for c, s in list(zip(alices, subs)) + [(bob, bob_sub)]:
        await c.connect()
        await s.subscribe()
        await s.ready()

    async def notifications():
        note = {"text": "your order shipped", "id": secrets.token_hex(3)}
        r = cent.broadcast(BroadcastRequest(channels=["notifications#alice"], data=note))
        expect(r.responses and r.responses[0].error is None, f"{r}")
        psql("SELECT relay.notify_users(ARRAY['alice'], '{\"text\": \"from SQL\"}');")
        for ev in alice_ev:
            await until(lambda ev=ev: [d for _, d in ev.pubs] == [note, {"text": "from SQL"}],
                        "both notifications on both of alice's connections")
        await asyncio.sleep(0.3)
        expect(not bob_ev.pubs, f"bob got {bob_ev.pubs}")
        return "2 connections of alice, none for bob"

    await check("notifications: broadcast (cent) and relay.notify_users (SQL) reach every connection "
                "of the user and no one else", notifications)

    async def history():
        h = cent.history(HistoryRequest(channel="notifications#alice", limit=-1))
        expect(len(h.publications) == 2 and h.offset == 2, f"{h}")
        cent.history_remove(HistoryRemoveRequest(channel="notifications#alice"))
        h2 = cent.history(HistoryRequest(channel="notifications#alice", limit=10))
        expect(not h2.publications and h2.epoch != h.epoch, f"{h2}")

    await check("cent: history, then history_remove (new epoch, empty)", history)

    async def sql_publish_transactions():
        before = len(watcher_events.pubs)
        tag = secrets.token_hex(3)
        psql(f"""
BEGIN;
SELECT relay.publish('{CHAT}', '{{"note": "rolled back {tag}"}}');
ROLLBACK;
BEGIN;
INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
VALUES ('tx-{tag}', 'sql', 'first', 'psql', 0);
SELECT relay.publish('{CHAT}', '{{"note": "between {tag}"}}');
UPDATE chat_data SET msg_data = 'second' WHERE msg_id = 'tx-{tag}';
COMMIT;
""")
        await until(lambda: len(watcher_events.pubs) >= before + 3, "three publications")
        await asyncio.sleep(0.5)
        got = watcher_events.pubs[before:]
        expect(len(got) == 3, f"got {len(got)}: {got}")
        kinds = [d.get("type") or d.get("note") for _, d in got]
        expect(kinds == ["INSERT", f"between {tag}", "UPDATE"], f"{kinds}")
        offsets = [o for o, _ in got]
        expect(offsets == list(range(offsets[0], offsets[0] + 3)), f"offsets {offsets}")

    await check("relay.publish: rolled back delivers nothing; committed delivers once, in order with the "
                "transaction's row changes", sql_publish_transactions)

    async def disconnect():
        cent.disconnect(DisconnectRequest(user="alice"))
        await until(lambda: all(cl.disconnected for cl in alice_cl), "both alice connections disconnected")
        codes = [cl.disconnected[0][0] for cl in alice_cl]
        expect(all(c == 3503 for c in codes), f"codes {codes}")
        await until(lambda: "alice" not in {i.user for i in cent.presence(PresenceRequest(channel=CHAT))
                                            .presence.values()}, "alice gone")
        s = await bob_sub.presence_stats()
        return f"codes {codes}; bob still connected ({s.num_clients} in his channel)"

    await check("cent: disconnect closes every connection of the user (3503, no reconnect)", disconnect)

    async def killed_node_members_expire():
        old = watcher_events.joins[0][0]
        out("READY_FOR_RESTART {}")
        line = await asyncio.to_thread(sys.stdin.readline)
        expect(line.startswith("RESTARTED"), f"orchestrator answered {line!r}")
        restarted = time.monotonic()
        await until(lambda: any(c == old for c, _ in watcher_events.leaves),
                    "leave of the watcher's membership on the killed node", NODE_TTL_S + 10)
        took = next(t for c, t in watcher_events.leaves if c == old) - restarted
        members = cent.presence(PresenceRequest(channel=CHAT)).presence
        expect(old not in members, "the killed node's member is still in presence")
        return f"leave {took:.1f} s after the restart (node TTL {NODE_TTL_S:.0f} s)"

    await check("presence: members of a SIGKILLed connector node leave within the node TTL",
                killed_node_members_expire)

    async def leave_on_disconnect():
        me = [j[0] for j in watcher_events.joins if j[1].get("username") == "py-watcher"][-1]
        await watcher.disconnect()
        stats = cent.presence(PresenceRequest(channel=CHAT)).presence
        await until(lambda: me not in cent.presence(PresenceRequest(channel=CHAT)).presence, "watcher gone")
        return f"{len(stats)} -> gone"

    await check("presence: a client that disconnects leaves", leave_on_disconnect)
    for c in alices + [bob]:
        await c.disconnect()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        asyncio.run(child())
        sys.exit(0)
    try:
        asyncio.run(asyncio.wait_for(main(), 300))
    except Exception as e:  # noqa: BLE001
        bad("scenario", f"{type(e).__name__}: {e}")
    out(f"RESULT passed={passed} failed={failed}")
    sys.exit(0 if failed == 0 else 1)
