//! Test helpers: a fresh database per test, a real connector on port 0, and a raw WebSocket client
//! that speaks the Centrifugo JSON protocol line by line.
#![allow(dead_code, clippy::unwrap_used)]

pub mod cluster;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// The server the tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database made for one test, dropped by [`TestDb::drop_db`], or else when the value is dropped
/// (a test that panics leaves no database behind).
pub struct TestDb {
    admin: String,
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    dropped: bool,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::new_on(&admin_url()).await
    }

    /// A fresh database on the server of `admin_url` (a throwaway cluster, for example).
    pub async fn new_on(admin_url: &str) -> Self {
        let admin = PgPool::connect(admin_url).await.unwrap();
        let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let (prefix, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{prefix}/{name}");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(12)
            .connect(&url)
            .await
            .unwrap();
        Self {
            admin: admin_url.to_owned(),
            name,
            url,
            pool,
            dropped: false,
        }
    }

    pub async fn drop_db(mut self) {
        self.pool.close().await;
        let admin = PgPool::connect(&self.admin).await.unwrap();
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await;
        admin.close().await;
        self.dropped = true;
    }

    /// The real writer's handler (`writer_lambda::handle`) behind the Lambda Invoke path, on port
    /// 0, writing into this database; returns the endpoint for a rule's `lambda` target.
    pub async fn local_writer(&self) -> String {
        use std::sync::Arc;

        use axum::extract::State;
        use axum::routing::post;
        use axum::{Json, Router};

        async fn invoke(
            State(s): State<Arc<writer_lambda::State>>,
            Json(event): Json<Value>,
        ) -> Json<Value> {
            Json(serde_json::to_value(writer_lambda::handle(&s, event).await.unwrap()).unwrap())
        }
        let state = Arc::new(writer_lambda::State::new(self.pool.clone()));
        let app = Router::new()
            .route("/2015-03-31/functions/{name}/invocations", post(invoke))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// Inserts a chat row directly (as an application would).
    pub async fn insert_chat(&self, id: &str, text: &str) {
        sqlx::query(
            "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
             VALUES ($1, 'sql', $2, 'sql-client', 0)",
        )
        .bind(id)
        .bind(text)
        .execute(&self.pool)
        .await
        .unwrap();
    }
}

impl Drop for TestDb {
    /// Drops the database when [`TestDb::drop_db`] did not (the test panicked, or returned early):
    /// on a thread of its own with its own runtime, since `Drop` cannot await.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropping = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let connect = tokio::time::timeout(Duration::from_secs(5), PgPool::connect(&admin));
                if let Ok(Ok(admin)) = connect.await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(&sql).execute(&admin).await;
                    admin.close().await;
                }
            });
        });
        let _ = dropping.join();
    }
}

