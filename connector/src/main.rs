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
