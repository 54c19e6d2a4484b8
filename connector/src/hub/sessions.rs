//! The sessions of this node by user, so that a `disconnect` order (from the server API, on any
//! node) reaches the connections it names. A session registers once connected and holds a
//! [`Registration`]; dropping it takes the session out of the index.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Hub;

/// A close order for one session: fired once, with its code and reason.
#[derive(Debug, Default)]
struct Kick {
    token: CancellationToken,
    advice: Mutex<Option<(u16, String)>>,
}

impl Kick {
    fn fire(&self, advice: &(u16, String)) {
        *self.advice.lock() = Some(advice.clone());
        self.token.cancel();
    }
}

/// A session as the index holds it.
#[derive(Debug)]
struct Entry {
    client: String,
    kick: Arc<Kick>,
}

/// The sessions of this node: user → session number → entry.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    by_user: Mutex<HashMap<String, HashMap<u64, Entry>>>,
}

impl Sessions {
    /// The users of the sessions on this node.
    pub(super) fn user_count(&self) -> usize {
        self.by_user.lock().len()
    }

    /// Fires the sessions of `user` (only `client`, if given; none in `whitelist`) with `advice`;
    /// how many.
    pub(super) fn disconnect(
        &self,
        user: &str,
        client: Option<&str>,
        whitelist: &[String],
        advice: &(u16, String),
    ) -> usize {
        let by_user = self.by_user.lock();
        let Some(sessions) = by_user.get(user) else {
            return 0;
        };
        let kept: HashSet<&str> = whitelist.iter().map(String::as_str).collect();
        let mut n = 0;
        for entry in sessions.values() {
            if client.is_none_or(|c| c == entry.client) && !kept.contains(entry.client.as_str()) {
                entry.kick.fire(advice);
                n += 1;
            }
        }
        n
    }

    /// Takes out the entry of `session` if it is still the one fired by `kick` (a session that
    /// connected again holds a newer one).
    fn remove(&self, user: &str, session: u64, kick: &Arc<Kick>) {
        let mut by_user = self.by_user.lock();
        if let Some(sessions) = by_user.get_mut(user) {
            if sessions
                .get(&session)
                .is_some_and(|e| Arc::ptr_eq(&e.kick, kick))
            {
                sessions.remove(&session);
            }
            if sessions.is_empty() {
                by_user.remove(user);
            }
        }
    }
}

/// A connected session's entry in the hub's index: `disconnect` orders reach the session through
/// it ([`Registration::kicked`]). Dropped, the session leaves the index.
#[derive(Debug)]
pub struct Registration {
    hub: Arc<Hub>,
    session: u64,
    user: String,
    kick: Arc<Kick>,
}

impl Registration {
    /// Completes when a `disconnect` order names the session.
    pub async fn kicked(&self) {
        self.kick.token.cancelled().await;
    }

    /// The close code and reason of the order.
    pub fn advice(&self) -> (u16, String) {
        self.kick
            .advice
            .lock()
            .clone()
            .unwrap_or((3503, "force disconnect".to_owned()))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.sessions.remove(&self.user, self.session, &self.kick);
    }
}

impl Hub {
    /// Registers the connected session `session` (connection `client` of `user`), so disconnect
    /// orders reach it while the registration lives.
    pub fn register_session(self: &Arc<Self>, session: u64, client: &str, user: &str) -> Registration {
        let kick = Arc::new(Kick::default());
        let entry = Entry {
            client: client.to_owned(),
            kick: kick.clone(),
        };
        self.sessions
            .by_user
            .lock()
            .entry(user.to_owned())
            .or_default()
            .insert(session, entry);
        Registration {
            hub: self.clone(),
            session,
            user: user.to_owned(),
            kick,
        }
    }

    /// Carries out a disconnect order on this node: closes the sessions of `user` (only `client`,
    /// if given; none in `whitelist`) with `advice` (code, reason); how many.
    pub fn disconnect(
        &self,
        user: &str,
        client: Option<&str>,
        whitelist: &[String],
        advice: &(u16, String),
    ) -> usize {
        self.sessions.disconnect(user, client, whitelist, advice)
    }

    /// The users of the sessions on this node.
    pub fn user_count(&self) -> usize {
        self.sessions.user_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_carry_their_advice() {
        let hub = Arc::new(Hub::new());
        let a = hub.register_session(1, "c1", "alice");
        let b = hub.register_session(2, "c2", "alice");
        let c = hub.register_session(3, "c3", "bob");
        let n = hub.disconnect("alice", None, &["c2".to_owned()], &(4000, "bye".to_owned()));
        assert_eq!(n, 1);
        assert!(a.kick.token.is_cancelled());
        assert!(!b.kick.token.is_cancelled() && !c.kick.token.is_cancelled());
        assert_eq!(a.advice(), (4000, "bye".to_owned()));
        assert_eq!(b.advice(), (3503, "force disconnect".to_owned()));
    }

    #[test]
    fn a_dropped_registration_leaves_the_index() {
        let hub = Arc::new(Hub::new());
        let a = hub.register_session(1, "c1", "alice");
        let only_c1 = hub.register_session(2, "c2", "alice");
        assert_eq!(hub.user_count(), 1);
        drop(a);
        let advice = (4000, "bye".to_owned());
        assert_eq!(hub.disconnect("alice", Some("c1"), &[], &advice), 0);
        drop(only_c1);
        assert_eq!(hub.user_count(), 0);
        assert_eq!(hub.disconnect("alice", None, &[], &advice), 0);
    }
}
