//! JWKS (`auth.jwks_url`) against a real connector: the JWKS is served by the test itself (axum on
//! 127.0.0.1:0, counting its hits), tokens are signed with the test keys of `tests/keys/` (RS256,
//! ES256, EdDSA) with a `kid`. Checked: keys chosen by `kid`, JWKS used exclusively, key rotation
//! (a new `kid` is accepted after a refetch), a flood of unknown `kid`s refetches at most once per
//! `auth.jwks_min_refetch_secs`, the periodic refresh, and an unreachable, oversized or slow JWKS
//! (error 100, temporary, within the bounded wait; the cached keys keep working).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The test JWKS's key `kid` (`rsa-1`, `ec-1`, `ed-1`).
fn jwk(kid: &str) -> Value {
    let set: Value =
        serde_json::from_str(&std::fs::read_to_string(key_path("jwks.json")).unwrap()).unwrap();
    set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .cloned()
        .unwrap()
}

fn jwks(kids: &[&str]) -> Value {
    json!({"keys": kids.iter().map(|k| jwk(k)).collect::<Vec<_>>()})
}

/// A token with header `alg` and `kid` (none when `kid` is empty), signed with `key`.
fn sign(alg: Algorithm, kid: &str, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    if !kid.is_empty() {
        header.kid = Some(kid.to_owned());
    }
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa_key(file: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(key_path(file)).unwrap()).unwrap()
}

fn rs256(kid: &str, claims: Value) -> String {
    sign(Algorithm::RS256, kid, &claims, &rsa_key("rsa_private.pem"))
}

fn es256(kid: &str, claims: Value) -> String {
    let key =
        EncodingKey::from_ec_pem(&std::fs::read(key_path("ec_private.pem")).unwrap()).unwrap();
    sign(Algorithm::ES256, kid, &claims, &key)
}

fn eddsa(kid: &str, claims: Value) -> String {
    let key =
        EncodingKey::from_ed_pem(&std::fs::read(key_path("ed25519_private.pem")).unwrap()).unwrap();
    sign(Algorithm::EdDSA, kid, &claims, &key)
}

/// A token whose `kid` is not in the set (EdDSA: cheap to sign, for floods).
fn unknown_kid(kid: &str) -> String {
    eddsa(kid, json!({"sub": "mallory"}))
}

/// Signed with a key the identity provider never published.
fn foreign(kid: &str) -> String {
    sign(
        Algorithm::RS256,
        kid,
        &json!({"sub": "mallory"}),
        &rsa_key("foreign_rsa_private.pem"),
    )
}

/// What the fake identity provider answers.
#[derive(Clone)]
enum Mode {
    Serve(Value),
    Status(u16),
    /// 2.5 MiB of chunked body (no Content-Length): the streaming body limit must stop it.
    Huge,
    /// Answers after 10 s (longer than the connector's fetch timeout).
    Slow,
}

#[derive(Clone)]
struct Idp {
    url: String,
    hits: Arc<AtomicUsize>,
    mode: Arc<Mutex<Mode>>,
}

