// PATCHED (catchall): the whole file is new; see vendor/README.md.
//! A byte budget on what a connection reads: RabbitMQ's prefetch counts messages, not bytes, so
//! a consumer whose prefetch was raised for small messages can be sent that many large ones at
//! once. With a gate, the I/O loop stops reading the socket while the content it delivered and
//! the application has not released reaches the limit; TCP flow control then holds the rest on
//! the broker's side. Frames already read wait in the receive buffer unparsed, acks and other
//! writes still go out. A delivery is counted once its body is read whole: its body's size and
//! what its header holds parsed (`header_weight`), so one larger than the limit still arrives.
//! What is held is at most the limit, one delivery under way and one read of raw frames.
//! Reading and parsing go on regardless while a method's reply is awaited (`basic.qos-ok`,
//! `basic.cancel-ok`, `channel.close-ok`…), so an application that awaits one cannot deadlock
//! against its own budget, unless it sealed the gate (`seal`, before a close it bounds with a
//! timeout).

use crate::socket_state::SocketStateHandle;
use crate::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use crate::BasicProperties;
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
    /// A gate that closes once `limit` bytes of deliveries (bodies, and headers as parsed) are
    /// held (at least 1).
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

    /// Bytes of deliveries read and not yet released.
    pub fn held(&self) -> u64 {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Whether the I/O loop may read.
    pub fn is_open(&self) -> bool {
        self.held() < self.inner.limit
    }

    /// Gives back `bytes` of bodies the application is done with (acked or rejected), or the
    /// `header_weight` of a delivery's properties once it drops them; wakes the I/O loop when
    /// that opens the gate.
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

    /// What a delivery's parsed properties hold in memory, its headers' values and its other
    /// properties' strings, estimated from what was parsed (the fixed-size part aside): the
    /// I/O loop counts it with the delivery's body, once that is read whole, and the
    /// application releases it when it is done with the delivery's properties. A header is at
    /// most a frame (128 KiB on RabbitMQ) on the wire, but each one-byte value of it (a void, a
    /// boolean) parses to an `AMQPValue` of 40 bytes, and a one-entry table in an array (7
    /// bytes) to a B-tree node of ~1 KiB. Counted by their bodies alone, small messages with
    /// such headers took a connection far past its budget: 64 of 5 MiB each at the first
    /// prefetch of a 64 MiB budget, up to 10,000 after a raise. The estimate is meant to err
    /// high: an array at the capacity a `Vec` grown by pushes has (at least 4, then powers of
    /// two), a table at one B-tree node (11 entries) for every 5 entries and one more, strings
    /// at their bytes, each allocation with a malloc's overhead (32 bytes at least).
    pub fn header_weight(properties: &BasicProperties) -> u64 {
        let strings = [
            properties.content_type(),
            properties.content_encoding(),
            properties.correlation_id(),
            properties.reply_to(),
            properties.expiration(),
            properties.message_id(),
            properties.kind(),
            properties.user_id(),
            properties.app_id(),
            properties.cluster_id(),
        ];
        strings.into_iter().flatten().map(short_string_weight).sum::<u64>()
            + properties.headers().as_ref().map_or(0, table_weight)
    }

    /// A delivery whose body was read whole, weighing `bytes` (its body's size and its
    /// `header_weight`).
    pub(crate) fn add(&self, bytes: u64) {
        self.inner.held.fetch_add(bytes, Ordering::SeqCst);
    }

    pub(crate) fn set_waker(&self, waker: SocketStateHandle) {
        *self.inner.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
    }
}

const VALUE: u64 = size_of::<AMQPValue>() as u64;
const KEY: u64 = size_of::<ShortString>() as u64;
/// A node of std's B-tree: 11 keys and values, its parent, its length and index, and (an
/// internal node) 12 edges.
const NODE: u64 = 11 * (KEY + VALUE) + 16 + 12 * 8;

