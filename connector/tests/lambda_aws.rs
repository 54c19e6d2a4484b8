//! `lambda` targets without `endpoint` invoke AWS Lambda through the AWS SDK: region, credentials and
//! endpoint come from the standard AWS environment. Here the endpoint is a fake Lambda on loopback
//! (`AWS_ENDPOINT_URL_LAMBDA`), the credentials are static (`AWS_ACCESS_KEY_ID=test`), and the connector
//! runs as a child process, so the environment it sees is its own (nothing process-global is changed
//! in the test process). The start-up check is one test; the invocation cases run in order in another
//! (its counts of the fake's calls are cumulative).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use support::{Client, TestDb, config_json};

/// One Invoke call the fake Lambda received.
#[derive(Debug, Clone)]
struct Call {
    function: String,
    authorization: String,
    invocation_type: String,
    event: Value,
}

#[derive(Clone, Default)]
struct FakeLambda {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeLambda {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

fn error(status: StatusCode, kind: &'static str, message: &str) -> Response {
    let mut h = HeaderMap::new();
    h.insert("x-amzn-ErrorType", HeaderValue::from_static(kind));
    h.insert("content-type", HeaderValue::from_static("application/json"));
    let body = json!({"Type": "User", "message": message}).to_string();
    (status, h, body).into_response()
}

/// `POST /2015-03-31/functions/{name}/invocations`, answering as Lambda does. The message name picks
/// the answer: `fail` (the function threw), `throttle` (429), `missing` (404); `slow-writer` sleeps.
async fn invoke(
    State(fake): State<FakeLambda>,
    UrlPath(function): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let authorization = header("authorization");
    if !authorization.starts_with("AWS4-HMAC-SHA256 ") {
        return error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "not signed",
        );
    }
    let event: Value = serde_json::from_str(&body).unwrap();
    let name = event["messages"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    fake.calls.lock().unwrap().push(Call {
        function: function.clone(),
        authorization,
        invocation_type: header("x-amz-invocation-type"),
        event,
    });
    if function == "slow-writer" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut h = HeaderMap::new();
    h.insert(
        "X-Amz-Executed-Version",
        HeaderValue::from_static("$LATEST"),
    );
    match name.as_str() {
        "fail" => {
            h.insert(
                "X-Amz-Function-Error",
                HeaderValue::from_static("Unhandled"),
            );
            let body = r#"{"errorType":"Error","errorMessage":"boom: duplicate author"}"#;
            (StatusCode::OK, h, body).into_response()
        }
        "throttle" => error(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            "Rate Exceeded.",
        ),
        "missing" => error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "Function not found",
        ),
        _ => (StatusCode::OK, h, r#"{"statusCode":200}"#).into_response(),
    }
}

async fn fake_lambda() -> (String, FakeLambda) {
    let fake = FakeLambda::default();
    let app = Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), fake)
}

/// The connector binary in a child process, with an AWS environment of the test's making only.
struct Connector {
    child: Child,
    log: PathBuf,
}

