//! The node's long-lived tasks (cluster, presence, LISTEN connection, change stream, capture,
//! retention), supervised: one that panics takes the node down instead of leaving it running
//! without it.
//!
//! Each of these tasks is the only one doing its job for the whole node: without the cluster task
//! no join or leave push reaches anyone, without the stream no publication is delivered. A panic
//! in one used to end that task silently (the runtime printed one line to stderr) while the node
//! went on answering `/readyz` and accepting connections. Now the panic is logged as an error with
//! its task and message, the node shuts down as on SIGTERM (sessions are told 3001 and reconnect to
//! another node), and [`crate::run`] returns [`Error::TaskPanicked`], so the process exits non-zero
//! and its supervisor (ECS, Compose `restart`, systemd) starts a fresh one.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;

/// Spawns the node's long-lived tasks on its tracker and watches them for panics.
#[derive(Debug, Clone)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
    /// The first task that panicked, and its message.
    panicked: Arc<OnceLock<(&'static str, String)>>,
}

impl Tasks {
    /// Tasks on `tracker`; a panic cancels `token` (the node's shutdown).
    pub(crate) fn new(tracker: TaskTracker, token: CancellationToken) -> Self {
        Self {
            tracker,
            token,
            panicked: Arc::default(),
        }
    }

    /// Runs `task` (named `name` in the log) until it ends; if it panics, the node shuts down.
    pub(crate) fn spawn(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let inner = tokio::spawn(task);
        let (token, panicked) = (self.token.clone(), self.panicked.clone());
        self.tracker.spawn(async move {
            let Err(e) = inner.await else { return };
            if !e.is_panic() {
                return; // cancelled: only when the runtime itself shuts down
            }
            let message = panic_message(e.into_panic());
            tracing::error!(
                task = name,
                panic = %message,
                "a task of the node panicked: the node shuts down so that a fresh one replaces it"
            );
            let _ = panicked.set((name, message));
            token.cancel();
        });
    }

    /// The first panic, as the error [`crate::run`] returns.
    pub(crate) fn panicked(&self) -> Option<Error> {
        self.panicked
            .get()
            .map(|(task, panic)| Error::TaskPanicked {
                task,
                panic: panic.clone(),
            })
    }
}

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |s| (*s).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_shuts_the_node_down_and_is_reported() {
        let (tracker, token) = (TaskTracker::new(), CancellationToken::new());
        let tasks = Tasks::new(tracker.clone(), token.clone());
        let quiet = token.clone();
        tasks.spawn("quiet", async move { quiet.cancelled().await });
        tasks.spawn("fine", async {});
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !token.is_cancelled(),
            "a task that ends normally is no failure"
        );
        assert!(tasks.panicked().is_none());
        tasks.spawn("cluster", async { panic!("attempt to add with overflow") });
        tokio::time::timeout(std::time::Duration::from_secs(5), token.cancelled())
            .await
            .expect("the panic cancels the node's token");
        tracker.close();
        tracker.wait().await;
        let err = tasks.panicked().expect("the panic is kept").to_string();
        assert_eq!(
            err,
            "the cluster task panicked: attempt to add with overflow"
        );
    }
}
