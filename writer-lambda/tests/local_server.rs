//! The local invoke server end to end: the real server on port 0, real HTTP (reqwest), real PostgreSQL.

mod support;

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use sqlx::{PgPool, postgres::PgPoolOptions};
use support::*;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use writer_lambda::{InvocationResult, State, Status, auth::Secret, local};

/// The secret the test servers and their callers share.
const SECRET: &str = "the-local-server-test-secret-0123456789";

/// A running local invoke server.
struct Server {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
    /// What [`Server::invoke`] signs with (the server's secret, or `None` for an unsigned call).
    signer: Option<Secret>,
}

impl Server {
    /// A server that requires invocations signed with [`SECRET`]; [`Server::invoke`] signs them.
    async fn start(pool: PgPool) -> Self {
        let secret = Secret::new(SECRET).expect("secret");
        Self::start_with(pool, Some(secret.clone()), Some(secret)).await
    }

    async fn start_with(pool: PgPool, server: Option<Secret>, signer: Option<Secret>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(local::serve(
            listener,
            Arc::new(State::new(pool)),
            server,
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            base,
            stop: Some(stop),
            task,
            http: reqwest::Client::new(),
            signer,
        }
    }

    fn invoke_url(&self) -> String {
        format!("{}/2015-03-31/functions/chat-writer/invocations", self.base)
    }

    /// Posts `body` to the invoke path, signed with the server's secret when it has one.
    async fn invoke(&self, body: impl AsRef<[u8]>) -> reqwest::Response {
        let body = body.as_ref().to_vec();
        let mut request = self.http.post(self.invoke_url());
        if let Some(signer) = &self.signer {
            request = request.header(
                "X-Relay-Signature",
                signer.sign(writer_lambda::auth::now_secs(), &body),
            );
        }
        request.body(body).send().await.expect("request")
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server stops promptly")
            .expect("server task")
            .expect("server result");
    }
}

fn function_error(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-amz-function-error")
        .map(|v| v.to_str().expect("ascii").to_owned())
}

#[sqlx::test(migrations = "../migrations")]
async fn invocations_over_http(pool: PgPool) {
    let server = Server::start(pool.clone()).await;
    let event = envelope(vec![
        chat("m1", "c1", "hello"),
        edit("e1", "c1", "m1", "hello!"),
    ]);

    let response = server.invoke(event.to_string()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(function_error(&response), None);
    assert!(response.headers().contains_key("x-amzn-requestid"));
    let result: InvocationResult = response.json().await.expect("result json");
    assert_eq!(statuses(&result), [Status::Inserted, Status::Updated]);
    let row = row(&pool, "m1").await.expect("row");
    assert_eq!((row.msg_data.as_str(), row.is_edited), ("hello!", true));

    // The exact wire format of the result.
    let response = server.invoke(event.to_string()).await;
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body,
        json!({"results": [
            {"index": 0, "id": "m1", "name": "chatMsg", "status": "duplicate", "reason": "message id already processed"},
            {"index": 1, "id": "e1", "name": "editedMsg", "status": "duplicate", "reason": "message id already processed"},
        ]})
    );

    // DryRun validates the request (signature included) without running the function.
    let dry = envelope(vec![chat("dry", "c1", "x")]).to_string();
    let signature = Secret::new(SECRET)
        .expect("secret")
        .sign(writer_lambda::auth::now_secs(), dry.as_bytes());
    let response = server
        .http
        .post(server.invoke_url())
        .header("X-Amz-Invocation-Type", "DryRun")
        .header("X-Relay-Signature", signature)
        .body(dry)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 204);
    assert_eq!(support::row(&pool, "dry").await, None);

    let health = server
        .http
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = server
        .http
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);

    server.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn bad_requests_get_clear_errors(pool: PgPool) {
    let server = Server::start(pool.clone()).await;

    // Not JSON: refused by the API, the function does not run.
    let response = server.invoke("{not json").await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response
            .headers()
            .get("x-amzn-errortype")
            .map(|v| v.as_bytes()),
        Some(&b"InvalidRequestContentException"[..])
    );
    let body: Value = response.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Could not parse request body into json")),
        "{body}"
    );

    // JSON but not an envelope: a function error, like Lambda reports it.
    let response = server.invoke(r#"{"messages": 5}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(function_error(&response).as_deref(), Some("Unhandled"));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["errorType"], "InvalidEvent");
    assert!(
        body["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("malformed envelope") && m.contains("not retryable")),
        "{body}"
    );

    // Over the 6 MB limit.
    let response = server
        .invoke(vec![b' '; local::MAX_PAYLOAD_BYTES + 1])
        .await;
    assert_eq!(response.status(), 413);

    // An unknown invocation type.
    let response = server
        .http
        .post(server.invoke_url())
        .header("X-Amz-Invocation-Type", "Sometimes")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 400);

    assert_eq!(count(&pool, "chat_data").await, 0);
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_function_error() {
    // Port 1 on localhost: connection refused, quickly.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres:hunter2@127.0.0.1:1/postgres")
        .expect("lazy pool");
    let server = Server::start(pool).await;

    let response = server
        .invoke(envelope(vec![chat("m1", "c1", "hi")]).to_string())
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(function_error(&response).as_deref(), Some("Unhandled"));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["errorType"], "DatabaseError");
    let message = body["errorMessage"].as_str().expect("message");
    assert!(message.contains("retryable"), "{message}");
    assert!(
        !message.contains("hunter2"),
        "the password leaked: {message}"
    );

    let ready = server
        .http
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let health = server
        .http
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(
        health.status(),
        200,
        "liveness does not depend on the database"
    );

    server.stop().await;
}

fn error_type(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-amzn-errortype")
        .map(|v| v.to_str().expect("ascii").to_owned())
}

#[sqlx::test(migrations = "../migrations")]
async fn only_invocations_signed_with_the_secret_run(pool: PgPool) {
    let server = Server::start(pool.clone()).await;
    let body = envelope(vec![chat("m1", "c1", "forged")]).to_string();
    let secret = Secret::new(SECRET).expect("secret");
    let now = writer_lambda::auth::now_secs();
    let other = Secret::new("not-the-server-secret-but-long-enough!!").expect("secret");
    let cases = [
        (None, "MissingAuthenticationTokenException"),
        (Some("t=1,v1=00".to_owned()), "InvalidSignatureException"),
        (
            Some(other.sign(now, body.as_bytes())),
            "InvalidSignatureException",
        ),
        // Signed with the right secret, but 10 minutes ago: a replay.
        (
            Some(secret.sign(now - 600, body.as_bytes())),
            "InvalidSignatureException",
        ),
        // The right signature of another body.
        (
            Some(secret.sign(now, b"{\"messages\":[]}")),
            "InvalidSignatureException",
        ),
    ];
    for (header, want) in cases {
        let mut request = server.http.post(server.invoke_url()).body(body.clone());
        if let Some(header) = &header {
            request = request.header("X-Relay-Signature", header);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 403, "{header:?}");
        assert_eq!(error_type(&response).as_deref(), Some(want), "{header:?}");
    }
    assert_eq!(count(&pool, "chat_data").await, 0, "no refused call wrote");

    // Signed properly, it runs.
    let response = server.invoke(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(count(&pool, "chat_data").await, 1);
    server.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn without_a_secret_unsigned_invocations_run(pool: PgPool) {
    let server = Server::start_with(pool.clone(), None, None).await;
    let response = server
        .invoke(envelope(vec![chat("m1", "c1", "hi")]).to_string())
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(count(&pool, "chat_data").await, 1);
    server.stop().await;
}