impl Idp {
    async fn start(keys: Value) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let mode = Arc::new(Mutex::new(Mode::Serve(keys)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let idp = Self { url, hits, mode };
        let app = Router::new()
            .route("/.well-known/jwks.json", get(serve_jwks))
            .with_state(idp.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        idp
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

async fn serve_jwks(State(idp): State<Idp>) -> Response {
    idp.hits.fetch_add(1, Ordering::SeqCst);
    let mode = idp.mode.lock().unwrap().clone();
    match mode {
        Mode::Serve(keys) => axum::Json(keys).into_response(),
        Mode::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Mode::Huge => {
            let chunks = (0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024]));
            (
                [(header::CONTENT_TYPE, "application/json")],
                axum::body::Body::from_stream(futures_util::stream::iter(chunks)),
            )
                .into_response()
        }
        Mode::Slow => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            axum::Json(json!({"keys": []})).into_response()
        }
    }
}

fn jwks_config(db_url: &str, idp: &Idp, refresh_secs: u64, min_refetch_secs: u64) -> String {
    config_json(
        db_url,
        json!({
            "client": {"allow_anonymous": false, "allow_publish": true},
            "auth": {
                "jwks_url": idp.url,
                "jwks_refresh_secs": refresh_secs,
                "jwks_min_refetch_secs": min_refetch_secs,
                "expired_close_delay_secs": 1
            }
        }),
    )
}

/// Opens a socket and sends `connect` with `token`: the client and the reply (panics if the server
/// closes instead).
async fn connect(server: &Server, token: &str) -> (Client, Value) {
    let mut c = Client::connect(&server.ws_url()).await;
    let reply = c.call(json!({"connect": {"token": token}})).await;
    (c, reply)
}

async fn assert_accepted(server: &Server, token: &str, user: &str, what: &str) -> Client {
    let (mut c, reply) = connect(server, token).await;
    assert!(reply["connect"]["client"].is_string(), "{what}: {reply}");
    let r = c
        .call(json!({"subscribe": {"channel": format!("room:{user}")}}))
        .await;
    assert!(r["subscribe"].is_object(), "{what}: {r}");
    c
}

async fn assert_closes(server: &Server, token: &str, code: u16, what: &str) {
    let mut c = Client::connect(&server.ws_url()).await;
    c.send(json!({"connect": {"token": token}})).await;
    let closed = c.closed().await;
    assert_eq!(closed.code, code, "{what}: {closed:?}");
}

/// The set `rsa-1`, plus a symmetric key (`oct-1`) that is never used: an HMAC secret must not come
/// from a URL.
fn rsa_and_oct() -> Value {
    let mut served = jwks(&["rsa-1"]);
    served["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kid": "oct-1", "kty": "oct", "k": "dGVzdC1zZWNyZXQtdGVzdC1zZWNyZXQtdGVzdC1zZWNyZXQh"}));
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_kids_verify_and_bad_tokens_are_refused_without_a_fetch() {
    let db = TestDb::new().await;
    let idp = Idp::start(rsa_and_oct()).await;
    let server = Server::start(&jwks_config(&db.url, &idp, 3600, 30)).await;
    assert_eq!(idp.hits(), 1, "fetched once at start-up");
    let exp = now() + 600;

    let _alice = assert_accepted(
        &server,
        &rs256("rsa-1", json!({"sub": "alice", "exp": exp})),
        "alice",
        "RS256 with a known kid",
    )
    .await;
    let (_, expired) = connect(
        &server,
        &rs256("rsa-1", json!({"sub": "a", "exp": now() - 5})),
    )
    .await;
    assert_eq!(expired["error"]["code"], 109, "expired → 109: {expired}");
    // Bad tokens with a known kid or none: refused without any fetch.
    let pem = std::fs::read(key_path("rsa_public.pem")).unwrap();
    for (token, what) in [
        (rs256("", json!({"sub": "a"})), "no kid"),
        (
            sign(
                Algorithm::RS256,
                "rsa-1",
                &json!({"sub": "mallory"}),
                &rsa_key("foreign_rsa_private.pem"),
            ),
            "forged: a known kid, another key",
        ),
        (
            sign(
                Algorithm::HS256,
                "rsa-1",
                &json!({"sub": "mallory"}),
                &EncodingKey::from_secret(&pem),
            ),
            "HS256 with the RSA public key as the secret",
        ),
        (
            es256("rsa-1", json!({"sub": "mallory"})),
            "ES256 naming an RSA key",
        ),
        (
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIiwia2lkIjoicnNhLTEifQ.eyJzdWIiOiJtYWxsb3J5In0."
                .to_owned(),
            "alg none with a known kid",
        ),
    ] {
        assert_closes(&server, &token, 3500, what).await;
    }
    assert_eq!(idp.hits(), 1, "no fetch for known kids or missing ones");

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_keys_are_used_exclusively_and_unknown_kids_refetch_once_per_window() {
    let db = TestDb::new().await;
    let idp = Idp::start(rsa_and_oct()).await;
    let server = Server::start(&jwks_config(&db.url, &idp, 3600, 30)).await;
    assert_eq!(idp.hits(), 1, "fetched once at start-up");
    let exp = now() + 600;
    let mut alice = assert_accepted(
        &server,
        &rs256("rsa-1", json!({"sub": "alice", "exp": exp})),
        "alice",
        "RS256 with a known kid",
    )
    .await;

    // Static keys are not accepted alongside: an HS256 token signed with the oct key of the set.
    let oct = sign(
        Algorithm::HS256,
        "oct-1",
        &json!({"sub": "mallory"}),
        &EncodingKey::from_secret(b"test-secret-test-secret-test-secret!"),
    );
    assert_closes(&server, &oct, 3500, "an oct key of the set").await;
    assert_eq!(idp.hits(), 1, "HS* tokens never cause a fetch");
    assert_closes(&server, &foreign("bogus"), 3500, "a kid not in the set").await;
    assert_eq!(idp.hits(), 2, "an unknown kid: one refetch");

    // The provider publishes ec-1 and ed-1, but the last refetch was just now: inside the 30 s window
    // a new kid is refused without a fetch.
    idp.set(Mode::Serve(jwks(&["rsa-1", "ec-1", "ed-1"])));
    assert_closes(
        &server,
        &es256("ec-1", json!({"sub": "bob"})),
        3500,
        "new kid within the refetch window",
    )
    .await;
    assert_eq!(idp.hits(), 2, "no refetch within the window");
    let r = alice.call(json!({"subscribe": {"channel": "room"}})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_fetched_once_and_a_retired_one_is_refused() {
    let db = TestDb::new().await;
    let idp = Idp::start(rsa_and_oct()).await;
    let exp = now() + 600;
    // Rotation, on a fresh connector: the new kid appears → one refetch → accepted.
    idp.set(Mode::Serve(jwks(&["rsa-1"])));
    let before = idp.hits();
    let server = Server::start(&jwks_config(&db.url, &idp, 3600, 30)).await;
    assert_eq!(idp.hits(), before + 1);
    idp.set(Mode::Serve(jwks(&["rsa-1", "ec-1", "ed-1"])));
    assert_accepted(
        &server,
        &es256("ec-1", json!({"sub": "bob", "exp": exp})),
        "bob",
        "ES256 with a kid published after start-up",
    )
    .await;
    assert_eq!(idp.hits(), before + 2, "one refetch for the new kid");
    assert_accepted(
        &server,
        &eddsa("ed-1", json!({"sub": "carol", "exp": exp})),
        "carol",
        "EdDSA, fetched by the same refetch",
    )
    .await;
    assert_accepted(
        &server,
        &rs256("rsa-1", json!({"sub": "alice"})),
        "alice",
        "the old key still",
    )
    .await;
    assert_eq!(idp.hits(), before + 2, "no fetch for cached kids");
    // The old key retired: refused once a fetch no longer has it.
    server.stop().await;
    idp.set(Mode::Serve(jwks(&["ec-1", "ed-1"])));
    let server = Server::start(&jwks_config(&db.url, &idp, 3600, 30)).await;
    assert_closes(
        &server,
        &rs256("rsa-1", json!({"sub": "alice"})),
        3500,
        "a retired kid",
    )
    .await;
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_refetches_at_most_once_per_window() {
    let db = TestDb::new().await;
    let idp = Idp::start(jwks(&["rsa-1"])).await;
    let window = Duration::from_secs(4);
    let server = Server::start(&jwks_config(&db.url, &idp, 3600, window.as_secs())).await;
    assert_eq!(idp.hits(), 1);
    let mut alice = assert_accepted(
        &server,
        &rs256("rsa-1", json!({"sub": "alice"})),
        "alice",
        "RS256",
    )
    .await;

    // 60 connections at once, each with a made-up kid, then 40 more one after the other.
    let concurrent: Vec<String> = (0..60)
        .map(|i| unknown_kid(&format!("bogus-{i}")))
        .collect();
    let sequential: Vec<String> = (0..40).map(|i| unknown_kid(&format!("seq-{i}"))).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for token in concurrent {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            c.send(json!({"connect": {"token": token}})).await;
            c.closed().await.code
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 3500);
    }
    for token in &sequential {
        assert_closes(&server, token, 3500, "bogus kid").await;
    }
    let flood = started.elapsed();
    assert!(
        flood < window,
        "the flood took {flood:?}, longer than the window"
    );
    assert_eq!(idp.hits(), 2, "100 unknown kids: one refetch");
    // The client connected before keeps working.
    let r = alice.call(json!({"subscribe": {"channel": "room"}})).await;
    assert!(r["subscribe"].is_object(), "{r}");

    // A kid the provider publishes now is refused inside the window, accepted after it (one fetch).
    idp.set(Mode::Serve(jwks(&["rsa-1", "ec-1"])));
    let bob = es256("ec-1", json!({"sub": "bob"}));
    assert_closes(&server, &bob, 3500, "new kid inside the window").await;
    assert_eq!(idp.hits(), 2);
    tokio::time::sleep(window.saturating_sub(started.elapsed()) + Duration::from_millis(300)).await;
    assert_accepted(&server, &bob, "bob", "new kid after the window").await;
    assert_eq!(idp.hits(), 3);
    let again: Vec<String> = (0..20)
        .map(|i| unknown_kid(&format!("again-{i}")))
        .collect();
    for token in &again {
        assert_closes(&server, token, 3500, "bogus kid").await;
    }
    assert_eq!(
        idp.hits(),
        3,
        "a second flood inside the new window: no fetch"
    );
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_refresh_and_an_unreachable_jwks() {
    let db = TestDb::new().await;
    let idp = Idp::start(jwks(&["rsa-1"])).await;
    // Refresh every second; on-demand refetches are spent by the first unknown kid (long window).
    let server = Server::start(&jwks_config(&db.url, &idp, 1, 3600)).await;
    assert_closes(&server, &foreign("bogus"), 3500, "bogus kid").await;
    idp.set(Mode::Serve(jwks(&["rsa-1", "ed-1"])));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let hits = idp.hits();
    assert!(
        hits >= 3,
        "start-up, one refetch, periodic refreshes: {hits}"
    );
    assert_accepted(
        &server,
        &eddsa("ed-1", json!({"sub": "carol"})),
        "carol",
        "a kid picked up by the periodic refresh",
    )
    .await;
    server.stop().await;

    // Unreachable: the cached keys keep working, a new kid gets error 100 (temporary) and the
    // connection stays open for another try.
    idp.set(Mode::Serve(jwks(&["rsa-1"])));
    let server = Server::start(&jwks_config(&db.url, &idp, 1, 1)).await;
    for (mode, what) in [
        (Mode::Status(500), "HTTP 500"),
        (Mode::Huge, "a body over the limit"),
        (Mode::Serve(json!({"not": "a jwks"})), "not a JWKS"),
        (Mode::Slow, "slower than the fetch timeout"),
    ] {
        idp.set(mode);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let started = Instant::now();
        let (mut c, reply) = connect(&server, &es256("ec-1", json!({"sub": "bob"}))).await;
        assert_eq!(reply["error"]["code"], 100, "{what}: {reply}");
        assert_eq!(reply["error"]["temporary"], true, "{what}: {reply}");
        assert!(
            started.elapsed() < Duration::from_millis(4500),
            "{what}: the connect waited {:?}",
            started.elapsed()
        );
        // The same socket may connect again, with a cached key.
        let r = c
            .call(json!({"connect": {"token": rs256("rsa-1", json!({"sub": "alice"}))}}))
            .await;
        assert!(r["connect"]["client"].is_string(), "{what}: {r}");
    }
    // Back to normal: once the slow fetch has given up, the new kid is fetched and accepted.
    idp.set(Mode::Serve(jwks(&["rsa-1", "ec-1"])));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_accepted(
        &server,
        &es256("ec-1", json!({"sub": "bob"})),
        "bob",
        "after the provider recovered",
    )
    .await;
    server.stop().await;
    db.drop_db().await;
}
