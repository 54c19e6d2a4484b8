// The chat scenario with the official centrifuge-js SDK (npm `centrifuge`, pinned in package.json),
// run by tests-sdk/run.py against a real connector and writer.
//
// Protocol with the orchestrator (one line each):
//   stdout  PASS <check> | FAIL <check>: <why> | SKIP <check>: <why> | INFO <text>
//   stdout  READY_FOR_RESTART <json>     the orchestrator may now SIGKILL and restart the connector
//   stdin   RESTARTED <json>             {"msg_ids": [...]} rows inserted with SQL while it was down
//   stdout  RESULT passed=N failed=M     last line; exit code 0 only when failed == 0
// Environment: RELAY_WS_URL (required), SCENARIO_LABEL, STEP_TIMEOUT_MS (default 20000),
// RESTART_TIMEOUT_MS (default 90000), FRAME_LOG (file that gets every WebSocket frame), RUN_TAG,
// SDK_PROTOCOL (`json`, the default, or `protobuf`: the SDK's Protobuf build, binary frames; then
// publication data travels as the bytes of its JSON, encoded and decoded here), SDK_TRANSPORT
// (`websocket`, the default, or `sse` / `http_stream`: the SDK's emulated transports, endpoints
// derived from RELAY_WS_URL, commands posted to /emulation; EventSource from the `eventsource`
// package, as Node 20 has none).

import { Centrifuge as JsonCentrifuge } from 'centrifuge';
import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';
import WebSocket from 'ws';
import { EventSource } from 'eventsource';
import fs from 'node:fs';
import readline from 'node:readline';
import { randomBytes } from 'node:crypto';

const url = process.env.RELAY_WS_URL;
const label = process.env.SCENARIO_LABEL || 'node';
const STEP_MS = Number(process.env.STEP_TIMEOUT_MS || 20000);
const RESTART_MS = Number(process.env.RESTART_TIMEOUT_MS || 90000);
const tag = process.env.RUN_TAG || randomBytes(4).toString('hex');
const IN_CHANNEL = 'incoming-chat';
const OUT_CHANNEL = 'outgoing-chat';
const PROTOBUF = process.env.SDK_PROTOCOL === 'protobuf';
const Centrifuge = PROTOBUF ? ProtobufCentrifuge : JsonCentrifuge;
const TRANSPORT = process.env.SDK_TRANSPORT || 'websocket';
/** The endpoint the scenario's client connects to: the WebSocket URL, or the one emulated transport. */
function endpoints() {
  if (TRANSPORT === 'websocket') return url;
  const http = url.replace(/^ws/, 'http');
  return [{ transport: TRANSPORT, endpoint: http.replace(/\/connection\/websocket$/, `/connection/${TRANSPORT}`) }];
}
function emulationOptions() {
  if (TRANSPORT === 'websocket') return {};
  const http = url.replace(/^ws/, 'http');
  return { eventsource: EventSource, emulationEndpoint: http.replace(/\/connection\/websocket$/, '/emulation') };
}

/** Publication data as the SDK wants it: the JSON value, or in Protobuf mode its UTF-8 bytes. */
function encodeData(value) {
  return PROTOBUF ? new TextEncoder().encode(JSON.stringify(value)) : value;
}

/** Publication data from the SDK as a JSON value (Protobuf mode hands over bytes). */
function decodeData(data) {
  return data instanceof Uint8Array ? JSON.parse(new TextDecoder().decode(data)) : data;
}

if (!url) {
  console.log('FAIL setup: RELAY_WS_URL is not set');
  console.log('RESULT passed=0 failed=1');
  process.exit(2);
}

// ---- output -------------------------------------------------------------------------------------

function out(line) {
  process.stdout.write(`${line}\n`);
}

// ---- wire log: every frame in both directions, for failure reports ------------------------------

const frameLog = process.env.FRAME_LOG ? fs.createWriteStream(process.env.FRAME_LOG, { flags: 'a' }) : null;
function logFrame(dir, text) {
  if (frameLog) frameLog.write(`${new Date().toISOString()} ${dir} ${text}\n`);
}

/** What the sockets saw: frame kinds received and the subprotocols the server selected. */
const wire = { binaryIn: 0, textIn: 0, selected: [] };

