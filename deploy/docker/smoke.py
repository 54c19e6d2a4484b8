#!/usr/bin/env python3
"""Smoke test of the shipped image: runs its containers with host networking against a fresh database on
the test PostgreSQL and checks what a deployment relies on. Usage (deploy/test.sh calls it):

    smoke.py IMAGE

- the image: a non-root user, only port 8000 exposed, the baked config is the AWS one (the rule invokes
  the Lambda function through the AWS API, no local endpoint) and `connector check` accepts it;
- the writer refuses to start without WRITER_SECRET (safe default), and serves when given one;
- the connector (config: the baked one with the rule pointed at the writer container) reaches /readyz 200,
  logs JSON lines without ANSI colours;
- a chat round trip through both containers: an anonymous client publishes chatMsg on outgoing-chat, the
  writer inserts the row, the connector pushes it on incoming-chat to the subscriber;
- identity: a client with a token whose `sub` equals the anonymous client's id cannot edit its message;
  the anonymous author can;
- an unsigned invocation of the writer container is refused (403) and writes nothing;
- the same image as a Lambda: the writer under a fake Lambda Runtime API answers an event;
- SIGTERM to the connector closes the open sessions with 3001 "shutdown" and the container exits 0.

Containers, the config directory and the database are removed at the end. Prints PASS/FAIL per check and
`image: N passed, N failed`; exit code 0 only when nothing failed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
RUN_ID = secrets.token_hex(4)
DB_NAME = f"relay_smoke_{RUN_ID}"
DB_URL = re.sub(r"/[^/?]*(\?|$)", f"/{DB_NAME}\\1", ADMIN_URL.split("://", 1)[1], count=1)
DB_URL = ADMIN_URL.split("://", 1)[0] + "://" + DB_URL
WRITER_SECRET = secrets.token_hex(32)
HMAC_KEY = secrets.token_hex(32)
ANSI = re.compile(r"\x1b\[[0-9;]*m")

passed = 0
failed = 0
containers: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}", flush=True)
    else:
        failed += 1
        print(f"FAIL {name}: {detail}", flush=True)
    return ok


def sh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def psql(url: str, sql: str) -> str:
    r = sh("psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql)
    if r.returncode != 0:
        raise RuntimeError(f"psql failed: {r.stderr.strip()}")
    return r.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_container(image: str, name: str, args: list[str], env: dict[str, str], mounts: list[str] = ()) -> str:
    cname = f"pg-relay-smoke-{name}-{RUN_ID}"
    argv = ["docker", "run", "-d", "--network", "host", "--name", cname]
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    for m in mounts:
        argv += ["-v", m]
    r = sh(*argv, image, *args)
    if r.returncode != 0:
        raise RuntimeError(f"docker run {name} failed: {r.stderr.strip()}")
    containers.append(cname)
    return cname


def logs(cname: str) -> str:
    r = sh("docker", "logs", cname)
    return r.stdout + r.stderr


def wait_http(url: str, cname: str, timeout: float = 90) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True, ""
                last = f"status {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"status {e.code}"
        except OSError as e:
            last = str(e)
        state = sh("docker", "inspect", "-f", "{{.State.Running}}", cname).stdout.strip()
        if state != "true":
            return False, f"container stopped; logs:\n{logs(cname)[-3000:]}"
        time.sleep(0.5)
    return False, f"{last}; logs:\n{logs(cname)[-3000:]}"


def jwt_hs256(key: str, claims: dict) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


# ---- image metadata ---------------------------------------------------------------------------------


def check_image(image: str) -> None:
    r = sh("docker", "image", "inspect", image)
    if not check("image exists", r.returncode == 0, r.stderr.strip()):
        return
    cfg = json.loads(r.stdout)[0]["Config"]
    user = cfg.get("User") or ""
    check("image runs as a non-root user", user not in ("", "root", "0") and not user.startswith("0:"), f"User={user!r}")
    exposed = sorted((cfg.get("ExposedPorts") or {}).keys())
    check("image exposes only the connector's port 8000", exposed == ["8000/tcp"], f"ExposedPorts={exposed}")
    env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    check("image does not set WRITER_LISTEN (the writer binds loopback)", "WRITER_LISTEN" not in env, f"Env={env}")
    check("image logs JSON by default", env.get("RELAY_LOG_FORMAT") == "json", f"Env={env}")
    health = json.dumps(cfg.get("Healthcheck") or {})
    check("image health check probes /readyz", "/readyz" in health, health)

    r = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "cat", image, "/app/config.json")
    if check("baked config readable", r.returncode == 0, r.stderr.strip()):
        baked = json.loads(r.stdout)
        targets = [rule.get("target", {}) for rule in baked.get("rules", [])]
        check("baked config is the AWS one (lambda targets without a local endpoint)",
              bool(targets) and all(t.get("type") == "lambda" and "endpoint" not in t for t in targets),
              f"targets={targets}")
        check("baked config equals deploy/aws/config.json",
              baked == json.loads((ROOT / "deploy" / "aws" / "config.json").read_text()), "differs")
    r = sh("docker", "run", "--rm", "--network", "none", image, "connector", "check")
    check("connector check accepts the baked config", r.returncode == 0, (r.stdout + r.stderr).strip()[-2000:])
    r = sh("docker", "run", "--rm", "--network", "none", image, "writer-lambda", "--help")
    check("writer-lambda --help", r.returncode == 0 and "--insecure-no-auth" in r.stdout and "WRITER_SECRET" in r.stdout,
          (r.stdout + r.stderr)[-1000:])
    r = sh("docker", "run", "--rm", "--network", "none", "-e", "DATABASE_URL=postgres://x@127.0.0.1:1/x", image, "writer-lambda")
    check("writer refuses to start without WRITER_SECRET", r.returncode != 0 and "WRITER_SECRET" in r.stderr,
          f"exit {r.returncode}: {r.stderr[-1000:]}")


# ---- the fake Lambda Runtime API ----------------------------------------------------------------------


def lambda_mode(image: str) -> None:
    """Runs the image's writer as Lambda does: AWS_LAMBDA_RUNTIME_API, one event, its response."""
    event = {"source": "channel.message", "channel": "outgoing-chat", "messages": [
        {"id": f"lambda-{RUN_ID}", "clientId": "lambda-check", "clientKind": "server", "connectionId": "api",
         "timestamp": int(time.time() * 1000), "name": "chatMsg",
         "data": {"username": "lambda", "content": "via the Runtime API"}}]}
    request_id = f"req-{RUN_ID}"
    got: dict = {}
    done = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        served = False

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            if self.path == "/2018-06-01/runtime/invocation/next" and not Handler.served:
                Handler.served = True
                body = json.dumps(event).encode()
                self.send_response(200)
                self.send_header("Lambda-Runtime-Aws-Request-Id", request_id)
                self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 30000))
                self.send_header("Lambda-Runtime-Invoked-Function-Arn",
                                 "arn:aws:lambda:us-east-1:123456789012:function:pg-relay-writer")
                self.send_header("Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000000")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                done.wait(30)  # the next poll: hold it until the test ends
                self.send_response(500)
                self.end_headers()

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            got["path"] = self.path
            got["body"] = self.rfile.read(length).decode()
            self.send_response(202)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            done.set()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    cname = run_container(image, "lambda", ["writer-lambda"], {
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{port}", "DATABASE_URL": DB_URL,
        "AWS_LAMBDA_FUNCTION_NAME": "pg-relay-writer", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST", "AWS_LAMBDA_LOG_FORMAT": "JSON",
        "AWS_LAMBDA_LOG_STREAM_NAME": "smoke", "AWS_LAMBDA_LOG_GROUP_NAME": "/pg-relay/smoke/writer"})
    answered = done.wait(60)
    server.shutdown()
    result = {}
    try:
        result = json.loads(got.get("body") or "{}")
    except ValueError:
        pass
    check("image as a Lambda: the writer answers an event through the Runtime API",
          answered and got.get("path") == f"/2018-06-01/runtime/invocation/{request_id}/response"
          and [r.get("status") for r in result.get("results", [])] == ["inserted"],
          f"answered={answered} got={got} logs:\n{logs(cname)[-2000:]}")
    sh("docker", "rm", "-f", cname)


