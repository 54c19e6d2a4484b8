#!/usr/bin/env python3
"""The chat's permissions in the shipped config.json, checked with raw protocol clients (plain JSON
frames over `websockets`, no SDK smoothing anything over): no one reads another pair's direct
messages or another user's personal channel, and no one publishes as someone else.

Users are connection tokens minted here (PyJWT, HS256 with the run's auth.hmac_secret_key); rows are
checked in the run's database with psql.

Environment: RELAY_WS_URL, JWT_HMAC_SECRET, RELAY_DATABASE_URL.
stdout: PASS/FAIL lines, then `RESULT passed=N failed=M`; exit code 0 only when nothing failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import jwt  # PyJWT
import websockets

URL = os.environ.get("RELAY_WS_URL", "")
SECRET = os.environ.get("JWT_HMAC_SECRET", "")
DB = os.environ.get("RELAY_DATABASE_URL", "")
STEP_S = 10.0

passed = 0
failed = 0


def out(line: str) -> None:
    print(line, flush=True)


def check(name: str, ok: bool, detail: str = "") -> None:
    global passed, failed
    if ok:
        passed += 1
        out(f"PASS {name}")
    else:
        failed += 1
        out(f"FAIL {name}: {detail}")


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


def psql(sql: str) -> str:
    r = subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", DB, "-c", sql],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    return r.stdout.strip()


class Raw:
    """One raw connection: numbered commands, replies matched by id, pushes kept."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.ws = None
        self.next_id = 0
        self.replies: dict[int, asyncio.Future] = {}
        self.pushes: list[dict] = []
        self.reader = None

    async def connect(self, sub: str | None) -> dict:
        self.ws = await websockets.connect(URL, max_size=1 << 22)
        self.reader = asyncio.create_task(self._read())
        params = {"token": token(sub)} if sub is not None else {}
        return await self.call("connect", params)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                for line in str(frame).splitlines():
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if not msg:  # ping
                        await self.ws.send("{}")
                        continue
                    fut = self.replies.pop(msg.get("id", 0), None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    elif "push" in msg:
                        self.pushes.append(msg["push"])
        except websockets.ConnectionClosed:
            pass

    async def call(self, method: str, params: dict) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.replies[self.next_id] = fut
        await self.ws.send(json.dumps({"id": self.next_id, method: params}))
        return await asyncio.wait_for(fut, STEP_S)

    async def publish(self, name: str, data: dict, channel: str = "outgoing-chat") -> dict:
        return await self.call("publish", {"channel": channel, "data": {"name": name, "data": data}})

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()


def code(reply: dict) -> int | None:
    return (reply.get("error") or {}).get("code")


async def main() -> None:
    tag = uuid.uuid4().hex[:6]
    alice, bob, carol = f"alice{tag}", f"bob{tag}", f"carol{tag}"
    pair = f"dm#{min(alice, bob)},{max(alice, bob)}"
    a, b, c, anon, comma = Raw("alice"), Raw("bob"), Raw("carol"), Raw("anonymous"), Raw("comma")
    try:
        for client, sub in ((a, alice), (b, bob), (c, carol), (anon, None), (comma, f"{alice},{bob}")):
            r = await client.connect(sub)
            check(f"{client.label} connects", "connect" in r, json.dumps(r))

        secret = f"for bob only {tag}"
        r = await a.publish("directMsg", {"to": bob, "content": secret})
        check("alice sends bob a direct message through the writer", "error" not in r, json.dumps(r))
        msg_id = psql(f"SELECT msg_id FROM chat_direct_messages WHERE body = '{secret}'")
        check("the row is alice's, to bob, on their pair",
              psql(f"SELECT sender || '>' || recipient || '|' || user_a || ',' || user_b "
                   f"FROM chat_direct_messages WHERE msg_id = '{msg_id}'")
              == f"{alice}>{bob}|{min(alice, bob)},{max(alice, bob)}", msg_id)

        # Reading the pair's channel: only alice and bob.
        r = await b.call("subscribe", {"channel": pair, "recover": False})
        check("bob may subscribe to the pair's channel", "subscribe" in r, json.dumps(r))
        h = await b.call("history", {"channel": pair, "limit": 10})
        bodies = [p["data"]["row"].get("body") for p in (h.get("history") or {}).get("publications", [])]
        check("bob reads alice's message in the pair's history", secret in bodies, json.dumps(h)[:400])
        for client in (c, anon, comma):
            for method, params in (("subscribe", {"channel": pair}), ("history", {"channel": pair, "limit": 10}),
                                   ("presence", {"channel": pair})):
                r = await client.call(method, params)
                check(f"{client.label} cannot {method} {pair} (error 103)", code(r) == 103, json.dumps(r)[:300])
        # Personal channels: only their user.
        personal = f"notifications#{bob}"
        for client in (a, c, anon, comma):
            for method, params in (("subscribe", {"channel": personal}), ("history", {"channel": personal, "limit": 10})):
                r = await client.call(method, params)
                check(f"{client.label} cannot {method} bob's personal channel (error 103)", code(r) == 103,
                      json.dumps(r)[:300])
        r = await b.call("subscribe", {"channel": personal})
        check("bob may subscribe to his personal channel", "subscribe" in r, json.dumps(r))
        h = await b.call("history", {"channel": personal, "limit": 10})
        notes = [p["data"] for p in (h.get("history") or {}).get("publications", [])]
        check("bob's personal channel announced the conversation with alice (the writer's notice)",
              any(n.get("type") == "conversation" and {n.get("user_a"), n.get("user_b")} == {alice, bob}
                  and n.get("started_by") == alice and n.get("channel") == pair for n in notes),
              json.dumps(notes))

        # Nobody publishes on the table-fed channels or on someone's personal channel.
        for ch in (pair, personal, "room:general", "rooms"):
            r = await a.call("publish", {"channel": ch, "data": {"body": "forged", "sender": bob}})
            check(f"alice cannot publish on {ch} (error 103)", code(r) == 103, json.dumps(r))

        # Publishing as someone else: the author is the connection's user, whatever the data says.
        forged = f"signed bob? {tag}"
        r = await c.publish("roomMsg", {"roomId": "general", "content": forged, "author": bob, "username": bob})
        check("carol's room message with author=bob in its data is accepted", "error" not in r, json.dumps(r))
        check("... and stored as carol's",
              psql(f"SELECT author FROM chat_messages WHERE body = '{forged}'") == carol, "")
        r = await c.publish("directMsg", {"to": bob, "content": forged, "from": alice, "sender": alice})
        check("carol's direct message claiming to be alice's is accepted", "error" not in r, json.dumps(r))
        check("... and stored as carol's, on carol and bob's pair, not alice and bob's",
              psql(f"SELECT sender || '|' || user_a || ',' || user_b FROM chat_direct_messages WHERE body = '{forged}'")
              == f"{carol}|{min(carol, bob)},{max(carol, bob)}", "")
        r = await anon.publish("roomMsg", {"roomId": "general", "content": forged + " anon"})
        check("an anonymous room message is refused by the writer (420)", code(r) == 420, json.dumps(r))
        r = await anon.publish("directMsg", {"to": bob, "content": forged + " anon"})
        check("an anonymous direct message is refused by the writer (420)", code(r) == 420, json.dumps(r))
        r = await comma.publish("directMsg", {"to": carol, "content": "x"})
        check("a user whose id would widen a pair's channel cannot send direct messages (420)", code(r) == 420,
              json.dumps(r))
        r = await a.publish("directMsg", {"to": f"{bob},{carol}", "content": "to both?"})
        check("a recipient list in `to` is invalid (421)", code(r) == 421, json.dumps(r))

        # Someone else's message: no edit, no read receipt.
        r = await c.publish("editMsg", {"msgId": msg_id, "content": "carol was here"})
        check("carol cannot edit alice's direct message (420)", code(r) == 420, json.dumps(r))
        r = await b.publish("editMsg", {"msgId": msg_id, "content": "bob was here"})
        check("bob (the recipient) cannot edit it either (420)", code(r) == 420, json.dumps(r))
        check("the message is unchanged", psql(f"SELECT body FROM chat_direct_messages WHERE msg_id = '{msg_id}'")
              == secret, "")
        r = await c.publish("readMsg", {"msgId": msg_id})
        check("carol cannot mark it read (420)", code(r) == 420, json.dumps(r))
        r = await a.publish("readMsg", {"msgId": msg_id})
        check("alice (the sender) cannot mark it read (420)", code(r) == 420, json.dumps(r))
        check("no receipt was stored", psql(f"SELECT count(*) FROM chat_receipts WHERE msg_id = '{msg_id}'") == "0", "")
        r = await b.publish("readMsg", {"msgId": msg_id})
        check("bob marks it read", "error" not in r, json.dumps(r))
        check("the receipt is bob's",
              psql(f"SELECT reader FROM chat_receipts WHERE msg_id = '{msg_id}'") == bob, "")
    except Exception as e:  # noqa: BLE001 - any failure is a failed check, reported
        check("scenario", False, repr(e))
    finally:
        for client in (a, b, c, anon, comma):
            try:
                await client.close()
            except Exception:  # noqa: BLE001
                pass
    out(f"RESULT passed={passed} failed={failed}")


if __name__ == "__main__":
    if not URL or not SECRET or not DB:
        out("FAIL environment: RELAY_WS_URL, JWT_HMAC_SECRET and RELAY_DATABASE_URL are required")
        out("RESULT passed=0 failed=1")
        sys.exit(1)
    asyncio.run(main())
    sys.exit(0 if failed == 0 else 1)
