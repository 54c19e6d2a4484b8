#!/usr/bin/env node
// An oversized message is terminal in a real browser (issue 9, item 8): headless Chromium opens a
// WebSocket to a real connector, sends `connect`, then a text message over client.max_message_bytes,
// and records the close event. Before the lingering close, 9 of 12 such sends ended as code 1006
// (a TCP reset overtook the close frame: the SDK saw "transport closed" and reconnected); each must
// now end with 1009, and the same sends through the vendored centrifuge-js must end in its terminal
// "message size limit exceeded" (never "transport closed" and a reconnect). Prints `N passed, N failed` last; exit code 0 only when nothing failed.
//
// Usage: node oversized.mjs [--bin-dir DIR] [--rounds N]   (DATABASE_URL, CHROMIUM as in run.mjs)

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const DATABASE_URL = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const args = process.argv.slice(2);
const BIN_DIR = args.includes('--bin-dir') ? args[args.indexOf('--bin-dir') + 1] : path.join(ROOT, 'target', 'debug');
const ROUNDS = args.includes('--rounds') ? Number(args[args.indexOf('--rounds') + 1]) : 12;

function psql(url, sql) {
  const r = spawnSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-At', '-d', url, '-c', sql], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`psql failed: ${(r.stderr || '').trim()}`);
  return r.stdout;
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function main() {
  const dbName = `relay_oversized_${randomBytes(6).toString('hex')}`;
  const dbUrl = DATABASE_URL.replace(/\/[^/]*$/, `/${dbName}`);
  psql(DATABASE_URL, `CREATE DATABASE "${dbName}"`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'relay-oversized-'));
  const port = await freePort();
  const config = JSON.parse(fs.readFileSync(path.join(ROOT, 'config.json'), 'utf8'));
  config.listen = `127.0.0.1:${port}`;
  config.database = { ...(config.database || {}), url: dbUrl };
  const cfgPath = path.join(dir, 'config.json');
  fs.writeFileSync(cfgPath, JSON.stringify(config));
  const logPath = path.join(dir, 'connector.log');
  const out = fs.openSync(logPath, 'w');
  const connector = spawn(path.join(BIN_DIR, 'connector'), ['--config', cfgPath], {
    env: { ...process.env, RELAY_LISTEN: `127.0.0.1:${port}`, DATABASE_URL: dbUrl },
    stdio: ['ignore', out, out],
  });
  let browser;
  let passed = 0;
  let failed = 0;
  try {
    const base = `http://127.0.0.1:${port}`;
    for (let i = 0; ; i += 1) {
      if (i > 600) throw new Error(`connector not ready: ${fs.readFileSync(logPath, 'utf8')}`);
      try {
        if ((await fetch(`${base}/readyz`)).ok) break;
      } catch { /* not yet */ }
      await new Promise((r) => setTimeout(r, 100));
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    const page = await browser.newPage();
    await page.goto(`${base}/healthz`);
    const codes = [];
    for (let round = 0; round < ROUNDS; round += 1) {
      const size = round % 2 === 0 ? 70_000 : 1_000_000;
      const result = await page.evaluate(([url, size]) => new Promise((resolve) => {
        const ws = new WebSocket(url);
        ws.onopen = () => ws.send('{"id":1,"connect":{}}');
        ws.onmessage = () => ws.send(`{"id":2,"publish":{"channel":"x","data":"${'a'.repeat(size)}"}}`);
        ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, clean: e.wasClean });
      }), [`ws://127.0.0.1:${port}/connection/websocket`, size]);
      codes.push(result.code);
      if (result.code === 1009) {
        passed += 1;
      } else {
        failed += 1;
        console.log(`[oversized] FAIL round ${round} (${size} bytes): close ${result.code} ${JSON.stringify(result)}`);
      }
    }
    console.log(`[oversized] close codes of ${ROUNDS} oversized sends: ${codes.join(' ')}`);
    // The same through the vendored SDK (centrifuge-js 5.8.0, as the chat page uses it): the send must
    // end in the terminal "message size limit exceeded", not "transport closed" and a reconnect.
    await page.addScriptTag({ url: `${base}/static/centrifuge-5.8.0.js` });
    const outcomes = [];
    for (let round = 0; round < ROUNDS / 2; round += 1) {
      const size = round % 2 === 0 ? 70_000 : 1_000_000;
      const result = await page.evaluate(([url, size]) => new Promise((resolve) => {
        const c = new Centrifuge(url, { minReconnectDelay: 60000 });
        c.on('connected', () => {
          c.publish('x', { text: 'a'.repeat(size) }).catch(() => {});
        });
        c.on('connecting', (ctx) => {
          if (ctx.code !== 0) { resolve(`${ctx.code} ${ctx.reason}`); c.disconnect(); }
        });
        c.on('disconnected', (ctx) => resolve(`${ctx.code} ${ctx.reason}`));
        c.connect();
      }), [`ws://127.0.0.1:${port}/connection/websocket`, size]);
      outcomes.push(result);
      if (result === '3 message size limit exceeded') {
        passed += 1;
      } else {
        failed += 1;
        console.log(`[oversized] FAIL SDK round ${round} (${size} bytes): ${result}`);
      }
    }
    console.log(`[oversized] centrifuge-js outcomes: ${outcomes.join(' | ')}`);
  } catch (e) {
    failed += 1;
    console.log(`[oversized] FAIL ${e && e.message ? e.message : e}`);
  } finally {
    if (browser) await browser.close();
    connector.kill('SIGTERM');
    await new Promise((r) => connector.once('exit', r));
    psql(DATABASE_URL, `DROP DATABASE IF EXISTS "${dbName}" WITH (FORCE)`);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main();
