//! Integration tests against the real RabbitMQ and Postgres. Each test has its own database and
//! its own exchange and queue names, and removes them when it ends.

mod chaos;
mod dedup;
mod e2e;
mod faults;
mod helpers;
mod http;
mod poison;
mod producer;
mod properties;
mod proxy;
mod rawamqp;
mod refusals;
mod shutdown;
mod steps;
mod store;
