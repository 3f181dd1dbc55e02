//! Capped exponential backoff with jitter, for reconnects and retries.

use std::time::Duration;

/// Doubles the wait after each failure, up to a cap; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next wait: the current step with up to 25% jitter (so replicas do not retry in step),
    /// then the step doubles, capped at `max`.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = step.mul_f64(f64::from(nanos % 1000) / 4000.0);
        step + jitter
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<_> = (0..6).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] <= Duration::from_millis(125));
        assert!(waits[1] >= Duration::from_millis(200));
        assert!(waits[5] >= Duration::from_secs(1) && waits[5] <= Duration::from_millis(1250));
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(125));
    }
}
