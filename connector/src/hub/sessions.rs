//! The sessions of this node by user, so that a `disconnect` order (from the server API, on any
//! node) reaches the connections it names. A session registers once connected and holds its
//! [`Registration`]; when the session drops it, the index forgets the session.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Hub;

/// The sessions of this node: user → session number → its registration (weak: the session owns
/// it).
#[derive(Debug, Default)]
pub(super) struct Sessions {
    by_user: Mutex<HashMap<String, HashMap<u64, Weak<Registration>>>>,
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
        // Taken out of the lock before they are used: one may be the last reference to its
        // registration, whose drop takes the lock.
        let registrations: Vec<Arc<Registration>> = match self.by_user.lock().get(user) {
            Some(sessions) => sessions.values().filter_map(Weak::upgrade).collect(),
            None => return 0,
        };
        let kept: HashSet<&str> = whitelist.iter().map(String::as_str).collect();
        let mut n = 0;
        for registration in registrations {
            let named = client.is_none_or(|c| c == registration.client);
            if named && !kept.contains(registration.client.as_str()) {
                registration.fire(advice);
                n += 1;
            }
        }
        n
    }

    /// Forgets `registration`'s session, unless the session registered again since (a newer
    /// registration under the same number stays).
    fn remove(&self, registration: &Registration) {
        let mut by_user = self.by_user.lock();
        if let Some(sessions) = by_user.get_mut(&registration.user) {
            let current = sessions
                .get(&registration.session)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), registration));
            if current {
                sessions.remove(&registration.session);
            }
            if sessions.is_empty() {
                by_user.remove(&registration.user);
            }
        }
    }
}

/// A connected session's entry in the hub's index: `disconnect` orders reach the session through
/// it ([`Registration::kicked`]). When the session drops it, the session leaves the index.
#[derive(Debug)]
pub struct Registration {
    hub: Arc<Hub>,
    session: u64,
    user: String,
    client: String,
    fired: CancellationToken,
    advice: Mutex<Option<(u16, String)>>,
}

impl Registration {
    /// Completes when a `disconnect` order names the session.
    pub async fn kicked(&self) {
        self.fired.cancelled().await;
    }

    /// The close code and reason of the order.
    pub fn advice(&self) -> (u16, String) {
        self.advice
            .lock()
            .clone()
            .unwrap_or((3503, "force disconnect".to_owned()))
    }

    fn fire(&self, advice: &(u16, String)) {
        *self.advice.lock() = Some(advice.clone());
        self.fired.cancel();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.sessions.remove(self);
    }
}

impl Hub {
    /// Registers the connected session `session` (connection `client` of `user`): disconnect
    /// orders reach it while the session holds the registration.
    pub fn register_session(
        self: &Arc<Self>,
        session: u64,
        client: &str,
        user: &str,
    ) -> Arc<Registration> {
        let registration = Arc::new(Registration {
            hub: self.clone(),
            session,
            user: user.to_owned(),
            client: client.to_owned(),
            fired: CancellationToken::new(),
            advice: Mutex::new(None),
        });
        self.sessions
            .by_user
            .lock()
            .entry(user.to_owned())
            .or_default()
            .insert(session, Arc::downgrade(&registration));
        registration
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
        assert!(a.fired.is_cancelled());
        assert!(!b.fired.is_cancelled() && !c.fired.is_cancelled());
        assert_eq!(a.advice(), (4000, "bye".to_owned()));
        assert_eq!(b.advice(), (3503, "force disconnect".to_owned()));
    }

    #[test]
    fn a_dropped_registration_leaves_the_index() {
        let hub = Arc::new(Hub::new());
        let first = hub.register_session(1, "c1", "alice");
        let again = hub.register_session(1, "c1", "alice");
        drop(first);
        let advice = (4000, "bye".to_owned());
        assert_eq!(
            hub.disconnect("alice", None, &[], &advice),
            1,
            "the newer registration of the session stays"
        );
        drop(again);
        assert_eq!(hub.user_count(), 0);
        assert_eq!(hub.disconnect("alice", None, &[], &advice), 0);
    }
}
