#!/usr/bin/env node
// The chat page in a real browser: Playwright (playwright-core, pinned) driving Debian's Chromium
// headless, against a real writer + connector.
//
// Orchestration as in tests-sdk/run.py: a fresh database (relay_browser_<random>) on DATABASE_URL's
// server, `connector migrate`, writer-lambda and the connector from target/debug on free ports, always
// torn down (processes stopped, database dropped), `N passed, N failed` as the last line, exit code 0
// only when nothing failed. User A's page goes through a TCP proxy of this script, so A's connection
// can be cut and restored while the others stay up. Logs and screenshots: artifacts/browser/.
//
// Scenario, two browser contexts (separate storage) as users alice (A) and bob (B):
//   both see each other online; A sends, B sees it; A edits, B sees the "edited" mark; B has no edit
//   control on A's message and a forged edit from B's page is refused with
//   the writer's answer (code 420 and its reason, shown when the publish is answered); B closes, A
//   sees B leave; A's connection is cut and restored while a new page of B sends, and A ends with every
//   message once, in the order of the table; screenshots of A's page (desktop and phone sizes).
//
// Usage: node run.mjs [--bin-dir DIR] [--keep-db]     (CHROMIUM=/path overrides /usr/bin/chromium)

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const ARTIFACTS = path.join(ROOT, 'artifacts', 'browser');
const DATABASE_URL = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STEP_MS = Number(process.env.STEP_TIMEOUT_MS || 15000);
const args = process.argv.slice(2);
const BIN_DIR = args.includes('--bin-dir') ? args[args.indexOf('--bin-dir') + 1] : path.join(ROOT, 'target', 'debug');
const KEEP_DB = args.includes('--keep-db');
// Presence (who is online, join/leave) is checked once the connector has it.
const PRESENCE = true;

let passed = 0;
let failed = 0;
const failures = [];
const log = (m) => console.log(`[browser] ${m}`);
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

// ---- processes and the database ---------------------------------------------------------------------

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function withDatabase(url, name) {
  const u = new URL(url);
  u.pathname = '/' + name;
  return u.toString();
}

function psql(url, sql) {
  const r = spawnSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-At', '-d', url, '-f', '-'], {
    input: sql, encoding: 'utf8', timeout: 60000,
  });
  if (r.status !== 0) throw new Error(`psql failed: ${(r.stderr || r.error || '').toString().trim()}`);
  return r.stdout;
}

class Service {
  constructor(name, argv, env) {
    this.name = name;
    this.argv = argv;
    this.env = env;
    this.logfile = path.join(ARTIFACTS, `${name}.log`);
    this.proc = null;
  }

  start() {
    const fd = fs.openSync(this.logfile, 'a');
    this.proc = spawn(this.argv[0], this.argv.slice(1), { env: this.env, cwd: ROOT, stdio: ['ignore', fd, fd] });
    fs.closeSync(fd);
  }

  alive() {
    return this.proc !== null && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  async stop() {
    if (!this.alive()) return;
    const exited = new Promise((r) => this.proc.once('exit', r));
    this.proc.kill('SIGTERM');
    const t = setTimeout(() => this.alive() && this.proc.kill('SIGKILL'), 15000);
    await exited;
    clearTimeout(t);
  }

  async waitHttp(url, ms = 60000) {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      if (!this.alive()) throw new Error(`${this.name} exited (${this.proc.exitCode ?? this.proc.signalCode})`);
      try {
        const r = await fetch(url);
        if (r.ok) return;
      } catch { /* not yet */ }
      await sleep(200);
    }
    throw new Error(`${url} not ready within ${ms / 1000} s`);
  }

