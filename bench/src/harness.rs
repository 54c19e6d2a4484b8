//! The benchmark's databases (one per part, dropped at the end) and the connector it runs in this
//! process.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::CHANNEL;
use crate::cli::{Mode, admin_url, current_mode};

/// A database made for one part of the benchmark.
pub(crate) struct BenchDb {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) pool: PgPool,
}

impl BenchDb {
    /// Creates the database and applies the migrations.
    pub(crate) async fn create() -> Result<Self> {
        let admin = PgPool::connect(&admin_url())
            .await
            .context("connecting to DATABASE_URL")?;
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let base = admin_url();
        let (prefix, _) = base
            .rsplit_once('/')
            .context("DATABASE_URL has no database name")?;
        let url = format!("{prefix}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        connector::db::migrate(&pool).await?;
        Ok(Self { name, url, pool })
    }

    pub(crate) async fn drop_db(self) {
        self.pool.close().await;
        match PgPool::connect(&admin_url()).await {
            Ok(admin) => {
                let r = sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .execute(&admin)
                .await;
                if let Err(e) = r {
                    println!("warning: could not drop database {}: {e}", self.name);
                }
                admin.close().await;
            }
            Err(e) => println!("warning: could not drop database {}: {e}", self.name),
        }
    }

    pub(crate) async fn exec(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .with_context(|| format!("running {sql:.60}"))?;
        Ok(())
    }
}

/// Opens a plain connection without statement logging.
pub(crate) async fn connect(url: &str) -> Result<PgConnection> {
    let opts: PgConnectOptions = url.parse()?;
    Ok(opts.disable_statement_logging().connect().await?)
}

/// The connector's configuration: one mapping of `chat_data` INSERTs to `channel` (a template).
pub(crate) fn config_json(db_url: &str, mode: Mode, channel: &str) -> String {
    json!({
        "capture": {"mode": mode.name(), "heartbeat_secs": 1},
        "listen": "127.0.0.1:0",
        "database": {"url": db_url, "pool_size": 4},
        "stream": {"poll_interval_ms": 250, "batch_size": 1000},
        "client": {"allow_anonymous": true, "ping_interval_secs": 25, "outbound_queue": 65536},
        "mappings": [{"table": "chat_data", "operations": ["INSERT"], "channel": channel}],
        "rules": [],
        "shutdown_grace_secs": 5
    })
    .to_string()
}

/// A connector running in this process.
pub(crate) struct Relay {
    pub(crate) addr: SocketAddr,
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) task: JoinHandle<connector::Result<()>>,
}

impl Relay {
    pub(crate) async fn start(db_url: &str) -> Result<Self> {
        Self::start_in(db_url, current_mode(), CHANNEL).await
    }

    /// Starts a connector in capture `mode` that maps `chat_data` to `channel`; in `wal` mode,
    /// returns once it leads the slot.
    pub(crate) async fn start_in(db_url: &str, mode: Mode, channel: &str) -> Result<Self> {
        let config = connector::Config::from_json(&config_json(db_url, mode, channel))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(connector::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let url = format!("http://{addr}/readyz");
        for _ in 0..400 {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                let relay = Self { addr, stop, task };
                if mode == Mode::Wal {
                    relay.wait_leader().await?;
                }
                return Ok(relay);
            }
            if task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        match task.await {
            Ok(Err(e)) => bail!("connector failed: {e}"),
            _ => bail!("connector not ready within 10 s"),
        }
    }

    pub(crate) async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .context("connector did not stop")???;
        Ok(())
    }

    /// Waits until this connector leads the `wal` capture (its metric says so).
    pub(crate) async fn wait_leader(&self) -> Result<()> {
        let url = format!("http://{}/metrics", self.addr);
        for _ in 0..600 {
            let text = reqwest::get(&url).await?.text().await?;
            if text.lines().any(|l| l.trim() == "relay_wal_leader 1") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the connector did not take the wal leadership within 30 s")
    }
}

/// Forgets the `wal` capture's slot and position, so the next connector starts from the current WAL
/// instead of decoding what was written while none ran (the baseline runs of the write part).
pub(crate) async fn reset_wal(db: &BenchDb) -> Result<()> {
    db.exec(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
          WHERE database = current_database() AND active_pid IS NULL;
         UPDATE relay.wal_state SET slot_name = NULL, lsn = NULL;",
    )
    .await
}
