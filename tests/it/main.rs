//! Integration tests against the real RabbitMQ and Postgres. Each test has its own database and
//! its own exchange and queue names, and removes them when it ends.

mod bounce;
mod chaos;
mod cluster;
mod dedup;
mod e2e;
mod faults;
mod helpers;
mod http;
mod ingest;
mod kumo;
mod lookup;
mod ops;
mod otlp;
mod poison;
mod producer;
mod properties;
mod proxy;
mod rawamqp;
mod refusals;
mod replica;
mod shutdown;
mod steps;
mod store;
mod tail;
mod tls;
mod webhooks;
