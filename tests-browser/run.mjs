#!/usr/bin/env node
// The chat page in a real browser: Playwright (playwright-core, pinned) driving Debian's Chromium
// headless, against a real writer + connector.
//
// The running system comes from the shared Python harness (tests-support/relaytest) through
// tests-browser/run.py, which creates the database (relay_browser_<random>), runs `connector migrate`,
// starts writer-lambda and the connector on free ports, runs this script as its scenario, and tears
// everything down; it passes RELAY_BASE_URL, RELAY_DATABASE_URL, RELAY_API_KEY and BROWSER_ARTIFACTS.
// This script prints PASS/FAIL lines and `RESULT passed=N failed=N` last (run.py adds its own checks and
// prints the closing `N passed, N failed`). User A's page goes through a TCP proxy of this script, so
// A's connection can be cut and restored while the others stay up. Logs and screenshots: artifacts/browser/.
//
// The run's connector config (run.py) is config.json with the demo token endpoint on (a random HMAC key)
// and a server API key (for a terminal disconnect). Browser contexts (separate storage) as alice (A, through
// the proxy), bob (B), carol (C):
//   sign-in; A and B online in General; A sends, B sees it; A edits, B sees the "edited" mark; B has no
//   edit control on A's message and a forged edit from B's page is refused with the writer's answer
//   (code 420 and its reason) when the publish is answered; A's connection is cut (state shown, online
//   list greyed, Send off) while B sends, then restored: every message once, in table order, and A can
//   still edit its message; A reloads and a second tab of A: still alice, still allowed to edit; A
//   creates a room and writes there: B gets it in the room list with unread 1, General never shows it;
//   A writes to bob directly: bob is told on his personal channel (unread 1), carol's subscribe to the
//   pair's channel is refused (103) and she never gets the message; bob opens it and A's message turns
//   "read" (a chat_receipts row); a backend notice to bob (relay.notify_users) shows on his page only; a 3-day-old message shows its date and a 130-message room loads its
//   older messages on scroll; screenshots at desktop and phone size; the server API disconnects alice
//   (terminal): the page stays disconnected and offers Reconnect, which works; change name and sign out.
//
// Usage: tests-browser/run.py [--bin-dir DIR] [--keep-db]     (CHROMIUM=/path overrides /usr/bin/chromium)

import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const ARTIFACTS = process.env.BROWSER_ARTIFACTS || path.join(ROOT, 'artifacts', 'browser');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STEP_MS = Number(process.env.STEP_TIMEOUT_MS || 15000);
// Presence (who is online, join/leave) is checked once the connector has it.
const PRESENCE = true;

let passed = 0;
let failed = 0;
const failures = [];
const log = (m) => console.log(m);
function ok(name, detail = '') {
  passed += 1;
  log(`PASS ${name}${detail ? ` (${detail})` : ''}`);
}
function fail(name, detail) {
  failed += 1;
  failures.push(`${name}: ${String(detail).split('\n')[0]}`);
  log(`FAIL ${name}: ${detail}`);
}
/** Runs one check: passes unless `fn` throws. */
async function check(name, fn) {
  try {
    const detail = await fn();
    ok(name, typeof detail === 'string' ? detail : '');
    return true;
  } catch (e) {
    fail(name, e && e.message ? e.message : e);
    return false;
  }
}

// ---- the database and the network ------------------------------------------------------------------

function psql(url, sql) {
  const r = spawnSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-At', '-d', url, '-f', '-'], {
    input: sql, encoding: 'utf8', timeout: 60000,
  });
  if (r.status !== 0) throw new Error(`psql failed: ${(r.stderr || r.error || '').toString().trim()}`);
  return r.stdout;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A TCP proxy this script controls: `cut()` drops every connection and refuses new ones until `restore()`. */
class Proxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.sockets = new Set();
    this.server = null;
    this.port = 0;
  }

  async listen(port = 0) {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.targetPort, '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
    await new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, '127.0.0.1', resolve);
    });
    this.port = this.server.address().port;
  }

  async cut() {
    // close() stops accepting and calls back once every open connection has ended: end them first.
    const closed = new Promise((r) => this.server.close(() => r()));
    for (const s of this.sockets) s.resetAndDestroy ? s.resetAndDestroy() : s.destroy();
    this.sockets.clear();
    await closed;
  }

  async restore() {
    await this.listen(this.port);
  }

  async close() {
    await this.cut().catch(() => {});
  }
}

// ---- the page ----------------------------------------------------------------------------------------

/** Signs `name` in on a page; resolves once connected with the General room's history loaded. */
async function signIn(page, name) {
  await page.fill('#username', name);
  await page.click('#login-form button[type=submit]');
  await waitSignedIn(page);
}

async function waitSignedIn(page) {
  await page.waitForFunction(() => document.querySelector('#state').dataset.state === 'connected', null, { timeout: STEP_MS });
  await page.waitForFunction(() => {
    const c = window.chat.state.convs.get('room:general');
    return c && c.historyLoaded;
  }, null, { timeout: STEP_MS });
}

async function openChat(browser, base, name, viewport, context) {
  const ctx = context || await browser.newContext({ viewport: viewport || { width: 1200, height: 760 } });
  const page = await ctx.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  await page.goto(base + '/', { waitUntil: 'load' });
  if (name) await signIn(page, name);
  return { context: ctx, page, errors, name };
}

/** The messages a page shows, in order: [{id, text, edited, editable, refused, receipt, time}]. */
function shown(page) {
  return page.$$eval('#messages li.msg', (items) => items.map((li) => ({
    id: li.dataset.msgId,
    text: li.querySelector('.text') ? li.querySelector('.text').textContent : '',
    edited: !!li.querySelector('.edited'),
    editable: !!li.querySelector('button.edit'),
    refused: li.querySelector('.refused') ? li.querySelector('.refused').textContent : '',
    receipt: li.dataset.receipt || '',
    time: li.querySelector('time') ? li.querySelector('time').textContent : '',
  })));
}

async function sendFrom(user, text) {
  await user.page.fill('#message', text);
  await user.page.click('#send');
  await user.page.waitForFunction(() => document.querySelector('#message').value === '' ||
      !!document.querySelector('#error:not([hidden])'), null, { timeout: STEP_MS });
  const err = await user.page.$eval('#error', (e) => (e.hidden ? '' : e.textContent));
  if (err) throw new Error(`${user.name} could not send ${JSON.stringify(text)}: ${err}`);
}

async function waitFor(user, fn, arg, what) {
  try {
    await user.page.waitForFunction(fn, arg, { timeout: STEP_MS });
  } catch {
    throw new Error(`${user.name}: ${what} not seen within ${STEP_MS / 1000} s; the page shows ${JSON.stringify(await shown(user.page))}`);
  }
}

const hasText = (t) => [...document.querySelectorAll('#messages li.msg .text')].some((e) => e.textContent === t);

async function waitText(user, text) {
  await waitFor(user, hasText, text, JSON.stringify(text));
}

const online = (page) => page.$$eval('#online-list li', (items) => items.map((li) => li.dataset.name));

async function waitOnline(user, name, present) {
  try {
    await user.page.waitForFunction(([n, p]) => [...document.querySelectorAll('#online-list li')]
      .some((li) => li.dataset.name === n) === p, [name, present], { timeout: STEP_MS });
  } catch {
    throw new Error(`${user.name}: ${name} ${present ? 'online' : 'gone'} not seen; online list ${JSON.stringify(await online(user.page))}`);
  }
}

async function openConv(user, channel) {
  await user.page.click(`.conv-list button[data-channel="${channel}"]`);
  await user.page.waitForFunction((c) => {
    const conv = window.chat.state.convs.get(c);
    return window.chat.state.active === c && conv && conv.historyLoaded;
  }, channel, { timeout: STEP_MS });
}

