//! The `catchall` worker binary: configuration, telemetry, and the run loop.

use anyhow::Context;
use catchall::app::App;
use catchall::config::{Cli, Command, HealthcheckArgs, redact_url};
use catchall::store::Store;
use catchall::telemetry;
use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck(check)) = &cli.command {
        // ADMIN_ADDR, when set, is where the probes are served out of reach of HTTP_ADDR's
        // connection cap.
        let addr = cli.config.admin_addr.unwrap_or(cli.config.http_addr);
        return healthcheck(addr, check).await;
    }
    let telemetry = telemetry::init(cli.config.log_format);
    if let Err(error) = cli.config.validate() {
        clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("{error}\n"),
        )
        .exit();
    }
    let code = match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "catchall failed.");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

/// `catchall healthcheck`: one line on stderr when unhealthy, nothing otherwise.
async fn healthcheck(http_addr: std::net::SocketAddr, check: &HealthcheckArgs) -> ExitCode {
    match catchall::healthcheck::check(http_addr, &check.path, check.timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("unhealthy: {:#}", anyhow::Error::new(error));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    if let Some(Command::Migrate) = cli.command {
        let store = Store::connect(&config.database_url, 1)
            .await
            .with_context(|| {
                format!(
                    "connecting to Postgres at {}",
                    redact_url(&config.database_url)
                )
            })?;
        let report = store.migrate().await.context("applying migrations")?;
        tracing::info!(
            applied = report.applied_migrations().len(),
            "Migrations up to date."
        );
        return Ok(());
    }
    if let Some(Command::Export(args)) = &cli.command {
        let rows = catchall::export::run(args, &config.database_url, config.threshold).await?;
        tracing::info!(rows, "Export written.");
        return Ok(());
    }

    let shutdown_timeout = config.shutdown_timeout;
    let app = App::build(config).await?;
    let cancel = CancellationToken::new();
    let mut worker = tokio::spawn(app.run(cancel.clone()));
    tokio::select! {
        result = &mut worker => return result.context("the worker task panicked")?,
        signal = shutdown_signal() => tracing::info!(signal, "Stopping: committing and acking what is in flight."),
    }
    cancel.cancel();
    match tokio::time::timeout(shutdown_timeout, worker).await {
        Ok(result) => result.context("the worker task panicked")?,
        Err(_) => anyhow::bail!(
            "did not stop within the shutdown timeout ({shutdown_timeout:?}); unacked messages return to the queue"
        ),
    }
}

/// Waits for SIGTERM or SIGINT and names it.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Could not install signal handlers; stop with SIGKILL.");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
