//! Presence: who is subscribed to a channel, on every connector node, with join and leave pushes.
//!
//! A member is a subscription to a channel that has presence (`presence.channels[]` in the
//! configuration): the pair (client id, user) with the connection's `conn_info` (token `info`) and the
//! subscription's `chan_info` (subscription token `info`, or — where the entry allows it — the
//! subscribe request's `data`, as a display name). Members live in PostgreSQL (`relay.presence`,
//! migration 0006), so `presence` and `presence_stats` answer the same on every node, and
//! `presence.channels[].max_members` caps a channel across nodes.
//!
//! When members go:
//! - unsubscribe, or a connection that closes (the client closed it, its process was killed and the OS
//!   reset the socket, the server closed it): at once (the session's end removes its memberships);
//! - a connection whose peer vanished without a FIN (network cut): when the server notices — the pong
//!   deadline (`client.ping_interval_secs` + `client.pong_timeout_secs`, 25 + 10 s by default) or a
//!   failed write;
//! - a node that died (SIGKILL, lost host): its heartbeat (every `node_ttl_secs` / 3) stops, its members
//!   drop out of presence after `presence.node_ttl_secs` (default 15 s) and the next heartbeat of any
//!   node announces their leave.
//!
//! Join and leave events travel to every node by `pg_notify('relay_presence')` from the transaction
//! that changes the table. Each node keeps one LISTEN connection for them (this module's task) and
//! pushes `join` / `leave` to its subscribers that asked for them (`join_leave` in subscribe, allowed by
//! the channel's entry). Like Centrifugo's, these pushes are best-effort: while a node's LISTEN
//! connection is down it misses events; presence queries stay exact. The same notification channel
//! carries the server API's `disconnect` orders.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_protocol::channel::ChannelPattern;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// The `presence` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    /// Seconds a node's members stay visible after its last heartbeat (default 15; heartbeats every
    /// third of it). The longest a dead node's members linger.
    #[serde(default = "default_node_ttl")]
    pub node_ttl_secs: u64,
    /// Channels with presence, by pattern (first match wins); other channels answer presence with 108.
    #[serde(default)]
    pub channels: Vec<PresenceRule>,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            node_ttl_secs: default_node_ttl(),
            channels: Vec::new(),
        }
    }
}

fn default_node_ttl() -> u64 {
    15
}

fn yes() -> bool {
    true
}

/// Presence settings of the channels that match `channel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceRule {
    /// Channel pattern (`*` matches any run of characters).
    pub channel: String,
    /// Subscriptions that ask for `join_leave` get join and leave pushes (default true).
    #[serde(default = "yes")]
    pub join_leave: bool,
    /// Most members of one channel (0 = no cap, the default); a subscribe over it gets error 106.
    #[serde(default)]
    pub max_members: u32,
    /// Without a subscription token, the subscribe request's `data` (a JSON object of at most 1 KiB)
    /// becomes the member's `chan_info`: a display name that the client declares, as the chat page
    /// does for anonymous users (default false).
    #[serde(default)]
    pub info_from_subscribe_data: bool,
}

impl PresenceConfig {
    /// The entry for `channel`, if it has presence.
    pub fn rule_for(&self, channel: &str) -> Option<&PresenceRule> {
        self.channels
            .iter()
            .find(|r| ChannelPattern::new(&r.channel).matches(channel))
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(3..=3600).contains(&self.node_ttl_secs) {
            return Err((
                "presence.node_ttl_secs".into(),
                format!("{} is out of range 3..=3600", self.node_ttl_secs),
            ));
        }
        for (i, r) in self.channels.iter().enumerate() {
            if r.channel.is_empty()
                || r.channel.len() > 255
                || !r.channel.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err((
                    format!("presence.channels[{i}].channel"),
                    "must be 1-255 printable ASCII characters without spaces".into(),
                ));
            }
            if r.max_members > 1_000_000 {
                return Err((
                    format!("presence.channels[{i}].max_members"),
                    format!("{} is out of range 0..=1000000", r.max_members),
                ));
            }
        }
        Ok(())
    }
}