/** The ws class, with every sent and received frame written to FRAME_LOG. */
class LoggingWebSocket extends WebSocket {
  constructor(address, protocols, options) {
    super(address, protocols, options);
    logFrame('*', `open ${address} protocols=${JSON.stringify(protocols ?? null)}`);
    this.on('open', () => wire.selected.push(this.protocol));
    this.on('message', (data, isBinary) => {
      if (isBinary) wire.binaryIn++;
      else wire.textIn++;
      logFrame('<', isBinary ? `[BINARY frame, ${data.length} bytes] ${Buffer.from(data).toString('hex')}` : data.toString());
    });
    this.on('close', (code, reason) => logFrame('*', `close code=${code} reason=${reason.toString()}`));
    this.on('error', (err) => logFrame('*', `error ${err.message}`));
  }

  send(data, ...rest) {
    logFrame('>', typeof data === 'string' ? data : `[BINARY frame] ${Buffer.from(data).toString('hex')}`);
    return super.send(data, ...rest);
  }
}

// ---- event recording and waiting ----------------------------------------------------------------

const events = []; // {kind, ctx, t}
let waiters = [];

function record(kind, ctx) {
  events.push({ kind, ctx, t: Date.now() });
  for (const w of [...waiters]) w();
}

/** Resolves with the first truthy value of `pred()`, re-evaluated on every event. */
function waitFor(what, pred, ms = STEP_MS) {
  return new Promise((resolve, reject) => {
    let timer = null;
    const cleanup = () => {
      clearTimeout(timer);
      waiters = waiters.filter((w) => w !== check);
    };
    const check = () => {
      let r;
      try {
        r = pred();
      } catch (e) {
        cleanup();
        reject(e);
        return;
      }
      if (r) {
        cleanup();
        resolve(r);
      }
    };
    timer = setTimeout(() => {
      cleanup();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
    waiters.push(check);
    check();
  });
}

function withTimeout(promise, what, ms = STEP_MS) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function since(t, kind) {
  return events.filter((e) => e.t >= t && e.kind === kind);
}

function describe(v) {
  return JSON.stringify(v, (_k, val) => (typeof val === 'bigint' ? String(val) : val));
}

function pubSummary(ctx) {
  const d = decodeData(ctx.data) || {};
  return { offset: ctx.offset, type: d.type, msg_id: d.row?.msg_id, msg_data: d.row?.msg_data };
}

function expect(cond, message) {
  if (!cond) throw new Error(message);
}

// ---- stdin: the orchestrator's answer -----------------------------------------------------------

const stdinLines = [];
let stdinClosed = false;
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  stdinLines.push(line);
  record('stdin', line);
});
rl.on('close', () => {
  stdinClosed = true;
  record('stdin-closed', null);
});

// ---- the scenario -------------------------------------------------------------------------------

const client = new Centrifuge(endpoints(), {
  ...emulationOptions(),
  websocket: LoggingWebSocket,
  name: `sdk-test-${label}`,
  timeout: 5000,
  minReconnectDelay: 200,
  maxReconnectDelay: 1000,
});
client.on('connecting', (ctx) => record('connecting', ctx));
client.on('connected', (ctx) => record('connected', ctx));
client.on('disconnected', (ctx) => record('disconnected', ctx));
client.on('error', (ctx) => record('client-error', ctx));

const sub = client.newSubscription(IN_CHANNEL, { recoverable: true, positioned: true });
sub.on('subscribing', (ctx) => record('subscribing', ctx));
sub.on('subscribed', (ctx) => record('subscribed', ctx));
sub.on('unsubscribed', (ctx) => record('unsubscribed', ctx));
sub.on('error', (ctx) => record('sub-error', ctx));
sub.on('publication', (ctx) => record('pub', { ...ctx, data: decodeData(ctx.data) }));

const state = {};
const username = `${label}-alice-${tag}`;
const content = `hello from ${label} ${tag}`;
const editedContent = `edited by ${label} ${tag}`;
const liveContent = `after restart ${label} ${tag}`;

function findInsert(text, after = 0) {
  const e = events.find((ev) => ev.t >= after && ev.kind === 'pub' && ev.ctx.data?.type === 'INSERT' && ev.ctx.data?.row?.msg_data === text);
  return e?.ctx;
}

