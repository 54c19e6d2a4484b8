//! Presence is never wrong for long: after many clients vanish at once with a pool too small for their
//! leaves, the failed leaves are retried and the node reconciles its members with its live sessions,
//! so presence converges to the truth; `per_user` channels list one entry per user, at most
//! `max_listed`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

const SECRET: &str = "presence-repair-secret-0123456789abcdef";
const CLIENTS: usize = 200;

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn stored_members(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM relay.presence WHERE channel = 'room'")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Waits (at most `limit`) until the store holds `want` members of `room`; returns how long it took.
async fn converge(db: &TestDb, want: i64, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let n = stored_members(db).await;
        if n == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "presence still holds {n} members after {limit:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn mass_vanish_with_a_tiny_pool_converges_to_the_truth() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let db = TestDb::new().await;
    let reconcile_secs = 2;
    let config = config_json(
        &db.url,
        json!({
            // Two pooled connections, one second to get one: the leaves of a mass disconnect time out.
            "database": {"url": db.url, "pool_size": 2, "connect_timeout_secs": 1},
            "presence": {"reconcile_interval_secs": reconcile_secs, "channels": [{"channel": "room"}]}
        }),
    );
    let server = Server::start(&config).await;
    let mut observer = Client::connected(&server.ws_url()).await;
    let r = observer
        .call(json!({"subscribe": {"channel": "room"}}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    let mut crowd = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = Client::connected(&server.ws_url()).await;
        let r = c.call(json!({"subscribe": {"channel": "room"}})).await;
        assert!(r["subscribe"].is_object(), "{r}");
        crowd.push(c);
    }
    assert_eq!(stored_members(&db).await, CLIENTS as i64 + 1);

    // Force failures: hold the presence table so the first leaves block both pooled connections and
    // the others time out waiting for one; then every client vanishes at once.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE relay.presence IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    drop(crowd);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    blocker.rollback().await.unwrap();
    let failed = String::from_utf8_lossy(&logs.0.lock().unwrap())
        .matches("leave at close failed")
        .count();
    assert!(failed > 0, "the test did not force failed leaves");

    // The failed leaves are retried: presence is the truth again (the observer only).
    let took = converge(&db, 1, Duration::from_secs(reconcile_secs + 20)).await;
    println!("{failed} leaves failed; presence converged {took:?} after the lock was released");

    // A ghost that no retry knows about (as if the retry queue had overflowed): a membership of this
    // node that no session holds. The reconciliation removes it within its interval.
    sqlx::query(
        "INSERT INTO relay.presence (channel, client, \"user\", node, member)
         SELECT 'room', 'ghost', '', id, 'g1' FROM relay.nodes",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored_members(&db).await, 2);
    let took = converge(&db, 1, Duration::from_secs(2 * reconcile_secs + 10)).await;
    println!("the ghost was reconciled away after {took:?}");
    // A membership the store lost is put back.
    sqlx::query("DELETE FROM relay.presence")
        .execute(&db.pool)
        .await
        .unwrap();
    converge(&db, 1, Duration::from_secs(2 * reconcile_secs + 10)).await;
    let p = observer
        .call(json!({"presence_stats": {"channel": "room"}}))
        .await;
    assert_eq!(p["presence_stats"]["num_clients"], 1, "{p}");

    server.stop().await;
    db.drop_db().await;
}

fn token(user: &str) -> String {
    connector::auth::verifier::mint_hs256(SECRET, &json!({"sub": user, "exp": 4_000_000_000u64}))
        .unwrap()
}

async fn connect_as(server: &Server, user: Option<&str>) -> Client {
    let mut c = Client::connect(&server.ws_url()).await;
    let connect = match user {
        Some(u) => json!({"connect": {"token": token(u)}}),
        None => json!({"connect": {}}),
    };
    let r = c.call(connect).await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    let r = c.call(json!({"subscribe": {"channel": "lobby"}})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    c
}

fn users(presence: &Value) -> Vec<String> {
    let mut u: Vec<String> = presence["presence"]["presence"]
        .as_object()
        .unwrap()
        .values()
        .map(|i| i["user"].as_str().unwrap().to_owned())
        .collect();
    u.sort();
    u
}

#[tokio::test]
async fn per_user_presence_lists_one_entry_per_user_up_to_the_cap() {
    let db = TestDb::new().await;
    for (max_listed, want) in [(10, vec!["", "alice", "bob"]), (2, vec!["alice", "bob"])] {
        let config = config_json(
            &db.url,
            json!({
                "auth": {"hmac_secret_key": SECRET},
                "presence": {"channels": [{"channel": "lobby", "per_user": true, "max_listed": max_listed}]}
            }),
        );
        let server = Server::start(&config).await;
        let mut clients = Vec::new();
        for user in [
            Some("alice"),
            Some("alice"),
            Some("bob"),
            Some("alice"),
            None,
            Some("bob"),
        ] {
            clients.push(connect_as(&server, user).await);
        }
        let p = clients[0]
            .call(json!({"presence": {"channel": "lobby"}}))
            .await;
        assert_eq!(users(&p), want, "max_listed {max_listed}: {p}");
        let s = clients[0]
            .call(json!({"presence_stats": {"channel": "lobby"}}))
            .await;
        assert_eq!(s["presence_stats"]["num_clients"], 6, "{s}");
        drop(clients);
        server.stop().await;
    }
    db.drop_db().await;
}