/// A member of a channel's presence.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// The user ("" when anonymous).
    pub user: String,
    /// The connection's client id.
    pub client: String,
    /// Connection info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Arc<RawValue>>,
    /// Channel info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Arc<RawValue>>,
}

impl Member {
    /// The member as a `ClientInfo` JSON value.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// A server-API order to close connections of a user, carried to every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisconnectOrder {
    /// The user whose connections close.
    pub user: String,
    /// Only this connection, if set.
    pub client: Option<String>,
    /// Connections kept.
    pub whitelist: Vec<String>,
    /// Close code (3000–4999).
    pub code: u32,
    /// Close reason.
    pub reason: String,
}

/// What a session gives presence so that a `disconnect` order can reach it.
#[derive(Debug, Default)]
pub struct Kick {
    token: CancellationToken,
    advice: Mutex<Option<(u16, String)>>,
}

impl Kick {
    /// Completes when the connection is ordered closed.
    pub async fn kicked(&self) {
        self.token.cancelled().await;
    }

    /// The close code and reason of the order.
    pub fn advice(&self) -> (u16, String) {
        self.advice
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or((3503, "force disconnect".to_owned()))
    }

    fn fire(&self, code: u16, reason: String) {
        *self.advice.lock().unwrap_or_else(|e| e.into_inner()) = Some((code, reason));
        self.token.cancel();
    }
}

struct LocalSession {
    user: String,
    kick: Arc<Kick>,
}

struct LocalMember {
    member: Member,
    id: String,
    announce: bool,
}

/// This node's presence: its id, the sessions and members it serves.
pub struct Presence {
    /// This node's id (a new one per process).
    pub node: String,
    config: PresenceConfig,
    sessions: Mutex<HashMap<String, LocalSession>>,
    members: Mutex<HashMap<(String, String), LocalMember>>,
    started: std::time::Instant,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("node", &self.node)
            .finish()
    }
}

/// Why a join did not happen.
#[derive(Debug)]
pub enum JoinError {
    /// The channel has `max_members` members.
    Full,
    /// The database failed.
    Db(sqlx::Error),
}

impl Presence {
    /// Presence for a new node.
    pub fn new(config: PresenceConfig) -> Self {
        Self {
            node: uuid::Uuid::new_v4().to_string(),
            config,
            sessions: Mutex::default(),
            members: Mutex::default(),
            started: std::time::Instant::now(),
        }
    }

    /// The presence entry of `channel` (None: no presence there).
    pub fn rule_for(&self, channel: &str) -> Option<&PresenceRule> {
        self.config.rule_for(channel)
    }

