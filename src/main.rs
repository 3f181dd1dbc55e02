//! The `catchall` worker binary: configuration, telemetry, and the run loop.

use anyhow::Context;
use catchall::app::App;
use catchall::config::{Cli, Command, HealthcheckArgs};
use catchall::signals::Stop;
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
    if let Err(error) = telemetry::log_filter() {
        catchall::config::exit_usage(&error);
    }
    let telemetry = telemetry::init(cli.config.log_format);
    if let Err(error) = cli.config.validate() {
        catchall::config::exit_usage(&error);
    }
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "catchall failed.");
            1
        }
    };
    telemetry.shutdown();
    // A host-name lookup (of the Postgres or RabbitMQ host) may still run on tokio's blocking
    // pool, where no timeout of ours stops it.
    catchall::signals::exit(code)
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
    // From here on a stop signal is ours, during the start too (waiting for Postgres,
    // migrating): the start is dropped (a migration under way rolls back) and the worker exits
    // 0 (`migrate` and `export` exit 1: their work is not done).
    let stop = Stop::install();
    if let Some(Command::Export(args)) = &cli.command {
        let export = catchall::export::run(args, &config.database_url, config.threshold);
        let rows = tokio::select! {
            rows = export => rows?,
            // The export's file under way is removed with it.
            signal = stop.signalled() => anyhow::bail!("stopped by {signal}; nothing exported"),
        };
        tracing::info!(rows, "Export written.");
        return Ok(());
    }
    if let Some(Command::Migrate) = cli.command {
        let migrate = async {
            let store = catchall::app::connect_waiting(&config.database_url, 1, None).await?;
            store.migrate().await.context("applying migrations")
        };
        let report = tokio::select! {
            report = migrate => report?,
            // Not a success: a Job or a `migrate && deploy` must not take it for one.
            signal = stop.signalled() => anyhow::bail!("stopped by {signal} before the migrations were done"),
        };
        tracing::info!(
            applied = report.applied_migrations().len(),
            "Migrations up to date."
        );
        return Ok(());
    }

    if let Err(error) = config.check_amqp_url() {
        catchall::config::exit_usage(&error);
    }
    let shutdown_timeout = config.shutdown_timeout;
    let app = tokio::select! {
        app = App::build(config) => app?,
        signal = stop.signalled() => {
            tracing::info!(signal, "Stopped while starting.");
            return Ok(());
        }
    };
    let cancel = CancellationToken::new();
    let mut worker = tokio::spawn(app.run(cancel.clone()));
    tokio::select! {
        result = &mut worker => return result.context("the worker task panicked")?,
        signal = stop.signalled() => tracing::info!(signal, "Stopping: committing and acking what is in flight."),
    }
    cancel.cancel();
    match tokio::time::timeout(shutdown_timeout, worker).await {
        Ok(result) => result.context("the worker task panicked")?,
        Err(_) => anyhow::bail!(
            "did not stop within the shutdown timeout ({shutdown_timeout:?}); unacked messages return to the queue"
        ),
    }
}
