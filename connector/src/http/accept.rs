//! The accept loop: what a connection must do to stay, before it is a session.
//!
//! Connections that never become sessions cost nothing lasting ([`serve`]):
//! - a connection must send a complete request head within `client.handshake_timeout_secs` (silent
//!   sockets, slowloris headers and idle keep-alive connections are closed);
//! - at most `client.max_pending_connections` connections that are not WebSockets are open at once:
//!   a new one over the cap closes the oldest, so idle sockets can never use up the file descriptors
//!   that health checks and new clients need;
//! - accepted sockets get `TCP_NODELAY` (small frames leave at once) and TCP keepalive.
//!
//! A WebSocket the server closes is not torn down at once: after the close frame the socket is
//! half-closed and what the client still sends is read and discarded until it closes too (at most
//! [`LINGER`]), so the close frame is not overtaken by a TCP reset caused by unread data (a browser
//! would report a reset as "transport closed" and reconnect, even after a terminal close code).
//! Each request carries its connection's [`ConnMeta`]; a connection that becomes a WebSocket or an
//! emulated stream leaves the pending set through it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::edge::Edge;

/// The longest a closed WebSocket's socket is kept to read what the client still sends.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// A WebSocket's read buffer, kept for the connection's life: client frames are small (a
/// command, a pong), so 512 bytes instead of the default 128 KiB keeps an idle connection's memory
/// in a few kilobytes. A larger frame (up to `client.max_message_bytes`) still arrives whole: the
/// buffer grows to the frame's length, read in pieces of this size.
pub(crate) const READ_BUFFER: usize = 512;

/// Serves `router` on `listener` until `shutdown` completes; then asks every connection to finish
/// (upgraded sessions end through the state's shutdown token).
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<Edge>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let cfg = &state.config.client;
    let acceptor = Acceptor {
        pending: Arc::new(Pending::new(cfg.max_pending_connections)),
        handshake: Duration::from_secs(cfg.handshake_timeout_secs),
        linger: Arc::new(LingerSlots {
            free: AtomicUsize::new(cfg.max_pending_connections),
        }),
        tracker: state.tracker.clone(),
        stop: CancellationToken::new(),
        connections: TaskTracker::new(),
        router,
    };
    tokio::pin!(shutdown);
    let mut last_error_log: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener, &mut last_error_log) => accepted,
        };
        acceptor.serve_connection(stream, peer);
    }
    acceptor.stop.cancel();
    acceptor.connections.close();
    acceptor.connections.wait().await;
}

/// The next connection. Accept errors (out of file descriptors, or a connection reset before it
/// was accepted) are logged at most once a second (`last_error_log`), and give the process a
/// moment before the next try.
async fn accept(
    listener: &TcpListener,
    last_error_log: &mut Option<tokio::time::Instant>,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(error = %e, "accept error");
                    *last_error_log = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// What the accepted connections are served with.
struct Acceptor {
    /// The connections that are not WebSockets (yet), capped.
    pending: Arc<Pending>,
    /// How long a connection has to send a complete request head.
    handshake: Duration,
    /// Room for closed WebSockets' sockets to linger.
    linger: Arc<LingerSlots>,
    /// The state's tracker (lingering sockets are tracked like sessions).
    tracker: TaskTracker,
    /// Asks every connection to finish (on shutdown).
    stop: CancellationToken,
    /// The connections' tasks.
    connections: TaskTracker,
    router: Router,
}

impl Acceptor {
    /// Serves HTTP/1 (with upgrades) on an accepted socket, on its own task.
    fn serve_connection(&self, stream: TcpStream, peer: SocketAddr) {
        configure_socket(&stream);
        let guard = self.pending.admit();
        let upgraded = Arc::new(AtomicBool::new(false));
        let meta = ConnMeta {
            peer,
            pending: self.pending.clone(),
            id: guard.id,
            upgraded: upgraded.clone(),
        };
        let io = TokioIo::new(Lingering {
            stream: Some(stream),
            upgraded,
            slots: self.linger.clone(),
            tracker: self.tracker.clone(),
        });
        let tower = TowerToHyperService::new(self.router.clone());
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(meta.clone());
                hyper::service::Service::call(&tower, req)
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.handshake)
            .serve_connection(io, service)
            .with_upgrades();
        let stop = self.stop.clone();
        self.connections.spawn(async move {
            tokio::pin!(conn);
            let evicted = guard.token.clone();
            tokio::select! {
                _ = conn.as_mut() => {}
                // Over the cap of connections that are not WebSockets: this one was the oldest.
                _ = evicted.cancelled() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
                }
            }
            drop(guard);
        });
    }
}

