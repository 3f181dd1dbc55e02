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
//!   no look-up (it could not tell a duplicate);
//! - `uuid_copy`: the cheapest row per id we found: the ids as `uuid` (16 bytes, not 36 of
//!   text), written with a binary `COPY` into a partitioned table of the same shape, no look-up;
//! - `skip_current`: a claim that trusts the unique index of the partition of now() and looks up
//!   only the others, falling back to the worker's claim on `unique_violation` (a savepoint per
//!   claim). The partition's bounds are passed in, read once before the rounds, so this is a
//!   lower bound on what such a claim would cost (reading them from the catalogue, as the
//!   worker would have to, costs ~0.9 ms a call here).
//!
//! And, as the yardstick of `dedup_overhead` in the same run, `upsert`: what the same batch
//! costs without ids, the worker's upsert of `BATCH_SIZE` events (random domains out of 100,000
//! present ones, 1 in 50 a bounce, summed per domain and sorted), reported per event. Each
//! variant's per-id cost over it is the `dedup_overhead` that variant would give.

use crate::measure::{Sampler, Services, Summary, Watch};
use crate::{PG_HOST, env_u64};
use anyhow::{Context, Result};
use catchall::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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

const UUID_COPY: &str = "COPY uuid_table (message_id) FROM STDIN (FORMAT binary)";
const SKIP_CURRENT: &str =
    "SELECT claim_skip_current($1::bytea[], $2::text::timestamptz, $3::text::timestamptz)";

const VARIANTS: [(&str, &str); 7] = [
    ("claim", catchall::store::CLAIM),
    ("v6_claim", V6_CLAIM),
    ("single_table", SINGLE_TABLE),
    ("plain_insert", PLAIN_INSERT),
    ("uuid_copy", UUID_COPY),
    ("skip_current", SKIP_CURRENT),
    ("upsert", catchall::store::UPSERT),
];

/// The tables and function of the `uuid_copy` and `skip_current` variants.
const SETUP: &str = "
    CREATE TABLE uuid_table (message_id uuid NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()) PARTITION BY RANGE (applied_at);
    CREATE INDEX ON uuid_table USING brin (applied_at);
    CREATE TABLE uuid_table_default PARTITION OF uuid_table DEFAULT;
    CREATE UNIQUE INDEX ON uuid_table_default (message_id);
    CREATE FUNCTION claim_skip_current(keys bytea[], lo timestamptz, hi timestamptz)
    RETURNS SETOF bytea LANGUAGE plpgsql SET enable_seqscan = off AS $$
    BEGIN
        RETURN QUERY
        WITH held AS MATERIALIZED (
            SELECT message_id FROM applied_messages
            WHERE message_id = ANY(keys) AND (applied_at < lo OR applied_at >= hi)),
        claimed AS (
            INSERT INTO applied_messages (message_id)
            SELECT DISTINCT id FROM unnest(keys) id WHERE id NOT IN (SELECT message_id FROM held)
            ORDER BY id)
        SELECT message_id FROM held;
    EXCEPTION WHEN unique_violation THEN
        RETURN QUERY SELECT applied_messages_claim(keys);
    END $$;";

/// A UUID parameter from its 16 bytes (tokio-postgres' own needs its `with-uuid-1` feature).
#[derive(Debug)]
struct Uuid16([u8; 16]);

