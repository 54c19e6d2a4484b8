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
    /// Allow `run`, `migrate` and `triggers sync` to write into the `postgres` maintenance database
    /// (refused by default: the relay's schema belongs in the application's database).
    #[arg(long, global = true, env = "RELAY_ALLOW_POSTGRES_DB",
          action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    allow_postgres_db: bool,
    /// Log format: `text`, or `json` (one JSON object per line, for CloudWatch and log shippers).
    /// Colours only when stderr is a terminal.
    #[arg(
        long,
        value_enum,
        env = "RELAY_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    /// What to do (default: run).
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Apply migrations, install triggers and serve (the default).
    Run,
    /// Apply the migrations and exit.
    Migrate,
    /// Validate the configuration and, when the database is reachable, the mappings against it
    /// (tables, columns, template columns); read-only. Says which checks it could not run.
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
        /// Lifetime: seconds, or a duration (`90s`, `15m`, `1h`, `7d`, `1h 30m`).
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

/// Parses a lifetime into whole seconds: a bare number of seconds (`90`) or a humantime duration
/// (`90s`, `15m`, `1h`, `7d`, `1h 30m`).
fn parse_ttl(s: &str) -> Result<u64, String> {
    let duration = match s.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration like 90s, 15m, 1h or 7d ({e})"))?,
    };
    if duration.subsec_nanos() != 0 {
        return Err(format!("{s:?} must be whole seconds"));
    }
    match duration.as_secs() {
        0 => Err(format!("{s:?} must be a positive duration")),
        secs => Ok(secs),
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
    init_tracing(cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connector: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each named once (a cause whose text its parent already shows is
/// skipped: sqlx and the migrator repeat their sources in their own messages).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A database error names the database's host, port and name; other errors stay as they are.
fn at_database(e: connector::Error, db: &str) -> anyhow::Error {
    match e {
        connector::Error::Database(_) | connector::Error::Migrate(_) => {
            anyhow::anyhow!("PostgreSQL at {db}: {}", error_chain(&e.into()))
        }
        other => other.into(),
    }
}

/// Refuses to write into the `postgres` maintenance database unless allowed; then checks that the
/// database can be reached, naming host, port and the real cause when it cannot.
async fn writable_database(config: &Config, allow_postgres_db: bool) -> anyhow::Result<()> {
    let url = &config.database.url;
    let name = connector::db::database_name(url)?;
    if name == "postgres" && !allow_postgres_db {
        anyhow::bail!(
            "refusing to write the relay's schema into the \"postgres\" maintenance database at {}: \
             point database.url / DATABASE_URL at the application's database (e.g. createdb relay; \
             DATABASE_URL=postgres://…/relay), or pass --allow-postgres-db (RELAY_ALLOW_POSTGRES_DB=1) \
             if you really mean it",
            connector::db::describe(url)
        );
    }
    reachable(config).await
}

/// Opens one connection to the database, or fails naming host, port, database and the cause.
async fn reachable(config: &Config) -> anyhow::Result<()> {
    let url = &config.database.url;
    let timeout = config.database.connect_timeout;
    connector::db::probe(url, timeout).await.map_err(|e| {
        let cause = match e {
            connector::Error::Database(e) => error_chain(&e.into()),
            other => error_chain(&other.into()),
        };
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {}: {cause}",
            connector::db::describe(url),
        )
    })
}

/// `connector check`: the file, then (read-only) the mappings against the database when it is
/// reachable. Every check that could not run is named.
async fn check(path: &std::path::Path, config: &Config) -> anyhow::Result<()> {
    #[allow(clippy::print_stdout)]
    let say = |line: String| println!("{line}");
    say(format!(
        "{}: configuration is valid (fields, limits, mapping identifiers and templates, no duplicated \
         mapping)",
        path.display()
    ));
    let db = connector::db::describe(&config.database.url);
    if config.mappings.is_empty() {
        say("no mappings: nothing to check against the database".to_owned());
        return Ok(());
    }
    if let Err(e) = reachable(config).await {
        say(format!(
            "NOT CHECKED against the database ({}): whether the mappings' tables, columns and \
             channel-template columns exist",
            error_chain(&e)
        ));
        return Ok(());
    }
    let pool = connector::db::pool(&config.database)?;
    let problems = connector::db::triggers::mapping_problems(&pool, &config.mappings).await;
    pool.close().await;
    let problems = problems.map_err(|e| anyhow::anyhow!("checking the mappings in {db}: {e}"))?;
    if problems.is_empty() {
        say(format!(
            "database {db}: the tables, columns and channel-template columns of all {} mappings exist",
            config.mappings.len()
        ));
        return Ok(());
    }
    for p in &problems {
        say(format!("database {db}: {p}"));
    }
    anyhow::bail!("{} problem(s) with the mappings in {db}", problems.len())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines; ANSI colours only
/// when stderr is a terminal.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(&cli.config)?;
    let db = connector::db::describe(&config.database.url);
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Check => check(&cli.config, &config).await,
        Cmd::Migrate => {
            writable_database(&config, cli.allow_postgres_db).await?;
            let pool = connector::db::pool(&config.database)?;
            connector::db::migrate(&pool)
                .await
                .map_err(|e| at_database(e, &db))?;
            tracing::info!(database = %db, "migrations applied");
            Ok(())
        }
        Cmd::Triggers {
            action: TriggerCmd::Sync,
        } => sync_triggers(&config, cli.allow_postgres_db, &db).await,
        Cmd::Token {
            sub,
            ttl,
            channel,
            info,
        } => {
            let token = mint_token(&config, sub, ttl, channel, info)?;
            #[allow(clippy::print_stdout)]
            {
                println!("{token}");
            }
            Ok(())
        }
        Cmd::Run => {
            writable_database(&config, cli.allow_postgres_db).await?;
            let addr = config.listen_addr()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            connector::run(config, listener, shutdown_signal())
                .await
                .map_err(|e| at_database(e, &db))?;
            Ok(())
        }
    }
}

/// `triggers sync`: applies the migrations, installs the mappings' capture triggers and removes
/// the stale ones, printing what it did.
async fn sync_triggers(config: &Config, allow_postgres_db: bool, db: &str) -> anyhow::Result<()> {
    if config.capture.mode == connector::capture::CaptureMode::Wal {
        anyhow::bail!(
            "capture.mode is \"wal\": capture triggers would publish every change twice; \
             the wal leader drops them (switch capture.mode to \"trigger\" to use triggers)"
        );
    }
    writable_database(config, allow_postgres_db).await?;
    let pool = connector::db::pool(&config.database)?;
    connector::db::migrate(&pool)
        .await
        .map_err(|e| at_database(e, db))?;
    let report = connector::db::triggers::sync(&pool, &config.mappings, None)
        .await
        .map_err(|e| at_database(e, db))?;
    #[allow(clippy::print_stdout)]
    {
        for t in &report.installed {
            println!("installed {t}");
        }
        for t in &report.kept {
            println!("kept {t} (a running node's mappings need it)");
        }
        for t in &report.removed {
            println!("removed {t}");
        }
    }
    Ok(())
}

/// `token`: a connection token for `sub` (or a subscription token for `channel`) living `ttl`
/// seconds, signed with the configured HMAC key and carrying its audience and issuer.
fn mint_token(
    config: &Config,
    sub: String,
    ttl: u64,
    channel: Option<String>,
    info: Option<String>,
) -> anyhow::Result<String> {
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
        let info: serde_json::Value =
            serde_json::from_str(&info).map_err(|e| anyhow::anyhow!("--info is not JSON: {e}"))?;
        claims["info"] = info;
    }
    if let Some(aud) = &config.auth.audience {
        claims["aud"] = aud.as_str().into();
    }
    if let Some(iss) = &config.auth.issuer {
        claims["iss"] = iss.as_str().into();
    }
    Ok(connector::auth::verifier::mint_hs256(secret, &claims)?)
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