# ---- the relay --------------------------------------------------------------------------------------


async def recv_json(ws, timeout: float = 10.0):
    """The next non-ping message (a frame may hold several JSON lines)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no message")
        frame = await asyncio.wait_for(ws.recv(), left)
        for line in str(frame).splitlines():
            msg = json.loads(line)
            if msg == {}:
                await ws.send("{}")  # pong
                continue
            return msg


async def reply(ws, cmd_id: int, timeout: float = 15.0):
    """The reply to command `cmd_id`; pushes that arrive first are kept in ws.pushes."""
    while True:
        msg = await recv_json(ws, timeout)
        if msg.get("id") == cmd_id:
            return msg
        ws.pushes.append(msg)


async def push_matching(ws, pred, timeout: float = 20.0):
    for msg in list(ws.pushes):
        if pred(msg):
            ws.pushes.remove(msg)
            return msg
    deadline = time.monotonic() + timeout
    while True:
        msg = await recv_json(ws, max(0.1, deadline - time.monotonic()))
        if pred(msg):
            return msg
        ws.pushes.append(msg)


def row_of(push: dict) -> dict:
    return (((push.get("push") or {}).get("pub") or {}).get("data") or {}).get("row") or {}


async def relay_checks(connector_port: int, connector: str) -> None:
    url = f"ws://127.0.0.1:{connector_port}/connection/websocket"
    anon = await websockets.connect(url, open_timeout=10)
    anon.pushes = []
    await anon.send(json.dumps({"id": 1, "connect": {"name": "smoke"}}))
    connected = await reply(anon, 1)
    client_id = (connected.get("connect") or {}).get("client", "")
    check("anonymous client connects through the container", bool(client_id), json.dumps(connected))
    await anon.send(json.dumps({"id": 2, "subscribe": {"channel": "incoming-chat"}}))
    sub = await reply(anon, 2)
    check("subscribes to incoming-chat", "subscribe" in sub, json.dumps(sub))

    content = f"hello from the smoke test {RUN_ID}"
    await anon.send(json.dumps({"id": 3, "publish": {"channel": "outgoing-chat",
                                                       "data": {"name": "chatMsg", "data": {"username": "smoke", "content": content}}}}))
    pub = await reply(anon, 3)
    check("publish on outgoing-chat accepted (writer container invoked)", "publish" in pub and "error" not in pub, json.dumps(pub))
    try:
        push = await push_matching(anon, lambda m: row_of(m).get("msg_data") == content)
        row = row_of(push)
        check("round trip: the writer's row comes back on incoming-chat", True)
        check("the row's author is the anonymous client, in the anonymous namespace",
              row.get("client_id") == client_id and row.get("client_kind") == "anonymous", json.dumps(row))
    except (TimeoutError, asyncio.TimeoutError):
        check("round trip: the writer's row comes back on incoming-chat", False, "no push within 20 s")
        row = {}

    msg_id = row.get("msg_id", "")
    if msg_id:
        # A user whose token `sub` is the anonymous client's id tries to edit that message.
        token = jwt_hs256(HMAC_KEY, {"sub": client_id, "exp": int(time.time()) + 300})
        thief = await websockets.connect(url, open_timeout=10)
        thief.pushes = []
        await thief.send(json.dumps({"id": 1, "connect": {"token": token}}))
        c = await reply(thief, 1)
        check("a token whose sub is the anonymous id connects", "connect" in c, json.dumps(c))
        await thief.send(json.dumps({"id": 2, "publish": {"channel": "outgoing-chat", "data": {
            "name": "editedMsg", "data": {"username": "thief", "content": "borrowed", "msgIdToEdit": msg_id}}}}))
        r2 = await reply(thief, 2)
        # The publish reply comes after the writer answered: the attempt has been judged by now.
        after = psql(DB_URL, f"SELECT msg_data || '|' || is_edited FROM chat_data WHERE msg_id = '{msg_id}'")
        attempts = psql(DB_URL, "SELECT count(*) FROM chat_processed_messages WHERE name = 'editedMsg'")
        check("a token whose sub is the anonymous id cannot edit that client's message",
              after == f"{content}|false" and attempts == "1",
              f"row after the attempt: {after!r}, edits processed by the writer: {attempts} (reply {json.dumps(r2)})")
        # The author's own edit, then wait for its push: the same path works for the author.
        await anon.send(json.dumps({"id": 4, "publish": {"channel": "outgoing-chat", "data": {
            "name": "editedMsg", "data": {"username": "smoke", "content": "edited by its author", "msgIdToEdit": msg_id}}}}))
        r4 = await reply(anon, 4)
        try:
            await push_matching(anon, lambda m: row_of(m).get("msg_data") == "edited by its author")
            author_edit = True
        except (TimeoutError, asyncio.TimeoutError):
            author_edit = False
        check("the anonymous author can edit its message", author_edit, json.dumps(r4))
        await thief.close()

    # SIGTERM: open sessions are closed with 3001 "shutdown", the container exits 0.
    sh("docker", "kill", "--signal", "TERM", connector)
    try:
        await asyncio.wait_for(anon.wait_closed(), 30)
        code, reason = anon.close_code, anon.close_reason
    except asyncio.TimeoutError:
        code, reason = None, None
    check("SIGTERM closes the session with 3001 shutdown", code == 3001 and reason == "shutdown",
          f"close code {code} reason {reason!r}")
    r = sh("docker", "wait", connector, timeout=60)
    check("the connector container exits 0 after SIGTERM", r.stdout.strip() == "0", f"exit {r.stdout.strip()} {r.stderr}")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    image = sys.argv[1]
    tmp = Path(tempfile.mkdtemp(prefix="pg-relay-smoke-"))
    psql(ADMIN_URL, f'CREATE DATABASE "{DB_NAME}"')
    try:
        check_image(image)

        writer_port, connector_port = free_port(), free_port()
        # The baked (AWS) config with the rule pointed at the writer container: the only difference.
        config = json.loads((ROOT / "deploy" / "aws" / "config.json").read_text())
        for rule in config["rules"]:
            rule["target"]["endpoint"] = f"http://127.0.0.1:{writer_port}"
        (tmp / "config.json").write_text(json.dumps(config))
        tmp.chmod(0o755)
        (tmp / "config.json").chmod(0o644)

        # The connector applies the migrations before the writer gets traffic.
        r = sh("docker", "run", "--rm", "--network", "host", "-e", f"DATABASE_URL={DB_URL}", "-v", f"{tmp}:/etc/relay:ro",
               image, "connector", "--config", "/etc/relay/config.json", "migrate")
        check("connector migrate (container)", r.returncode == 0, r.stderr[-2000:])

        writer = run_container(image, "writer", ["writer-lambda"], {
            "DATABASE_URL": DB_URL, "WRITER_LISTEN": f"127.0.0.1:{writer_port}", "WRITER_SECRET": WRITER_SECRET})
        ok, why = wait_http(f"http://127.0.0.1:{writer_port}/readyz", writer)
        check("writer container /readyz 200", ok, why)
        body = json.dumps({"messages": [{"id": f"unsigned-{RUN_ID}", "clientId": "x", "clientKind": "user",
                                         "timestamp": 1, "name": "chatMsg", "data": {"username": "x", "content": "x"}}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{writer_port}/2015-03-31/functions/pg-relay-writer/invocations",
                                     data=body, method="POST")
        try:
            status = urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as e:
            status = e.code
        rows = psql(DB_URL, f"SELECT count(*) FROM chat_data WHERE msg_id = 'unsigned-{RUN_ID}'")
        check("an unsigned invocation of the writer container is refused (403) and writes nothing",
              status == 403 and rows == "0", f"status {status}, rows {rows}")

        connector = run_container(image, "connector", ["connector", "--config", "/etc/relay/config.json"], {
            "DATABASE_URL": DB_URL, "RELAY_LISTEN": f"127.0.0.1:{connector_port}", "WRITER_SECRET": WRITER_SECRET,
            "RELAY__AUTH__HMAC_SECRET_KEY": HMAC_KEY}, [f"{tmp}:/etc/relay:ro"])
        ok, why = wait_http(f"http://127.0.0.1:{connector_port}/readyz", connector)
        if check("connector container /readyz 200", ok, why):
            asyncio.run(relay_checks(connector_port, connector))
        for name, cname in (("connector", connector), ("writer", writer)):
            text = logs(cname)
            lines = [l for l in text.splitlines() if l.strip()]
            bad = [l for l in lines if not l.startswith("{")]
            check(f"{name} logs are JSON lines without colours", bool(lines) and not bad and not ANSI.search(text),
                  f"{len(bad)} non-JSON of {len(lines)}: {bad[:3]}")
        lambda_mode(image)
    except Exception as e:  # noqa: BLE001 - reported as a failure, cleanup below
        check("smoke test ran to the end", False, repr(e))
    finally:
        for cname in containers:
            sh("docker", "rm", "-f", cname)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            psql(ADMIN_URL, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        except RuntimeError as e:
            print(f"WARN {e}")
    print(f"image: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
