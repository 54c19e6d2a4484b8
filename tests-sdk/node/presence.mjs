// Presence and join/leave with the official centrifuge-js SDK (npm `centrifuge`, pinned), run by
// tests-sdk/run.py against a real connector.
//
// Protocol with the orchestrator: stdout `PASS <check>` | `FAIL <check>: <why>`, and
// `RESULT passed=N failed=M` last (exit code 0 only when failed == 0).
// Environment: RELAY_WS_URL, STEP_TIMEOUT_MS (default 20000).
//
// Checks: own join after subscribe; presence and presenceStats; a second client's join, with its
// display name as chanInfo; its unsubscribe is a leave; a client in another process that is SIGKILLed
// leaves within a few seconds (the OS resets its socket) and is gone from presence.
//
// `node presence.mjs --child NAME` is that other process: it joins and waits to be killed.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const URL = process.env.RELAY_WS_URL;
const STEP_MS = Number(process.env.STEP_TIMEOUT_MS || 20000);
const CHAT = 'incoming-chat';
const LEAVE_WITHIN_MS = 5000;

let passed = 0;
let failed = 0;
const out = (l) => console.log(l);

async function check(name, fn) {
  try {
    const detail = await fn();
    passed += 1;
    out(`PASS ${name}${typeof detail === 'string' ? ` (${detail})` : ''}`);
  } catch (e) {
    failed += 1;
    out(`FAIL ${name}: ${e && e.message ? e.message : JSON.stringify(e)}`);
  }
}

function expect(cond, why) {
  if (!cond) throw new Error(why);
}

async function until(pred, what, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (pred()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`${what}: not within ${ms} ms`);
}

function member(name) {
  const c = new Centrifuge(URL, { websocket: WebSocket });
  const events = { joins: [], leaves: [] };
  const sub = c.newSubscription(CHAT, { joinLeave: true, data: { username: name } });
  sub.on('join', (ctx) => events.joins.push({ client: ctx.info.client, info: ctx.info, at: Date.now() }));
  sub.on('leave', (ctx) => events.leaves.push({ client: ctx.info.client, at: Date.now() }));
  let client = '';
  c.on('connected', (ctx) => { client = ctx.client; });
  sub.subscribe();
  c.connect();
  return { c, sub, events, client: () => client };
}

async function child(name) {
  const m = member(name);
  await m.sub.ready(STEP_MS);
  out(`CHILD ${m.client()}`);
  setInterval(() => {}, 1 << 30);
}

async function main() {
  const a = member('js-a');
  await a.sub.ready(STEP_MS);

  await check('own join push after the subscribe reply, presence and presenceStats', async () => {
    await until(() => a.events.joins.some((j) => j.client === a.client()), 'own join');
    const p = await a.sub.presence();
    expect(p.clients[a.client()], `presence ${JSON.stringify(p)}`);
    expect(p.clients[a.client()].chanInfo.username === 'js-a', JSON.stringify(p.clients[a.client()]));
    const s = await a.sub.presenceStats();
    expect(s.numClients === Object.keys(p.clients).length && s.numUsers >= 1, JSON.stringify(s));
    return `${s.numClients} member(s)`;
  });

  const b = member('js-b');
  await b.sub.ready(STEP_MS);
  await check("another client's join and leave (unsubscribe)", async () => {
    await until(() => a.events.joins.some((j) => j.client === b.client() && j.info.chanInfo?.username === 'js-b'),
      "b's join with its name");
    b.sub.unsubscribe();
    await until(() => a.events.leaves.some((l) => l.client === b.client()), "b's leave");
    const p = await a.sub.presence();
    expect(!p.clients[b.client()], 'b still in presence');
  });
  b.c.disconnect();

  await check('a SIGKILLed client process leaves at once', async () => {
    const proc = spawn(process.execPath, [fileURLToPath(import.meta.url), '--child', 'js-doomed'], {
      stdio: ['ignore', 'pipe', 'inherit'], env: process.env,
    });
    let doomed = '';
    proc.stdout.on('data', (d) => {
      const m = /CHILD (\S+)/.exec(String(d));
      if (m) doomed = m[1];
    });
    try {
      await until(() => doomed && a.events.joins.some((j) => j.client === doomed), "the child's join");
      expect((await a.sub.presence()).clients[doomed], 'child not in presence');
    } finally {
      proc.kill('SIGKILL');
    }
    const killed = Date.now();
    await until(() => a.events.leaves.some((l) => l.client === doomed), 'leave of the killed client', LEAVE_WITHIN_MS);
    const took = a.events.leaves.find((l) => l.client === doomed).at - killed;
    expect(!(await a.sub.presence()).clients[doomed], 'still in presence');
    return `leave ${took} ms after SIGKILL`;
  });
  a.c.disconnect();
}

if (process.argv[2] === '--child') {
  await child(process.argv[3]);
} else {
  try {
    await main();
  } catch (e) {
    failed += 1;
    out(`FAIL scenario: ${e && e.stack ? e.stack : e}`);
  }
  out(`RESULT passed=${passed} failed=${failed}`);
  process.exit(failed === 0 ? 0 : 1);
}
