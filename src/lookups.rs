//! Single look-ups (`GET /domains/{domain}`) answered together: look-ups that arrive while
//! [`IN_FLIGHT`] queries already run wait for one of them to end, then go to Postgres as one
//! `domain = ANY($1)` query ([`Store::lookup_many`]) instead of one query each.
//!
//! Why: under load the look-ups and ingestion share the machine's cores, and a query per
//! look-up is most of a look-up's cost in Postgres. One query for 8 domains cost Postgres about
//! what a query for one did (pgbench, 100,000 domains: 6,500-8,200 against 7,100-10,300
//! queries/s). A look-up that finds no query running goes out at once and alone (the
//! single-row statement, as before), so a quiet worker answers as fast as it did; the groups
//! grow only as far as look-ups arrive faster than Postgres answers them.
//!
//! Answers are the same as one query each: every look-up of a group reads a snapshot taken
//! after it arrived, and a failed or timed-out query fails every look-up of its group (503).

use crate::store::{Counts, Store, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Queries for single look-ups at once. Two: one slow query does not hold up every look-up,
/// and look-ups still gather into groups as soon as both are busy.
pub const IN_FLIGHT: usize = 2;
/// Domains per query of grouped single look-ups at most (a bulk look-up, up to 10,000 domains,
/// is one query of its own; SPEC §5).
pub const MAX_GROUP: usize = 500;
/// Single look-ups waiting for a query at most; past it a look-up fails at once (503). The
/// queue was unbounded: while Postgres stalled it grew at the clients' rate, since a request
/// that timed out or whose client left did not take its look-up out.
pub const MAX_QUEUED: usize = 10_000;

/// The answer to one look-up: the error is shared by every look-up of the failed query.
pub type Answer = Result<Counts, Arc<StoreError>>;

struct Ask {
    domain: String,
    reply: oneshot::Sender<Answer>,
}

/// The handle the HTTP handlers look up through. Cheap to clone; the task that sends the
/// queries ends when the last handle is dropped.
#[derive(Clone)]
pub struct Lookups {
    asks: mpsc::Sender<Ask>,
    queries: Arc<AtomicU64>,
    /// Look-ups those queries answered.
    asked: Arc<AtomicU64>,
}

impl Lookups {
    /// Starts the task that groups look-ups and queries `store` (the look-up pool, or the
    /// replica's). Must run inside a Tokio runtime.
    pub fn spawn(store: Store) -> Self {
        let (asks, mut queue) = mpsc::channel::<Ask>(MAX_QUEUED);
        let queries = Arc::new(AtomicU64::new(0));
        let asked = Arc::new(AtomicU64::new(0));
        let (sent, sent_asks) = (queries.clone(), asked.clone());
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            loop {
                // A free slot first, then the look-ups: while both slots are busy, look-ups
                // queue in the channel and the next query takes all of them.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = queue.recv().await else {
                    return;
                };
                // Look-ups whose request is gone (its client left, or it timed out) are
                // dropped, not queried.
                let mut group = vec![first];
                group.retain(|ask| !ask.reply.is_closed());
                while group.len() < MAX_GROUP {
                    match queue.try_recv() {
                        Ok(ask) if ask.reply.is_closed() => {}
                        Ok(ask) => group.push(ask),
                        Err(_) => break,
                    }
                }
                if group.is_empty() {
                    continue;
                }
                crate::metrics::lookup_group(group.len());
                sent.fetch_add(1, Ordering::Relaxed);
                sent_asks.fetch_add(group.len() as u64, Ordering::Relaxed);
                let store = store.clone();
                tokio::spawn(async move {
                    answer(&store, group).await;
                    drop(slot);
                });
            }
        });
        Self {
            asks,
            queries,
            asked,
        }
    }

    /// Queries sent so far (each answered one group of look-ups).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Look-ups sent to Postgres so far (those dropped before their query are not).
    pub fn asked(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }

    /// A (normalised) domain's counters; zero for a domain never seen.
    pub async fn lookup(&self, domain: String) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.asks
            .try_send(Ask { domain, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => Arc::new(StoreError::Busy),
                mpsc::error::TrySendError::Closed(_) => Arc::new(StoreError::Closed),
            })?;
        answer.await.map_err(|_| Arc::new(StoreError::Closed))?
    }
}

/// Queries one group and replies to each look-up in it. A look-up whose client went away has
/// dropped its receiver; its reply is discarded.
async fn answer(store: &Store, mut group: Vec<Ask>) {
    if group.len() == 1 {
        let ask = group.remove(0);
        let answer = store.lookup(&ask.domain).await.map_err(Arc::new);
        let _ = ask.reply.send(answer);
        return;
    }
    let mut domains: Vec<String> = group.iter().map(|ask| ask.domain.clone()).collect();
    domains.sort_unstable();
    domains.dedup();
    let found: Result<HashMap<String, Counts>, _> =
        store.lookup_many(&domains).await.map_err(Arc::new);
    for ask in group {
        let answer = match &found {
            Ok(found) => Ok(found.get(&ask.domain).copied().unwrap_or_default()),
            Err(error) => Err(error.clone()),
        };
        let _ = ask.reply.send(answer);
    }
}