/// `TCP_NODELAY` (Nagle's algorithm would hold small frames back waiting for an ACK) and TCP
/// keepalive (a peer that vanished without a FIN is found within about two minutes).
fn configure_socket(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// What a request knows about its connection (a request extension).
#[derive(Clone, Debug)]
pub(crate) struct ConnMeta {
    /// The socket's peer.
    pub peer: SocketAddr,
    pending: Arc<Pending>,
    id: u64,
    upgraded: Arc<AtomicBool>,
}

impl ConnMeta {
    /// The accept loop's connections that are not WebSockets yet, and how many were closed to make
    /// room (for `/metrics`).
    pub(crate) fn pending(&self) -> crate::metrics::Pending {
        crate::metrics::Pending {
            connections: self.pending.len() as u64,
            evictions: self.pending.evicted.load(Ordering::Relaxed),
        }
    }

    /// The connection becomes a WebSocket: it leaves the pending set (no eviction, no handshake
    /// limit) and lingers when closed.
    pub(crate) fn upgrading(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
        self.pending.release(self.id);
    }
}

/// The connections that are not WebSockets: at most `cap`, the oldest closed to admit a new one.
#[derive(Debug)]
struct Pending {
    cap: usize,
    open: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
    evicted: AtomicU64,
}

/// A connection's place in [`Pending`]; leaving it (dropped, or upgraded) frees the place.
struct PendingGuard {
    pending: Arc<Pending>,
    id: u64,
    token: CancellationToken,
}

impl Pending {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            open: Mutex::new((0, BTreeMap::new())),
            evicted: AtomicU64::new(0),
        }
    }

    fn admit(self: &Arc<Self>) -> PendingGuard {
        let token = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while open.1.len() >= self.cap {
            match open.1.pop_first() {
                Some((_, oldest)) => {
                    oldest.cancel();
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        open.0 += 1;
        let id = open.0;
        open.1.insert(id, token.clone());
        PendingGuard {
            pending: self.clone(),
            id,
            token,
        }
    }

    fn release(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(&id);
    }

    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.release(self.id);
    }
}

/// Lingering sockets allowed at once (so closing many WebSockets cannot hold many descriptors).
#[derive(Debug)]
struct LingerSlots {
    free: AtomicUsize,
}

/// An accepted socket that, once its WebSocket is dropped, half-closes and drains before closing.
struct Lingering {
    stream: Option<TcpStream>,
    upgraded: Arc<AtomicBool>,
    slots: Arc<LingerSlots>,
    tracker: TaskTracker,
}

impl Lingering {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        match self.stream.as_mut() {
            Some(s) => Pin::new(s),
            // Only `drop` takes the stream.
            None => unreachable!("stream taken before drop"),
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        if !self.upgraded.load(Ordering::Relaxed) {
            return;
        }
        let slots = self.slots.clone();
        let took = slots
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !took || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.tracker.spawn(async move {
            let deadline = tokio::time::Instant::now() + LINGER;
            // FIN after the close frame; then read until the peer closes.
            let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
            let mut buf = [0u8; 8192];
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
            }
            drop(stream);
            slots.free.fetch_add(1, Ordering::AcqRel);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let _client = TcpStream::connect(addr).await;
        let (stream, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
        let sock = socket2::SockRef::from(&stream);
        assert!(!stream.nodelay().unwrap_or(true));
        assert!(!sock.keepalive().unwrap_or(true));
        configure_socket(&stream);
        assert!(stream.nodelay().unwrap_or(false));
        assert!(sock.keepalive().unwrap_or(false));
        assert_eq!(
            sock.tcp_keepalive_time().ok(),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn the_oldest_pending_connection_makes_room() {
        let pending = Arc::new(Pending::new(2));
        let a = pending.admit();
        let b = pending.admit();
        assert_eq!(pending.len(), 2);
        let c = pending.admit();
        assert!(a.token.is_cancelled() && !b.token.is_cancelled() && !c.token.is_cancelled());
        assert_eq!(pending.len(), 2);
        // An upgraded connection leaves the set: it is never evicted.
        pending.release(b.id);
        let _d = pending.admit();
        assert!(!b.token.is_cancelled() && !c.token.is_cancelled());
        drop(c);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending.evicted.load(Ordering::Relaxed), 1);
    }
}