  tail(n = 40) {
    try {
      return fs.readFileSync(this.logfile, 'utf8').split('\n').slice(-n).map((l) => '    ' + l).join('\n');
    } catch {
      return '    (no log)';
    }
  }
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

// ---- the page ---------------------------------------------------------------------------------------

async function openChat(browser, base, name, viewport) {
  const context = await browser.newContext({ viewport: viewport || { width: 1100, height: 760 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  await page.goto(base + '/', { waitUntil: 'load' });
  await page.fill('#username', name);
  await page.click('#login-form button[type=submit]');
  await page.waitForFunction(() => document.querySelector('#state').dataset.state === 'connected', null, { timeout: STEP_MS });
  await page.waitForFunction(() => window.chat.state.historyLoaded, null, { timeout: STEP_MS });
  return { context, page, errors, name };
}

/** The messages a page shows, in order: [{id, text, edited, editable}]. */
function shown(page) {
  return page.$$eval('#messages li.msg', (items) => items.map((li) => ({
    id: li.dataset.msgId,
    text: li.querySelector('.text') ? li.querySelector('.text').textContent : '',
    edited: !!li.querySelector('.edited'),
    editable: !!li.querySelector('button.edit'),
    refused: li.querySelector('.refused') ? li.querySelector('.refused').textContent : '',
  })));
}

async function sendFrom(user, text) {
  await user.page.fill('#message', text);
  await user.page.click('#send');
  await user.page.waitForFunction((t) => document.querySelector('#message').value === '' ||
      !!document.querySelector('#error:not([hidden])'), text, { timeout: STEP_MS });
  const err = await user.page.$eval('#error', (e) => (e.hidden ? '' : e.textContent));
  if (err) throw new Error(`${user.name} could not send ${JSON.stringify(text)}: ${err}`);
}

async function waitMessage(user, pred, what) {
  try {
    await user.page.waitForFunction(pred.fn, pred.arg, { timeout: STEP_MS });
  } catch {
    throw new Error(`${user.name} did not see ${what} within ${STEP_MS / 1000} s; shows ${JSON.stringify(await shown(user.page))}`);
  }
}

const hasText = (text) => ({
  fn: (t) => [...document.querySelectorAll('#messages li.msg .text')].some((e) => e.textContent === t),
  arg: text,
});

const online = (page) => page.$$eval('#online-list li', (items) => items.map((li) => li.dataset.name));

async function waitOnline(user, predicate, what) {
  try {
    await user.page.waitForFunction(predicate.fn, predicate.arg, { timeout: STEP_MS });
  } catch {
    throw new Error(`${user.name}: ${what} not seen within ${STEP_MS / 1000} s; online list ${JSON.stringify(await online(user.page))}, note ${JSON.stringify(await user.page.$eval('#online-note', (e) => (e.hidden ? '' : e.textContent)))}`);
  }
}
const listed = (name) => ({
  fn: (n) => [...document.querySelectorAll('#online-list li')].some((li) => li.dataset.name === n),
  arg: name,
});
const notListed = (name) => ({
  fn: (n) => ![...document.querySelectorAll('#online-list li')].some((li) => li.dataset.name === n),
  arg: name,
});

// ---- the run ----------------------------------------------------------------------------------------

async function scenario(base, proxyBase, proxy, dbUrl) {
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
  try {
    await check('the name form (phone size), screenshot login-phone.png', async () => {
      const context = await browser.newContext({ viewport: { width: 390, height: 760 } });
      const page = await context.newPage();
      await page.goto(base + '/', { waitUntil: 'load' });
      if (!(await page.isVisible('#login-form')) || (await page.isVisible('#chat'))) throw new Error('name form not shown alone');
      await page.screenshot({ path: path.join(ARTIFACTS, 'login-phone.png') });
      await context.close();
    });
    const A = await openChat(browser, proxyBase, 'alice');
    const B = await openChat(browser, base, 'bob');
    ok('both pages connected, history loaded');

    if (PRESENCE) await check('A sees B online, B sees A online', async () => {
      await waitOnline(A, listed('bob'), 'bob online');
      await waitOnline(B, listed('alice'), 'alice online');
      await waitOnline(A, listed('alice'), 'alice herself online');
    });

    const hello = `hello from alice ${randomBytes(2).toString('hex')}`;
    await check('A sends, B sees it', async () => {
      await sendFrom(A, hello);
      await waitMessage(B, hasText(hello), JSON.stringify(hello));
      await waitMessage(A, hasText(hello), JSON.stringify(hello));
    });
    const helloId = await A.page.evaluate((t) => {
      for (const [id, row] of window.chat.state.rows) if (row.msg_data === t) return id;
      return null;
    }, hello);

    const edited = hello + ' (edited)';
    await check('A edits, B sees the new text with the edited mark', async () => {
      if (!helloId) throw new Error('the message id is unknown');
      const li = A.page.locator(`#messages li[data-msg-id="${helloId}"]`);
      await li.locator('button.edit').click();
      await li.locator('form.editor input').fill(edited);
      await li.locator('form.editor button[type=submit]').click();
      await waitMessage(B, {
        fn: ([id, t]) => {
          const li = document.querySelector(`#messages li[data-msg-id="${id}"]`);
          return li && li.querySelector('.text').textContent === t && !!li.querySelector('.edited');
        },
        arg: [helloId, edited],
      }, 'the edit with its mark');
    });

    await check("B is not offered to edit A's message; a forged edit is refused and shown so", async () => {
      const mine = (await shown(B.page)).find((m) => m.id === helloId);
      if (!mine) throw new Error("B does not show A's message");
      if (mine.editable) throw new Error("B's page offers edit on A's message");
      // The page awaits the publish's answer (the writer's): when edit() returns, the refusal must
      // already be shown, with the writer's reason (no timer guessing).
      const t0 = Date.now();
      await B.page.evaluate((id) => window.chat.edit(id, 'bob was here'), helloId);
      const ms = Date.now() - t0;
      const mark = await B.page.evaluate((id) => {
        const li = document.querySelector(`#messages li[data-msg-id="${id}"]`);
        const r = li && li.querySelector('.refused');
        return r ? r.textContent : null;
      }, helloId);
      if (mark === null) throw new Error('no refused mark when the publish was answered');
      if (!mark.startsWith('Edit refused: ') || !mark.includes('only its author can edit it')) {
        throw new Error(`the mark ${JSON.stringify(mark)} is not the writer's answer (code 420 and its reason)`);
      }
      const rowNow = psql(dbUrl, `SELECT msg_data FROM chat_data WHERE msg_id = '${helloId.replace(/'/g, "''")}'`).trim();
      if (rowNow !== edited) throw new Error(`the row changed to ${JSON.stringify(rowNow)}`);
      const onA = (await shown(A.page)).find((m) => m.id === helloId);
      if (!onA || onA.text !== edited) throw new Error(`A shows ${JSON.stringify(onA)}`);
      return `refusal shown ${ms} ms after sending: ${JSON.stringify(mark)}`;
    });

    await check('B closes' + (PRESENCE ? ', A sees B leave' : ''), async () => {
      await B.context.close();
      if (PRESENCE) await waitOnline(A, notListed('bob'), 'bob leaving');
    });

    // A's connection is cut (proxy down: open sockets reset, new ones refused) while a new page of B
    // sends; then restored.
    const B2 = await openChat(browser, base, 'bob');
    const missed = [];
    await check("A's page shows the connection drop", async () => {
      await proxy.cut();
      await A.page.waitForFunction(() => ['reconnecting', 'disconnected', 'connecting']
        .includes(document.querySelector('#state').dataset.state), null, { timeout: STEP_MS });
      const banner = await A.page.$eval('#banner', (e) => (e.hidden ? '' : e.textContent));
      if (!banner) throw new Error('no banner while reconnecting');
      return await A.page.$eval('#state', (e) => e.dataset.state);
    });
    await check('B sends while A is cut off', async () => {
      for (let i = 1; i <= 5; i += 1) {
        const t = `while alice was away ${i}`;
        await sendFrom(B2, t);
        missed.push(t);
      }
      await waitMessage(B2, hasText(missed[missed.length - 1]), 'its last message');
    });
    await sleep(500);
    await check('A reconnects: connected again, banner gone', async () => {
      await proxy.restore();
      await A.page.waitForFunction(() => document.querySelector('#state').dataset.state === 'connected', null, { timeout: STEP_MS + 10000 });
      await A.page.waitForFunction(() => document.querySelector('#banner').hidden, null, { timeout: STEP_MS });
    });
    await check('A ends with every message once, in order', async () => {
      await waitMessage(A, hasText(missed[missed.length - 1]), 'the last missed message');
      const expected = psql(dbUrl, 'SELECT msg_id FROM chat_data ORDER BY incremental_record_id')
        .split('\n').filter(Boolean);
      const got = (await shown(A.page)).map((m) => m.id);
      if (JSON.stringify(got) !== JSON.stringify(expected)) {
        throw new Error(`A shows ${JSON.stringify(got)}, the table has ${JSON.stringify(expected)}`);
      }
      if (new Set(got).size !== got.length) throw new Error('a message is shown twice');
      return `${got.length} messages`;
    });
    if (PRESENCE) await check('A sees B (again) online after the reconnect', async () => {
      await waitOnline(A, listed('bob'), 'bob online');
    });
    await check('A can still send after the reconnect', async () => {
      const t = 'alice is back';
      await sendFrom(A, t);
      await waitMessage(B2, hasText(t), JSON.stringify(t));
    });

    await check('screenshots saved (artifacts/browser/chat.png, chat-phone.png)', async () => {
      await A.page.screenshot({ path: path.join(ARTIFACTS, 'chat.png') });
      const phone = await openChat(browser, base, 'carol', { width: 390, height: 760 });
      await phone.page.waitForFunction(() => document.querySelectorAll('#messages li.msg').length > 0, null, { timeout: STEP_MS });
      await phone.page.click('#online-toggle');
      await phone.page.screenshot({ path: path.join(ARTIFACTS, 'chat-phone.png') });
      await phone.context.close();
    });
    for (const u of [A, B, B2]) {
      const real = u.errors.filter((e) => !/WebSocket|ERR_CONNECTION|net::/.test(e));
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
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  for (const f of fs.readdirSync(ARTIFACTS)) if (f.endsWith('.log')) fs.rmSync(path.join(ARTIFACTS, f));
  const dbName = `relay_browser_${randomBytes(4).toString('hex')}`;
  const dbUrl = withDatabase(DATABASE_URL, dbName);
  let dbCreated = false;
  const services = [];
  let proxy = null;
  try {
    for (const b of ['connector', 'writer-lambda']) {
      if (!fs.existsSync(path.join(BIN_DIR, b))) throw new Error(`${BIN_DIR}/${b} is missing: run cargo build --workspace --bins`);
    }
    if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found (Debian: apt-get install chromium)`);
    psql(DATABASE_URL, `CREATE DATABASE "${dbName}";`);
    dbCreated = true;
    log(`database ${dbName}; artifacts in artifacts/browser`);

    const connectorPort = await freePort();
    let writerPort = await freePort();
    while (writerPort === connectorPort) writerPort = await freePort();
    const config = JSON.parse(fs.readFileSync(path.join(ROOT, 'config.json'), 'utf8'));
    config.listen = `127.0.0.1:${connectorPort}`;
    config.database = { ...(config.database || {}), url: dbUrl };
    for (const rule of config.rules || []) {
      if (rule.target && rule.target.type === 'lambda') rule.target.endpoint = `http://127.0.0.1:${writerPort}`;
    }
    // Quick dead-link detection is not needed: the proxy resets A's sockets, which the page sees at once.
    const cfgPath = path.join(ARTIFACTS, 'config.json');
    fs.writeFileSync(cfgPath, JSON.stringify(config, null, 2));

    // WRITER_SECRET: the writer runs only invocations the connector signs with it.
    const env = { ...process.env, DATABASE_URL: dbUrl, RUST_LOG: process.env.RUST_LOG || 'info', NO_COLOR: '1',
                  WRITER_SECRET: randomBytes(32).toString('hex') };
    delete env.AWS_LAMBDA_RUNTIME_API;
    const connectorBin = path.join(BIN_DIR, 'connector');
    const m = spawnSync(connectorBin, ['--config', cfgPath, 'migrate'], { env, cwd: ROOT, encoding: 'utf8', timeout: 120000 });
    if (m.status !== 0) throw new Error(`connector migrate: ${m.stderr}`);
    ok('connector migrate');

    const writer = new Service('writer', [path.join(BIN_DIR, 'writer-lambda')], { ...env, WRITER_LISTEN: `127.0.0.1:${writerPort}` });
    const connector = new Service('connector', [connectorBin, '--config', cfgPath], { ...env, RELAY_LISTEN: `127.0.0.1:${connectorPort}` });
    services.push(connector, writer);
    writer.start();
    connector.start();
    const base = `http://127.0.0.1:${connectorPort}`;
    await writer.waitHttp(`http://127.0.0.1:${writerPort}/healthz`);
    await connector.waitHttp(`${base}/readyz`);
    ok('writer and connector ready', base);

    await check('GET / serves the chat page', async () => {
      const r = await fetch(base + '/');
      if (r.status !== 200 || !(await r.text()).includes('centrifuge-5.8.0.js')) throw new Error(`status ${r.status}`);
    });

    proxy = new Proxy(connectorPort);
    await proxy.listen();
    await scenario(base, `http://127.0.0.1:${proxy.port}`, proxy, dbUrl);
    if (failed) {
      log(`---- connector log (artifacts/browser/connector.log) ----\n${connector.tail(60)}`);
      log(`---- writer log ----\n${writer.tail(20)}`);
    }
  } catch (e) {
    fail('setup', e && e.message ? e.message : e);
    for (const s of services) log(`---- ${s.name} log ----\n${s.tail(40)}`);
  } finally {
    if (proxy) await proxy.close();
    for (const s of services) await s.stop().catch((e) => log(`stopping ${s.name}: ${e}`));
    if (dbCreated && !KEEP_DB) {
      try {
        psql(DATABASE_URL, `DROP DATABASE IF EXISTS "${dbName}" WITH (FORCE);`);
        log(`dropped database ${dbName}`);
      } catch (e) {
        log(`could not drop database ${dbName}: ${e.message}`);
      }
    }
  }
  if (failures.length) {
    log('failures:');
    for (const f of failures) log('  ' + f);
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main();
