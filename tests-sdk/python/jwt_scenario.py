#!/usr/bin/env python3
"""Tokens minted by a third-party JWT library (PyJWT) are accepted by the connector, through the
official centrifuge-python SDK; a forged one is refused with 3500 and an expired one is refreshed.

Environment: RELAY_WS_URL, JWT_HMAC_SECRET (the connector's auth.hmac_secret_key), JWT_RSA_PRIVATE_KEY
(the path of the private key whose public half is the connector's auth.rsa_public_key).
stdout: PASS/FAIL lines, then `RESULT passed=N failed=M`; exit code 0 only when nothing failed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import jwt  # PyJWT
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    DisconnectedContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)

URL = os.environ.get("RELAY_WS_URL", "")
SECRET = os.environ.get("JWT_HMAC_SECRET", "")
RSA_KEY = os.environ.get("JWT_RSA_PRIVATE_KEY", "")
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


class Events(ClientEventHandler):
    def __init__(self) -> None:
        self.connected: asyncio.Future = asyncio.get_running_loop().create_future()
        self.disconnected: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_connected(self, ctx: ConnectedContext) -> None:
        if not self.connected.done():
            self.connected.set_result(ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(ctx)


class SubEvents(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.unsubscribed: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        if not self.unsubscribed.done():
            self.unsubscribed.set_result(ctx)


def hs256(claims: dict, secret: str = "") -> str:
    return jwt.encode(claims, secret or SECRET, algorithm="HS256")


async def connect(token: str = "", get_token=None) -> tuple[Client, Events]:
    events = Events()
    client = Client(URL, events=events, token=token, get_token=get_token, name="pyjwt-test",
                    min_reconnect_delay=0.2, max_reconnect_delay=1.0)
    await client.connect()
    return client, events


async def main() -> int:
    if not (URL and SECRET and RSA_KEY):
        out("FAIL setup: RELAY_WS_URL, JWT_HMAC_SECRET and JWT_RSA_PRIVATE_KEY are required")
        out("RESULT passed=0 failed=1")
        return 2
    now = int(time.time())

    # HS256 from PyJWT, with info; then the user's own personal channel, and not another's.
    client, events = await connect(hs256({"sub": "py-alice", "exp": now + 3600, "info": {"lib": "pyjwt"}}))
    try:
        ctx = await asyncio.wait_for(events.connected, STEP_S)
        check("PyJWT HS256 token accepted", bool(ctx.client))
        mine = client.new_subscription("notifications#py-alice")
        await mine.subscribe()
        await mine.ready(STEP_S)
        check("own personal channel subscribed", True)
        sub_events = SubEvents()
        other = client.new_subscription("notifications#bob", events=sub_events)
        await other.subscribe()
        u = await asyncio.wait_for(sub_events.unsubscribed, STEP_S)
        check("another user's personal channel refused with 103", u.code == 103, f"code {u.code}")
    except Exception as e:  # noqa: BLE001 - any failure is a failed check
        check("PyJWT HS256 token accepted", False, repr(e))
    finally:
        await client.disconnect()

    # RS256 from PyJWT (cryptography backend).
    with open(RSA_KEY, "rb") as fh:
        private_key = fh.read()
    rs = jwt.encode({"sub": "py-rsa", "exp": now + 3600}, private_key, algorithm="RS256")
    client, events = await connect(rs)
    try:
        ctx = await asyncio.wait_for(events.connected, STEP_S)
        check("PyJWT RS256 token accepted", bool(ctx.client))
    except Exception as e:  # noqa: BLE001
        check("PyJWT RS256 token accepted", False, repr(e))
    finally:
        await client.disconnect()

    # Forged: terminal 3500, no reconnect.
    client, events = await connect(hs256({"sub": "py-mallory"}, secret="not-the-secret-not-the-secret-!!"))
    try:
        d = await asyncio.wait_for(events.disconnected, STEP_S)
        check("forged token refused with 3500", d.code == 3500, f"code {d.code} {d.reason!r}")
    except Exception as e:  # noqa: BLE001
        check("forged token refused with 3500", False, repr(e))
    finally:
        await client.disconnect()

    # Expired: error 109 makes the SDK call get_token and connect with the fresh token.
    calls = []

    async def get_token() -> str:
        calls.append(1)
        return hs256({"sub": "py-bob", "exp": int(time.time()) + 3600})

    client, events = await connect(hs256({"sub": "py-bob", "exp": now - 60}), get_token=get_token)
    try:
        await asyncio.wait_for(events.connected, STEP_S)
        check("expired token → 109 → get_token → connected", len(calls) >= 1, f"get_token calls {len(calls)}")
    except Exception as e:  # noqa: BLE001
        check("expired token → 109 → get_token → connected", False, repr(e))
    finally:
        await client.disconnect()

    out(f"RESULT passed={passed} failed={failed}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