    /// Registers a connected session, so `disconnect` orders can reach it.
    pub fn register_session(&self, client: &str, user: &str) -> Arc<Kick> {
        let kick = Arc::new(Kick::default());
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                client.to_owned(),
                LocalSession {
                    user: user.to_owned(),
                    kick: kick.clone(),
                },
            );
        kick
    }

    /// Forgets a session and removes its memberships everywhere (leaves announced). During shutdown
    /// (`bulk`), the database rows are left to the node's deregistration, one statement for all.
    pub async fn end_session(&self, pool: &PgPool, client: &str, bulk: bool) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client);
        let had = {
            let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            let before = members.len();
            members.retain(|(_, c), _| c != client);
            before != members.len()
        };
        if had
            && !bulk
            && let Err(e) = sqlx::query("SELECT relay.presence_leave($1)")
                .bind(client)
                .execute(pool)
                .await
        {
            tracing::warn!(error = %e, client, "presence: leave at close failed (the node's TTL will clear it)");
        }
    }

    /// Adds `member` to `channel`'s presence; returns the membership id (for [`Presence::leave`]).
    pub async fn join(
        &self,
        pool: &PgPool,
        channel: &str,
        member: Member,
        announce: bool,
    ) -> Result<String, JoinError> {
        let max = self.rule_for(channel).map_or(0, |r| r.max_members);
        let id = uuid::Uuid::new_v4().to_string();
        let joined = join_sql(pool, channel, &member, &self.node, &id, max, announce)
            .await
            .map_err(JoinError::Db)?;
        if !joined {
            return Err(JoinError::Full);
        }
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (channel.to_owned(), member.client.clone()),
                LocalMember {
                    member,
                    id: id.clone(),
                    announce,
                },
            );
        Ok(id)
    }

    /// Removes one membership (a late call for an older membership of the same pair removes nothing).
    pub async fn leave(&self, pool: &PgPool, channel: &str, client: &str, id: &str) {
        {
            let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            let key = (channel.to_owned(), client.to_owned());
            if members.get(&key).is_some_and(|m| m.id == id) {
                members.remove(&key);
            }
        }
        if let Err(e) = sqlx::query("SELECT relay.presence_leave($1, $2, $3)")
            .bind(client)
            .bind(channel)
            .bind(id)
            .execute(pool)
            .await
        {
            tracing::warn!(error = %e, client, channel, "presence: leave failed");
        }
    }

    /// Presence memberships held by this node's sessions.
    pub fn local_members(&self) -> usize {
        self.members.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Users of the sessions on this node.
    fn local_users(&self) -> usize {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let users: std::collections::HashSet<&str> =
            sessions.values().map(|s| s.user.as_str()).collect();
        users.len()
    }

    /// Carries out a disconnect order on this node's sessions.
    fn apply_disconnect(&self, order: &DisconnectOrder) -> usize {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for (client, s) in sessions.iter() {
            if s.user == order.user
                && order.client.as_ref().is_none_or(|c| c == client)
                && !order.whitelist.contains(client)
            {
                s.kick.fire(
                    u16::try_from(order.code).unwrap_or(3503),
                    order.reason.clone(),
                );
                n += 1;
            }
        }
        n
    }

    /// Writes this node's heartbeat; when the row had expired (the node was stalled longer than its
    /// TTL and others removed its members), puts its members back.
    async fn heartbeat(&self, state: &AppState) -> Result<(), sqlx::Error> {
        let stats = json!({
            "num_clients": state.metrics.connections.load(Ordering::Relaxed),
            "num_subs": state.hub.subscription_count(),
            "num_channels": state.hub.channel_count(),
            "num_users": self.local_users(),
            "uptime": self.started.elapsed().as_secs(),
        });
        let inserted: bool = sqlx::query_scalar(
            "INSERT INTO relay.nodes AS n (id, name, version, expires_at, stats)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5::text::jsonb)
             ON CONFLICT (id) DO UPDATE
                SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at, stats = EXCLUDED.stats
             RETURNING (xmax = 0)",
        )
        .bind(&self.node)
        .bind(node_name())
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(self.config.node_ttl_secs as f64)
        .bind(stats.to_string())
        .fetch_one(&state.pool)
        .await?;
        if inserted {
            let again: Vec<(String, Member, String, bool)> = self
                .members
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|((c, _), m)| (c.clone(), m.member.clone(), m.id.clone(), m.announce))
                .collect();
            if !again.is_empty() {
                tracing::warn!(
                    members = again.len(),
                    "presence: this node's heartbeat had expired; members registered again"
                );
            }
            for (channel, member, id, announce) in again {
                join_sql(&state.pool, &channel, &member, &self.node, &id, 0, announce).await?;
            }
        }
        let gone: i32 = sqlx::query_scalar("SELECT relay.presence_expire()")
            .fetch_one(&state.pool)
            .await?;
        if gone > 0 {
            tracing::info!(members = gone, "presence: members of expired nodes removed");
        }
        Ok(())
    }

    /// Registers the node before it serves (its members are only visible while it is registered).
    pub async fn start(&self, state: &AppState) -> Result<(), sqlx::Error> {
        self.heartbeat(state).await
    }

    /// Heartbeats and listens for join / leave events and disconnect orders until `shutdown`; then
    /// removes the node and its remaining members.
    pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
        let presence = state.presence.clone();
        let every = Duration::from_secs(presence.config.node_ttl_secs).div_f64(3.0);
        let heartbeat = {
            let state = state.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = state.presence.heartbeat(&state).await {
                        tracing::warn!(error = %e, "presence heartbeat failed");
                    }
                }
            }
        };
        let listen = listen(state.clone(), shutdown.clone());
        tokio::join!(heartbeat, listen);
        // Leaving: this node's members go now rather than after the TTL.
        let left = async {
            sqlx::query(
                "SELECT relay.presence_leave(client) FROM
                   (SELECT DISTINCT client FROM relay.presence WHERE node = $1) c",
            )
            .bind(&presence.node)
            .execute(&state.pool)
            .await?;
            sqlx::query("DELETE FROM relay.nodes WHERE id = $1")
                .bind(&presence.node)
                .execute(&state.pool)
                .await
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(3), left)
            .await
            .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut))
        {
            tracing::warn!(error = %e, "presence: could not deregister the node");
        }
    }
}

