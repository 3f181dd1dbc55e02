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

/// Tries of one page: a page that times out (a busy primary, a lock queued ahead of it) or
/// whose connection drops is read again, with growing pauses, before the export gives up. One
/// slow page failed an export of millions of domains whole.
const PAGE_TRIES: u32 = 5;

/// Options of `catchall export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Which domains: catch-all, not-catch-all or unknown (seen, but not enough events yet).
    #[arg(long, value_parser = crate::http::parse_status, default_value = "catch-all")]
    pub status: Status,

    /// File to write; standard output when absent. Written beside it under a name of its own
    /// and renamed when complete, so a failed or stopped export leaves no file, truncated or
    /// not.
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
            let partial = Partial::create(path)?;
            let mut out = std::io::BufWriter::new(&partial.file);
            let rows = write_csv(&store, args.status, threshold, &mut out).await?;
            drop(out);
            partial.persist(path)?;
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

/// The file an export writes before it is complete: beside the output, its whole name with
/// `.<uuid>.partial` appended (not its extension replaced: `counts.csv` and `counts.tsv` must
/// not share one; two exports to one name each have their own, where they wrote into one file
/// and renamed a mix of both), created new (never through a link left there). Removed when
/// dropped unpersisted: an export that fails or is stopped leaves nothing behind.
struct Partial {
    path: PathBuf,
    file: std::fs::File,
    persisted: bool,
}

impl Partial {
    fn create(output: &std::path::Path) -> anyhow::Result<Self> {
        let mut path = output.as_os_str().to_owned();
        path.push(format!(".{}.partial", uuid::Uuid::now_v7().simple()));
        let path = PathBuf::from(path);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            file,
            persisted: false,
        })
    }

    /// On disk (data, then the rename) under `output`, replacing what was there.
    fn persist(mut self, output: &std::path::Path) -> anyhow::Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("writing {}", self.path.display()))?;
        std::fs::rename(&self.path, output)
            .with_context(|| format!("renaming {} to {}", self.path.display(), output.display()))?;
        self.persisted = true;
        let dir = match output.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        // The rename itself reaches the disk with its directory. The export is complete
        // either way: a directory that cannot be synced (not readable) is only a warning.
        if let Err(error) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
            tracing::warn!(%error, dir = %dir.display(), "Could not sync the export's directory.");
        }
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
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
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(5),
    );
    loop {
        let mut tries = 0;
        let page = loop {
            tries += 1;
            match store
                .list_domains(Some(status), threshold, &after, PAGE)
                .await
            {
                Ok(page) => break page,
                Err(error) if tries < PAGE_TRIES && !error.is_permanent() => {
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::new(error)),
                        after = %after,
                        tries,
                        wait_ms = wait.as_millis() as u64,
                        "Reading a page of domains failed; reading it again."
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error)
                        .context(format!("reading a page of domains ({tries} tries)")));
                }
            }
        };
        backoff.reset();
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
