//! SIGTERM and SIGINT for the binaries (the worker and the producer), handled from
//! [`Stop::install`] on: the first asks for a stop, a second ends the process at once (exit 130
//! or 143, as the signal's default would have).

use std::sync::{Arc, OnceLock};

/// Ends the process with `code` once stdout and stderr are flushed, without dropping the Tokio
/// runtime: work on its blocking pool cannot be cancelled, and the runtime's drop waited for
/// it. A host-name lookup with DNS not answering (glibc waits out its timeouts, for each name
/// of the search list) held a stopped worker past its grace period; `publish -`'s read of a
/// quiet stdin held a stopped producer after its summary, until killed.
pub fn exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}
use tokio_util::sync::CancellationToken;

pub struct Stop {
    /// Cancelled by the first signal.
    token: CancellationToken,
    /// Its name.
    first: Arc<OnceLock<&'static str>>,
}

impl Stop {
    pub fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let (token, first) = (CancellationToken::new(), Arc::new(OnceLock::new()));
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                let (token, first) = (token.clone(), first.clone());
                tokio::spawn(async move {
                    loop {
                        let (name, code) = tokio::select! {
                            _ = term.recv() => ("SIGTERM", 143),
                            _ = int.recv() => ("SIGINT", 130),
                        };
                        if first.set(name).is_err() {
                            tracing::warn!(signal = name, "A second stop signal: exiting now.");
                            std::process::exit(code);
                        }
                        token.cancel();
                    }
                });
            }
            _ => tracing::error!("Could not install signal handlers; stop with SIGKILL."),
        }
        Self { token, first }
    }

    /// Cancelled by the first stop signal (never, without handlers).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Waits for the first stop signal and names it.
    pub async fn signalled(&self) -> &'static str {
        self.token.cancelled().await;
        self.first.get().copied().unwrap_or("a signal")
    }
}
