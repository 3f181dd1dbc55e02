//! What `/readyz` reports: whether the worker consumes, and the last Postgres failure.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared between the consumer (which writes) and the HTTP server (which reads).
#[derive(Debug, Default)]
pub struct Health {
    consuming: AtomicBool,
    db_error: Mutex<Option<String>>,
    /// Why the last connection to RabbitMQ failed or ended (a refused certificate, every node
    /// down…), until the consumer runs again.
    broker_error: Mutex<Option<String>>,
}

impl Health {
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// Records that applying a batch failed; cleared by the next commit.
    pub fn set_db_error(&self, error: Option<String>) {
        let mut slot = self
            .db_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = error;
    }

    pub fn db_error(&self) -> Option<String> {
        self.db_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set_broker_error(&self, error: Option<String>) {
        *self
            .broker_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = error;
    }

    pub fn broker_error(&self) -> Option<String> {
        self.broker_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
