// PATCHED (catchall): the whole file is new; see vendor/README.md.
//! A byte budget on what a connection reads: RabbitMQ's prefetch counts messages, not bytes, so
//! a consumer whose prefetch was raised for small messages can be sent that many large ones at
//! once. With a gate, the I/O loop stops reading the socket while the content it delivered and
//! the application has not released reaches the limit; TCP flow control then holds the rest on
//! the broker's side. Frames already read are still handled, acks and other writes still go out,
//! a body is counted once read whole (so one larger than the limit still arrives: what is held
//! is at most the limit, one body under way and one read), and reading goes on regardless while a method's reply is awaited (`basic.qos-ok`, `basic.cancel-ok`,
//! `channel.close-ok`…), so an application that awaits one cannot deadlock against its own
//! budget, unless it sealed the gate (`seal`, before a close it bounds with a timeout).

use crate::socket_state::SocketStateHandle;
use std::fmt;
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

/// Shared between the application and one connection's I/O loop (clones share the count).
#[derive(Clone)]
pub struct ReadGate {
    inner: Arc<Inner>,
}

struct Inner {
    limit: u64,
    held: AtomicU64,
    sealed: AtomicBool,
    waker: Mutex<Option<SocketStateHandle>>,
}

impl ReadGate {
    /// A gate that closes once `limit` bytes of message bodies are held (at least 1).
    pub fn new(limit: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                limit: limit.max(1),
                held: AtomicU64::new(0),
                sealed: AtomicBool::new(false),
                waker: Mutex::new(None),
            }),
        }
    }

    /// Bytes of message bodies read and not yet released.
    pub fn held(&self) -> u64 {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Whether the I/O loop may read.
    pub fn is_open(&self) -> bool {
        self.held() < self.inner.limit
    }

    /// Gives back `bytes` of bodies the application is done with (acked or rejected); wakes
    /// the I/O loop when that opens the gate.
    pub fn release(&self, bytes: u64) {
        let before = self
            .inner
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                Some(held.saturating_sub(bytes))
            })
            .unwrap_or_default();
        if before >= self.inner.limit && self.is_open() {
            if let Some(waker) = &*self.inner.waker.lock().unwrap_or_else(|e| e.into_inner()) {
                waker.wake();
            }
        }
    }

    /// From now on the gate holds even while a reply is awaited or the connection closes: for
    /// an application about to close that would rather time its close out than read on (what
    /// the broker sent before its replies could be any size).
    pub fn seal(&self) {
        self.inner.sealed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.inner.sealed.load(Ordering::SeqCst)
    }

    /// A body of `bytes` was read whole.
    pub(crate) fn add(&self, bytes: u64) {
        self.inner.held.fetch_add(bytes, Ordering::SeqCst);
    }

    pub(crate) fn set_waker(&self, waker: SocketStateHandle) {
        *self.inner.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
    }
}

impl fmt::Debug for ReadGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadGate")
            .field("limit", &self.inner.limit)
            .field("held", &self.held())
            .finish()
    }
}
