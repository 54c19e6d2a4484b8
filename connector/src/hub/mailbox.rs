//! A session's side of the hub: its bounded mailbox, and the subscriber entry that points at it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use relay_protocol::reply::Encoding;

use super::Delivery;

/// A session as the hub sees it: its mailbox (which also carries its encoding, byte bound and slow
/// mark).
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The session's bounded mailbox.
    pub mailbox: Arc<Mailbox>,
    /// The session's encoding: which frame of a delivery it sends (the mailbox's, copied here so
    /// fan-out reads it without following the pointer).
    pub encoding: Encoding,
}

impl Subscriber {
    /// The subscriber whose deliveries go to `mailbox`.
    pub fn of(mailbox: &Arc<Mailbox>) -> Self {
        Self {
            mailbox: mailbox.clone(),
            encoding: mailbox.encoding,
        }
    }
}

/// The mailbox is marked slow.
const SLOW: u8 = 1;
/// The session has ended: nothing more is accepted, and a refusal does not mark it slow.
const CLOSED: u8 = 2;

/// A session's bounded mailbox: the hub adds deliveries, the session takes them out. Bounded by
/// a number of deliveries (`client.outbound_queue`) and by the bytes of their frames
/// (`client.outbound_queue_bytes`, which the session's replies being written also count against).
/// A delivery that does not fit marks the mailbox slow, which wakes the session to close with 3008.
///
/// One allocation per session, of about 100 bytes while empty: a queue under a short
/// `std::sync::Mutex` (never held across `.await`) and the session task's waker. (A tokio `mpsc`
/// channel, with a `CancellationToken` for the slow mark and an `Arc` for the byte count, took
/// about 1 KiB per connection: cache-padded counters and a first block of 32 slots.)
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Arc<Delivery>>>,
    /// The most deliveries it holds.
    capacity: usize,
    /// The most bytes of frames it (and the replies being written) may hold.
    max_bytes: usize,
    /// Bytes of frames in the mailbox, plus those of replies being written.
    queued: AtomicUsize,
    /// [`SLOW`] and [`CLOSED`].
    flags: AtomicU8,
    /// The session task, woken by a delivery or the slow mark.
    waker: AtomicWaker,
    /// The session's encoding.
    encoding: Encoding,
}

/// A queue keeps at most this capacity once emptied (a burst's larger one is given back).
pub(super) const KEPT_CAPACITY: usize = 64;

impl Mailbox {
    /// An empty mailbox of at most `capacity` deliveries and `max_bytes` bytes, for a session in
    /// `encoding`.
    pub fn new(capacity: usize, max_bytes: usize, encoding: Encoding) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            max_bytes,
            queued: AtomicUsize::new(0),
            flags: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            encoding,
        }
    }

    /// Adds `delivery`, whose frame in this mailbox's encoding is `len` bytes. Refused (false) if
    /// the mailbox is full, over its bytes, or closed; the caller then marks it slow unless closed.
    pub(super) fn offer(&self, delivery: &Arc<Delivery>, len: usize) -> bool {
        // Reserved first, given back on a refusal: the count may exceed the bound only for the
        // moment between the two, never wrap.
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before
            .checked_add(len)
            .is_none_or(|after| after > self.max_bytes)
        {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            // Checked under the lock: `close` sets it under the same lock, so nothing is added to
            // a mailbox after its session emptied it for good.
            if queue.len() >= self.capacity || self.is_closed() {
                drop(queue);
                self.queued.fetch_sub(len, Ordering::Relaxed);
                return false;
            }
            queue.push_back(delivery.clone());
        }
        self.waker.wake();
        true
    }

    /// Marks the mailbox slow and wakes its session; true if it was not marked already (and not
    /// closed: a session that ended is not slow).
    pub(super) fn mark_slow(&self) -> bool {
        let before = self.flags.fetch_or(SLOW, Ordering::AcqRel);
        if before != 0 {
            return false;
        }
        self.waker.wake();
        true
    }

    /// Whether the mailbox is marked slow.
    pub fn is_slow(&self) -> bool {
        self.flags.load(Ordering::Acquire) & SLOW != 0
    }

    /// Whether its session has ended.
    pub fn is_closed(&self) -> bool {
        self.flags.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Ends the mailbox (its session is leaving): what it holds is dropped and nothing more is
    /// accepted. The byte count loses exactly the dropped deliveries' bytes: a fan-out may have
    /// reserved bytes for an offer that finds the mailbox closed and gives them back afterwards,
    /// so resetting the count to zero here would make that give-back wrap it below zero (the next
    /// offer then overflowed).
    pub fn close(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.flags.fetch_or(CLOSED, Ordering::AcqRel);
        let dropped: usize = queue.iter().map(|d| d.frame_len(self.encoding)).sum();
        *queue = VecDeque::new();
        self.queued.fetch_sub(dropped, Ordering::Relaxed);
    }

    /// Bytes of frames waiting in the mailbox, plus those of replies being written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Counts `bytes` more against the byte bound (replies being written).
    pub fn hold(&self, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back `bytes` counted by [`hold`](Self::hold), or of a delivery taken out.
    pub fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Completes when the mailbox is marked slow.
    pub fn slow(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.is_slow() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.is_slow() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Takes out the oldest delivery, waiting for one. (The session subtracts its bytes with
    /// [`release`](Self::release) when it handles it.)
    pub fn recv(&self) -> impl Future<Output = Arc<Delivery>> + '_ {
        std::future::poll_fn(|cx| {
            if let Some(d) = self.try_recv() {
                return Poll::Ready(d);
            }
            self.waker.register(cx.waker());
            match self.try_recv() {
                Some(d) => Poll::Ready(d),
                None => Poll::Pending,
            }
        })
    }

    /// Takes out the oldest delivery, if any.
    pub fn try_recv(&self) -> Option<Arc<Delivery>> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let d = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEPT_CAPACITY {
            // A burst grew it: an idle session keeps a small queue.
            *queue = VecDeque::new();
        }
        d
    }
}

#[cfg(test)]
impl Mailbox {
    /// The queue's allocated capacity (a test checks that a burst's is given back).
    pub(super) fn queue_capacity(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .capacity()
    }
}