// Nesting is bounded (amq-protocol-types keeps values deeper than 64 levels as bytes), and so
// is this recursion.
fn table_weight(table: &FieldTable) -> u64 {
    let entries = table.inner().len() as u64;
    if entries == 0 {
        return 0;
    }
    // Every node but the root holds at least 5 entries.
    let nodes = entries / 5 + 1;
    nodes * heap(NODE as usize)
        + table
            .inner()
            .iter()
            .map(|(key, value)| short_string_weight(key) + value_weight(value))
            .sum::<u64>()
}

fn array_weight(array: &FieldArray) -> u64 {
    let values = array.as_slice();
    if values.is_empty() {
        return 0;
    }
    let capacity = (values.len() as u64).next_power_of_two().max(4);
    heap((capacity * VALUE) as usize) + values.iter().map(value_weight).sum::<u64>()
}

/// An allocation of `bytes` as a malloc like glibc's makes it: 8 bytes of its own, rounded up
/// to 16, 32 at least (a one-byte string takes 32).
fn heap(bytes: usize) -> u64 {
    if bytes == 0 {
        return 0;
    }
    ((bytes as u64 + 8).div_ceil(16) * 16).max(32)
}

// The text (lossy when the bytes are not UTF-8) and, then, the bytes as sent (counted twice
// when they are the text).
fn short_string_weight(string: &ShortString) -> u64 {
    heap(string.as_str().len()) + heap(string.as_bytes().len())
}

fn value_weight(value: &AMQPValue) -> u64 {
    match value {
        AMQPValue::ShortString(string) => short_string_weight(string),
        AMQPValue::LongString(string) => heap(string.as_bytes().len()),
        AMQPValue::ByteArray(bytes) => heap(bytes.as_slice().len()),
        AMQPValue::FieldArray(array) => array_weight(array),
        AMQPValue::FieldTable(table) => table_weight(table),
        _ => 0,
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

// PATCHED (catchall): test of `header_weight`.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FieldArray, FieldTable, LongString};

    fn weight(headers: FieldTable) -> u64 {
        ReadGate::header_weight(&BasicProperties::default().with_headers(headers))
    }

    #[test]
    fn header_weight_covers_what_parsed_values_hold() {
        assert_eq!(ReadGate::header_weight(&BasicProperties::default()), 0);
        // A property's string: its text and its bytes, 32 each at least.
        let id = BasicProperties::default().with_message_id("m-1".into());
        assert_eq!(ReadGate::header_weight(&id), 64);
        let mut headers = FieldTable::default();
        headers.insert(
            "voids".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void; 1000])),
        );
        headers.insert(
            "text".into(),
            AMQPValue::LongString(LongString::from(vec![b'x'; 5000])),
        );
        // At least what the values and the text take (a node for the two keys, 1,024 values,
        // the text); at most that and another node.
        let held = NODE + 1024 * VALUE + 5000;
        assert!(heap(5000) >= 5000 + 8 && heap(1) == 32, "{}", heap(1));
        let weight = weight(headers);
        assert!(weight >= held, "{weight} < {held}");
        assert!(weight <= held + NODE + 64, "{weight}");
    }

    #[test]
    fn header_weight_counts_a_b_tree_node_for_each_small_table() {
        // An array of one-entry tables: 7 bytes each on the wire, a node of ~1 KiB parsed.
        let mut one = FieldTable::default();
        one.insert("k".into(), AMQPValue::Void);
        let mut headers = FieldTable::default();
        headers.insert(
            "tables".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(one); 1000])),
        );
        let weight = weight(headers);
        assert!(weight >= 1000 * NODE, "{weight}");
    }

    #[test]
    fn header_weight_counts_the_allocation_of_each_small_string() {
        // 16,384 one-byte long strings: 6 bytes each on the wire, a 40-byte value and a
        // 32-byte allocation each parsed.
        let mut headers = FieldTable::default();
        headers.insert(
            "strings".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongString(LongString::from(vec![b'x']));
                16_384
            ])),
        );
        let weight = weight(headers);
        assert!(weight >= 16_384 * (VALUE + 32), "{weight}");
    }
}