async fn join_sql(
    pool: &PgPool,
    channel: &str,
    member: &Member,
    node: &str,
    id: &str,
    max_members: u32,
    announce: bool,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT relay.presence_join($1, $2, $3, $4::text::jsonb, $5::text::jsonb, $6, $7, $8, $9)",
    )
    .bind(channel)
    .bind(&member.client)
    .bind(&member.user)
    .bind(member.conn_info.as_deref().map(RawValue::get))
    .bind(member.chan_info.as_deref().map(RawValue::get))
    .bind(node)
    .bind(id)
    .bind(i32::try_from(max_members).unwrap_or(i32::MAX))
    .bind(announce)
    .fetch_one(pool)
    .await
}

fn node_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "connector".to_owned())
}

/// An event from `relay_presence`.
#[derive(Deserialize)]
struct Event {
    k: String,
    #[serde(default)]
    c: String,
    #[serde(default)]
    i: Option<Box<RawValue>>,
    #[serde(default)]
    d: Option<DisconnectOrder>,
}

/// The LISTEN connection for presence events, reconnecting with backoff until `shutdown`.
async fn listen(state: Arc<AppState>, shutdown: CancellationToken) {
    let url = state
        .config
        .database
        .listen_url
        .clone()
        .unwrap_or_else(|| state.config.database.url.clone());
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = listen_once(&state, &url, &shutdown).await;
        if shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                                     "presence events: LISTEN connection lost (join/leave pushes missed meanwhile)"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(
    state: &AppState,
    url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let target = crate::db::tls::listen_target(url)?;
    let (client, mut connection) = target.config.connect(target.tls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let driver = async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "presence LISTEN connection failed");
                    break;
                }
                None => break,
            }
        }
    };
    let work = async {
        client.batch_execute("LISTEN relay_presence").await?;
        while let Some(payload) = rx.recv().await {
            handle_event(state, &payload);
        }
        anyhow::Ok(())
    };
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        _ = driver => anyhow::bail!("LISTEN connection closed"),
        r = work => r,
    }
}

fn handle_event(state: &AppState, payload: &str) {
    let Ok(event) = serde_json::from_str::<Event>(payload) else {
        tracing::debug!(payload, "presence: unreadable event");
        return;
    };
    match (event.k.as_str(), event.i, event.d) {
        (kind @ ("join" | "leave"), Some(info), _) => {
            if !state.hub.has_subscribers(&event.c) {
                return;
            }
            let frame = format!(
                "{{\"push\":{{\"channel\":{},\"{kind}\":{{\"info\":{}}}}}}}",
                Value::String(event.c.clone()),
                info.get()
            );
            state.hub.push_event(&event.c, frame);
        }
        ("disconnect", _, Some(order)) => {
            let n = state.presence.apply_disconnect(&order);
            if n > 0 {
                tracing::info!(user = %order.user, connections = n, "disconnected by the server API");
            }
        }
        _ => tracing::debug!(payload, "presence: unknown event"),
    }
}

/// Members of `channel` on every live node.
pub async fn members(state: &AppState, channel: &str) -> Result<Vec<Member>, sqlx::Error> {
    let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        r#"SELECT p.client, p."user", p.conn_info::text, p.chan_info::text
           FROM relay.presence p JOIN relay.nodes n ON n.id = p.node
           WHERE p.channel = $1 AND n.expires_at > now()
           ORDER BY p.joined_at"#,
    )
    .bind(channel)
    .fetch_all(&state.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(client, user, conn, chan)| Member {
            client,
            user,
            conn_info: conn
                .and_then(|t| RawValue::from_string(t).ok())
                .map(Arc::from),
            chan_info: chan
                .and_then(|t| RawValue::from_string(t).ok())
                .map(Arc::from),
        })
        .collect())
}

