//! The `writer-lambda` binary: parses the command line, reads the configuration, builds the pool once,
//! then runs under `lambda_runtime` when `AWS_LAMBDA_RUNTIME_API` is set, or serves the local invoke
//! server otherwise.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;
use writer_lambda::{Config, State, lambda, local, shutdown};

/// The writer: turns published chat events into rows of `chat_data`.
///
/// In AWS Lambda (AWS_LAMBDA_RUNTIME_API set) it runs under the Lambda runtime and IAM decides who may
/// invoke it. Elsewhere it serves the Lambda Invoke API on a local port (127.0.0.1:9000 unless told
/// otherwise) and accepts only invocations signed with WRITER_SECRET, the secret the connector signs with.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Environment:
  DATABASE_URL                    the database (default postgres://postgres@127.0.0.1:5432/postgres)
  WRITER_LISTEN, PORT             local mode: the address (PORT: 127.0.0.1:$PORT); --listen wins
  WRITER_SECRET                   local mode: the shared secret (>= 32 bytes) invocations are signed with
  WRITER_DB_MAX_CONNECTIONS       pool size (default 4)
  WRITER_DB_ACQUIRE_TIMEOUT_MS    wait for a database connection (default 3000)
  RUST_LOG                        log filter (default info)"
)]
struct Cli {
    /// Local mode: the address of the invoke server (default: WRITER_LISTEN, else 127.0.0.1:9000).
    /// Binding anything but loopback exposes it to the network: keep WRITER_SECRET set.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Log format: `text`, or `json` (one JSON object per line, for CloudWatch and log shippers).
    /// Default: json when AWS_LAMBDA_LOG_FORMAT=JSON, text otherwise. Colours only on a terminal.
    #[arg(long, value_enum, env = "RELAY_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Local mode: accept invocations without a signature when WRITER_SECRET is not set. Anyone who
    /// reaches the port can then write as any client: only for a writer no one else can reach.
    #[arg(long, env = "WRITER_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    init_tracing(in_lambda, cli.log_format);

    let mut config = Config::from_env()?;
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if !in_lambda && config.secret.is_none() && !cli.insecure_no_auth {
        anyhow::bail!(
            "WRITER_SECRET is not set: the local invoke server accepts only invocations signed with it \
             (set the same WRITER_SECRET, at least 32 bytes, for the connector), or pass \
             --insecure-no-auth for a writer no one else can reach"
        );
    }
    tracing::info!(
        database = %config.database_description(),
        max_connections = config.max_connections,
        acquire_timeout_ms = config.acquire_timeout.as_millis() as u64,
        mode = if in_lambda { "lambda" } else { "local" },
        "writer starting"
    );
    let state = State::new(config.pool()?);

    if in_lambda {
        tokio::select! {
            result = lambda::run(&state) => {
                result.map_err(|e| anyhow::anyhow!(e)).context("lambda runtime failed")?;
            }
            () = shutdown::signal() => {}
        }
    } else {
        if config.secret.is_none() {
            tracing::warn!("--insecure-no-auth: invocations are not authenticated");
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        local::serve(
            listener,
            Arc::new(state.clone()),
            config.secret.clone(),
            shutdown::signal(),
        )
        .await
        .context("local invoke server failed")?;
    }
    state.pool().close().await;
    tracing::info!("writer stopped");
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): JSON lines when asked (`--log-format json`,
/// `RELAY_LOG_FORMAT=json`, or in Lambda `AWS_LAMBDA_LOG_FORMAT=JSON`), text otherwise; ANSI colours only
/// when stderr is a terminal; in Lambda no timestamps in text (CloudWatch adds its own).
fn init_tracing(in_lambda: bool, format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or_else(|| {
        if std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match (format, in_lambda) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}
