#!/usr/bin/env python3
"""Many raw WebSocket subscribers in one asyncio process, cheap enough for a thousand on a small machine:
a minimal RFC 6455 client (handshake, masked client frames, unmasked server frames, close and ping) that
speaks the Centrifugo JSON protocol just enough to connect, subscribe to a channel and answer pings. It
records, per client, each publication's offset and the time its bytes arrived.

Run by tests-faults/cases.py (slow-client) as a child process, so its parsing does not share an event loop
with the orchestrator:

  argv    fanout.py WS_URL N CHANNEL OUT_FILE
  stdout  READY <n subscribed>          once every client has its subscribe reply (or failed)
  stdin   STOP <top offset>             wait (up to 30 s) until every open client has reached <top>, then stop
  stdout  DONE <json summary>           after OUT_FILE got the per-client records

OUT_FILE: for each client, struct '<iiiq' (index, subscribe offset, close code or -1, n) then n int64
offsets and n float64 receive times (time.time()).

The class WsClient is also used in-process by the orchestrator for the client that stops reading.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import sys
import time
from array import array

URL_RE = re.compile(r"ws://([^:/]+):(\d+)(/.*)$")
OFFSET_KEY = b'"offset":'


class WsClient(asyncio.Protocol):
    """One WebSocket connection subscribed to `channel`."""

    def __init__(self, idx: int, host: str, port: int, path: str, channel: str) -> None:
        self.idx = idx
        self.host, self.port, self.path, self.channel = host, port, path, channel
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshake = False
        self.frag = bytearray()
        self.offsets = array("q")
        self.times = array("d")
        self.sub_offset: int | None = None
        self.sub_error: str | None = None
        self.close_code: int | None = None
        self.lost = False
        self.subscribed = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.bytes_in = 0
        self.stall_after_subscribe = False
        self.throttle = 0.0
        self.stalled_at: float | None = None

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        t = time.time()
        self.bytes_in += len(data)
        if self.throttle and self.transport is not None and self.handshake:
            # A slow reader: one read (at most its small receive buffer) every `throttle` seconds.
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.throttle, self._resume)
        buf = self.buf
        buf += data
        if not self.handshake:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:buf.find(b"\r\n")])
            del buf[:end + 4]
            if b" 101 " not in status + b" ":
                self._fail(f"handshake: {status!r}")
                return
            self.handshake = True
            self.send_text(json.dumps({"id": 1, "connect": {"name": f"fanout-{self.idx}"}}) + "\n"
                           + json.dumps({"id": 2, "subscribe": {"channel": self.channel, "recoverable": True,
                                                                "positioned": True}}))
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            ln = b1 & 0x7F
            pos = 2
            if ln == 126:
                if len(buf) < 4:
                    return
                ln = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif ln == 127:
                if len(buf) < 10:
                    return
                ln = int.from_bytes(buf[2:10], "big")
                pos = 10
            if len(buf) < pos + ln:
                return
            payload = bytes(buf[pos:pos + ln])
            del buf[:pos + ln]
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode == 0:  # continuation
                self.frag += payload
                if fin:
                    payload, self.frag = bytes(self.frag), bytearray()
                    self._text(payload, t)
            elif opcode == 1:
                if fin:
                    self._text(payload, t)
                else:
                    self.frag = bytearray(payload)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._send_frame(0x8, payload[:2])
                if self.transport:
                    self.transport.close()
            elif opcode == 9:
                self._send_frame(0xA, payload)

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.subscribed.done():
            self.subscribed.set_result(False)
        if not self.closed.done():
            self.closed.set_result(True)

    # -- protocol --

    def _text(self, payload: bytes, t: float) -> None:
        for line in payload.split(b"\n"):
            if line.startswith(b'{"push"'):
                i = line.rfind(OFFSET_KEY)
                if i >= 0:
                    j = i + len(OFFSET_KEY)
                    k = j
                    while k < len(line) and 48 <= line[k] <= 57:
                        k += 1
                    self.offsets.append(int(line[j:k]))
                    self.times.append(t)
                else:
                    pass  # unsubscribe / other pushes: counted by the orchestrator's checks as missing rows
            elif line == b"{}":
                self.send_text("{}")
            elif line.startswith(b'{"id":2'):
                msg = json.loads(line)
                if "subscribe" in msg:
                    self.sub_offset = int(msg["subscribe"].get("offset", 0))
                else:
                    self.sub_error = str(msg.get("error"))
                if not self.subscribed.done():
                    self.subscribed.set_result(self.sub_offset is not None)
                if self.stall_after_subscribe and self.transport is not None:
                    self.transport.pause_reading()  # never reads again (until resume_reading)
                    self.stalled_at = time.time()
                    return

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 65536:
            head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(head + mask + masked)

    def _fail(self, why: str) -> None:
        self.sub_error = why
        if not self.subscribed.done():
            self.subscribed.set_result(False)
        if self.transport:
            self.transport.close()


def parse_url(url: str) -> tuple[str, int, str]:
    m = URL_RE.match(url)
    if not m:
        raise ValueError(f"not a ws:// URL: {url}")
    return m.group(1), int(m.group(2)), m.group(3)


async def open_client(idx: int, url: str, channel: str, stall: bool = False, throttle: float = 0.0) -> WsClient:
    """Opens a client. `throttle`: it reads once every `throttle` seconds (a slow reader). `stall`: it stops
    reading right after its subscribe reply. Both have a small receive
    buffer and a small MSS (announced in the SYN), so that the kernel on the server's side cannot buffer
    megabytes for it (on loopback the sender's buffer grows to tcp_wmem's maximum, 4 MiB here, once data
    has flowed) and the stall reaches the connector within a second - as for a client on a slow link."""
    host, port, path = parse_url(url)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if stall or throttle:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1024)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))

    def make() -> WsClient:
        c = WsClient(idx, host, port, path, channel)
        c.stall_after_subscribe = stall
        c.throttle = throttle
        return c

    _, proto = await loop.create_connection(make, sock=sock)
    return proto


async def main() -> int:
    url, n, channel, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sem = asyncio.Semaphore(50)
    clients: list[WsClient | None] = [None] * n

    async def one(i: int) -> None:
        async with sem:
            try:
                c = await asyncio.wait_for(open_client(i, url, channel), 20)
                clients[i] = c
                await asyncio.wait_for(asyncio.shield(c.subscribed), 30)
            except (OSError, asyncio.TimeoutError):
                pass

    await asyncio.gather(*(one(i) for i in range(n)))
    ok = sum(1 for c in clients if c is not None and c.sub_offset is not None)
    print(f"READY {ok}", flush=True)

    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    top = int(line.split()[1]) if line.startswith("STOP") else 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        behind = [c for c in clients if c is not None and not c.lost and (c.offsets[-1] if c.offsets else 0) < top]
        if not behind:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)

    with open(out_file, "wb") as fh:
        for i, c in enumerate(clients):
            if c is None:
                fh.write(struct.pack("<iiiq", i, -1, -1, 0))
                continue
            fh.write(struct.pack("<iiiq", i, c.sub_offset if c.sub_offset is not None else -1,
                                 c.close_code if c.close_code is not None else (-2 if c.lost else -1), len(c.offsets)))
            fh.write(c.offsets.tobytes())
            fh.write(c.times.tobytes())
    summary = {
        "clients": n,
        "subscribed": ok,
        "lost": sum(1 for c in clients if c is not None and c.lost),
        "close_codes": sorted({c.close_code for c in clients if c is not None and c.close_code is not None}),
        "errors": sorted({c.sub_error for c in clients if c is not None and c.sub_error})[:5],
        "frames": sum(len(c.offsets) for c in clients if c is not None),
    }
    for c in clients:
        if c is not None and c.transport is not None:
            c.transport.abort()
    print("DONE " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
