// Run-time bindings of centrifuge-js's own test suite to the relay: a jest `setupFilesAfterEnv`
// module, given to upstream's jest on the command line by run_js.py (never by hand; upstream's
// files are not changed). It runs before each upstream test file, in that file's module registry,
// so the modules it patches are the very ones the test file imports.
//
// Upstream's suite is written for the Centrifugo of its centrifugo_test.json; two of that file's
// secrets are too short for the relay, which refuses HMAC keys under 32 bytes and API keys under 16
// characters. They are bound here the way a configuration file would bind them:
//
//   - tokens: a connection or subscription token that the SDK is about to put in a `connect` or
//     `subscribe` command is checked against upstream's HMAC key; if upstream's Centrifugo would
//     accept its signature (HS256 with that key), the same header and claims, byte for byte, are
//     signed with the relay's key. Any other token (bad signature, other algorithm, not a JWT)
//     goes out unchanged, so a token upstream's server would refuse is refused by the relay too.
//   - the server API key: a request of undici's `fetch` to upstream's API (http://localhost:8000/api…)
//     that carries upstream's key in `X-API-Key` carries the relay's key instead; other requests
//     are untouched.
//
// It also counts, per test, the connections opened to port 8000 (the relay's port in the network
// namespace run_js.py creates) and the writes on them, so the runner can tell the cases that
// reached the relay from the SDK-only ones (unit tests that never touch a server). Counts go, one JSON line
// per test, to the file named by RELAY_UPSTREAM_JS_CONNS.
//
// Environment (set by run_js.py): RELAY_UPSTREAM_JS_CHECKOUT (the upstream tree),
// RELAY_UPSTREAM_JS_UPSTREAM_HMAC / RELAY_UPSTREAM_JS_RELAY_HMAC (the two token keys),
// RELAY_UPSTREAM_JS_UPSTREAM_API_KEY / RELAY_UPSTREAM_JS_RELAY_API_KEY, RELAY_UPSTREAM_JS_CONNS.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const path = require('path');

const RELAY_PORT = 8000;
const UPSTREAM_API_PREFIXES = ['http://localhost:8000/api', 'http://127.0.0.1:8000/api'];

function env(name) {
  const v = process.env[name];
  if (!v) {
    throw new Error(`bind.cjs: ${name} is not set (this file is run by tests-sdk/upstream/js/run_js.py)`);
  }
  return v;
}

const checkout = env('RELAY_UPSTREAM_JS_CHECKOUT');
const upstreamHmac = env('RELAY_UPSTREAM_JS_UPSTREAM_HMAC');
const relayHmac = env('RELAY_UPSTREAM_JS_RELAY_HMAC');
const upstreamApiKey = env('RELAY_UPSTREAM_JS_UPSTREAM_API_KEY');
const relayApiKey = env('RELAY_UPSTREAM_JS_RELAY_API_KEY');
const connsFile = env('RELAY_UPSTREAM_JS_CONNS');

// ---- tokens -------------------------------------------------------------------------------------

function hs256(key, signingInput) {
  return crypto.createHmac('sha256', key).update(signingInput).digest('base64url');
}

/** The token signed with the relay's key when upstream's key signed it; otherwise unchanged. */
function rebind(token) {
  if (typeof token !== 'string' || token === '') {
    return token;
  }
  const parts = token.split('.');
  if (parts.length !== 3) {
    return token;
  }
  let header;
  try {
    header = JSON.parse(Buffer.from(parts[0], 'base64url').toString('utf8'));
  } catch (_) {
    return token;
  }
  if (!header || header.alg !== 'HS256') {
    return token;
  }
  const input = `${parts[0]}.${parts[1]}`;
  const want = Buffer.from(hs256(upstreamHmac, input));
  const got = Buffer.from(parts[2]);
  if (want.length !== got.length || !crypto.timingSafeEqual(want, got)) {
    return token;
  }
  return `${input}.${hs256(relayHmac, input)}`;
}

