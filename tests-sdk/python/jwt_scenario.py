#!/usr/bin/env python3
"""Tokens minted by a third-party JWT library (PyJWT) are accepted by the connector, through the
official centrifuge-python SDK; a forged one is refused with 3500 and an expired one is refreshed.

Then the same through a JWKS served by this script: PyJWT (with `cryptography`) makes fresh RSA and
EC key pairs, this script serves their public halves as a JWKS on 127.0.0.1 (counting requests) and
starts a second connector on the run's database with `auth.jwks_url` pointing at it. A PyJWT RS256
token with a `kid` is accepted; a key added later (rotation, ES256) is accepted after one refetch;
unknown-`kid` and HS256 tokens are refused with 3500.

Environment: RELAY_WS_URL, JWT_HMAC_SECRET (the connector's auth.hmac_secret_key), JWT_RSA_PRIVATE_KEY
(the path of the private key whose public half is the connector's auth.rsa_public_key); for the JWKS
part RELAY_CONFIG (the run's connector configuration) and RELAY_BIN_DIR (where `connector` is).
stdout: PASS/FAIL lines, then `RESULT passed=N failed=M`; exit code 0 only when nothing failed.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import jwt  # PyJWT
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    DisconnectedContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests-support"))
from relaytest import free_port  # noqa: E402
from relaytest.system import Connector  # noqa: E402

URL = os.environ.get("RELAY_WS_URL", "")
SECRET = os.environ.get("JWT_HMAC_SECRET", "")
RSA_KEY = os.environ.get("JWT_RSA_PRIVATE_KEY", "")
RELAY_CONFIG = os.environ.get("RELAY_CONFIG", "")
RELAY_BIN_DIR = os.environ.get("RELAY_BIN_DIR", "")
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


async def connect(token: str = "", get_token=None, url: str = "") -> tuple[Client, Events]:
    events = Events()
    client = Client(url or URL, events=events, token=token, get_token=get_token, name="pyjwt-test",
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

    await jwks_checks()

    out(f"RESULT passed={passed} failed={failed}")
    return 0 if failed == 0 else 1


# ---- through a JWKS served here ------------------------------------------------------------------


class JwksServer:
    """Serves {"keys": [...]} at /jwks.json on 127.0.0.1:<free port>, counting requests."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                outer.hits += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_jwks_connector(jwks_url: str) -> Connector:
    """A second connector on the run's database, verifying tokens with the JWKS only (started with the
    shared harness; stopped by the caller)."""
    cfg_path = Path(RELAY_CONFIG)
    config = json.loads(cfg_path.read_text())
    port = free_port()
    config["listen"] = f"127.0.0.1:{port}"
    config["auth"] = {"jwks_url": jwks_url, "jwks_min_refetch_secs": 1}
    jwks_cfg = cfg_path.parent / "config-jwks.json"
    jwks_cfg.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, DATABASE_URL=config["database"]["url"], NO_COLOR="1")
    env.pop("RELAY__AUTH__HMAC_SECRET_KEY", None)
    node = Connector("connector-jwks", Path(RELAY_BIN_DIR), jwks_cfg, port, env, cfg_path.parent / "connector-jwks.log")
    node.start()
    err = node.wait_http(f"{node.base}/readyz")
    if err:
        node.stop()
        raise RuntimeError(f"the JWKS connector did not become ready: {err} (see {node.logfile})")
    return node


async def expect_connected(name: str, token: str, url: str) -> None:
    client, events = await connect(token, url=url)
    try:
        ctx = await asyncio.wait_for(events.connected, STEP_S)
        check(name, bool(ctx.client))
    except Exception as e:  # noqa: BLE001
        check(name, False, repr(e))
    finally:
        await client.disconnect()


async def expect_refused(name: str, token: str, url: str) -> None:
    client, events = await connect(token, url=url)
    try:
        d = await asyncio.wait_for(events.disconnected, STEP_S)
        check(name, d.code == 3500, f"code {d.code} {d.reason!r}")
    except Exception as e:  # noqa: BLE001
        check(name, False, repr(e))
    finally:
        await client.disconnect()


async def jwks_checks() -> None:
    if not (RELAY_CONFIG and RELAY_BIN_DIR):
        check("JWKS: setup", False, "RELAY_CONFIG and RELAY_BIN_DIR are required")
        return
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    server = JwksServer()
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    server.keys = [dict(rsa_jwk, kid="py-rsa-1", use="sig", alg="RS256")]
    node = None
    try:
        node = await asyncio.to_thread(start_jwks_connector, server.url)
        url = node.ws_url
        check("JWKS: connector fetched the JWKS at start-up", server.hits == 1, f"{server.hits} requests")
        now = int(time.time())
        rs = jwt.encode({"sub": "py-jwks", "exp": now + 3600}, rsa_key, algorithm="RS256",
                        headers={"kid": "py-rsa-1"})
        await expect_connected("JWKS: PyJWT RS256 token with kid accepted", rs, url)

        # Rotation: a new EC key appears in the set; its first token makes the connector refetch once.
        ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
        server.keys.append(dict(ec_jwk, kid="py-ec-2", use="sig", alg="ES256"))
        before = server.hits
        es = jwt.encode({"sub": "py-jwks-ec", "exp": now + 3600}, ec_key, algorithm="ES256",
                        headers={"kid": "py-ec-2"})
        await expect_connected("JWKS: rotated-in PyJWT ES256 key accepted after a refetch", es, url)
        check("JWKS: the rotation cost one refetch", server.hits == before + 1, f"{server.hits - before} requests")

        await asyncio.sleep(1.2)  # past jwks_min_refetch_secs
        bogus = jwt.encode({"sub": "py-mallory"}, rsa_key, algorithm="RS256", headers={"kid": "py-unknown"})
        await expect_refused("JWKS: unknown kid refused with 3500", bogus, url)
        hs = jwt.encode({"sub": "py-mallory"}, SECRET, algorithm="HS256", headers={"kid": "py-rsa-1"})
        await expect_refused("JWKS: HS256 refused (JWKS keys only)", hs, url)
    except Exception as e:  # noqa: BLE001
        check("JWKS: scenario", False, repr(e))
    finally:
        if node is not None:
            await asyncio.to_thread(node.stop)
        server.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
