//! catchall: learns which email domains are catch-all from delivered/bounced events.
//!
//! Events arrive on RabbitMQ ([`amqp`]), are parsed and normalised ([`event`]), gathered into
//! batches and applied to Postgres ([`consumer`], [`store`]); [`http`] serves the verdicts.

pub mod amqp;
pub mod app;
pub mod backoff;
pub mod bounce;
pub mod config;
pub mod consumer;
pub mod event;
pub mod export;
pub mod health;
pub mod healthcheck;
pub mod hex;
pub mod http;
pub mod ingest;
pub mod lookups;
pub mod metrics;
pub mod pg;
pub mod replica;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod trace_http;
pub mod webhooks;