/** The id of the row with this text in a conversation of the page's model. */
function idOf(user, channel, text) {
  return user.page.evaluate(([c, t]) => {
    const conv = window.chat.state.convs.get(c);
    for (const [id, row] of conv.rows) if (row.body === t) return id;
    return null;
  }, [channel, text]);
}

async function editFromUi(user, msgId, text) {
  const li = user.page.locator(`#messages li[data-msg-id="${msgId}"]`);
  await li.locator('button.edit').click();
  await li.locator('form.editor input').fill(text);
  await li.locator('form.editor button[type=submit]').click();
}

const editedTo = ([id, t]) => {
  const li = document.querySelector(`#messages li[data-msg-id="${id}"]`);
  return !!li && li.querySelector('.text').textContent === t && !!li.querySelector('.edited');
};

const q = (s) => `'${String(s).replace(/'/g, "''")}'`;

// ---- the run ----------------------------------------------------------------------------------------

async function scenario(base, proxyBase, proxy, dbUrl, apiKey) {
  let browser;
  try {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      // playwright gives every launch a fresh temporary profile (its own --user-data-dir).
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    ok('chromium launched', `${CHROMIUM} ${browser.version()}`);
  } catch (e) {
    fail('chromium launched', e.message);
    return;
  }
  const pages = [];
  try {
    await check('the sign-in form (phone size), screenshot login-phone.png', async () => {
      const context = await browser.newContext({ viewport: { width: 390, height: 760 } });
      const page = await context.newPage();
      await page.goto(base + '/', { waitUntil: 'load' });
      if (!(await page.isVisible('#login-form')) || (await page.isVisible('#chat'))) throw new Error('sign-in form not shown alone');
      await page.screenshot({ path: path.join(ARTIFACTS, 'login-phone.png') });
      await context.close();
    });
    const A = await openChat(browser, proxyBase, 'alice');
    const B = await openChat(browser, base, 'bob');
    pages.push(A, B);
    ok('alice and bob signed in (demo tokens), General loaded');

    await check('A and B see each other online in General', async () => {
      await waitOnline(A, 'bob', true);
      await waitOnline(B, 'alice', true);
      await waitOnline(A, 'alice', true);
    });

    const hello = `hello from alice ${randomBytes(2).toString('hex')}`;
    let helloId = null;
    await check('A sends in General, B sees it; the row is alice\'s', async () => {
      await sendFrom(A, hello);
      await waitText(B, hello);
      await waitText(A, hello);
      helloId = await idOf(A, 'room:general', hello);
      const author = psql(dbUrl, `SELECT author || '/' || room_id FROM chat_messages WHERE msg_id = ${q(helloId)}`).trim();
      if (author !== 'alice/general') throw new Error(`the row says ${author}`);
    });

    const edited1 = hello + ' (edited)';
    await check('A edits, B sees the new text with the edited mark', async () => {
      await editFromUi(A, helloId, edited1);
      await waitFor(B, editedTo, [helloId, edited1], 'the edit with its mark');
    });

    await check("B is not offered to edit A's message; a forged edit is refused and shown at once", async () => {
      const onB = (await shown(B.page)).find((m) => m.id === helloId);
      if (!onB) throw new Error("B does not show A's message");
      if (onB.editable) throw new Error("B's page offers edit on A's message");
      const t0 = Date.now();
      await B.page.evaluate((id) => window.chat.edit(id, 'bob was here', 'room:general'), helloId);
      const ms = Date.now() - t0;
      const mark = (await shown(B.page)).find((m) => m.id === helloId).refused;
      if (!mark.startsWith('Edit refused: ') || !mark.includes('only its author can edit it')) {
        throw new Error(`the mark ${JSON.stringify(mark)} is not the writer's answer (code 420 and its reason)`);
      }
      const rowNow = psql(dbUrl, `SELECT body FROM chat_messages WHERE msg_id = ${q(helloId)}`).trim();
      if (rowNow !== edited1) throw new Error(`the row changed to ${JSON.stringify(rowNow)}`);
      return `refusal shown when the publish was answered (${ms} ms): ${JSON.stringify(mark)}`;
    });

    // A reconnect (the connection cut by the proxy, B sending meanwhile) keeps A's right to edit.
    const missed = [];
    await check("A's connection is cut: the page says so, the online list greys out, sending is off", async () => {
      await proxy.cut();
      await A.page.waitForFunction(() => ['reconnecting', 'disconnected', 'connecting']
        .includes(document.querySelector('#state').dataset.state), null, { timeout: STEP_MS });
      const banner = await A.page.$eval('#banner', (e) => (e.hidden ? '' : e.textContent));
      if (!banner) throw new Error('no banner while reconnecting');
      if (!(await A.page.$eval('#online', (e) => e.classList.contains('stale')))) throw new Error('the online list is not greyed out');
      if (!(await A.page.$eval('#send', (e) => e.disabled))) throw new Error('Send is enabled while disconnected');
    });
    await check('B sends while A is cut off', async () => {
      for (let i = 1; i <= 3; i += 1) {
        const t = `while alice was away ${i}`;
        await sendFrom(B, t);
        missed.push(t);
      }
    });
    await check('A reconnects: recovered in order, and can still edit its message', async () => {
      await proxy.restore();
      await A.page.waitForFunction(() => document.querySelector('#state').dataset.state === 'connected', null, { timeout: STEP_MS + 10000 });
      await waitText(A, missed[missed.length - 1]);
      const expected = psql(dbUrl, "SELECT msg_id FROM chat_messages WHERE room_id = 'general' ORDER BY seq").split('\n').filter(Boolean);
      const got = (await shown(A.page)).map((m) => m.id);
      if (JSON.stringify(got) !== JSON.stringify(expected)) throw new Error(`A shows ${JSON.stringify(got)}, the table has ${JSON.stringify(expected)}`);
      const mine = (await shown(A.page)).find((m) => m.id === helloId);
      if (!mine.editable) throw new Error('no edit control on A\'s message after the reconnect');
      await editFromUi(A, helloId, hello + ' (after reconnect)');
      await waitFor(B, editedTo, [helloId, hello + ' (after reconnect)'], 'the edit after the reconnect');
    });

    await check('A reloads the page: signed in again as alice, still allowed to edit', async () => {
      await A.page.reload({ waitUntil: 'load' });
      await waitSignedIn(A.page);
      await waitText(A, hello + ' (after reconnect)');
      const mine = (await shown(A.page)).find((m) => m.id === helloId);
      if (!mine || !mine.editable) throw new Error('no edit control after the reload');
      await editFromUi(A, helloId, hello + ' (after reload)');
      await waitFor(B, editedTo, [helloId, hello + ' (after reload)'], 'the edit after the reload');
    });

    await check('a second tab of alice is alice too (edit control there)', async () => {
      const tab = await openChat(browser, proxyBase, null, null, A.context);
      await waitSignedIn(tab.page);
      await waitText(tab, hello + ' (after reload)');
      const mine = (await shown(tab.page)).find((m) => m.id === helloId);
      if (!mine || !mine.editable) throw new Error('no edit control in the second tab');
      await tab.page.close();
    });

    // Rooms.
    const roomMsg = `only in the second room ${randomBytes(2).toString('hex')}`;
    await check('A creates a room; B sees it in the list with an unread count, General stays apart', async () => {
      await A.page.fill('#room-name', 'Second room');
      await A.page.click('#room-form button[type=submit]');
      await A.page.waitForFunction(() => window.chat.state.active === 'room:second-room', null, { timeout: STEP_MS });
      await B.page.waitForSelector('.conv-list button[data-channel="room:second-room"]', { timeout: STEP_MS });
      await sendFrom(A, roomMsg);
      await waitText(A, roomMsg);
      await B.page.waitForFunction(() => {
        const li = document.querySelector('#room-list li[data-channel="room:second-room"]');
        return li && li.dataset.unread === '1' && li.querySelector('.unread').textContent === '1';
      }, null, { timeout: STEP_MS });
      if (await B.page.evaluate(hasText, roomMsg)) throw new Error("the second room's message is shown in General");
      const inGeneral = await B.page.evaluate((t) => [...window.chat.state.convs.get('room:general').rows.values()].some((r) => r.body === t), roomMsg);
      if (inGeneral) throw new Error("the second room's message reached General's model");
      await openConv(B, 'room:second-room');
      await waitText(B, roomMsg);
      const unread = await B.page.$eval('#room-list li[data-channel="room:second-room"]', (li) => li.dataset.unread);
      if (unread !== '0') throw new Error(`unread ${unread} after opening the room`);
      await waitOnline(B, 'alice', true);
    });

    await check('a send the writer refuses stays on the page, marked with its reason at once', async () => {
      // A room the page knows but the database does not: the writer answers 420 "there is no room".
      await A.page.evaluate(() => window.chat.open(window.chat.addRoom('ghost', 'Ghost').channel));
      await A.page.fill('#message', 'into the void');
      const t0 = Date.now();
      await A.page.click('#send');
      await A.page.waitForSelector('#messages li.pending.failed', { timeout: STEP_MS });
      const ms = Date.now() - t0;
      const mark = await A.page.$eval('#messages li.pending.failed .refused', (e) => e.textContent);
      if (!mark.startsWith('Not sent: message refused: ') || !mark.includes('no room')) {
        throw new Error(`the mark ${JSON.stringify(mark)} is not the writer's answer`);
      }
      const err = await A.page.$eval('#error', (e) => (e.hidden ? '' : e.textContent));
      if (err !== mark) throw new Error(`the error line says ${JSON.stringify(err)}`);
      const stored = psql(dbUrl, "SELECT count(*) FROM chat_messages WHERE body = 'into the void'").trim();
      if (stored !== '0') throw new Error(`${stored} rows stored`);
      return `${JSON.stringify(mark)} after ${ms} ms`;
    });

    // Direct messages.
    const C = await openChat(browser, base, 'carol');
    pages.push(C);
    const dm = `psst bob ${randomBytes(2).toString('hex')}`;
    let dmId = null;
    await check('A writes to bob directly; bob is notified on his personal channel and has it unread', async () => {
      await A.page.fill('#dm-user', 'bob');
      await A.page.click('#dm-form button[type=submit]');
      await A.page.waitForFunction(() => window.chat.state.active === 'dm#alice,bob', null, { timeout: STEP_MS });
      await sendFrom(A, dm);
      await waitText(A, dm);
      dmId = await idOf(A, 'dm#alice,bob', dm);
      await B.page.waitForFunction(() => {
        const li = document.querySelector('#dm-list li[data-channel="dm#alice,bob"]');
        return li && li.dataset.unread === '1';
      }, null, { timeout: STEP_MS });
      const mine = (await shown(A.page)).find((m) => m.id === dmId);
      if (mine.receipt !== 'sent') throw new Error(`A's receipt is ${JSON.stringify(mine.receipt)} before bob read it`);
    });
    await check("carol cannot subscribe to alice and bob's channel (refused), and never got the message", async () => {
      const code = await C.page.evaluate(() => new Promise((resolve) => {
        const sub = window.chat.centrifuge.newSubscription('dm#alice,bob');
        sub.on('subscribed', () => resolve('subscribed'));
        sub.on('unsubscribed', (ctx) => resolve(ctx.code));
        sub.subscribe();
        setTimeout(() => resolve('no answer'), 8000);
      }));
      if (code !== 103) throw new Error(`carol's subscribe ended with ${JSON.stringify(code)}, not 103 permission denied`);
      const leaked = await C.page.evaluate((t) => document.body.textContent.includes(t) ||
        [...window.chat.state.convs.values()].some((c) => [...c.rows.values()].some((r) => r.body === t)), dm);
      if (leaked) throw new Error("carol's page has the direct message");
      if (await C.page.$('#dm-list li[data-channel="dm#alice,bob"]')) throw new Error("carol lists alice and bob's conversation");
    });
    await check('bob opens the conversation: alice sees "read" (a receipt row through the relay)', async () => {
      await openConv(B, 'dm#alice,bob');
      await waitText(B, dm);
      await waitFor(A, (id) => {
        const li = document.querySelector(`#messages li[data-msg-id="${id}"]`);
        return li && li.dataset.receipt === 'read';
      }, dmId, 'the read receipt');
      const r = psql(dbUrl, "SELECT reader || '/' || msg_id FROM chat_receipts WHERE user_a = 'alice' AND user_b = 'bob'").trim();
      if (r !== `bob/${dmId}`) throw new Error(`chat_receipts has ${JSON.stringify(r)}`);
    });

    await check('a backend notice to bob (relay.notify_users in SQL) shows on his page only', async () => {
      const text = `maintenance at noon ${randomBytes(2).toString('hex')}`;
      psql(dbUrl, `SELECT relay.notify_users(ARRAY['bob'], jsonb_build_object('text', ${q(text)}::text))`);
      await B.page.waitForFunction((t) => {
        const n = document.querySelector('#notice');
        return !n.hidden && n.textContent.includes(t);
      }, text, { timeout: STEP_MS });
      await sleep(300);
      if (!(await A.page.$eval('#notice', (n) => n.hidden))) throw new Error("alice's page shows bob's notice");
      await B.page.click('#notice-close');
    });

    // Dates and history paging.
    await check('a message older than today shows its date; a long room loads older messages on scroll', async () => {
      const old = Date.now() - 3 * 86400000;
      psql(dbUrl, `INSERT INTO chat_rooms (room_id, title, created_by) VALUES ('long', 'Long', 'test');
        INSERT INTO chat_messages (msg_id, room_id, author, body, created_at_ms)
        SELECT 'long-' || i, 'long', 'dave', 'long message ' || i, ${old} + i FROM generate_series(1, 130) i;`);
      await A.page.waitForSelector('.conv-list button[data-channel="room:long"]', { timeout: STEP_MS });
      await openConv(A, 'room:long');
      await waitText(A, 'long message 130');
      const first = await shown(A.page);
      const last = first[first.length - 1];
      if (!/[A-Za-z]/.test(last.time) || !/\d/.test(last.time)) throw new Error(`the time of a 3-day-old message is ${JSON.stringify(last.time)} (no date)`);
      if (first.length >= 130) throw new Error(`all ${first.length} messages loaded at once`);
      for (let i = 0; i < 10 && (await shown(A.page)).length < 130; i += 1) {
        await A.page.$eval('#messages', (e) => { e.scrollTop = 0; e.dispatchEvent(new Event('scroll')); });
        await sleep(400);
      }
      const all = (await shown(A.page)).map((m) => m.text);
      const expected = Array.from({ length: 130 }, (_, i) => `long message ${i + 1}`);
      if (JSON.stringify(all) !== JSON.stringify(expected)) throw new Error(`after scrolling: ${all.length} messages, first ${all[0]}`);
      return `${first.length} at first, ${all.length} after scrolling; date shown as ${JSON.stringify(last.time)}`;
    });

    await check('screenshots at desktop and phone size (artifacts/browser/chat.png, dm.png, chat-phone.png, nav-phone.png)', async () => {
      await openConv(A, 'room:general');
      await A.page.screenshot({ path: path.join(ARTIFACTS, 'chat.png') });
      await openConv(B, 'dm#alice,bob');
      await B.page.screenshot({ path: path.join(ARTIFACTS, 'dm.png') });
      const phone = await openChat(browser, base, 'erin', { width: 390, height: 760 });
      await phone.page.screenshot({ path: path.join(ARTIFACTS, 'chat-phone.png') });
      await phone.page.click('#nav-toggle');
      await phone.page.screenshot({ path: path.join(ARTIFACTS, 'nav-phone.png') });
      await phone.page.click('#nav-toggle');
      await phone.page.click('#online-toggle');
      await phone.page.screenshot({ path: path.join(ARTIFACTS, 'online-phone.png') });
      await phone.context.close();
    });

    // A terminal disconnect (the server API closes alice's connections, code 3503: no reconnect).
    await check('after a terminal disconnect the page offers Reconnect, and it works', async () => {
      const r = await fetch(base + '/api/disconnect', {
        method: 'POST', headers: { 'X-API-Key': apiKey, 'Content-Type': 'application/json' }, body: JSON.stringify({ user: 'alice' }),
      });
      if (!r.ok) throw new Error(`API disconnect: ${r.status} ${await r.text()}`);
      await A.page.waitForFunction(() => document.querySelector('#state').dataset.state === 'disconnected', null, { timeout: STEP_MS });
      await A.page.waitForSelector('#reconnect', { state: 'visible', timeout: STEP_MS });
      if (!(await A.page.$eval('#online', (e) => e.classList.contains('stale')))) throw new Error('the online list is not greyed out');
      await sleep(1500);
      if ((await A.page.$eval('#state', (e) => e.dataset.state)) !== 'disconnected') throw new Error('the page reconnected by itself');
      await A.page.screenshot({ path: path.join(ARTIFACTS, 'disconnected.png') });
      await A.page.click('#reconnect');
      await A.page.waitForFunction(() => document.querySelector('#state').dataset.state === 'connected', null, { timeout: STEP_MS });
      await sendFrom(A, 'alice is back');
      await openConv(B, 'room:general');
      await waitText(B, 'alice is back');
    });

    await check('sign out forgets the name; change name keeps it in the form', async () => {
      await C.page.click('#rename');
      await C.page.waitForSelector('#login-form', { state: 'visible', timeout: STEP_MS });
      const v = await C.page.$eval('#username', (e) => e.value);
      if (v !== 'carol') throw new Error(`the form holds ${JSON.stringify(v)}`);
      await signIn(C.page, 'carol2');
      await C.page.click('#sign-out');
      await C.page.waitForSelector('#login-form', { state: 'visible', timeout: STEP_MS });
      await C.page.reload({ waitUntil: 'load' });
      if (await C.page.isVisible('#chat')) throw new Error('signed in again after signing out');
    });

    for (const u of pages) {
      const real = u.errors.filter((e) => !/WebSocket|ERR_CONNECTION|net::|readMsg/.test(e));
      if (real.length) fail(`no script errors on ${u.name}'s page`, real.join('; '));
    }
    ok('no script errors on the pages');
  } catch (e) {
    fail('scenario', e && e.stack ? e.stack : e);
  } finally {
    await browser.close().catch(() => {});
  }
}

async function main() {
  const base = process.env.RELAY_BASE_URL;
  const dbUrl = process.env.RELAY_DATABASE_URL;
  const apiKey = process.env.RELAY_API_KEY;
  let proxy = null;
  try {
    if (!base || !dbUrl || !apiKey) throw new Error('RELAY_BASE_URL, RELAY_DATABASE_URL and RELAY_API_KEY are not set: run tests-browser/run.py');
    if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found (Debian: apt-get install chromium)`);
    await check('GET / serves the chat page', async () => {
      const r = await fetch(base + '/');
      if (r.status !== 200 || !(await r.text()).includes('centrifuge-5.8.0.js')) throw new Error(`status ${r.status}`);
    });
    proxy = new Proxy(Number(new URL(base).port));
    await proxy.listen();
    await scenario(base, `http://127.0.0.1:${proxy.port}`, proxy, dbUrl, apiKey);
  } catch (e) {
    fail('setup', e && e.message ? e.message : e);
  } finally {
    if (proxy) await proxy.close();
  }
  if (failures.length) {
    log('failures:');
    for (const f of failures) log('  ' + f);
  }
  console.log(`RESULT passed=${passed} failed=${failed}`);
  process.exit(failed === 0 ? 0 : 1);
}

main();
