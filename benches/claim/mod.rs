//! The claim stage (issue 13), alone with `BENCH_STAGES=claim` (`make bench-claim`): what
//! deduplication costs Postgres per id, statement against statement, on one new install.
//!
//! Every round runs each variant once, interleaved, on the same database: `CLAIM_BATCHES`
//! (default 80) transactions of `BATCH_SIZE` (default 2,500) fresh ids each, shaped like the
//! producer's (UUIDv7 text, sorted), one claim statement and COMMIT per transaction, from one
//! connection. The CPU of that database's backends is sampled from `/proc` over each window and
//! reported per id (median and range over `BENCH_REPEATS` rounds, default 5), with each variant's
//! ratio to the pre-issue-8 claim:
//!
//! - `claim`: the worker's claim ([`catchall::store::CLAIM`]) on the partitioned table;
//! - `v6_claim`: the claim it replaced (issue 13): look-up of the other partitions only (bounds
//!   of the partition of now() from the catalogue), `ON CONFLICT DO NOTHING RETURNING`;
//! - `single_table`: the pre-issue-8 claim (`cbf388c`): one unpartitioned table with a text
//!   primary key and a BRIN index on `applied_at`, `ON CONFLICT DO NOTHING RETURNING`;
//! - `plain_insert`: the floor of a row per id, a plain `INSERT` into the partitioned table with
//!   no look-up (it could not tell a duplicate).

use crate::measure::{Sampler, Services, Summary, Watch};
use crate::{PG_HOST, env_u64};
use anyhow::{Context, Result};
use catchall::store::Store;
use serde_json::{Value, json};
use std::collections::BTreeMap;

const V6_CLAIM: &str = "INSERT INTO applied_messages (message_id) \
     SELECT id FROM (SELECT unnest($1::bytea[]) AS id \
                     EXCEPT SELECT message_id FROM applied_messages WHERE message_id = ANY($1::bytea[]) \
                       AND (applied_at < (SELECT lo FROM applied_messages_current()) \
                            OR applied_at >= (SELECT hi FROM applied_messages_current()))) fresh \
     ORDER BY id ON CONFLICT DO NOTHING RETURNING message_id";
const SINGLE_TABLE: &str = "INSERT INTO single_table (message_id) SELECT * FROM unnest($1::text[]) \
     ON CONFLICT DO NOTHING RETURNING message_id";
const PLAIN_INSERT: &str = "INSERT INTO applied_messages (message_id) SELECT unnest($1::bytea[])";

const VARIANTS: [(&str, &str); 4] = [
    ("claim", catchall::store::CLAIM),
    ("v6_claim", V6_CLAIM),
    ("single_table", SINGLE_TABLE),
    ("plain_insert", PLAIN_INSERT),
];

pub async fn claim_stage() -> Result<Value> {
    let name = format!(
        "bench_claim_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let admin = crate::http_stage::admin().await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let result = run(&name).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    result
}

async fn run(database: &str) -> Result<Value> {
    let url = format!("{PG_HOST}/{database}");
    Store::connect(&url, 1).await?.migrate().await?;
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .context("connecting to the claim stage's database")?;
    tokio::spawn(connection);
    // As autovacuum may leave a new partition: analysed while empty (see migration V8).
    client.batch_execute("ANALYZE applied_messages").await?;
    // The pre-issue-8 table (migration V1 as it was before V2 and V5).
    client
        .batch_execute(
            "CREATE TABLE single_table (message_id text COLLATE \"C\" PRIMARY KEY, \
               applied_at timestamptz NOT NULL DEFAULT now()); \
             CREATE INDEX ON single_table USING brin (applied_at)",
        )
        .await?;
    let (batches, size) = (env_u64("CLAIM_BATCHES", 80), env_u64("BATCH_SIZE", 2500));
    let repeats = env_u64("BENCH_REPEATS", 5);
    let services = Services::find();
    let watch = Watch {
        databases: vec![database.to_string()],
        ..Watch::default()
    };
    let mut runs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 1..=repeats {
        eprintln!("claim round {round}/{repeats}");
        for (variant, sql) in VARIANTS {
            let statement = client.prepare(sql).await?;
            let sampler = Sampler::start(&services, watch.clone());
            for _ in 0..batches {
                let ids: Vec<String> = (0..size)
                    .map(|_| uuid::Uuid::now_v7().to_string())
                    .collect();
                let tx = client.transaction().await?;
                let bytes: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
                let window = catchall::store::CLAIM_LOCK_WINDOW.as_secs_f64();
                match variant {
                    "single_table" => tx.query(&statement, &[&ids]).await?,
                    "claim" => tx.query(&statement, &[&bytes, &window]).await?,
                    _ => tx.query(&statement, &[&bytes]).await?,
                };
                tx.commit().await?;
            }
            let per_id = sampler.stop().postgres_per_event((batches * size) as f64);
            eprintln!("  {variant}: {per_id:.2} Postgres CPU-µs per id");
            runs.entry(variant).or_default().push(per_id);
        }
    }
    let baseline = Summary::of(&runs["single_table"]).median;
    let mut report = json!({ "ids_per_batch": size, "batches": batches, "rounds": repeats });
    println!("\nclaim: Postgres CPU-µs per id (median, min–max), and / single_table");
    for (variant, _) in VARIANTS {
        let summary = Summary::of(&runs[variant]);
        println!(
            "  {variant:14} {:6.2} ({:.2}–{:.2})  {:.2}",
            summary.median,
            summary.min,
            summary.max,
            summary.median / baseline
        );
        report[variant] = json!({
            "postgres_cpu_us_per_id": summary.json(2),
            "ratio_to_single_table": ((summary.median / baseline) * 1000.0).round() / 1000.0,
        });
    }
    Ok(report)
}
