//! The one root of shutdown (SIGTERM or SIGINT), and the reload signal
//! (SIGHUP). SIGUSR1 and SIGUSR2 are taken and logged, so a stray one no
//! longer kills the daemon.

/// Completes on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the daemon");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Yields once per SIGHUP (and logs, and ignores, SIGUSR1/SIGUSR2). Never
/// yields where signals are not available.
pub struct Reload {
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    usr1: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    usr2: Option<tokio::signal::unix::Signal>,
}

impl Default for Reload {
    fn default() -> Self {
        Self::new()
    }
}

impl Reload {
    /// Installs the handlers.
    pub fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let take = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for {name}");
                    None
                }
            };
            Reload {
                hup: take(SignalKind::hangup(), "SIGHUP"),
                usr1: take(SignalKind::user_defined1(), "SIGUSR1"),
                usr2: take(SignalKind::user_defined2(), "SIGUSR2"),
            }
        }
        #[cfg(not(unix))]
        {
            Reload {}
        }
    }

    /// The next SIGHUP.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        loop {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.hup) => {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    return;
                }
                () = recv(&mut self.usr1) => tracing::info!("SIGUSR1 received and ignored"),
                () = recv(&mut self.usr2) => tracing::info!("SIGUSR2 received and ignored"),
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    }
}
