//! `catchall export`: the domains of one status as CSV (`domain,delivered,bounced,status`), for
//! list-cleaning jobs. Streams keyset pages, so memory stays flat however many domains match.

use crate::config::redact_url;
use crate::event::Status;
use crate::store::Store;
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// Rows fetched per page.
const PAGE: u32 = 10_000;

/// Options of `catchall export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Which domains: catch-all, not-catch-all or unknown (seen, but not enough events yet).
    #[arg(long, value_parser = crate::http::parse_status, default_value = "catch-all")]
    pub status: Status,

    /// File to write; standard output when absent. Written to `<FILE>.partial` and renamed
    /// when complete, so a failed export never leaves a truncated file under the name.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// Writes every domain of `args.status` to `args.output` (or stdout); returns the row count.
pub async fn run(args: &ExportArgs, database_url: &str, threshold: i64) -> anyhow::Result<u64> {
    let store = Store::connect(database_url, 1)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redact_url(database_url)))?;
    match &args.output {
        Some(path) => {
            // Beside the file, its whole name with `.partial` appended (not its extension
            // replaced: `counts.csv` and `counts.tsv` must not share one).
            let mut partial = path.as_os_str().to_owned();
            partial.push(".partial");
            let partial = PathBuf::from(partial);
            let file = std::fs::File::create(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            let rows = write_csv(
                &store,
                args.status,
                threshold,
                std::io::BufWriter::new(file),
            )
            .await?;
            std::fs::rename(&partial, path)
                .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
            Ok(rows)
        }
        None => {
            let stdout = std::io::stdout().lock();
            write_csv(
                &store,
                args.status,
                threshold,
                std::io::BufWriter::new(stdout),
            )
            .await
        }
    }
}

/// Writes the header and one line per domain, a keyset page at a time.
pub async fn write_csv(
    store: &Store,
    status: Status,
    threshold: i64,
    mut out: impl Write,
) -> anyhow::Result<u64> {
    writeln!(out, "domain,delivered,bounced,status").context("writing the CSV")?;
    let mut after = String::new();
    let mut rows = 0u64;
    loop {
        let page = store
            .list_domains(Some(status), threshold, &after, PAGE)
            .await
            .context("reading a page of domains")?;
        for row in &page {
            // Domains are normalised host names (letters, digits, dots, hyphens): no quoting.
            writeln!(
                out,
                "{},{},{},{}",
                row.domain,
                row.delivered,
                row.bounced,
                Status::classify(row.delivered, row.bounced, threshold).as_str()
            )
            .context("writing the CSV")?;
        }
        rows += page.len() as u64;
        match page.last() {
            Some(last) if page.len() == PAGE as usize => after.clone_from(&last.domain),
            _ => break,
        }
    }
    out.flush().context("writing the CSV")?;
    Ok(rows)
}