/// The chat configuration of `config.json`, pointed at `db_url`, with extra top-level settings merged.
pub fn config_json(db_url: &str, extra: Value) -> String {
    let mut config = json!({
        "listen": "127.0.0.1:0",
        "database": {"url": db_url, "pool_size": 8},
        "stream": {"poll_interval_ms": 100},
        "client": {"allow_anonymous": true, "allow_publish": true, "ping_interval_secs": 25},
        "mappings": [{"table": "chat_data", "operations": ["INSERT", "UPDATE", "DELETE"], "channel": "incoming-chat"}],
        "rules": [],
        "shutdown_grace_secs": 5
    });
    if let (Some(base), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            match (base.get_mut(k), v) {
                (Some(Value::Object(b)), Value::Object(e)) => {
                    for (k2, v2) in e {
                        b.insert(k2.clone(), v2.clone());
                    }
                }
                _ => {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
    }
    config.to_string()
}

/// A connector running in this process.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<connector::Result<()>>,
}

impl Server {
    pub async fn start(config_json: &str) -> Self {
        let config = connector::Config::from_json(config_json).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(connector::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            stop: Some(stop),
            task,
        };
        server.wait_ready().await;
        server
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.addr);
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("connector not ready");
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Calls server API `method` with `key`; the answer must be HTTP 200.
    pub async fn api(&self, key: &str, method: &str, params: Value) -> Value {
        let r = reqwest::Client::new()
            .post(format!("http://{}/api/{method}", self.addr))
            .header("X-API-Key", key)
            .json(&params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/connection/websocket", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// A raw protocol client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: std::collections::VecDeque<Value>,
    next_id: u32,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = connect_async(url).await.unwrap();
        Self {
            ws,
            pending: Default::default(),
            next_id: 1,
        }
    }

    /// Connects with extra upgrade-request headers (e.g. `X-Forwarded-For`).
    pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().append(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap(),
                value.parse().unwrap(),
            );
        }
        let (ws, _) = connect_async(request).await.unwrap();
        Self {
            ws,
            pending: Default::default(),
            next_id: 1,
        }
    }

    /// Connects and sends the `connect` command.
    pub async fn connected(url: &str) -> Self {
        let mut c = Self::connect(url).await;
        let reply = c.call(json!({"connect": {"name": "test"}})).await;
        assert!(reply["connect"]["client"].is_string(), "{reply}");
        c
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// Sends a command with the next id; returns the id.
    pub async fn send(&mut self, mut command: Value) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = json!(id);
        self.send_raw(&command.to_string()).await;
        id
    }

    /// Sends a command and waits for its reply (pushes that arrive meanwhile are kept).
    pub async fn call(&mut self, command: Value) -> Value {
        let id = self.send(command).await;
        let mut kept = Vec::new();
        loop {
            let m = self.next_message().await;
            if m["id"] == json!(id) {
                for k in kept.into_iter().rev() {
                    self.pending.push_front(k);
                }
                return m;
            }
            kept.push(m);
        }
    }

    /// The next message (reply, push or ping), waiting at most 20 s.
    pub async fn next_message(&mut self) -> Value {
        self.try_next(Duration::from_secs(20))
            .await
            .expect("no message within 20 s")
    }

    /// The next message within `wait`, or None. Panics if the connection closed.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Value> {
        if let Some(m) = self.pending.pop_front() {
            return Some(m);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    for line in t.as_str().split('\n') {
                        assert!(!line.is_empty(), "empty line in frame {t:?}");
                        self.pending.push_back(serde_json::from_str(line).unwrap());
                    }
                    return self.pending.pop_front();
                }
                Some(Ok(Message::Close(f))) => panic!("connection closed: {f:?}"),
                Some(Ok(_)) => {}
                other => panic!("connection failed: {other:?}"),
            }
        }
    }

    /// The next publication push on `channel` (pings skipped; publications of other channels are
    /// kept for later calls).
    pub async fn next_pub(&mut self, channel: &str) -> Value {
        let mut other = Vec::new();
        let found = loop {
            let m = self.next_message().await;
            if m["push"]["pub"].is_object() {
                if m["push"]["channel"] == json!(channel) {
                    break m["push"]["pub"].clone();
                }
                other.push(m);
            }
        };
        for m in other.into_iter().rev() {
            self.pending.push_front(m);
        }
        found
    }

    /// Waits for the server to close the connection; returns the close code and reason.
    pub async fn closed(&mut self) -> Closed {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("no close within 20 s")
            {
                Some(Ok(Message::Close(Some(f)))) => {
                    return Closed {
                        code: f.code.into(),
                        reason: f.reason.to_string(),
                    };
                }
                Some(Ok(Message::Close(None))) | None => {
                    return Closed {
                        code: 0,
                        reason: String::new(),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    return Closed {
                        code: 0,
                        reason: String::new(),
                    };
                }
            }
        }
    }
}

impl Client {
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }
}

impl Client {
    /// The next message, or None once the connection has ended (closed or reset).
    pub async fn raw_next(&mut self) -> Option<Value> {
        if let Some(m) = self.pending.pop_front() {
            return Some(m);
        }
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    for line in t.as_str().split('\n') {
                        self.pending.push_back(serde_json::from_str(line).unwrap());
                    }
                    return self.pending.pop_front();
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }
}

impl Client {
    /// The publications of a recovering subscribe reply followed by live ones, until `n` in all;
    /// panics on a duplicate or a gap.
    pub async fn recovered_then_live(
        &mut self,
        reply: &Value,
        channel: &str,
        n: usize,
    ) -> Vec<Value> {
        let mut pubs: Vec<Value> = reply["subscribe"]["publications"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        while pubs.len() < n {
            pubs.push(self.next_pub(channel).await);
        }
        for w in pubs.windows(2) {
            assert_eq!(
                w[1]["offset"].as_u64().unwrap(),
                w[0]["offset"].as_u64().unwrap() + 1,
                "gap or duplicate"
            );
        }
        pubs
    }
}
