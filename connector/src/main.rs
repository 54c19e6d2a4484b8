//! The `connector` binary: parses the command line, loads the configuration, sets up logging and
//! calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use connector::Config;

/// The realtime relay for PostgreSQL.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (environment variables override it).
    #[arg(
        long,
        short,
        env = "RELAY_CONFIG",
        default_value = "config.json",
        global = true
    )]
    config: PathBuf,
    /// What to do (default: run).
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Apply migrations, install triggers and serve (the default).
    Run,
    /// Apply the migrations and exit.
    Migrate,
    /// Validate the configuration and exit.
    Check,
    /// Manage the capture triggers.
    Triggers {
        #[command(subcommand)]
        action: TriggerCmd,
    },
    /// Mint an HS256 token with the configured `auth.hmac_secret_key` and print it (for development
    /// and operations; production tokens come from the application's backend).
    Token {
        /// The user (`sub`).
        #[arg(long)]
        sub: String,
        /// Lifetime: seconds, or a number with s, m, h or d (`90s`, `15m`, `1h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
        /// Mint a subscription token for this channel instead of a connection token.
        #[arg(long)]
        channel: Option<String>,
        /// JSON for the `info` claim (connection or channel info).
        #[arg(long)]
        info: Option<String>,
    },
}

/// Parses `90`, `90s`, `15m`, `1h`, `7d` into seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 1h or 7d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(scale) {
        Some(secs) if secs > 0 => Ok(secs),
        _ => Err(format!("{s:?} must be a positive duration")),
    }
}

#[derive(Debug, Subcommand)]
enum TriggerCmd {
    /// Install the triggers of every mapping and drop those of mappings that are gone.
    Sync,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(&cli.config)?;
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Check => {
            #[allow(clippy::print_stdout)]
            {
                println!("{}: configuration is valid", cli.config.display());
            }
            Ok(())
        }
        Cmd::Migrate => {
            let pool = connector::db::pool(&config.database)?;
            connector::db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Cmd::Triggers {
            action: TriggerCmd::Sync,
        } => {
            if config.capture.mode == connector::capture::CaptureMode::Wal {
                anyhow::bail!(
                    "capture.mode is \"wal\": capture triggers would publish every change twice; \
                     the wal leader drops them (switch capture.mode to \"trigger\" to use triggers)"
                );
            }
            let pool = connector::db::pool(&config.database)?;
            connector::db::migrate(&pool).await?;
            let report = connector::db::triggers::sync(&pool, &config.mappings).await?;
            #[allow(clippy::print_stdout)]
            {
                for t in &report.installed {
                    println!("installed {t}");
                }
                for t in &report.removed {
                    println!("removed {t}");
                }
            }
            Ok(())
        }
        Cmd::Token {
            sub,
            ttl,
            channel,
            info,
        } => {
            let Some(secret) = config.auth.hmac_secret_key.as_deref() else {
                anyhow::bail!(
                    "no auth.hmac_secret_key configured (set it in the file or RELAY__AUTH__HMAC_SECRET_KEY)"
                );
            };
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let mut claims =
                serde_json::json!({"sub": sub, "iat": now.as_secs(), "exp": now.as_secs() + ttl});
            if let Some(channel) = channel {
                relay_protocol::channel::validate_channel(&channel)?;
                claims["channel"] = channel.into();
            }
            if let Some(info) = info {
                let info: serde_json::Value = serde_json::from_str(&info)
                    .map_err(|e| anyhow::anyhow!("--info is not JSON: {e}"))?;
                claims["info"] = info;
            }
            if let Some(aud) = &config.auth.audience {
                claims["aud"] = aud.as_str().into();
            }
            if let Some(iss) = &config.auth.issuer {
                claims["iss"] = iss.as_str().into();
            }
            let token = connector::auth::verifier::mint_hs256(secret, &claims)?;
            #[allow(clippy::print_stdout)]
            {
                println!("{token}");
            }
            Ok(())
        }
        Cmd::Run => {
            let addr = config.listen_addr()?;
            let listener = tokio::net::TcpListener::bind(addr).await?;
            connector::run(config, listener, shutdown_signal()).await?;
            Ok(())
        }
    }
}

/// Completes on SIGTERM (what ECS/Fargate sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
