//! The outage stage of `make bench` (issue 8): the worker's peak RSS while Postgres refuses
//! every commit and the queue holds far more 1 MiB messages than `PREFETCH_BYTES` (default
//! 64 MiB) lets it take; then the refusal ends and every message must be counted once. With
//! `BENCH_BASELINE_BIN`, the baseline binary runs the same (before issue 8 it held as many
//! messages as `PREFETCH` allowed).

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{PG_HOST, Run, metric, peak_rss_mib, round3, spawn_worker, stop_worker};

/// Messages of 1 MiB in the queue: ~5 times the default budget.
const MESSAGES: usize = 320;

/// A body of one event padded to 1 MiB (an unknown field is ignored by the parser).
fn big_body(i: usize) -> Vec<u8> {
    let mut body =
        format!(r#"{{"domain":"big{i}.outage.example","type":"delivered","pad":""#).into_bytes();
    body.resize((1 << 20) - 16, b'x');
    body.extend_from_slice(b"\"}");
    body
}

impl Run {
    /// Runs the outage with `bin` on a clone of `template`: returns the JSON figures.
    pub(crate) async fn outage(
        &self,
        stage: &str,
        bin: &Path,
        template: &str,
    ) -> Result<serde_json::Value> {
        let topology = self.topology(stage);
        let db = self.clone_db_of(stage, template).await?;
        let url = format!("{PG_HOST}/{db}");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(connection);
        client
            .batch_execute(
                "CREATE FUNCTION bench_outage() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                   RAISE EXCEPTION 'bench outage' USING ERRCODE = 'serialization_failure'; END $$; \
                 CREATE TRIGGER bench_outage BEFORE INSERT OR UPDATE ON domains \
                   FOR EACH ROW EXECUTE FUNCTION bench_outage();",
            )
            .await
            .context("installing the outage trigger")?;
        let bodies: Vec<Vec<u8>> = (0..MESSAGES).map(big_body).collect();
        self.prefill(&topology, &bodies, true).await?;
        drop(bodies);
        let (mut child, pid, base) = spawn_worker(bin, &url, &topology, &self.config)?;
        let http = crate::http_client();
        // Refused for 20 s: long enough for every retry to have taken what the prefetch allows.
        let refused = Instant::now();
        let mut errors = 0.0;
        while refused.elapsed() < Duration::from_secs(20) {
            if let Some(status) = child.try_wait()? {
                bail!("{stage}: the worker exited during the outage: {status}");
            }
            if let Ok(response) = http.get(format!("{base}/metrics")).send().await
                && let Ok(text) = response.text().await
            {
                errors = metric(&text, "catchall_db_errors_total");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let peak_during = peak_rss_mib(pid);
        client
            .batch_execute("DROP TRIGGER bench_outage ON domains")
            .await
            .context("ending the outage")?;
        let recovered = Instant::now();
        let deadline = recovered + Duration::from_secs(300);
        loop {
            let row = client
                .query_one(
                    "SELECT count(*) FROM domains WHERE domain LIKE '%.outage.example' AND delivered = 1",
                    &[],
                )
                .await?;
            if row.get::<_, i64>(0) == MESSAGES as i64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{stage}: not every message counted once within 300 s of the outage's end");
            }
            if let Some(status) = child.try_wait()? {
                bail!("{stage}: the worker exited after the outage: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drained_s = recovered.elapsed().as_secs_f64();
        let peak = peak_rss_mib(pid);
        stop_worker(&mut child, pid).await?;
        let doubled = client
            .query_one(
                "SELECT count(*) FROM domains WHERE domain LIKE '%.outage.example' AND delivered <> 1",
                &[],
            )
            .await?
            .get::<_, i64>(0);
        drop(client);
        let _ = task.await;
        self.drop_db(&db).await;
        self.delete_topology(&topology).await;
        if doubled != 0 {
            bail!("{stage}: {doubled} domains counted more than once");
        }
        eprintln!(
            "  {stage}: {MESSAGES} messages of 1 MiB, Postgres refusing for 20 s ({errors} failed commits): peak RSS {peak_during:.1} MiB during, {peak:.1} MiB overall; counted once each {drained_s:.1} s after",
        );
        Ok(serde_json::json!({
            "messages_of_1_mib": MESSAGES,
            "refused_seconds": 20,
            "failed_commits": errors,
            "peak_rss_during_outage_mib": round3(peak_during),
            "peak_rss_mib": round3(peak),
            "drained_after_s": round3(drained_s),
        }))
    }
}