/// (clients, distinct users) of `channel` on every live node.
pub async fn stats(state: &AppState, channel: &str) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        r#"SELECT count(*), count(DISTINCT p."user")
           FROM relay.presence p JOIN relay.nodes n ON n.id = p.node
           WHERE p.channel = $1 AND n.expires_at > now()"#,
    )
    .bind(channel)
    .fetch_one(&state.pool)
    .await
}

/// Channels with subscribers and their counts: this node's subscriptions, and presence members of
/// every node (the larger of the two per channel).
pub async fn channel_counts(state: &AppState) -> Result<Vec<(String, u64)>, sqlx::Error> {
    let mut counts: HashMap<String, u64> = state.hub.channel_counts().into_iter().collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT p.channel, count(*) FROM relay.presence p JOIN relay.nodes n ON n.id = p.node
         WHERE n.expires_at > now() GROUP BY p.channel",
    )
    .fetch_all(&state.pool)
    .await?;
    for (channel, n) in rows {
        let n = u64::try_from(n).unwrap_or(0);
        let e = counts.entry(channel).or_default();
        *e = (*e).max(n);
    }
    let mut out: Vec<(String, u64)> = counts.into_iter().collect();
    out.sort();
    Ok(out)
}

/// The live nodes, as the server API's `info` shows them.
pub async fn nodes(state: &AppState) -> Result<Vec<Value>, sqlx::Error> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT id, name, version, stats::text FROM relay.nodes WHERE expires_at > now() ORDER BY started_at",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(uid, name, version, stats)| {
            let mut v: Value = serde_json::from_str(&stats).unwrap_or_else(|_| json!({}));
            v["uid"] = json!(uid);
            v["name"] = json!(name);
            v["version"] = json!(version);
            v
        })
        .collect())
}

/// Sends a disconnect order to every node (this one included).
pub async fn disconnect(state: &AppState, order: &DisconnectOrder) -> Result<(), sqlx::Error> {
    let mut order = order.clone();
    order.whitelist.truncate(100);
    let payload = json!({"k": "disconnect", "d": order}).to_string();
    if payload.len() > 7900 {
        return Err(sqlx::Error::Protocol(
            "disconnect order too large".to_owned(),
        ));
    }
    sqlx::query("SELECT pg_notify('relay_presence', $1)")
        .bind(payload)
        .execute(&state.pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_validation() {
        let c: PresenceConfig = serde_json::from_str(
            r#"{"channels":[{"channel":"chat:*","max_members":2},{"channel":"incoming-chat","info_from_subscribe_data":true}]}"#,
        )
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.rule_for("chat:1").unwrap().max_members, 2);
        assert!(c.rule_for("chat:1").unwrap().join_leave);
        assert!(
            c.rule_for("incoming-chat")
                .unwrap()
                .info_from_subscribe_data
        );
        assert!(c.rule_for("other").is_none());
        let bad: PresenceConfig = serde_json::from_str(r#"{"node_ttl_secs":1}"#).unwrap();
        assert_eq!(bad.validate().unwrap_err().0, "presence.node_ttl_secs");
        assert!(serde_json::from_str::<PresenceConfig>(r#"{"chanels":[]}"#).is_err());
    }

    #[test]
    fn kicks_carry_their_advice() {
        let p = Presence::new(PresenceConfig::default());
        let a = p.register_session("c1", "alice");
        let b = p.register_session("c2", "alice");
        let c = p.register_session("c3", "bob");
        let n = p.apply_disconnect(&DisconnectOrder {
            user: "alice".into(),
            client: None,
            whitelist: vec!["c2".into()],
            code: 4000,
            reason: "bye".into(),
        });
        assert_eq!(n, 1);
        assert!(a.token.is_cancelled() && !b.token.is_cancelled() && !c.token.is_cancelled());
        assert_eq!(a.advice(), (4000, "bye".to_owned()));
    }
}
