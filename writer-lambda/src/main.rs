//! The `writer-lambda` binary: reads the configuration, builds the pool once, then runs under
//! `lambda_runtime` when `AWS_LAMBDA_RUNTIME_API` is set, or serves the local invoke server otherwise.

use std::sync::Arc;

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;
use writer_lambda::{Config, State, lambda, local, shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    init_tracing(in_lambda);

    let config = Config::from_env()?;
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
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        local::serve(listener, Arc::new(state.clone()), shutdown::signal())
            .await
            .context("local invoke server failed")?;
    }
    state.pool().close().await;
    tracing::info!("writer stopped");
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). In Lambda: no colours and no timestamps
/// (CloudWatch adds its own), JSON lines when `AWS_LAMBDA_LOG_FORMAT=JSON`.
fn init_tracing(in_lambda: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"))
        || std::env::var("WRITER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    match (in_lambda, json) {
        (_, true) => builder.json().init(),
        (true, false) => builder.with_ansi(false).without_time().init(),
        (false, false) => builder.init(),
    }
}
