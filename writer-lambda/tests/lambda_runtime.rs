//! The `lambda_runtime` mode end to end: the real binary as a child process, polling a fake Lambda
//! Runtime API that this test serves on port 0, writing to the test's own PostgreSQL database.
//!
//! The child's logs are off (it logs the expected errors of this test); set `WRITER_TEST_LOG` to a
//! `RUST_LOG` filter, e.g. `WRITER_TEST_LOG=debug`, to see them.

mod support;

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use sqlx::PgPool;
use support::*;
use tokio::sync::{Mutex, mpsc};

/// What the runtime posted back for an invocation.
#[derive(Debug)]
enum Posted {
    Response {
        request_id: String,
        body: Value,
    },
    Error {
        request_id: String,
        error_type_header: Option<String>,
        body: Value,
    },
    InitError {
        body: String,
    },
}

/// The fake Runtime API: `next` hands out queued events (and waits, like the real one, while there are
/// none); `response`, `error` and `init/error` are captured.
struct FakeRuntimeApi {
    events: Mutex<mpsc::UnboundedReceiver<(String, Value)>>,
    posted: mpsc::UnboundedSender<Posted>,
}

async fn next(State(api): State<Arc<FakeRuntimeApi>>) -> Response {
    let Some((request_id, event)) = api.events.lock().await.recv().await else {
        return std::future::pending().await;
    };
    let deadline = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        + 30_000;
    (
        [
            ("Lambda-Runtime-Aws-Request-Id", request_id),
            ("Lambda-Runtime-Deadline-Ms", deadline.to_string()),
            (
                "Lambda-Runtime-Invoked-Function-Arn",
                "arn:aws:lambda:eu-west-1:123456789012:function:chat-writer".to_owned(),
            ),
            (
                "Lambda-Runtime-Trace-Id",
                "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
                    .to_owned(),
            ),
            ("Content-Type", "application/json".to_owned()),
        ],
        event.to_string(),
    )
        .into_response()
}

async fn response(
    State(api): State<Arc<FakeRuntimeApi>>,
    Path(request_id): Path<String>,
    body: Bytes,
) -> StatusCode {
    let body = serde_json::from_slice(&body).expect("response body is JSON");
    let _ = api.posted.send(Posted::Response { request_id, body });
    StatusCode::ACCEPTED
}

async fn error(
    State(api): State<Arc<FakeRuntimeApi>>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let error_type_header = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = serde_json::from_slice(&body).expect("error body is JSON");
    let _ = api.posted.send(Posted::Error {
        request_id,
        error_type_header,
        body,
    });
    StatusCode::ACCEPTED
}

async fn init_error(State(api): State<Arc<FakeRuntimeApi>>, body: String) -> StatusCode {
    let _ = api.posted.send(Posted::InitError { body });
    StatusCode::ACCEPTED
}

/// The test's side of the fake API and the child process.
struct Harness {
    events: mpsc::UnboundedSender<(String, Value)>,
    posted: mpsc::UnboundedReceiver<Posted>,
    child: tokio::process::Child,
}

impl Harness {
    async fn start(pool: &PgPool) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (posted_tx, posted_rx) = mpsc::unbounded_channel();
        let api = Arc::new(FakeRuntimeApi {
            events: Mutex::new(events_rx),
            posted: posted_tx,
        });
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(api);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        // The child writes to this test's database (trust auth: no password needed).
        let options = pool.connect_options();
        let database_url = format!(
            "postgres://{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().expect("test database name"),
        );
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_writer-lambda"))
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", "chat-writer")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "2024/01/01/[$LATEST]test")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/chat-writer")
            .env("DATABASE_URL", database_url)
            .env("WRITER_DB_MAX_CONNECTIONS", "1")
            .env(
                "RUST_LOG",
                std::env::var("WRITER_TEST_LOG").unwrap_or_else(|_| "off".to_owned()),
            )
            .env_remove("WRITER_LISTEN")
            .env_remove("PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn writer-lambda");
        Harness {
            events: events_tx,
            posted: posted_rx,
            child,
        }
    }

    /// Queues an event and waits for what the runtime posts back.
    async fn invoke(&mut self, request_id: &str, event: Value) -> Posted {
        self.events
            .send((request_id.to_owned(), event))
            .expect("fake API alive");
        let posted = tokio::select! {
            posted = self.posted.recv() => posted.expect("fake API alive"),
            status = self.child.wait() => panic!(
                "writer-lambda exited ({status:?}) instead of answering {request_id}; \
                 rerun with WRITER_TEST_LOG=debug to see its logs"
            ),
            () = tokio::time::sleep(Duration::from_secs(20)) => {
                panic!("writer-lambda did not answer {request_id} within 20 s")
            }
        };
        if let Posted::InitError { body } = &posted {
            panic!("the writer failed to initialize: {body}");
        }
        posted
    }

    async fn stop(mut self) {
        self.child.kill().await.expect("kill child");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_binary_under_lambda_runtime(pool: PgPool) {
    let mut harness = Harness::start(&pool).await;
    let event = envelope(vec![
        chat("m1", "c1", "hello"),
        edit("e1", "c1", "m1", "hello!"),
    ]);

    // Success: the result is posted to .../response.
    match harness.invoke("req-1", event.clone()).await {
        Posted::Response { request_id, body } => {
            assert_eq!(request_id, "req-1");
            assert_eq!(body["results"][0]["status"], "inserted", "{body}");
            assert_eq!(body["results"][1]["status"], "updated", "{body}");
        }
        other => panic!("expected a response, got {other:?}"),
    }
    let row = row(&pool, "m1").await.expect("row written by the child");
    assert_eq!((row.msg_data.as_str(), row.is_edited), ("hello!", true));

    // The same event again (a Lambda retry): nothing changes.
    match harness.invoke("req-2", event).await {
        Posted::Response { body, .. } => {
            assert_eq!(body["results"][0]["status"], "duplicate", "{body}");
            assert_eq!(body["results"][1]["status"], "duplicate", "{body}");
        }
        other => panic!("expected a response, got {other:?}"),
    }

    // A malformed envelope: posted to .../error, not retryable.
    match harness.invoke("req-3", json!({"messages": "nope"})).await {
        Posted::Error {
            request_id,
            error_type_header,
            body,
        } => {
            assert_eq!(request_id, "req-3");
            assert_eq!(error_type_header.as_deref(), Some("unhandled"));
            assert_eq!(body["errorType"], "InvalidEvent", "{body}");
            assert!(
                body["errorMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains("not retryable")),
                "{body}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }

    // A database failure: posted to .../error as retryable; the retry succeeds once it is fixed.
    break_writes(&pool, "INSERT").await;
    let second = envelope(vec![chat("m2", "c2", "second")]);
    match harness.invoke("req-4", second.clone()).await {
        Posted::Error { body, .. } => {
            assert_eq!(body["errorType"], "DatabaseError", "{body}");
            let message = body["errorMessage"].as_str().expect("message");
            assert!(message.contains("retryable"), "{message}");
            assert!(message.contains("injected failure"), "{message}");
            assert!(
                !message.contains("failure: injected failure"),
                "repeated: {message}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(support::row(&pool, "m2").await, None);
    unbreak(&pool).await;
    match harness.invoke("req-5", second).await {
        Posted::Response { body, .. } => {
            assert_eq!(body["results"][0]["status"], "inserted", "{body}")
        }
        other => panic!("expected a response, got {other:?}"),
    }
    assert_eq!(count(&pool, "chat_data").await, 2);

    harness.stop().await;
}
