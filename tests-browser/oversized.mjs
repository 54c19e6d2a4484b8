#!/usr/bin/env node
// An oversized message is terminal in a real browser (issue 9, item 8): headless Chromium opens a
// WebSocket to a real connector, sends `connect`, then a text message over client.max_message_bytes,
// and records the close event. Before the lingering close, 9 of 12 such sends ended as code 1006
// (a TCP reset overtook the close frame: the SDK saw "transport closed" and reconnected); each must
// now end with 1009, and the same sends through the vendored centrifuge-js must end in its terminal
// "message size limit exceeded" (never "transport closed" and a reconnect). The connector (on a fresh
// database) comes from the shared Python harness through tests-browser/run.py --oversized, which passes
// RELAY_BASE_URL; this script prints `RESULT passed=N failed=N` last (run.py prints the closing
// `N passed, N failed`); exit code 0 only when nothing failed.
//
// Usage: tests-browser/run.py --oversized [--rounds N] [--bin-dir DIR]   (CHROMIUM as in run.mjs)

import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ROUNDS = Number(process.env.OVERSIZED_ROUNDS || 12);

async function main() {
  let browser;
  let passed = 0;
  let failed = 0;
  try {
    const base = process.env.RELAY_BASE_URL;
    if (!base) throw new Error('RELAY_BASE_URL is not set: run tests-browser/run.py --oversized');
    const port = new URL(base).port;
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
        console.log(`FAIL round ${round} (${size} bytes): close ${result.code} ${JSON.stringify(result)}`);
      }
    }
    console.log(`close codes of ${ROUNDS} oversized sends: ${codes.join(' ')}`);
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
        console.log(`FAIL SDK round ${round} (${size} bytes): ${result}`);
      }
    }
    console.log(`centrifuge-js outcomes: ${outcomes.join(' | ')}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${e && e.message ? e.message : e}`);
  } finally {
    if (browser) await browser.close();
  }
  console.log(`RESULT passed=${passed} failed=${failed}`);
  process.exit(failed === 0 ? 0 : 1);
}

main();
