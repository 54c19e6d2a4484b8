// The chat page: the editable chat of the seed, on the relay, with the official centrifuge SDK.
//
// - Messages are rows of chat_data; the relay publishes every INSERT/UPDATE on `incoming-chat`. The page
//   loads the newest HISTORY_LIMIT publications (history, reverse, then shown oldest first) and follows
//   the live ones. Every publication carries its offset in the channel: one already applied (history
//   and live overlap, recovery after a reconnect) is skipped, so each change is applied once, in order.
// - After a reconnect the SDK resubscribes with recovery: missed publications arrive in order. When the
//   relay cannot recover (recovered=false: history pruned or reset), the page reloads history.
// - Sending publishes {"name":"chatMsg","data":{username,content}} on `outgoing-chat`; the relay hands
//   it to the writer, which inserts the row; the row comes back on `incoming-chat`. Editing publishes
//   "editedMsg"; the writer applies it only for the row's author (the row's client_id is the identity
//   of the connection that sent it: its client id, as this page connects anonymously). The page offers
//   "edit" only on rows of the current connection. The publish's answer is the writer's: success once
//   the row is updated, or an error with the writer's reason (420 rejected, 421 invalid, 422 not
//   handled), shown on the message at once.
// - Who is online: presence of `incoming-chat` (the subscribe request's `data` carries the name), kept
//   up to date by join/leave pushes.
(() => {
  'use strict';

  const INCOMING = 'incoming-chat';
  const OUTGOING = 'outgoing-chat';
  const HISTORY_LIMIT = 100;
  const NAME_KEY = 'relay-chat-username';

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  const state = {
    username: '',
    client: '', // the current connection's client id (the identity the writer records as client_id)
    myClients: new Set(), // every client id this page has had (its older messages stay "mine")
    everConnected: false,
    sub: null,
    rows: new Map(), // msg_id -> row
    items: new Map(), // msg_id -> <li>
    lastOffset: 0, // offset of the last publication applied
    historyLoaded: false,
    loading: false,
    buffered: [], // live publications that arrived while history was loading
    members: new Map(), // client id -> ClientInfo
    pendingEdits: new Map(), // msg_id -> {content} (published, the writer's answer not yet in)
    refused: new Map(), // msg_id -> reason
    applied: 0, // publications applied (for tests and the banner)
  };

  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/connection/websocket';
  const centrifuge = new Centrifuge(url, { minReconnectDelay: 200, maxReconnectDelay: 3000 });

  // ---- connection state --------------------------------------------------------------------------

  function setState(name, detail) {
    const s = $('state');
    s.textContent = name;
    s.dataset.state = name;
    s.className = 'state state-' + name;
    s.title = detail || '';
    const banner = $('banner');
    if (name === 'reconnecting') {
      banner.textContent = 'Connection lost, reconnecting… Messages sent meanwhile will be filled in.';
      banner.hidden = false;
    } else if (name === 'disconnected' && state.everConnected) {
      banner.textContent = 'Disconnected' + (detail ? ': ' + detail : '') + '.';
      banner.hidden = false;
    }
  }

  centrifuge.on('connecting', (ctx) => setState(state.everConnected ? 'reconnecting' : 'connecting', ctx.reason));
  centrifuge.on('connected', (ctx) => {
    state.client = ctx.client;
    state.myClients.add(ctx.client);
    state.everConnected = true;
    setState('connected');
    for (const id of state.rows.keys()) fill(id);
    renderMembers();
  });
  centrifuge.on('disconnected', (ctx) => setState('disconnected', ctx.reason));

  // ---- messages ----------------------------------------------------------------------------------

  /** Applies one publication of incoming-chat, unless it was applied already. */
  function applyPublication(data, offset) {
    if (offset && offset <= state.lastOffset) return;
    if (offset) state.lastOffset = offset;
    state.applied += 1;
    if (!data || data.table !== 'chat_data' || !data.row) return;
    const row = data.row;
    if (data.type === 'DELETE') {
      state.rows.delete(row.msg_id);
      const li = state.items.get(row.msg_id);
      if (li) li.remove();
      state.items.delete(row.msg_id);
      return;
    }
    const before = state.rows.get(row.msg_id);
    state.rows.set(row.msg_id, row);
    const pending = state.pendingEdits.get(row.msg_id);
    if (pending && data.type === 'UPDATE' && row.msg_data === pending.content) {
      state.pendingEdits.delete(row.msg_id);
      state.refused.delete(row.msg_id);
    }
    place(row, !before);
  }

  function onPublication(ctx) {
    if (state.loading) {
      state.buffered.push(ctx);
      return;
    }
    applyPublication(ctx.data, ctx.offset);
  }

  /** Loads the newest messages (history newest first, applied oldest first). */
  async function loadHistory() {
    state.loading = true;
    state.buffered = [];
    try {
      const h = await state.sub.history({ limit: HISTORY_LIMIT, reverse: true });
      state.rows.clear();
      state.items.clear();
      $('messages').replaceChildren();
      state.lastOffset = 0;
      for (const p of h.publications.slice().reverse()) applyPublication(p.data, p.offset);
      state.lastOffset = Math.max(state.lastOffset, h.offset || 0);
      state.historyLoaded = true;
    } catch (e) {
      showError('Could not load the history: ' + describe(e));
    } finally {
      state.loading = false;
      const live = state.buffered;
      state.buffered = [];
      for (const ctx of live) applyPublication(ctx.data, ctx.offset);
      renderEmpty();
      scrollToEnd(true);
    }
  }

  function recordId(row) {
    return Number(row.incremental_record_id || 0);
  }

  /** Creates or updates the list item of a row, keeping the list in record order. */
  function place(row, isNew) {
    const list = $('messages');
    let li = state.items.get(row.msg_id);
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    if (!li) {
      li = el('li', 'msg');
      li.dataset.msgId = row.msg_id;
      state.items.set(row.msg_id, li);
      let next = null;
      for (const other of list.children) {
        const r = state.rows.get(other.dataset.msgId);
        if (r && recordId(r) > recordId(row)) {
          next = other;
          break;
        }
      }
      list.insertBefore(li, next);
    }
    fill(row.msg_id);
    renderEmpty();
    if (isNew) scrollToEnd(atEnd || state.myClients.has(row.client_id));
  }

  /** (Re)draws one message. */
  function fill(msgId) {
    const row = state.rows.get(msgId);
    const li = state.items.get(msgId);
    if (!row || !li) return;
    const mine = state.myClients.has(row.client_id);
    const editable = row.client_id === state.client;
    li.classList.toggle('mine', mine);
    li.dataset.edited = row.is_edited ? 'true' : 'false';
    if (li.dataset.editing === '1') return;
    const meta = el('div', 'meta');
    meta.append(el('span', 'author', row.username));
    const t = el('time', '', new Date(Number(row.created_at_timestamp) || Date.now())
      .toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }));
    meta.append(t);
    if (row.is_edited) meta.append(el('span', 'edited', 'edited'));
    if (editable) {
      const b = el('button', 'link edit', 'edit');
      b.type = 'button';
      b.addEventListener('click', () => openEditor(msgId));
      meta.append(b);
    }
    const parts = [meta, el('div', 'text', row.msg_data)];
    if (state.pendingEdits.has(msgId)) parts.push(el('div', 'note', 'saving edit…'));
    if (state.refused.has(msgId)) parts.push(el('div', 'refused', state.refused.get(msgId)));
    li.replaceChildren(...parts);
  }

  function openEditor(msgId) {
    const row = state.rows.get(msgId);
    const li = state.items.get(msgId);
    if (!row || !li) return;
    li.dataset.editing = '1';
    const form = el('form', 'editor');
    const input = el('input');
    input.value = row.msg_data;
    input.maxLength = 2000;
    input.setAttribute('aria-label', 'Edit message');
    const save = el('button', '', 'Save');
    save.type = 'submit';
    const cancel = el('button', 'link', 'cancel');
    cancel.type = 'button';
    form.append(input, save, cancel);
    const close = () => {
      delete li.dataset.editing;
      fill(msgId);
    };
    cancel.addEventListener('click', close);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const content = input.value.trim();
      close();
      if (content && content !== row.msg_data) edit(msgId, content);
    });
    li.replaceChildren(li.querySelector('.meta') || el('div'), form);
    input.focus();
  }

  /** The relay's codes for a publication the writer refused (protocol/src/codes.rs). */
  const REFUSED = { 420: 'Edit refused', 421: 'Edit invalid', 422: 'Edit not handled' };

  /** Publishes an edit; the publish's answer is the writer's: applied, or refused with its reason. */
  async function edit(msgId, content) {
    state.refused.delete(msgId);
    state.pendingEdits.set(msgId, { content });
    fill(msgId);
    try {
      await centrifuge.publish(OUTGOING, {
        name: 'editedMsg',
        data: { username: state.username, content, msgIdToEdit: msgId },
      });
      // Applied: the UPDATE arrives on incoming-chat (it may already have).
      const row = state.rows.get(msgId);
      if (row && row.msg_data === content) state.pendingEdits.delete(msgId);
    } catch (e) {
      state.pendingEdits.delete(msgId);
      const refused = e && REFUSED[e.code];
      state.refused.set(msgId, refused ? refused + ': ' + e.message : 'Edit not saved: ' + describe(e));
    }
    fill(msgId);
  }

  async function send(content) {
    await centrifuge.publish(OUTGOING, { name: 'chatMsg', data: { username: state.username, content } });
  }

  function renderEmpty() {
    const list = $('messages');
    const empty = list.querySelector('.empty');
    if (state.rows.size === 0 && !empty && state.historyLoaded) {
      list.append(el('li', 'empty', 'No messages yet. Say hello!'));
    } else if (state.rows.size > 0 && empty) {
      empty.remove();
    }
  }

  function scrollToEnd(really) {
    if (!really) return;
    const list = $('messages');
    list.scrollTop = list.scrollHeight;
  }

  // ---- who is online ------------------------------------------------------------------------------

  function displayName(info) {
    const chan = info.chanInfo || info.chan_info;
    const conn = info.connInfo || info.conn_info;
    return (chan && chan.username) || (conn && (conn.name || conn.username)) || info.user || 'anonymous';
  }

  async function loadPresence() {
    const note = $('online-note');
    try {
      const r = await state.sub.presence();
      state.members.clear();
      for (const [id, info] of Object.entries(r.clients || {})) state.members.set(id, info);
      note.hidden = true;
    } catch (e) {
      note.textContent = 'Presence not available (' + describe(e) + ').';
      note.hidden = false;
    }
    renderMembers();
  }

  function renderMembers() {
    const byName = new Map();
    for (const [client, info] of state.members) {
      const name = displayName(info);
      const entry = byName.get(name) || { name, clients: [], me: false };
      entry.clients.push(client);
      entry.me = entry.me || client === state.client;
      byName.set(name, entry);
    }
    const items = [...byName.values()].sort((a, b) => (b.me - a.me) || a.name.localeCompare(b.name));
    $('online-list').replaceChildren(...items.map((m) => {
      const li = el('li', m.me ? 'me' : '');
      li.dataset.name = m.name;
      li.dataset.clients = m.clients.join(' ');
      li.append(el('span', 'dot'), document.createTextNode(m.name + (m.me ? ' (you)' : '')));
      if (m.clients.length > 1) li.append(el('span', 'note', ' ×' + m.clients.length));
      return li;
    }));
    $('online-count').textContent = String(items.length);
  }

  // ---- wiring -------------------------------------------------------------------------------------

  function describe(e) {
    if (!e) return 'unknown error';
    if (e.message) return e.message + (e.code ? ' (' + e.code + ')' : '');
    return String(e);
  }

  function showError(text) {
    const p = $('error');
    p.textContent = text;
    p.hidden = !text;
  }

  /** Runs an event handler; an exception must never escape into the SDK (it would stop the client). */
  const safe = (fn) => (ctx) => {
    try {
      fn(ctx);
    } catch (e) {
      console.error(e); // eslint-disable-line no-console
    }
  };

  function enter(name) {
    state.username = name;
    try { localStorage.setItem(NAME_KEY, name); } catch (_) { /* private mode */ }
    $('login').hidden = true;
    $('chat').hidden = false;
    $('state').hidden = false;
    $('online-toggle').hidden = false;
    const sub = centrifuge.newSubscription(INCOMING, {
      recoverable: true,
      positioned: true,
      joinLeave: true,
      data: { username: name },
    });
    state.sub = sub;
    sub.on('subscribed', safe((ctx) => {
      $('banner').hidden = true;
      const lost = ctx.wasRecovering && !ctx.recovered;
      if (!state.historyLoaded || lost || !ctx.wasRecovering) loadHistory();
      loadPresence();
    }));
    sub.on('publication', safe(onPublication));
    sub.on('join', safe((ctx) => {
      state.members.set(ctx.info.client, ctx.info);
      renderMembers();
    }));
    sub.on('leave', safe((ctx) => {
      state.members.delete(ctx.info.client);
      renderMembers();
    }));
    sub.on('unsubscribed', safe((ctx) => showError('Unsubscribed: ' + ctx.reason)));
    sub.on('error', safe((ctx) => showError('Subscription error: ' + describe(ctx.error))));
    sub.subscribe();
    centrifuge.connect();
    $('message').focus();
  }

  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = $('username').value.trim();
    if (name) enter(name);
  });

  $('send-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const input = $('message');
    const content = input.value.trim();
    if (!content) return;
    const button = $('send');
    button.disabled = true;
    try {
      await send(content);
      input.value = '';
      showError('');
    } catch (e) {
      showError('Not sent: ' + describe(e));
    } finally {
      button.disabled = false;
      input.focus();
    }
  });

  $('online-toggle').addEventListener('click', () => {
    const open = $('online').classList.toggle('open');
    $('online-toggle').setAttribute('aria-expanded', String(open));
  });

  try {
    const saved = localStorage.getItem(NAME_KEY);
    if (saved) $('username').value = saved;
  } catch (_) { /* private mode */ }

  // For tests and the curious: the page's state, and an edit that bypasses the UI's author check.
  window.chat = { state, edit, send, centrifuge };
})();