impl tokio_postgres::types::ToSql for Uuid16 {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::UUID
    }

    tokio_postgres::types::to_sql_checked!();
}

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
    client.batch_execute(SETUP).await?;
    // The names `crate::domain` gives, which `random_batch` draws: every upsert updates rows
    // present (seeded as `'d' || x || '.example'` before, the first batches inserted rows instead).
    client
        .batch_execute(
            "INSERT INTO domains (domain) \
             SELECT 'd' || x || '.bench.example' FROM generate_series(0, 99999) x",
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE domains").await?;
    let mut rng = StdRng::seed_from_u64(13);
    // The bounds of the partition of now(), for `skip_current`.
    let row = client
        .query_one(
            "SELECT lo::text, hi::text FROM applied_messages_current()",
            &[],
        )
        .await?;
    let (lo, hi): (String, String) = (row.get(0), row.get(1));
    let (batches, size) = (env_u64("CLAIM_BATCHES", 80), env_u64("BATCH_SIZE", 2500));
    let repeats = env_u64("BENCH_REPEATS", 5);
    let services = Services::find()?;
    let watch = Watch {
        databases: vec![database.to_string()],
        ..Watch::default()
    };
    let mut runs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 1..=repeats {
        eprintln!("claim round {round}/{repeats}");
        for (variant, sql) in VARIANTS {
            let statement = match variant {
                "uuid_copy" => None,
                _ => Some(client.prepare(sql).await?),
            };
            let sampler = Sampler::start(&services, watch.clone());
            for _ in 0..batches {
                let ids: Vec<String> = (0..size)
                    .map(|_| uuid::Uuid::now_v7().to_string())
                    .collect();
                let tx = client.transaction().await?;
                if variant == "upsert" {
                    let events = random_batch(&mut rng, size);
                    tx.execute(sql, &[&events.0, &events.1, &events.2, &events.3])
                        .await?;
                    tx.commit().await?;
                    continue;
                }
                let bytes: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
                let window = catchall::store::CLAIM_WINDOW.as_secs_f64();
                match &statement {
                    None => copy_uuids(&tx, &ids).await?,
                    Some(s) => {
                        let rows = match variant {
                            "single_table" => tx.query(s, &[&ids]).await?,
                            "claim" => tx.query(s, &[&bytes, &window]).await?,
                            "skip_current" => tx.query(s, &[&bytes, &lo, &hi]).await?,
                            _ => tx.query(s, &[&bytes]).await?,
                        };
                        drop(rows);
                    }
                }
                tx.commit().await?;
            }
            let per_id = sampler.stop().postgres_per_event((batches * size) as f64);
            eprintln!("  {variant}: {per_id:.2} Postgres CPU-µs per id");
            runs.entry(variant).or_default().push(per_id);
        }
    }
    let baseline = Summary::of(&runs["single_table"]).median;
    let upsert = Summary::of(&runs["upsert"]).median;
    let mut report = json!({ "ids_per_batch": size, "batches": batches, "rounds": repeats });
    println!(
        "\nclaim: Postgres CPU-µs per id (upsert: per event) (median, min–max), / single_table, \
         / upsert (the dedup_overhead it would give)"
    );
    for (variant, _) in VARIANTS {
        let summary = Summary::of(&runs[variant]);
        println!(
            "  {variant:14} {:6.2} ({:.2}–{:.2})  {:.2}  {:.2}",
            summary.median,
            summary.min,
            summary.max,
            summary.median / baseline,
            summary.median / upsert
        );
        report[variant] = json!({
            "postgres_cpu_us_per_id": summary.json(2),
            "ratio_to_single_table": ((summary.median / baseline) * 1000.0).round() / 1000.0,
            "ratio_to_upsert": ((summary.median / upsert) * 1000.0).round() / 1000.0,
        });
    }
    Ok(report)
}

/// The `uuid_copy` variant: the ids as `uuid`, in one binary `COPY`.
async fn copy_uuids(tx: &tokio_postgres::Transaction<'_>, ids: &[String]) -> Result<()> {
    let sink = tx.copy_in(UUID_COPY).await?;
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[tokio_postgres::types::Type::UUID],
    );
    futures_util::pin_mut!(writer);
    for id in ids {
        let id = Uuid16(*id.parse::<uuid::Uuid>()?.as_bytes());
        writer.as_mut().write(&[&id]).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// The arrays of the `upsert` variant: `size` events of random domains out of 100,000 (1 in 50
/// a bounce), summed per domain, in domain order.
fn random_batch(rng: &mut StdRng, size: u64) -> (Vec<String>, Vec<i64>, Vec<i64>, Vec<i64>) {
    let mut totals: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for _ in 0..size {
        let entry = totals
            .entry(crate::domain(rng.random_range(0..100_000)))
            .or_default();
        match rng.random_ratio(1, 50) {
            true => entry.1 += 1,
            false => entry.0 += 1,
        }
    }
    let mut arrays = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (domain, (delivered, bounced)) in totals {
        arrays.0.push(domain);
        arrays.1.push(delivered);
        arrays.2.push(bounced);
        arrays.3.push(0);
    }
    arrays
}
