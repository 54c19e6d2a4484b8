//! Authentication, permissions and limits against a real connector and PostgreSQL: tokens minted
//! here with `jsonwebtoken` (HS256, RS256 and ES256 with the test keys in `tests/keys/`), and every
//! bad input of the security table (`docs/security.md`) refused with its documented code, with nothing
//! written to the database and an observing client unaffected.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret-test-secret-test-secret!";
const AUDIENCE: &str = "relay-test";

fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// An HS256 token with `aud` set to the test audience unless the claims say otherwise.
fn hs256(mut claims: Value) -> String {
    if claims.get("aud").is_none() {
        claims["aud"] = json!(AUDIENCE);
    }
    sign(
        Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

fn rs256(claims: Value) -> String {
    let pem = std::fs::read(key_path("rsa_private.pem")).unwrap();
    sign(
        Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
}

fn es256(claims: Value) -> String {
    let pem = std::fs::read(key_path("ec_private.pem")).unwrap();
    sign(
        Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
}

fn sign(header: Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// The channel permissions and keys every test here runs with.
fn auth_config(db_url: &str, extra_client: Value) -> String {
    let mut client = json!({"allow_anonymous": true, "allow_publish": true});
    for (k, v) in extra_client.as_object().unwrap() {
        client[k] = v.clone();
    }
    config_json(
        db_url,
        json!({
            "client": client,
            "auth": {
                "hmac_secret_key": SECRET,
                "rsa_public_key": key_path("rsa_public.pem"),
                "ecdsa_public_key": key_path("ec_public.pem"),
                "audience": AUDIENCE,
                "expired_close_delay_secs": 1
            },
            "channels": [
                {"channel": "incoming-chat", "subscribe": "anyone", "history": "anyone"},
                {"channel": "public:*", "subscribe": "anyone", "publish": "anyone", "history": "anyone"},
                {"channel": "members:*", "subscribe": "authenticated", "publish": "authenticated"},
                {"channel": "staff:*", "subscribe": {"claim": "roles", "value": "staff"}},
                {"channel": "notifications#*", "subscribe": "authenticated", "user_limited": true},
                {"channel": "private:*", "subscribe": "token"}
            ]
        }),
    )
}

/// Opens a socket and sends `connect` with `token` ("" = none); returns the client and the reply.
async fn connect_with(server: &Server, token: &str) -> (Client, Value) {
    let mut c = Client::connect(&server.ws_url()).await;
    let cmd = if token.is_empty() {
        json!({"connect": {"name": "test"}})
    } else {
        json!({"connect": {"token": token, "name": "test"}})
    };
    let id = c.send(cmd).await;
    let reply = c.raw_next().await.unwrap_or(Value::Null);
    assert!(reply.is_null() || reply["id"] == json!(id), "{reply}");
    (c, reply)
}

/// Asserts that `connect` with `token` ends with close `code`.
async fn assert_connect_closes(server: &Server, token: &str, code: u16, what: &str) {
    let mut c = Client::connect(&server.ws_url()).await;
    c.send(json!({"connect": {"token": token}})).await;
    let closed = c.closed().await;
    assert_eq!(closed.code, code, "{what}: {closed:?}");
    assert!(
        !closed.reason.is_empty(),
        "{what}: a close reason is required"
    );
}

async fn db_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT (SELECT count(*) FROM relay.changelog) + (SELECT count(*) FROM relay.publications)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// An observer on `public:watch` that must keep working through every refusal.
async fn observer(server: &Server) -> Client {
    let mut o = Client::connected(&server.ws_url()).await;
    let r = o
        .call(json!({"subscribe": {"channel": "public:watch"}}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    o
}

async fn observer_still_works(o: &mut Client, server: &Server, text: &str) {
    let mut p = Client::connected(&server.ws_url()).await;
    let r = p
        .call(json!({"publish": {"channel": "public:watch", "data": {"text": text}}}))
        .await;
    assert!(r["publish"].is_object(), "{r}");
    let got = o.next_pub("public:watch").await;
    assert_eq!(got["data"]["text"], text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_of_every_key_kind_are_accepted_with_their_claims() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;
    let mut o = observer(&server).await;

    let exp = now() + 600;
    let token = hs256(json!({"sub": "alice", "exp": exp, "info": {"name": "Alice"}}));
    let (mut alice, reply) = connect_with(&server, &token).await;
    let connect = &reply["connect"];
    assert!(connect["client"].is_string(), "{reply}");
    assert_eq!(connect["expires"], true, "{reply}");
    let ttl = connect["ttl"].as_u64().unwrap();
    assert!((590..=600).contains(&ttl), "{reply}");
    // Identity and info come from the token: the publication carries them.
    let r = alice
        .call(json!({"publish": {"channel": "public:watch", "data": {"text": "hi"}}}))
        .await;
    assert!(r["publish"].is_object(), "{r}");
    let p = o.next_pub("public:watch").await;
    assert_eq!(p["info"]["user"], "alice", "{p}");
    assert_eq!(p["info"]["conn_info"], json!({"name": "Alice"}), "{p}");

    // A token without exp never expires: no expires/ttl.
    let (_, reply) = connect_with(&server, &hs256(json!({"sub": "bob"}))).await;
    assert!(reply["connect"].get("expires").is_none(), "{reply}");
    // RS256 and ES256 (the configured audience is required of every token).
    for token in [
        rs256(json!({"sub": "rsa-user", "aud": AUDIENCE, "exp": exp})),
        es256(json!({"sub": "ec-user", "aud": AUDIENCE, "exp": exp})),
        hs256(json!({"sub": "kid-user", "exp": exp})),
    ] {
        let (mut c, reply) = connect_with(&server, &token).await;
        assert!(reply["connect"]["client"].is_string(), "{reply}");
        let r = c.call(json!({"subscribe": {"channel": "members:1"}})).await;
        assert!(r["subscribe"].is_object(), "{r}");
    }
    // Anonymous (no token) is allowed by this config.
    let (_, reply) = connect_with(&server, "").await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_connection_token_gets_109_and_the_connection_stays_unauthenticated() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;
    // Expired (correctly signed): error 109 on connect, the SDK fetches a new token.
    let (mut c, reply) =
        connect_with(&server, &hs256(json!({"sub": "a", "exp": now() - 10}))).await;
    assert_eq!(reply["error"]["code"], 109, "{reply}");
    // The connection is still unauthenticated: anything else is a protocol violation.
    c.send(json!({"subscribe": {"channel": "public:watch"}}))
        .await;
    assert_eq!(c.closed().await.code, 3501);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connection_tokens_close_with_3500_and_write_nothing() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;
    let mut o = observer(&server).await;
    let before = db_rows(&db).await;
    let exp = now() + 600;

    let forged = sign(
        Header::new(Algorithm::HS256),
        &json!({"sub": "a", "aud": AUDIENCE, "exp": exp}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-!!"),
    );
    let rsa_pub = std::fs::read(key_path("rsa_public.pem")).unwrap();
    let hs_with_rsa_public_key = sign(
        Header::new(Algorithm::HS256),
        &json!({"sub": "a", "aud": AUDIENCE, "exp": exp}),
        &EncodingKey::from_secret(&rsa_pub),
    );
    // {"alg":"none"} with claims {"sub":"admin","aud":"relay-test"} and no signature.
    let alg_none =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiIsImF1ZCI6InJlbGF5LXRlc3QifQ.";
    let mut unknown_kid = Header::new(Algorithm::RS256);
    unknown_kid.kid = Some("no-such-key".into());
    let foreign_rsa = sign(
        unknown_kid,
        &json!({"sub": "a", "aud": AUDIENCE, "exp": exp}),
        &EncodingKey::from_rsa_pem(FOREIGN_RSA_KEY.as_bytes()).unwrap(),
    );
    let cases = [
        ("forged signature", forged),
        (
            "not yet valid (nbf)",
            hs256(json!({"sub": "a", "nbf": now() + 600})),
        ),
        (
            "wrong audience",
            hs256(json!({"sub": "a", "aud": "another-service"})),
        ),
        ("alg none", alg_none.to_owned()),
        (
            "HS256 signed with the RSA public key",
            hs_with_rsa_public_key,
        ),
        ("unknown kid, foreign key", foreign_rsa),
        (
            "a subscription token used to connect",
            hs256(json!({"sub": "a", "channel": "x"})),
        ),
        ("garbage", "not.a.token".to_owned()),
        (
            "expired with a bad signature",
            sign(
                Header::new(Algorithm::HS256),
                &json!({"sub": "a", "aud": AUDIENCE, "exp": 1}),
                &EncodingKey::from_secret(b"not-the-secret-not-the-secret-!!"),
            ),
        ),
    ];
    for (what, token) in &cases {
        assert_connect_closes(&server, token, 3500, what).await;
    }
    assert_eq!(db_rows(&db).await, before, "nothing written");
    observer_still_works(&mut o, &server, "after bad tokens").await;
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_an_rsa_key_hs256_and_anonymous_connections_are_refused() {
    let db = TestDb::new().await;
    let rsa_pub = std::fs::read(key_path("rsa_public.pem")).unwrap();
    // Only an RSA key, and no anonymous connections.
    let config = config_json(
        &db.url,
        json!({
            "client": {"allow_anonymous": false},
            "auth": {"rsa_public_key": key_path("rsa_public.pem")}
        }),
    );
    let server = Server::start(&config).await;
    let (_, reply) = connect_with(&server, &rs256(json!({"sub": "a"}))).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    let hs_with_rsa_public_key = sign(
        Header::new(Algorithm::HS256),
        &json!({"sub": "a"}),
        &EncodingKey::from_secret(&rsa_pub),
    );
    assert_connect_closes(
        &server,
        &hs_with_rsa_public_key,
        3500,
        "HS256 when only RSA is configured",
    )
    .await;
    let mut c = Client::connect(&server.ws_url()).await;
    c.send(json!({"connect": {}})).await;
    let closed = c.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (3501, "token required")
    );
    assert_connect_closes(&server, &rs256(json!({"sub": ""})), 3507, "anonymous token").await;
    server.stop().await;
    db.drop_db().await;
}

/// An anonymous client, `alice` and `sam` of the staff, connected.
struct Three {
    anon: Client,
    alice: Client,
    staff: Client,
}

impl Three {
    async fn connect(server: &Server) -> Self {
        let anon = Client::connected(&server.ws_url()).await;
        let (alice, _) = connect_with(server, &hs256(json!({"sub": "alice"}))).await;
        let (staff, _) =
            connect_with(server, &hs256(json!({"sub": "sam", "roles": ["staff"]}))).await;
        Self { anon, alice, staff }
    }

    fn pick(&mut self, who: &str) -> &mut Client {
        match who {
            "anon" => &mut self.anon,
            "alice" => &mut self.alice,
            _ => &mut self.staff,
        }
    }
}

/// The error code of a reply (0 for none).
fn code(r: &Value) -> u64 {
    r["error"]["code"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_commands_without_permission_get_103_and_write_nothing() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;
    let mut o = observer(&server).await;
    let before = db_rows(&db).await;
    let mut clients = Three::connect(&server).await;

    // Subscribe and publish without permission: 103.
    for (who, cmd) in [
        ("anon", json!({"subscribe": {"channel": "members:1"}})),
        (
            "anon",
            json!({"publish": {"channel": "members:1", "data": {"x": 1}}}),
        ),
        ("anon", json!({"subscribe": {"channel": "unlisted"}})),
        (
            "anon",
            json!({"history": {"channel": "members:1", "limit": 10}}),
        ),
        ("alice", json!({"subscribe": {"channel": "staff:1"}})),
        (
            "alice",
            json!({"publish": {"channel": "unlisted", "data": {"x": 1}}}),
        ),
        // The table-fed channel is never publishable, whoever asks.
        (
            "alice",
            json!({"publish": {"channel": "incoming-chat", "data": {"x": 1}}}),
        ),
        // Another user's personal channel.
        (
            "alice",
            json!({"subscribe": {"channel": "notifications#bob"}}),
        ),
        (
            "anon",
            json!({"subscribe": {"channel": "notifications#alice"}}),
        ),
        // A token-only channel without a token.
        ("alice", json!({"subscribe": {"channel": "private:a"}})),
        // History of members:1 needs a subscription to it (default "subscriber").
        (
            "alice",
            json!({"history": {"channel": "members:1", "limit": 10}}),
        ),
        ("anon", json!({"presence": {"channel": "members:1"}})),
    ] {
        let r = clients.pick(who).call(cmd.clone()).await;
        assert_eq!(code(&r), 103, "{cmd} → {r}");
    }
    assert_eq!(
        db_rows(&db).await,
        before,
        "nothing written by refused publishes"
    );

    observer_still_works(&mut o, &server, "after refusals").await;
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_commands_with_permission_succeed() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;
    let mut clients = Three::connect(&server).await;
    // Allowed ones.
    for (who, cmd) in [
        ("alice", json!({"subscribe": {"channel": "members:1"}})),
        (
            "alice",
            json!({"history": {"channel": "members:1", "limit": 10}}),
        ),
        (
            "alice",
            json!({"subscribe": {"channel": "notifications#alice"}}),
        ),
        ("staff", json!({"subscribe": {"channel": "staff:1"}})),
        ("anon", json!({"subscribe": {"channel": "incoming-chat"}})),
        (
            "anon",
            json!({"history": {"channel": "incoming-chat", "limit": 1}}),
        ),
    ] {
        let r = clients.pick(who).call(cmd.clone()).await;
        assert!(r.get("error").is_none(), "{cmd} → {r}");
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_tokens_subscribe_refresh_and_are_checked() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;
    let (mut alice, _) = connect_with(&server, &hs256(json!({"sub": "alice"}))).await;

    // Subscription tokens: valid → subscribed with expires/ttl and chan_info.
    let exp = now() + 300;
    let tok =
        hs256(json!({"sub": "alice", "channel": "private:a", "exp": exp, "info": {"seat": 7}}));
    let r = alice
        .call(json!({"subscribe": {"channel": "private:a", "token": tok}}))
        .await;
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
    assert!(r["subscribe"]["ttl"].as_u64().unwrap() > 200, "{r}");
    let tok = hs256(json!({"sub": "alice", "channel": "private:a", "exp": now() + 900}));
    let r = alice
        .call(json!({"sub_refresh": {"channel": "private:a", "token": tok}}))
        .await;
    assert!(r["sub_refresh"]["ttl"].as_u64().unwrap() > 800, "{r}");
    // Expired → 109; invalid (forged, or no channel claim) → 103.
    let expired = hs256(json!({"sub": "alice", "channel": "private:b", "exp": now() - 5}));
    let r = alice
        .call(json!({"subscribe": {"channel": "private:b", "token": expired}}))
        .await;
    assert_eq!(code(&r), 109, "{r}");
    let forged = sign(
        Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "aud": AUDIENCE, "channel": "private:b"}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-!!"),
    );
    let r = alice
        .call(json!({"subscribe": {"channel": "private:b", "token": forged}}))
        .await;
    assert_eq!(code(&r), 103, "{r}");
    let r = alice
        .call(
            json!({"subscribe": {"channel": "private:b", "token": hs256(json!({"sub": "alice"}))}}),
        )
        .await;
    assert_eq!(code(&r), 103, "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_token_of_another_user_or_connection_closes_with_3500() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;
    let mut o = observer(&server).await;
    let (mut alice, _) = connect_with(&server, &hs256(json!({"sub": "alice"}))).await;
    // A token for another user (or channel, or connection) closes with 3500.
    let bobs = hs256(json!({"sub": "bob", "channel": "private:b"}));
    alice
        .send(json!({"subscribe": {"channel": "private:b", "token": bobs}}))
        .await;
    assert_eq!(alice.closed().await.code, 3500);
    let (mut alice2, _) = connect_with(&server, &hs256(json!({"sub": "alice"}))).await;
    let other_conn =
        hs256(json!({"sub": "alice", "channel": "private:c", "client": "someone-else"}));
    alice2
        .send(json!({"subscribe": {"channel": "private:c", "token": other_conn}}))
        .await;
    assert_eq!(alice2.closed().await.code, 3500);

    observer_still_works(&mut o, &server, "after refusals").await;
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_and_expiry() {
    let db = TestDb::new().await;
    let server = Server::start(&auth_config(&db.url, json!({}))).await;

    // Refresh extends the connection; a token for another user closes with 3500.
    let (mut c, reply) =
        connect_with(&server, &hs256(json!({"sub": "alice", "exp": now() + 2}))).await;
    assert_eq!(reply["connect"]["expires"], true, "{reply}");
    let r = c
        .call(json!({"refresh": {"token": hs256(json!({"sub": "alice", "exp": now() + 3600}))}}))
        .await;
    assert_eq!(r["refresh"]["expires"], true, "{r}");
    assert!(r["refresh"]["ttl"].as_u64().unwrap() > 3500, "{r}");
    assert!(r["refresh"]["client"].is_string(), "{r}");
    // Past the old expiry + delay, still connected. (The session's unit tests check this on
    // paused time, to the millisecond: `refresh_outlives_the_first_token_...` in
    // connector/src/session/tests.rs; here it runs once end to end, through a real socket.)
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let r = c.call(json!({"subscribe": {"channel": "public:x"}})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    // Expired refresh token: 3005; another user's: 3500.
    let mut d = connect_with(&server, &hs256(json!({"sub": "alice"})))
        .await
        .0;
    d.send(json!({"refresh": {"token": hs256(json!({"sub": "mallory"}))}}))
        .await;
    assert_eq!(d.closed().await.code, 3500);
    c.send(json!({"refresh": {"token": hs256(json!({"sub": "alice", "exp": now() - 5}))}}))
        .await;
    assert_eq!(c.closed().await.code, 3005);

    // Not refreshed: closed with 3005 after expiry + expired_close_delay_secs (its moment is
    // checked on paused time in connector/src/session/tests.rs,
    // `an_unrefreshed_connection_closes_with_3005_at_expiry_plus_delay`).
    let (mut e, _) = connect_with(&server, &hs256(json!({"sub": "alice", "exp": now() + 1}))).await;
    assert_eq!(e.closed().await.code, 3005);

    // A subscription whose token is not refreshed gets an unsubscribe push 2501.
    let (mut f, _) = connect_with(&server, &hs256(json!({"sub": "alice"}))).await;
    let tok = hs256(json!({"sub": "alice", "channel": "private:z", "exp": now() + 1}));
    let r = f
        .call(json!({"subscribe": {"channel": "private:z", "token": tok}}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    let push = loop {
        let m = f.next_message().await;
        if m["push"]["unsubscribe"].is_object() {
            break m;
        }
    };
    assert_eq!(push["push"]["channel"], "private:z");
    assert_eq!(push["push"]["unsubscribe"]["code"], 2501);
    server.stop().await;
    db.drop_db().await;
}

/// A server with a publish rate of 1/s (burst 3) and at most 4 connections.
async fn limited_server(db: &TestDb) -> Server {
    Server::start(&auth_config(
        &db.url,
        json!({"publish_rate_per_sec": 1, "publish_burst": 3, "max_connections": 4}),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sites_origin_gets_403_before_the_upgrade() {
    let db = TestDb::new().await;
    let server = limited_server(&db).await;
    // Origin: same origin or none passes; another site gets 403 before the upgrade.
    let with_origin = |origin: &str| {
        let mut req = server.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req
    };
    let err = tokio_tungstenite::connect_async(with_origin("https://evil.example"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("expected HTTP 403, got {other:?}"),
    }
    let same = format!("http://{}", server.addr);
    let (ws, _) = tokio_tungstenite::connect_async(with_origin(&same))
        .await
        .unwrap();
    drop(ws);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_the_rate_get_111_and_the_connection_stays_usable() {
    let db = TestDb::new().await;
    let server = limited_server(&db).await;
    let mut o = observer(&server).await;

    // Rate: a burst of 3, then 111 (temporary); the connection stays usable.
    let mut p = Client::connected(&server.ws_url()).await;
    let mut codes = Vec::new();
    for i in 0..8 {
        let r = p
            .call(json!({"publish": {"channel": "public:flood", "data": {"i": i}}}))
            .await;
        codes.push(r["error"]["code"].as_u64().unwrap_or(0));
        if r.get("error").is_some() {
            assert_eq!(r["error"]["temporary"], true, "{r}");
        }
    }
    assert_eq!(&codes[..3], &[0, 0, 0], "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == 111), "{codes:?}");
    observer_still_works(&mut o, &server, "after the flood").await;
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503() {
    let db = TestDb::new().await;
    let server = limited_server(&db).await;
    // Two connections already open, as in a busy node: an observer and a publisher.
    let _o = observer(&server).await;
    let _p = Client::connected(&server.ws_url()).await;

    // Connections: max 4 (the observer, p, _a and _b).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _a = Client::connect(&server.ws_url()).await;
    let _b = Client::connect(&server.ws_url()).await;
    let err = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    drop(_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _c = Client::connected(&server.ws_url()).await;
    server.stop().await;
    db.drop_db().await;
}

/// An RSA key the server does not know (the "unknown kid" case).
const FOREIGN_RSA_KEY: &str = include_str!("keys/foreign_rsa_private.pem");

#[test]
fn token_cli_mints_verifiable_tokens_and_needs_an_hmac_key() {
    let run = |secret: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_connector"));
        cmd.arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../config.json"))
            .arg("token")
            .args(args)
            .env_remove("RELAY__AUTH__HMAC_SECRET_KEY");
        if let Some(s) = secret {
            cmd.env("RELAY__AUTH__HMAC_SECRET_KEY", s);
        }
        cmd.output().unwrap()
    };
    let out = run(
        Some(SECRET),
        &[
            "--sub",
            "alice",
            "--ttl",
            "1h",
            "--channel",
            "notifications#alice",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim_end();
    assert_eq!(token.lines().count(), 1, "only the token is printed");
    let verifier = connector::auth::Verifier::new(&connector::auth::AuthConfig {
        hmac_secret_key: Some(SECRET.into()),
        ..Default::default()
    })
    .unwrap();
    let claims: Value = verifier.verify_cached(token).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["channel"], "notifications#alice");
    let ttl = claims["exp"].as_u64().unwrap() - now();
    assert!((3590..=3600).contains(&ttl), "{claims}");

    let out = run(None, &["--sub", "alice"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hmac_secret_key"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty());
}
