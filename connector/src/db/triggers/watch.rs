//! The watch over a node's capture triggers: renews its registry entry, swaps legacy triggers
//! ([`super::upgrade`]) and checks that its triggers are in place, every `stream.capture_check_secs`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{MappingTriggers, Owner, TriggerSpec, deregister, owner_ttl, register, upgrade};
use crate::error::Result;

/// What is wrong with the node's capture triggers: one line per trigger that is not in place as the
/// node installed it (empty: all fine). A mapping none of whose triggers is installed is in place if
/// its legacy trigger is (kept for a node of an earlier release, see [`super::upgrade`]).
pub async fn verify(pool: &PgPool, maps: &[MappingTriggers]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for m in maps {
        let mut found = Vec::new();
        for s in &m.current {
            found.push(check(pool, s, |source| source == s.body).await?);
        }
        if found.iter().all(|f| matches!(f, Some(Problem::Gone(_)))) {
            // The legacy trigger's body from any earlier release names its mapping on its first line.
            let legacy_first = first_line(&m.legacy.body);
            let legacy =
                check(pool, &m.legacy, |source| first_line(source) == legacy_first).await?;
            if legacy.is_none() {
                continue;
            }
        }
        problems.extend(found.into_iter().flatten().map(|p| match p {
            Problem::Gone(what) => {
                format!("{what} is gone (dropped by a sync with another configuration, or by hand)")
            }
            Problem::Disabled(what) => format!("{what} is disabled"),
            Problem::Replaced(what) => {
                format!("{what} was replaced: it no longer runs the function this node installed")
            }
        }));
    }
    Ok(problems)
}

fn first_line(body: &str) -> &str {
    body.trim_start().lines().next().unwrap_or_default()
}

/// Why a trigger is not in place (each with the trigger's description).
enum Problem {
    Gone(String),
    Disabled(String),
    Replaced(String),
}

/// Whether `s` is installed, enabled and calls its function, whose source `body_ok` accepts.
async fn check(
    pool: &PgPool,
    s: &TriggerSpec,
    body_ok: impl Fn(&str) -> bool,
) -> Result<Option<Problem>> {
    let found: Option<(String, String, String, String)> = sqlx::query_as(
        r"SELECT t.tgenabled::text, pn.nspname::text, p.proname::text, p.prosrc
          FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_proc p ON p.oid = t.tgfoid
          JOIN pg_namespace pn ON pn.oid = p.pronamespace
          WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = $3",
    )
    .bind(&s.schema)
    .bind(&s.table)
    .bind(&s.trigger)
    .fetch_optional(pool)
    .await?;
    let what = format!(
        "capture trigger {} of mapping {} ({}.{})",
        s.trigger, s.index, s.schema, s.table
    );
    Ok(match found {
        None => Some(Problem::Gone(what)),
        Some((enabled, _, _, _)) if enabled == "D" => Some(Problem::Disabled(what)),
        Some((_, schema, function, source)) => {
            (schema != "relay" || function != s.function || !body_ok(&source))
                .then_some(Problem::Replaced(what))
        }
    })
}

/// Where [`watch`] reports the state of the node's capture.
#[derive(Debug, Default)]
pub struct CaptureStatus {
    problem: parking_lot::Mutex<Option<String>>,
}

impl CaptureStatus {
    /// Why the node's capture is not in place, if it is not.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().clone()
    }

    fn set(&self, problem: Option<String>) -> Option<String> {
        std::mem::replace(&mut *self.problem.lock(), problem)
    }
}

/// Every `every` until `shutdown`: renews the node's registry entry and checks its triggers (see the
/// module docs); on shutdown removes the entry.
pub async fn watch(
    pool: PgPool,
    maps: Vec<MappingTriggers>,
    node: String,
    every: Duration,
    status: Arc<CaptureStatus>,
    shutdown: CancellationToken,
) {
    let owner = Owner {
        node: &node,
        ttl: owner_ttl(every),
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = register(&pool, owner, &maps).await {
            tracing::warn!(error = %e, "capture: renewing this node's trigger registration failed");
        }
        swap(&pool, &maps).await;
        match verify(&pool, &maps).await {
            Ok(problems) if problems.is_empty() => {
                if let Some(was) = status.set(None) {
                    tracing::warn!(was = %was, "capture: this node's triggers are back in place; \
                        changes written while they were missing were not captured");
                }
            }
            Ok(problems) => {
                let problem = problems.join("; ");
                if status.set(Some(problem.clone())).as_deref() != Some(problem.as_str()) {
                    tracing::error!(problem = %problem, "capture: this node's triggers were changed \
                        under it; it receives no changes of those mappings (not ready). Run \
                        `connector triggers sync` with this node's configuration, or restart it");
                }
            }
            Err(e) => tracing::warn!(error = %e, "capture: checking the triggers failed"),
        }
    }
    match tokio::time::timeout(Duration::from_secs(3), deregister(&pool, &node)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "capture: removing this node's registration failed")
        }
        Err(_) => tracing::warn!("capture: removing this node's registration timed out"),
    }
}

/// [`upgrade::reconcile`], with what it did in the log.
async fn swap(pool: &PgPool, maps: &[MappingTriggers]) {
    match upgrade::reconcile(pool, maps).await {
        Ok(report) if report.installed.is_empty() && report.removed.is_empty() => {}
        Ok(report) if report.installed.is_empty() => tracing::warn!(removed = ?report.removed,
            kept = ?report.kept, "capture: a node of an earlier release runs these mappings again \
            (a rollback?): this node uses that release's trigger until no such node is left"),
        Ok(report) => tracing::info!(installed = ?report.installed, removed = ?report.removed,
            "capture: no node of an earlier release runs these mappings any more: this release's \
            triggers replace its trigger"),
        Err(e) => tracing::warn!(error = %e, "capture: swapping an earlier release's trigger \
            failed (tried again at the next check)"),
    }
}
