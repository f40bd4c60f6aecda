//! When to stop: the process signal, and the drain signal handed to services.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Resolves on SIGTERM (how Cloud Run stops an instance) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Tells long-lived streams to end now, with a clear status, before the grace period runs out.
///
/// Unary calls and short streams simply finish during the drain; an endless stream would
/// otherwise be cut by the process exit with no status at all.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
}

impl Drain {
    /// Ends every stream bounded by this drain.
    pub fn start(&self) {
        self.token.cancel();
    }

    /// Whether the drain has started.
    pub fn is_started(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the drain has started.
    pub async fn started(&self) {
        self.token.cancelled().await;
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// How long after SIGTERM streams are told to end: most of the grace, leaving them time to
    /// send their final status before the process must exit.
    pub fn stream_cutoff(grace: Duration) -> Duration {
        grace.saturating_sub(Duration::from_secs(1).min(grace / 5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_get_most_of_the_grace_period() {
        assert_eq!(
            Drain::stream_cutoff(Duration::from_secs(10)),
            Duration::from_secs(9)
        );
        assert_eq!(
            Drain::stream_cutoff(Duration::from_secs(1)),
            Duration::from_millis(800)
        );
        assert_eq!(Drain::stream_cutoff(Duration::ZERO), Duration::ZERO);
    }
}
