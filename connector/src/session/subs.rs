//! A session's subscriptions by channel, kept small for the many connections that hold one or a
//! few.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

use super::subscriptions::SubState;

/// A session's subscriptions by channel. Most connections hold one or a few: a vector searched in
/// order while they are at most [`Subs::FEW`] (a `HashMap` of one subscription takes four buckets
/// of 120 bytes), a map beyond.
pub(super) enum Subs {
    Few(Vec<(String, SubState)>),
    Many(HashMap<String, SubState>),
}

impl Default for Subs {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl Subs {
    /// The most subscriptions kept in the vector.
    pub(super) const FEW: usize = 8;

    pub(super) fn len(&self) -> usize {
        match self {
            Self::Few(few) => few.len(),
            Self::Many(many) => many.len(),
        }
    }

    // The lookups take what `HashMap`'s do (a `&str` or a `&String`).
    pub(super) fn contains_key<Q: Hash + Eq + ?Sized>(&self, channel: &Q) -> bool
    where
        String: Borrow<Q>,
    {
        match self {
            Self::Few(few) => few.iter().any(|(c, _)| c.borrow() == channel),
            Self::Many(many) => many.contains_key(channel),
        }
    }

    pub(super) fn get<Q: Hash + Eq + ?Sized>(&self, channel: &Q) -> Option<&SubState>
    where
        String: Borrow<Q>,
    {
        match self {
            Self::Few(few) => few
                .iter()
                .find(|(c, _)| c.borrow() == channel)
                .map(|(_, s)| s),
            Self::Many(many) => many.get(channel),
        }
    }

    pub(super) fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, channel: &Q) -> Option<&mut SubState>
    where
        String: Borrow<Q>,
    {
        match self {
            Self::Few(few) => few
                .iter_mut()
                .find(|(c, _)| c.borrow() == channel)
                .map(|(_, s)| s),
            Self::Many(many) => many.get_mut(channel),
        }
    }

    pub(super) fn remove<Q: Hash + Eq + ?Sized>(&mut self, channel: &Q) -> Option<SubState>
    where
        String: Borrow<Q>,
    {
        match self {
            Self::Few(few) => {
                let i = few.iter().position(|(c, _)| c.borrow() == channel)?;
                Some(few.swap_remove(i).1)
            }
            Self::Many(many) => many.remove(channel),
        }
    }

    /// Adds or replaces the subscription of `channel`; returns the one replaced.
    pub(super) fn insert(&mut self, channel: String, sub: SubState) -> Option<SubState> {
        if let Some(old) = self.get_mut(channel.as_str()) {
            return Some(std::mem::replace(old, sub));
        }
        match self {
            Self::Few(few) if few.len() < Self::FEW => {
                // One slot at a time: a first push would reserve four (480 bytes).
                few.reserve_exact(1);
                few.push((channel, sub));
            }
            Self::Few(few) => {
                let mut many: HashMap<String, SubState> = std::mem::take(few).into_iter().collect();
                many.insert(channel, sub);
                *self = Self::Many(many);
            }
            Self::Many(many) => {
                many.insert(channel, sub);
            }
        }
        None
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &SubState)> {
        let (few, many) = match self {
            Self::Few(few) => (Some(few.iter().map(|(c, s)| (c, s))), None),
            Self::Many(many) => (None, Some(many.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(c, _)| c)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &SubState> {
        self.iter().map(|(_, s)| s)
    }
}