const steps = [
  ['connect', async () => {
    // Subscribing before connecting makes the SDK batch connect + subscribe in one frame.
    sub.subscribe();
    client.connect();
    const c = await waitFor('connected event', () => events.find((e) => e.kind === 'connected')?.ctx);
    expect(typeof c.client === 'string' && c.client.length > 0, `connected ctx has no client id: ${describe(c)}`);
    state.clientId = c.client;
    return `client id ${c.client}`;
  }],
  ['the connection speaks the expected encoding', async () => {
    if (TRANSPORT !== 'websocket') {
      const c = events.find((e) => e.kind === 'connected')?.ctx;
      expect(c?.transport === TRANSPORT, `connected over ${describe(c?.transport)}, want ${TRANSPORT}`);
      expect(wire.binaryIn === 0 && wire.textIn === 0, `WebSocket frames in: ${wire.binaryIn + wire.textIn}, want none`);
      return `${TRANSPORT}, no WebSocket`;
    }
    if (PROTOBUF) {
      expect(wire.selected[0] === 'centrifuge-protobuf', `selected subprotocol ${describe(wire.selected)}, want centrifuge-protobuf`);
      expect(wire.binaryIn > 0 && wire.textIn === 0, `frames in: ${wire.binaryIn} binary, ${wire.textIn} text; want binary only`);
    } else {
      expect(wire.textIn > 0 && wire.binaryIn === 0, `frames in: ${wire.binaryIn} binary, ${wire.textIn} text; want text only`);
    }
    return `${PROTOBUF ? 'protobuf' : 'json'}: ${wire.binaryIn} binary, ${wire.textIn} text frames in`;
  }],
  ['subscribe incoming-chat recoverable+positioned', async () => {
    const s = await waitFor('subscribed event', () => events.find((e) => e.kind === 'subscribed')?.ctx);
    expect(s.recoverable === true, `subscribed.recoverable is ${s.recoverable}, want true`);
    expect(s.positioned === true, `subscribed.positioned is ${s.positioned}, want true`);
    const pos = s.streamPosition;
    expect(pos && typeof pos.offset === 'number' && pos.offset >= 0, `no or bad stream position: ${describe(s)}`);
    state.startPos = { offset: pos.offset, epoch: pos.epoch || '' };
    return `position ${describe(state.startPos)}`;
  }],
  ['subscribe reply carries the stream epoch', async () => {
    expect(state.startPos.epoch.length > 0,
      `subscribe reply has no epoch (position ${describe(state.startPos)}); Centrifuge always sends the stream's epoch to a recoverable subscription, and without it the client cannot detect a reset stream on recovery`);
  }, { critical: false }],
  ['publish chatMsg on outgoing-chat', async () => {
    state.t0 = Date.now();
    await withTimeout(client.publish(OUT_CHANNEL, encodeData({ name: 'chatMsg', data: { username, content } })), 'publish chatMsg reply');
  }],
  ['receive INSERT row with offset', async () => {
    const p = await waitFor(`INSERT publication with msg_data=${describe(content)}`, () => findInsert(content));
    const d = p.data;
    expect(d.schema === 'public' && d.table === 'chat_data', `schema/table: ${describe(d)}`);
    expect(d.row.username === username, `row.username ${describe(d.row.username)}, want ${describe(username)}`);
    expect(d.row.is_edited === false, `row.is_edited ${describe(d.row.is_edited)}, want false`);
    expect(typeof d.row.msg_id === 'string' && d.row.msg_id.length > 0, `row.msg_id missing: ${describe(d.row)}`);
    expect(typeof p.offset === 'number' && p.offset > 0 && p.offset > state.startPos.offset,
      `offset ${p.offset} must be > 0 and > subscribe offset ${state.startPos.offset}`);
    state.msgId = d.row.msg_id;
    state.insertOffset = p.offset;
    return `msg_id ${state.msgId} offset ${p.offset}`;
  }],
  ['INSERT row carries the connection identity as client_id', async () => {
    const row = findInsert(content).data.row;
    expect(row.client_id === state.clientId, `row.client_id ${describe(row.client_id)}, want the connection's client id ${describe(state.clientId)}`);
  }, { critical: false }],
  ['publish editedMsg on outgoing-chat', async () => {
    await withTimeout(client.publish(OUT_CHANNEL, encodeData({
      name: 'editedMsg',
      data: { username, content: editedContent, msgIdToEdit: state.msgId },
    })), 'publish editedMsg reply');
  }],
  ['receive UPDATE row (is_edited) at the next offset', async () => {
    const p = await waitFor(`UPDATE publication for msg_id ${state.msgId}`,
      () => events.find((e) => e.kind === 'pub' && e.ctx.data?.type === 'UPDATE' && e.ctx.data?.row?.msg_id === state.msgId)?.ctx);
    const d = p.data;
    expect(d.table === 'chat_data', `table: ${describe(d)}`);
    expect(d.row.msg_data === editedContent, `row.msg_data ${describe(d.row.msg_data)}, want ${describe(editedContent)}`);
    expect(d.row.is_edited === true, `row.is_edited ${describe(d.row.is_edited)}, want true`);
    expect(d.old && d.old.msg_data === content, `old.msg_data should be the text before the edit: ${describe(d.old)}`);
    expect(p.offset === state.insertOffset + 1, `UPDATE offset ${p.offset}, want ${state.insertOffset + 1} (INSERT offset + 1)`);
    state.updateOffset = p.offset;
    return `offset ${p.offset}`;
  }],
  ['a refused edit (another connection edits our message) rejects the publish promise with 420', async () => {
    // The attack: a second connection, so a different identity, edits this connection's message.
    const intruder = new Centrifuge(url, { websocket: LoggingWebSocket, name: `sdk-test-${label}-intruder`, timeout: 5000 });
    intruder.connect();
    try {
      let err = null;
      try {
        await withTimeout(intruder.publish(OUT_CHANNEL, encodeData({
          name: 'editedMsg',
          data: { username: 'intruder', content: `FORGED ${tag}`, msgIdToEdit: state.msgId },
        })), 'publish of the forged edit');
      } catch (e) {
        err = e;
      }
      expect(err !== null, 'the forged edit was answered as a success');
      expect(err.code === 420, `error code ${describe(err.code)}, want 420 (publication rejected): ${describe(err)}`);
      expect(typeof err.message === 'string' && err.message.includes('author'),
        `error message ${describe(err.message)} should be the writer's reason (only the author can edit)`);
      return `code ${err.code}: ${err.message}`;
    } finally {
      intruder.disconnect();
    }
  }],
  ['history(limit 10) returns both in order', async () => {
    const h = await withTimeout(sub.history({ limit: 10, since: state.startPos }), 'history since subscribe position');
    const got = h.publications.map(pubSummary);
    expect(got.length === 2, `history since ${describe(state.startPos)}: ${got.length} publications, want 2: ${describe(got)}`);
    expect(got[0].offset === state.insertOffset && got[0].type === 'INSERT' && got[0].msg_id === state.msgId,
      `first: ${describe(got[0])}, want INSERT of ${state.msgId} at ${state.insertOffset}`);
    expect(got[1].offset === state.updateOffset && got[1].type === 'UPDATE' && got[1].msg_id === state.msgId,
      `second: ${describe(got[1])}, want UPDATE of ${state.msgId} at ${state.updateOffset}`);
    expect(!state.startPos.epoch || h.epoch === state.startPos.epoch, `history epoch ${describe(h.epoch)}, want ${describe(state.startPos.epoch)}`);
    expect(typeof h.epoch === 'string' && h.epoch.length > 0, `history reply has no epoch: ${describe({ epoch: h.epoch, offset: h.offset })}`);
    expect(h.offset === state.updateOffset, `history top offset ${h.offset}, want ${state.updateOffset}`);
    state.epoch = h.epoch;
    const all = await withTimeout(sub.history({ limit: 10 }), 'history limit 10');
    const offs = all.publications.map((p) => p.offset);
    expect(offs.length > 0 && offs.length <= 10, `history(limit 10) returned ${offs.length} publications`);
    expect(offs.every((o, i) => o > 0 && (i === 0 || o > offs[i - 1])), `history(limit 10) offsets not increasing: ${describe(offs)}`);
    return `offsets ${describe(got.map((g) => g.offset))}`;
  }, { critical: false }],
  ['client notices the killed connector', async () => {
    state.tKill = Date.now();
    out(`READY_FOR_RESTART ${describe({ offset: state.updateOffset, epoch: state.startPos.epoch })}`);
    const c = await waitFor('connecting event (transport closed) after the kill',
      () => since(state.tKill, 'connecting')[0]?.ctx);
    return `connecting code=${c.code} reason=${describe(c.reason)}`;
  }],
  ['orchestrator restarted the connector', async () => {
    const line = await waitFor('RESTARTED line on stdin', () => {
      if (stdinClosed && stdinLines.length === 0) throw new Error('stdin closed without RESTARTED');
      return stdinLines.shift();
    }, RESTART_MS);
    expect(line.startsWith('RESTARTED '), `unexpected orchestrator line ${describe(line)}`);
    const info = JSON.parse(line.slice('RESTARTED '.length));
    state.missed = info.msg_ids;
    expect(Array.isArray(state.missed) && state.missed.length > 0, `no msg_ids in ${describe(line)}`);
    return `rows inserted while away: ${describe(state.missed)}`;
  }],
  ['resubscribed with wasRecovering and recovered', async () => {
    const s = await waitFor('subscribed event after the restart',
      () => since(state.tKill, 'subscribed')[0]?.ctx, RESTART_MS);
    expect(s.wasRecovering === true, `wasRecovering ${s.wasRecovering}, want true: ${describe(s)}`);
    expect(s.recovered === true, `recovered ${s.recovered}, want true: ${describe(s)}`);
    const epoch = state.startPos.epoch || state.epoch;
    expect(!epoch || s.streamPosition?.epoch === epoch, `epoch changed: ${describe(s.streamPosition)}, want epoch ${describe(epoch)}`);
    return `hasRecoveredPublications=${s.hasRecoveredPublications}`;
  }],
  ['missed rows delivered once, in order', async () => {
    const want = state.missed;
    await waitFor(`publications of the ${want.length} rows inserted while away`, () => {
      const ids = new Set(since(state.tKill, 'pub').map((e) => e.ctx.data?.row?.msg_id));
      return want.every((id) => ids.has(id));
    });
    await sleep(1000); // anything duplicated would arrive now
    const got = since(state.tKill, 'pub').map((e) => pubSummary(e.ctx));
    const ids = got.map((g) => g.msg_id);
    expect(describe(ids) === describe(want), `msg_ids received after the kill ${describe(ids)}, want exactly ${describe(want)}`);
    const wantOffsets = want.map((_, i) => state.updateOffset + 1 + i);
    expect(describe(got.map((g) => g.offset)) === describe(wantOffsets), `offsets ${describe(got.map((g) => g.offset))}, want ${describe(wantOffsets)}`);
    expect(got.every((g) => g.type === 'INSERT'), `types ${describe(got.map((g) => g.type))}, want all INSERT`);
    state.lastOffset = wantOffsets[wantOffsets.length - 1];
    return `offsets ${describe(wantOffsets)}`;
  }],
  ['publish and receive live after the restart', async () => {
    const t = Date.now();
    await withTimeout(client.publish(OUT_CHANNEL, encodeData({ name: 'chatMsg', data: { username, content: liveContent } })), 'publish chatMsg reply');
    const p = await waitFor('INSERT publication after the restart', () => findInsert(liveContent, t));
    expect(p.offset === state.lastOffset + 1, `offset ${p.offset}, want ${state.lastOffset + 1}`);
    state.lastOffset = p.offset;
  }, { critical: false }],
  ['history agrees after the restart', async () => {
    const h = await withTimeout(sub.history({ limit: 10, since: state.startPos }), 'history since subscribe position');
    const offs = h.publications.map((p) => p.offset);
    const want = [];
    for (let o = state.insertOffset; o <= state.lastOffset; o++) want.push(o);
    expect(describe(offs) === describe(want), `history offsets ${describe(offs)}, want ${describe(want)}`);
    expect(h.offset === state.lastOffset, `history top offset ${h.offset}, want ${state.lastOffset}`);
  }, { critical: false }],
];

// A failed critical step skips the rest (they build on it); a failed non-critical one does not.
let passed = 0;
let failed = 0;
let aborted = null;
for (const [name, fn, opts = {}] of steps) {
  if (aborted) {
    failed++;
    out(`SKIP ${name}: not run, "${aborted}" failed`);
    continue;
  }
  try {
    const detail = await fn();
    passed++;
    out(`PASS ${name}${detail ? ` (${detail})` : ''}`);
  } catch (err) {
    failed++;
    if (opts.critical !== false) aborted = name;
    // SDK errors are {code, message, temporary?}: show all of it.
    const why = err instanceof Error ? err.message : `SDK error ${describe(err)}`;
    out(`FAIL ${name}: ${why}`);
  }
}

if (failed > 0) {
  const tail = events.slice(-15).map((e) => `${e.kind} ${describe(e.kind === 'pub' ? pubSummary(e.ctx) : e.ctx)}`);
  out(`INFO last SDK events:\n${tail.map((l) => `INFO   ${l}`).join('\n')}`);
}
client.disconnect();
rl.close();
out(`RESULT passed=${passed} failed=${failed}`);
if (frameLog) await new Promise((r) => frameLog.end(r));
process.exit(failed === 0 ? 0 : 1);