function patchMethod(proto, name, owner, wrap) {
  const original = proto[name];
  if (typeof original !== 'function') {
    throw new Error(`bind.cjs: ${owner}.prototype.${name} is not a function in this centrifuge-js; ` +
      'the token binding needs updating for it');
  }
  if (original.__relayBound) {
    return;
  }
  const patched = wrap(original);
  patched.__relayBound = true;
  proto[name] = patched;
}

const { Centrifuge } = require(path.join(checkout, 'src', 'centrifuge'));
const { Subscription } = require(path.join(checkout, 'src', 'subscription'));

// The connect command (every transport builds it here, whatever the token's source: `token`,
// `getToken` or `setToken`).
patchMethod(Centrifuge.prototype, '_constructConnectCommand', 'Centrifuge', (original) =>
  function constructConnectCommand(...args) {
    const cmd = original.apply(this, args); // { connect: { token, ... } }
    const req = cmd && cmd.connect;
    if (!req || typeof req !== 'object') {
      throw new Error('bind.cjs: _constructConnectCommand returned no `connect` request');
    }
    if (typeof req.token === 'string') {
      req.token = rebind(req.token);
    }
    return cmd;
  });

// The subscribe command of a stream subscription (the token is its first argument).
patchMethod(Subscription.prototype, '_buildSubscribeCommand', 'Subscription', (original) =>
  function buildSubscribeCommand(token, ...rest) {
    return original.call(this, rebind(token), ...rest);
  });

// ---- the server API key ---------------------------------------------------------------------------

// The checkout's undici, resolved as upstream's test files resolve it (the same module instance).
const undici = require(path.join(checkout, 'node_modules', 'undici'));
if (!undici.fetch.__relayBound) {
  const originalFetch = undici.fetch;
  const boundFetch = function fetch(input, init) {
    const url = typeof input === 'string' ? input : (input && input.url) || '';
    if (UPSTREAM_API_PREFIXES.some((p) => url.startsWith(p)) && init && init.headers &&
        !Array.isArray(init.headers) && typeof init.headers === 'object' &&
        init.headers['X-API-Key'] === upstreamApiKey) {
      init = { ...init, headers: { ...init.headers, 'X-API-Key': relayApiKey } };
    }
    return originalFetch.call(this, input, init);
  };
  boundFetch.__relayBound = true;
  undici.fetch = boundFetch;
}

// ---- traffic to the relay, per test ------------------------------------------------------------

// Sockets are pooled (undici keeps connections alive between tests), so what is counted is the
// connections opened to the relay's port and the writes on them. `net` is Node's own module,
// shared by every test file of the worker: patched once, the counter kept on the patched function.
let counter = net.Socket.prototype.connect.__relayCounter;
if (!counter) {
  counter = { n: 0 };
  const originalConnect = net.Socket.prototype.connect;
  const originalWrite = net.Socket.prototype.write;
  const countingConnect = function connect(...args) {
    let opts = args[0];
    if (Array.isArray(opts)) {
      opts = opts[0]; // net.connect passes its normalized [options, callback]
    }
    const port = opts !== null && typeof opts === 'object' ? opts.port : opts;
    if (Number(port) === RELAY_PORT) {
      this.__relaySocket = true;
      counter.n += 1;
    }
    return originalConnect.apply(this, args);
  };
  countingConnect.__relayCounter = counter;
  net.Socket.prototype.connect = countingConnect;
  net.Socket.prototype.write = function write(...args) {
    if (this.__relaySocket) {
      counter.n += 1;
    }
    return originalWrite.apply(this, args);
  };
}

beforeEach(() => {
  counter.n = 0;
});

afterEach(() => {
  const state = expect.getState();
  const line = JSON.stringify({
    file: state.testPath,
    test: state.currentTestName,
    relay_traffic: counter.n,
  });
  fs.appendFileSync(connsFile, line + '\n');
});
