//! The binary in local mode (no `AWS_LAMBDA_RUNTIME_API`): it serves the invoke path on `WRITER_LISTEN`
//! and stops cleanly on SIGTERM.

#![cfg(unix)]

mod support;

use std::{process::Stdio, time::Duration};

use sqlx::PgPool;
use support::*;
use writer_lambda::{InvocationResult, Status, auth::Secret};

const SECRET: &str = "the-binary-test-secret-0123456789abcdef";

#[sqlx::test(migrations = "../migrations")]
async fn serves_locally_and_stops_on_sigterm(pool: PgPool) {
    // A free port: bind port 0, note it, release it for the child.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let options = pool.connect_options();
    let database_url = format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().expect("test database name"),
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_writer-lambda"))
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env_remove("PORT")
        .env("WRITER_LISTEN", format!("127.0.0.1:{port}"))
        .env("WRITER_SECRET", SECRET)
        .env("DATABASE_URL", database_url)
        .env(
            "RUST_LOG",
            std::env::var("WRITER_TEST_LOG").unwrap_or_else(|_| "off".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn writer-lambda");

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await {
            ready = response.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "the local server came up and reached the database");

    let invoke_url = format!("{base}/2015-03-31/functions/chat-writer/invocations");
    let body = envelope(vec![chat("m1", "c1", "from the binary")]).to_string();
    // Unsigned: refused.
    let response = http
        .post(&invoke_url)
        .body(body.clone())
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status(), 403);
    let signature = Secret::new(SECRET)
        .expect("secret")
        .sign(writer_lambda::auth::now_secs(), body.as_bytes());
    let response = http
        .post(&invoke_url)
        .header("X-Relay-Signature", signature)
        .body(body)
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status(), 200);
    let result: InvocationResult = response.json().await.expect("json");
    assert_eq!(statuses(&result), [Status::Inserted]);
    assert_eq!(
        row(&pool, "m1").await.expect("row").msg_data,
        "from the binary"
    );

    let pid = child.id().expect("child pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the writer stops within 10 s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
}
