// The chat page: rooms, direct messages and read receipts on the relay, with the official centrifuge SDK.
//
// - Identity: the page signs in with a name. The connector's demo token endpoint (POST /demo/token, on
//   in `scripts/run`, off in the shipped configs) answers a connection token whose `sub` is that name;
//   the SDK asks for a fresh one whenever it needs (getToken). The writer records the token's user as
//   the author, so the same person can edit their messages after a reconnect, in another tab, after a
//   reload. Only the name is kept (localStorage); "sign out" forgets it.
// - Rooms: rows of chat_rooms arrive on `rooms`; the messages of room R are rows of chat_messages,
//   published on `room:R` (the mapping's row template `room:{room_id}`). The page subscribes to every
//   room it knows (recoverable, positioned), so it counts unread messages of the rooms not shown. Each
//   room has its own history, recovery and presence (join/leave).
// - Direct messages: rows of chat_direct_messages on `dm#A,B` (A < B), a user-limited channel only A and
//   B may subscribe to. The writer announces a new conversation on each party's personal channel
//   `notifications#USER` ({"type":"conversation",…}); other notices there ({"text":…}, from a backend)
//   are shown at the top.
// - Receipts: "sent" once the writer stored the message (its row exists); "read" once the other side's
//   chat_receipts row (published on the same dm channel) has reached it. The page marks a conversation
//   read (readMsg) when it shows it.
// - Every publication carries its offset in its channel: one already applied (history and live
//   overlap, recovery after a reconnect) is skipped. After a reconnect the SDK recovers what was
//   missed; when the relay says recovered=false, the page reloads that channel's history. Older
//   messages load when the list is scrolled to the top (history before the oldest offset shown).
// - Every publish is answered by the writer: success, or an error with its reason (420 rejected,
//   421 invalid, 422 not handled), shown at once on the message or under the composer.
(() => {
  'use strict';

  const OUTGOING = 'outgoing-chat';
  const PAGE = 50; // publications per history read
  const NAME_KEY = 'relay-chat-user';
  const SEEN_KEY = 'relay-chat-seen:'; // + user: {channel: offset seen}
  const MAX_ROOMS = 60; // subscriptions per page stay below client.max_channels_per_connection

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const store = {
    get(k) { try { return localStorage.getItem(k); } catch (_) { return null; } },
    set(k, v) { try { localStorage.setItem(k, v); } catch (_) { /* private mode */ } },
    del(k) { try { localStorage.removeItem(k); } catch (_) { /* private mode */ } },
  };

  const state = {
    user: '',
    client: '',
    tokenError: '', // why the last token request failed
    connState: 'disconnected',
    everConnected: false,
    convs: new Map(), // channel -> conversation
    active: '', // channel shown
    seen: {}, // channel -> offset seen
  };

  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/connection/websocket';
  let centrifuge = null;

  // ---- sign-in ------------------------------------------------------------------------------------

  async function fetchToken() {
    let r;
    try {
      r = await fetch('/demo/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ user: state.user }),
      });
    } catch (e) {
      throw new Error('the server cannot be reached'); // temporary: the SDK tries again
    }
    if (r.status === 404) state.tokenError = 'sign-in is off on this server (demo.token_endpoint)';
    else if (!r.ok) state.tokenError = 'sign-in refused: ' + ((await r.text()) || r.status);
    else {
      state.tokenError = '';
      return (await r.json()).token;
    }
    throw new Centrifuge.UnauthorizedError(state.tokenError);
  }

  function signIn(name) {
    state.user = name;
    store.set(NAME_KEY, name);
    try { state.seen = JSON.parse(store.get(SEEN_KEY + name) || '{}') || {}; } catch (_) { state.seen = {}; }
    $('login').hidden = true;
    $('chat').hidden = false;
    for (const id of ['state', 'me', 'online-toggle', 'nav-toggle']) $(id).hidden = false;
    $('me-name').textContent = name;
    for (const e of document.querySelectorAll('.me-name')) e.textContent = name;
    centrifuge = new Centrifuge(url, { getToken: fetchToken, minReconnectDelay: 200, maxReconnectDelay: 3000 });
    centrifuge.on('connecting', (ctx) => setState(state.everConnected ? 'reconnecting' : 'connecting', ctx.reason));
    centrifuge.on('connected', (ctx) => {
      state.client = ctx.client;
      state.everConnected = true;
      setState('connected');
    });
    centrifuge.on('disconnected', (ctx) => setState('disconnected', ctx.reason + (ctx.code ? ' (' + ctx.code + ')' : '')));

    const rooms = centrifuge.newSubscription('rooms', { recoverable: true, positioned: true });
    rooms.on('subscribed', safe(async () => {
      try {
        const h = await rooms.history({ limit: 300, reverse: true });
        for (const p of h.publications.slice().reverse()) onRoomRow(p.data);
      } catch (e) {
        showNavError('Could not load the rooms: ' + describe(e));
      }
    }));
    rooms.on('publication', safe((ctx) => onRoomRow(ctx.data)));
    rooms.subscribe();

    // The personal channel: the writer announces new conversations here; a backend may notify too
    // (server API `broadcast`, or `relay.notify_users()` in SQL), e.g. {"text": "…"}.
    const personal = centrifuge.newSubscription('notifications#' + name, { recoverable: true, positioned: true });
    personal.on('subscribed', safe(async () => {
      try {
        const h = await personal.history({ limit: 300, reverse: true });
        for (const p of h.publications.slice().reverse()) onNotification(p.data, false);
      } catch (e) {
        showNavError('Could not load your conversations: ' + describe(e));
      }
    }));
    personal.on('publication', safe((ctx) => onNotification(ctx.data, true)));
    personal.subscribe();

    addRoom('general', 'General');
    open(location.hash.startsWith('#room:') && state.convs.has(location.hash.slice(1)) ? location.hash.slice(1) : 'room:general');
    centrifuge.connect();
  }

  function signOut(keepName) {
    store.del(NAME_KEY);
    if (centrifuge) centrifuge.disconnect();
    location.replace(location.pathname + (keepName ? '?name=' + encodeURIComponent(state.user) : ''));
  }

  // ---- connection state --------------------------------------------------------------------------

  function setState(name, detail) {
    state.connState = name;
    const s = $('state');
    s.textContent = name;
    s.dataset.state = name;
    s.className = 'state state-' + name;
    s.title = detail || '';
    const banner = $('banner');
    const again = $('reconnect');
    $('online').classList.toggle('stale', name !== 'connected');
    $('send').disabled = name !== 'connected';
    if (name === 'reconnecting') {
      $('banner-text').textContent = 'Connection lost, reconnecting… Messages sent meanwhile will be filled in.';
      again.hidden = true;
      banner.hidden = false;
    } else if (name === 'disconnected') {
      const why = state.tokenError || detail;
      $('banner-text').textContent = 'Disconnected' + (why ? ': ' + why : '') + '. ';
      again.hidden = false;
      banner.hidden = false;
    } else if (name === 'connected') {
      banner.hidden = true;
    }
  }

  function reconnect() {
    $('reconnect').hidden = true;
    $('banner-text').textContent = 'Reconnecting…';
    centrifuge.setToken(''); // a fresh token: the old one may be what ended the connection
    centrifuge.connect();
  }

  // ---- conversations ------------------------------------------------------------------------------

  function newConv(channel, kind, title, other) {
    return {
      channel, kind, title, other,
      sub: null,
      rows: new Map(), // msg_id -> row
      items: new Map(), // msg_id -> <li>
      lastOffset: 0,
      oldestOffset: 0,
      epoch: '',
      hasMore: false,
      historyLoaded: false,
      loading: false,
      loadingOlder: false,
      buffered: [],
      unread: 0,
      members: new Map(),
      theirReadSeq: 0, // dm: how far the other side has read
      myReadSeq: 0, // dm: how far I have read (as stored)
      readSent: 0, // dm: the newest seq a readMsg was published for
      refused: new Map(), // msg_id -> reason
      pendingEdits: new Map(), // msg_id -> content
    };
  }

  function onRoomRow(data) {
    if (!data || data.table !== 'chat_rooms' || !data.row) return;
    addRoom(data.row.room_id, data.row.title);
  }

  /** A publication of the personal channel: a new conversation, or a notice to show (live only). */
  function onNotification(data, live) {
    if (!data || typeof data !== 'object') return;
    if (data.type === 'conversation' && typeof data.user_a === 'string' && typeof data.user_b === 'string') {
      if (data.user_a === state.user || data.user_b === state.user) addDm(data.user_a === state.user ? data.user_b : data.user_a);
      return;
    }
    if (live && typeof data.text === 'string') {
      const n = $('notice');
      n.querySelector('span').textContent = data.text.slice(0, 500);
      n.hidden = false;
    }
  }

  function addRoom(roomId, title) {
    const channel = 'room:' + roomId;
    if (state.convs.has(channel)) return state.convs.get(channel);
    if ([...state.convs.values()].filter((c) => c.kind === 'room').length >= MAX_ROOMS) return null;
    const conv = newConv(channel, 'room', title || roomId, '');
    state.convs.set(channel, conv);
    subscribe(conv);
    renderNav();
    return conv;
  }

  function dmChannel(other) {
    const [a, b] = [state.user, other].sort();
    return 'dm#' + a + ',' + b;
  }

  function addDm(other) {
    const channel = dmChannel(other);
    if (state.convs.has(channel)) return state.convs.get(channel);
    const conv = newConv(channel, 'dm', other, other);
    state.convs.set(channel, conv);
    subscribe(conv);
    renderNav();
    return conv;
  }

  function subscribe(conv) {
    const sub = centrifuge.newSubscription(conv.channel, {
      recoverable: true,
      positioned: true,
      joinLeave: conv.kind === 'room',
    });
    conv.sub = sub;
    sub.on('subscribed', safe((ctx) => {
      conv.error = '';
      const lost = ctx.wasRecovering && !ctx.recovered;
      if (ctx.streamPosition) conv.epoch = ctx.streamPosition.epoch;
      if (!conv.historyLoaded || lost || !ctx.wasRecovering) loadHistory(conv);
      if (conv.kind === 'room') loadPresence(conv);
      if (conv.channel === state.active) renderHeader();
    }));
    sub.on('publication', safe((ctx) => {
      if (conv.loading) conv.buffered.push(ctx);
      else apply(conv, ctx.data, ctx.offset, true);
    }));
    sub.on('join', safe((ctx) => {
      conv.members.set(ctx.info.client, ctx.info);
      if (conv.channel === state.active) renderMembers();
    }));
    sub.on('leave', safe((ctx) => {
      conv.members.delete(ctx.info.client);
      if (conv.channel === state.active) renderMembers();
    }));
    sub.on('unsubscribed', safe((ctx) => {
      conv.error = 'Unsubscribed: ' + ctx.reason + (ctx.code ? ' (' + ctx.code + ')' : '');
      if (conv.channel === state.active) showError(conv.error);
    }));
    sub.on('error', safe((ctx) => {
      if (conv.channel === state.active) showError('Subscription error: ' + describe(ctx.error));
    }));
    sub.subscribe();
  }

  /** Loads the newest PAGE publications of a conversation (newest first, applied oldest first). */
  async function loadHistory(conv) {
    conv.loading = true;
    conv.buffered = [];
    try {
      const h = await conv.sub.history({ limit: PAGE, reverse: true });
      conv.rows.clear();
      conv.items.clear();
      conv.lastOffset = 0;
      conv.epoch = h.epoch || conv.epoch;
      const pubs = h.publications.slice().reverse();
      conv.oldestOffset = pubs.length ? pubs[0].offset : 0;
      conv.hasMore = conv.oldestOffset > 1;
      conv.unread = 0;
      const seen = state.seen[conv.channel] || 0;
      for (const p of pubs) apply(conv, p.data, p.offset, p.offset > seen);
      conv.lastOffset = Math.max(conv.lastOffset, h.offset || 0);
      conv.historyLoaded = true;
    } catch (e) {
      conv.error = 'Could not load the history: ' + describe(e);
      if (conv.channel === state.active) showError(conv.error);
    } finally {
      conv.loading = false;
      const live = conv.buffered;
      conv.buffered = [];
      for (const ctx of live) apply(conv, ctx.data, ctx.offset, true);
      if (conv.channel === state.active) {
        renderMessages();
        markSeen(conv);
      }
      renderNav();
    }
  }

  /** Loads the PAGE publications before the oldest one shown (history paging). */
  async function loadOlder(conv) {
    if (conv.loadingOlder || !conv.hasMore || !conv.historyLoaded) return;
    conv.loadingOlder = true;
    const list = $('messages');
    const fromBottom = list.scrollHeight - list.scrollTop;
    try {
      const h = await conv.sub.history({ limit: PAGE, reverse: true, since: { offset: conv.oldestOffset, epoch: conv.epoch } });
      const pubs = h.publications.slice().reverse();
      if (pubs.length) conv.oldestOffset = pubs[0].offset;
      conv.hasMore = pubs.length > 0 && conv.oldestOffset > 1;
      for (const p of pubs) applyRow(conv, p.data, false);
      if (conv.channel === state.active) {
        renderMessages();
        list.scrollTop = list.scrollHeight - fromBottom;
      }
    } catch (e) {
      showError('Could not load older messages: ' + describe(e));
    } finally {
      conv.loadingOlder = false;
    }
  }

  /** Applies one publication of a conversation once (by offset); counts it unread when new. */
  function apply(conv, data, offset, fresh) {
    if (offset && offset <= conv.lastOffset) return;
    if (offset) conv.lastOffset = offset;
    const isNewMessage = applyRow(conv, data, true);
    const active = conv.channel === state.active && !document.hidden;
    if (isNewMessage && fresh && !active && authorOf(data.row) !== state.user) conv.unread += 1;
    if (conv.loading) return;
    if (conv.channel === state.active) {
      placeRow(conv, data);
      markSeen(conv);
    } else if (isNewMessage) {
      renderNav();
    }
  }

  function authorOf(row) {
    return row ? (row.author || row.sender || '') : '';
  }

  /** Updates the conversation's model from one row change; true when it is a new message. */
  function applyRow(conv, data, live) {
    if (!data || !data.row) return false;
    const row = data.row;
    if (data.table === 'chat_receipts') {
      if (row.reader === state.user) conv.myReadSeq = Math.max(conv.myReadSeq, Number(row.read_seq));
      else conv.theirReadSeq = Math.max(conv.theirReadSeq, Number(row.read_seq));
      if (conv.channel === state.active && live) for (const id of conv.rows.keys()) fill(conv, id);
      return false;
    }
    if (data.table !== 'chat_messages' && data.table !== 'chat_direct_messages') return false;
    if (data.type === 'DELETE') {
      conv.rows.delete(row.msg_id);
      return false;
    }
    const before = conv.rows.get(row.msg_id);
    if (before && !live && Number(before.seq) >= Number(row.seq) && before.updated_at >= row.updated_at) return false;
    conv.rows.set(row.msg_id, row);
    const pending = conv.pendingEdits.get(row.msg_id);
    if (pending !== undefined && row.body === pending) {
      conv.pendingEdits.delete(row.msg_id);
      conv.refused.delete(row.msg_id);
    }
    return !before && data.type === 'INSERT';
  }

  // ---- rendering ------------------------------------------------------------------------------------

  function sortedRows(conv) {
    return [...conv.rows.values()].sort((x, y) => Number(x.seq) - Number(y.seq));
  }

  function renderMessages() {
    const conv = state.convs.get(state.active);
    const list = $('messages');
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.replaceChildren();
    conv.items.clear();
    if (conv.hasMore) list.append(el('li', 'older', 'Scroll up for older messages'));
    for (const row of sortedRows(conv)) {
      const li = el('li', 'msg');
      li.dataset.msgId = row.msg_id;
      conv.items.set(row.msg_id, li);
      list.append(li);
      fill(conv, row.msg_id);
    }
    if (conv.rows.size === 0 && conv.historyLoaded) {
      list.append(el('li', 'empty', conv.kind === 'dm' ? 'No messages yet. Say hello to ' + conv.other + '!' : 'No messages yet. Say hello!'));
    }
    if (atEnd || !list.dataset.shown || list.dataset.shown !== conv.channel) list.scrollTop = list.scrollHeight;
    list.dataset.shown = conv.channel;
    // Nothing to scroll yet, but older messages exist: load them now.
    if (conv.hasMore && list.scrollHeight <= list.clientHeight) setTimeout(() => loadOlder(conv), 0);
  }

  /** Creates or updates the list item of a row of the active conversation, in seq order. */
  function placeRow(conv, data) {
    if (!data || !data.row || !data.row.msg_id) return;
    const row = conv.rows.get(data.row.msg_id);
    if (!row) return;
    const list = $('messages');
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    let li = conv.items.get(row.msg_id);
    if (!li) {
      const empty = list.querySelector('.empty');
      if (empty) empty.remove();
      li = el('li', 'msg');
      li.dataset.msgId = row.msg_id;
      conv.items.set(row.msg_id, li);
      let next = null;
      for (const other of list.querySelectorAll('li.msg')) {
        const r = conv.rows.get(other.dataset.msgId);
        if (r && Number(r.seq) > Number(row.seq)) {
          next = other;
          break;
        }
      }
      list.insertBefore(li, next);
      fill(conv, row.msg_id);
      if (atEnd || authorOf(row) === state.user) list.scrollTop = list.scrollHeight;
    } else {
      fill(conv, row.msg_id);
    }
  }

  function when(ms) {
    const d = new Date(Number(ms) || Date.now());
    const now = new Date();
    const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    if (d.toDateString() === now.toDateString()) return time;
    const sameYear = d.getFullYear() === now.getFullYear();
    return d.toLocaleDateString([], sameYear ? { day: 'numeric', month: 'short' } : { day: 'numeric', month: 'short', year: 'numeric' }) + ' ' + time;
  }

  /** (Re)draws one message of the active conversation. */
  function fill(conv, msgId) {
    const row = conv.rows.get(msgId);
    const li = conv.items.get(msgId);
    if (!row || !li) return;
    const mine = authorOf(row) === state.user;
    li.classList.toggle('mine', mine);
    li.dataset.edited = row.is_edited ? 'true' : 'false';
    if (li.dataset.editing === '1') return;
    const meta = el('div', 'meta');
    meta.append(el('span', 'author', authorOf(row)));
    const t = el('time', '', when(row.created_at_ms));
    t.dateTime = new Date(Number(row.created_at_ms) || 0).toISOString();
    meta.append(t);
    if (row.is_edited) meta.append(el('span', 'edited', 'edited'));
    if (mine) {
      const read = conv.kind === 'dm' && conv.theirReadSeq >= Number(row.seq);
      const receipt = el('span', 'receipt ' + (read ? 'read' : 'sent'), read ? 'read' : 'sent');
      li.dataset.receipt = read ? 'read' : 'sent';
      meta.append(receipt);
      const b = el('button', 'link edit', 'edit');
      b.type = 'button';
      b.addEventListener('click', () => openEditor(conv, msgId));
      meta.append(b);
    }
    const parts = [meta, el('div', 'text', row.body)];
    if (conv.pendingEdits.has(msgId)) parts.push(el('div', 'note', 'saving edit…'));
    if (conv.refused.has(msgId)) parts.push(el('div', 'refused', conv.refused.get(msgId)));
    li.replaceChildren(...parts);
  }

  function openEditor(conv, msgId) {
    const row = conv.rows.get(msgId);
    const li = conv.items.get(msgId);
    if (!row || !li) return;
    li.dataset.editing = '1';
    const form = el('form', 'editor');
    const input = el('input');
    input.value = row.body;
    input.maxLength = 2000;
    input.setAttribute('aria-label', 'Edit message');
    const save = el('button', '', 'Save');
    save.type = 'submit';
    const cancel = el('button', 'link', 'cancel');
    cancel.type = 'button';
    form.append(input, save, cancel);
    const close = () => {
      delete li.dataset.editing;
      fill(conv, msgId);
    };
    cancel.addEventListener('click', close);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const content = input.value.trim();
      close();
      if (content && content !== row.body) edit(msgId, content, conv.channel);
    });
    li.replaceChildren(li.querySelector('.meta') || el('div'), form);
    input.focus();
  }

  function renderHeader() {
    const conv = state.convs.get(state.active);
    if (!conv) return;
    $('conv-title').textContent = conv.kind === 'room' ? '# ' + conv.title : '@ ' + conv.other;
    $('online').hidden = conv.kind !== 'room';
    $('online-toggle').hidden = conv.kind !== 'room';
    showError(conv.error || '');
  }

  function renderNav() {
    const item = (conv) => {
      const li = el('li', conv.channel === state.active ? 'active' : '');
      const b = el('button', 'conv', conv.kind === 'room' ? '# ' + conv.title : '@ ' + conv.other);
      b.type = 'button';
      b.dataset.channel = conv.channel;
      b.addEventListener('click', () => open(conv.channel));
      li.append(b);
      if (conv.unread > 0) {
        const badge = el('span', 'unread', String(conv.unread));
        badge.setAttribute('aria-label', conv.unread + ' unread');
        li.append(badge);
      }
      li.dataset.channel = conv.channel;
      li.dataset.unread = String(conv.unread);
      return li;
    };
    const convs = [...state.convs.values()];
    const rooms = convs.filter((c) => c.kind === 'room').sort((a, b) => (a.channel === 'room:general' ? -1 : b.channel === 'room:general' ? 1 : a.title.localeCompare(b.title)));
    const dms = convs.filter((c) => c.kind === 'dm').sort((a, b) => a.other.localeCompare(b.other));
    $('room-list').replaceChildren(...rooms.map(item));
    $('dm-list').replaceChildren(...dms.map(item));
    const total = convs.reduce((n, c) => n + c.unread, 0);
    document.title = (total ? '(' + total + ') ' : '') + 'pg-relay chat';
  }

  function open(channel) {
    const conv = state.convs.get(channel);
    if (!conv) return;
    state.active = channel;
    if (location.hash !== '#' + channel) history.replaceState(null, '', '#' + channel);
    $('nav').classList.remove('open');
    $('nav-toggle').setAttribute('aria-expanded', 'false');
    renderHeader();
    renderMessages();
    renderMembers();
    markSeen(conv);
    renderNav();
  }

  /** The active conversation is seen: unread 0, the offset remembered, and a DM marked read. */
  function markSeen(conv) {
    if (conv.channel !== state.active || document.hidden || !conv.historyLoaded) return;
    conv.unread = 0;
    if ((state.seen[conv.channel] || 0) < conv.lastOffset) {
      state.seen[conv.channel] = conv.lastOffset;
      store.set(SEEN_KEY + state.user, JSON.stringify(state.seen));
    }
    renderNav();
    if (conv.kind !== 'dm') return;
    let newest = null;
    for (const row of conv.rows.values()) {
      if (row.recipient === state.user && (!newest || Number(row.seq) > Number(newest.seq))) newest = row;
    }
    if (!newest) return;
    const seq = Number(newest.seq);
    if (seq <= conv.myReadSeq || seq <= conv.readSent || state.connState !== 'connected') return;
    conv.readSent = seq;
    centrifuge.publish(OUTGOING, { name: 'readMsg', data: { msgId: newest.msg_id } }).catch((e) => {
      conv.readSent = 0;
      console.warn('readMsg', describe(e)); // eslint-disable-line no-console
    });
  }

  // ---- who is online (the active room) -------------------------------------------------------------

  function displayName(info) {
    const conn = info.connInfo || info.conn_info;
    return info.user || (conn && conn.name) || 'anonymous';
  }

  async function loadPresence(conv) {
    try {
      const r = await conv.sub.presence();
      conv.members.clear();
      for (const [id, info] of Object.entries(r.clients || {})) conv.members.set(id, info);
      conv.presenceError = '';
    } catch (e) {
      conv.presenceError = 'Presence not available (' + describe(e) + ').';
    }
    if (conv.channel === state.active) renderMembers();
  }

  function renderMembers() {
    const conv = state.convs.get(state.active);
    if (!conv) return;
    const note = $('online-note');
    note.textContent = conv.presenceError || '';
    note.hidden = !conv.presenceError;
    const byName = new Map();
    for (const [client, info] of conv.members) {
      const name = displayName(info);
      const entry = byName.get(name) || { name, clients: [], me: false };
      entry.clients.push(client);
      entry.me = entry.me || name === state.user;
      byName.set(name, entry);
    }
    const items = [...byName.values()].sort((a, b) => (b.me - a.me) || a.name.localeCompare(b.name));
    $('online-list').replaceChildren(...items.map((m) => {
      const li = el('li', m.me ? 'me' : '');
      li.dataset.name = m.name;
      li.append(el('span', 'dot'), document.createTextNode(m.name + (m.me ? ' (you)' : '')));
      if (m.clients.length > 1) li.append(el('span', 'note', ' ×' + m.clients.length));
      if (!m.me) {
        const w = el('button', 'link', 'message');
        w.type = 'button';
        w.addEventListener('click', () => open(addDm(m.name).channel));
        li.append(w);
      }
      return li;
    }));
    $('online-count').textContent = String(items.length);
  }

  // ---- publishing ----------------------------------------------------------------------------------

  /** The relay's codes for a publication the writer refused (protocol/src/codes.rs). */
  const REFUSED = { 420: 'refused', 421: 'invalid', 422: 'not handled' };

  function refusal(what, e) {
    const kind = e && REFUSED[e.code];
    return kind ? what + ' ' + kind + ': ' + e.message : what + ' failed: ' + describe(e);
  }

  /** Publishes an edit; the publish's answer is the writer's: applied, or refused with its reason. */
  async function edit(msgId, content, channel) {
    const conv = state.convs.get(channel || state.active);
    conv.refused.delete(msgId);
    conv.pendingEdits.set(msgId, content);
    fill(conv, msgId);
    try {
      await centrifuge.publish(OUTGOING, { name: 'editMsg', data: { msgId, content } });
      const row = conv.rows.get(msgId);
      if (row && row.body === content) conv.pendingEdits.delete(msgId);
    } catch (e) {
      conv.pendingEdits.delete(msgId);
      conv.refused.set(msgId, refusal('Edit', e));
    }
    fill(conv, msgId);
  }

  async function send(content) {
    const conv = state.convs.get(state.active);
    if (conv.kind === 'room') {
      await centrifuge.publish(OUTGOING, { name: 'roomMsg', data: { roomId: conv.channel.slice(5), content } });
    } else {
      await centrifuge.publish(OUTGOING, { name: 'directMsg', data: { to: conv.other, content } });
    }
  }

  function slug(name) {
    return name.toLowerCase().replace(/[^a-z0-9_-]+/g, '-').replace(/^[-_]+|-+$/g, '').slice(0, 40);
  }

  async function createRoom(name) {
    const roomId = slug(name);
    if (!roomId) throw new Error('a room name needs a letter or digit');
    await centrifuge.publish(OUTGOING, { name: 'createRoom', data: { roomId, title: name } });
    const conv = addRoom(roomId, name);
    if (!conv) throw new Error('too many rooms on this page');
    open(conv.channel);
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

  function showNavError(text) {
    const p = $('nav-error');
    p.textContent = text;
    p.hidden = !text;
  }

  /** Runs an event handler; an exception must never escape into the SDK (it would stop the client). */
  function safe(fn) {
    return (ctx) => {
      try {
        const r = fn(ctx);
        if (r && r.catch) r.catch((e) => console.error(e)); // eslint-disable-line no-console
      } catch (e) {
        console.error(e); // eslint-disable-line no-console
      }
    };
  }

  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = $('username').value.trim();
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) {
      $('login-error').textContent = "Use 1-64 letters, digits, '_', '-' or '.'.";
      $('login-error').hidden = false;
      return;
    }
    signIn(name);
  });

  $('send-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const input = $('message');
    const content = input.value.trim();
    if (!content) return;
    if (state.connState !== 'connected') {
      showError('Not connected: the message was not sent.');
      return;
    }
    const button = $('send');
    button.disabled = true;
    // Shown at once as "sending…", until the writer answers: then the row (with "sent") replaces it,
    // or it stays with the writer's refusal.
    const pending = el('li', 'pending mine');
    const meta = el('div', 'meta');
    meta.append(el('span', 'author', state.user), el('span', 'receipt', 'sending…'));
    pending.append(meta, el('div', 'text', content));
    const list = $('messages');
    list.append(pending);
    list.scrollTop = list.scrollHeight;
    try {
      await send(content);
      pending.remove();
      input.value = '';
      showError('');
    } catch (e) {
      const why = refusal('Not sent: message', e);
      pending.classList.add('failed');
      pending.querySelector('.receipt').textContent = 'not sent';
      pending.append(el('div', 'refused', why));
      showError(why);
    } finally {
      button.disabled = state.connState !== 'connected';
      input.focus();
    }
  });

  $('room-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const name = $('room-name').value.trim();
    if (!name) return;
    try {
      await createRoom(name);
      $('room-name').value = '';
      showNavError('');
    } catch (e) {
      showNavError(refusal('Room', e));
    }
  });

  $('dm-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const other = $('dm-user').value.trim();
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(other) || other === state.user) {
      showNavError("Write to another user: 1-64 letters, digits, '_', '-' or '.'.");
      return;
    }
    $('dm-user').value = '';
    showNavError('');
    open(addDm(other).channel);
    $('message').focus();
  });

  $('messages').addEventListener('scroll', () => {
    const conv = state.convs.get(state.active);
    if (conv && $('messages').scrollTop < 60) loadOlder(conv);
  });
  document.addEventListener('visibilitychange', () => {
    const conv = state.convs.get(state.active);
    if (conv && !document.hidden) markSeen(conv);
  });
  $('reconnect').addEventListener('click', reconnect);
  $('notice-close').addEventListener('click', () => { $('notice').hidden = true; });
  for (const b of document.querySelectorAll('#sign-out, [data-action="sign-out"]')) b.addEventListener('click', () => signOut(false));
  for (const b of document.querySelectorAll('#rename, [data-action="rename"]')) b.addEventListener('click', () => signOut(true));
  $('online-toggle').addEventListener('click', () => {
    const open = $('online').classList.toggle('open');
    $('online-toggle').setAttribute('aria-expanded', String(open));
  });
  $('nav-toggle').addEventListener('click', () => {
    const open = $('nav').classList.toggle('open');
    $('nav-toggle').setAttribute('aria-expanded', String(open));
  });

  const params = new URLSearchParams(location.search);
  const saved = store.get(NAME_KEY);
  if (params.get('name')) {
    $('username').value = params.get('name');
    history.replaceState(null, '', location.pathname);
  } else if (saved) {
    signIn(saved);
  }

  // For tests and the curious: the page's state, an edit that bypasses the UI's author check, opening a
  // conversation.
  window.chat = {
    state, edit, send, open, addDm, addRoom,
    get centrifuge() { return centrifuge; },
  };
})();