impl Connector {
    fn spawn(config: &Path, db_url: &str, listen: &str, aws_env: &[(&str, &str)]) -> Self {
        let log = config.with_extension(format!("{}.log", listen.replace([':', '.'], "_")));
        let empty = config.with_file_name("empty-aws-profile");
        std::fs::write(&empty, "").unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_connector"));
        cmd.args(["--config", config.to_str().unwrap(), "run"]);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("DATABASE_URL", db_url)
            .env("RELAY_LISTEN", listen)
            .env("RUST_LOG", "info")
            // No instance metadata service and empty profile files: nothing outside the test decides.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", &empty)
            .env("AWS_SHARED_CREDENTIALS_FILE", &empty)
            .envs(aws_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Self {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns whether it succeeded.
    async fn exited(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "still running:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(&mut self, listen: &str) {
        let url = format!("http://{listen}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("connector exited with {status}:\n{}", self.log());
            }
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("connector not ready:\n{}", self.log());
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_local_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

async fn publish(c: &mut Client, channel: &str, name: &str) -> Value {
    c.call(
        json!({"publish": {"channel": channel, "data": {"name": name, "data": {"content": "hi"}}}}),
    )
    .await
}

const SECRET: &str = "fake-secret-key-that-is-never-logged";
const ARN: &str = "arn:aws:lambda:eu-west-1:123456789012:function:chat-writer:live";

/// The test database, the fake Lambda (and its URL), and a directory of its own (`tag`) holding a
/// `config.json` with the three rules.
async fn setup(tag: &str) -> (TestDb, String, FakeLambda, PathBuf) {
    let db = TestDb::new().await;
    let (fake_url, fake) = fake_lambda().await;
    let dir = std::env::temp_dir().join(format!("relay-lambda-aws-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config_json(
            &db.url,
            json!({"rules": [
                {"channel": "outgoing-chat", "target": {"type": "lambda", "function": "chat-writer"}, "retries": 1, "retry_backoff_ms": 10},
                {"channel": "eu:*", "target": {"type": "lambda", "function": ARN, "region": "eu-west-1"}},
                {"channel": "slow", "target": {"type": "lambda", "function": "slow-writer"}, "timeout_ms": 500}
            ]}),
        ),
    )
    .unwrap();
    (db, fake_url, fake, dir)
}

/// Static credentials and the fake Lambda's endpoint, as the AWS environment gives them.
fn credentials(fake_url: &str) -> [(&'static str, &str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_ENDPOINT_URL_LAMBDA", fake_url),
    ]
}

#[tokio::test]
async fn without_an_aws_region_start_up_stops_naming_the_rule() {
    let (db, fake_url, fake, dir) = setup("no-region").await;
    let config = dir.join("config.json");
    let credentials = credentials(&fake_url);

    // Without any AWS region, start-up stops with a message naming the rule.
    let mut no_region = Connector::spawn(&config, &db.url, &free_local_addr(), &credentials);
    assert!(!no_region.exited(Duration::from_secs(30)).await);
    let log = no_region.log();
    assert!(
        log.contains("rules[0].target.region") && log.contains("outgoing-chat"),
        "{log}"
    );
    assert!(fake.calls().is_empty());
    drop(no_region);
    std::fs::remove_dir_all(&dir).unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn lambda_targets_without_endpoint_are_signed_sdk_invocations() {
    let (db, fake_url, fake, dir) = setup("invocations").await;
    let config = dir.join("config.json");
    let credentials = credentials(&fake_url);
    let listen = free_local_addr();
    let mut env = credentials.to_vec();
    env.push(("AWS_REGION", "us-east-1"));
    let mut connector = Connector::spawn(&config, &db.url, &listen, &env);
    connector.wait_ready(&listen).await;
    let mut c = Client::connected(&format!("ws://{listen}/connection/websocket")).await;

    // (a) Success: a SigV4-signed RequestResponse invoke with the envelope as the event.
    let r = publish(&mut c, "outgoing-chat", "chatMsg").await;
    assert_eq!(r["publish"], json!({}), "{r}\n{}", connector.log());
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.function, "chat-writer");
    assert!(
        call.authorization.contains("Credential=test/")
            && call
                .authorization
                .contains("/us-east-1/lambda/aws4_request"),
        "{}",
        call.authorization
    );
    assert_eq!(call.invocation_type, "RequestResponse");
    assert_eq!(call.event["source"], "channel.message");
    assert_eq!(call.event["channel"], "outgoing-chat");
    assert_eq!(call.event["messages"][0]["name"], "chatMsg");
    assert_eq!(call.event["messages"][0]["encoding"], "json");

    // (b) The function threw (X-Amz-Function-Error): an error reply, not retried.
    let r = publish(&mut c, "outgoing-chat", "fail").await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["message"], "publish target failed");
    assert_eq!(fake.calls().len(), 2);

    // (c) Throttled (429 TooManyRequestsException): retried once, then an error reply.
    let r = publish(&mut c, "outgoing-chat", "throttle").await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["message"], "publish target unavailable");
    assert_eq!(fake.calls().len(), 4);

    // Unknown function (404 ResourceNotFoundException): an error reply at once.
    let r = publish(&mut c, "outgoing-chat", "missing").await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["message"], "publish target failed");
    assert_eq!(fake.calls().len(), 5);

    // A function ARN with the rule's own region: signed for that region.
    let r = publish(&mut c, "eu:1", "chatMsg").await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let call = fake.calls().pop().unwrap();
    assert_eq!(call.function, ARN);
    assert!(
        call.authorization
            .contains("/eu-west-1/lambda/aws4_request"),
        "{}",
        call.authorization
    );

    // The rule's timeout_ms bounds the invocation.
    let started = Instant::now();
    let r = publish(&mut c, "slow", "chatMsg").await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["message"], "publish target unavailable");
    assert!(started.elapsed() < Duration::from_millis(2500));

    let log = connector.log();
    assert!(!log.contains(SECRET), "{log}");
    drop(connector);
    std::fs::remove_dir_all(&dir).unwrap();
    db.drop_db().await;
}
