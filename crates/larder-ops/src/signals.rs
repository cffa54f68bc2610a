//! SIGINT and SIGTERM for the long-running verbs (`daemon run`, `watch-store`, `watch-exec`):
//! remembered, so a signal that arrives during a push is seen afterwards, and kept handled, so
//! a second one does not kill the process while it drains what is pending.

use tokio::sync::watch;

/// SIGINT and SIGTERM, remembered once one has come.
pub struct Signals {
    rx: watch::Receiver<bool>,
}

impl Signals {
    /// Install the handlers (needs a tokio runtime).
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(true);
            // Keep the handlers installed: a second signal must not kill us mid-drain.
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
        });
        Ok(Self { rx })
    }

    /// Wait for a signal (returns at once if one came already).
    pub async fn recv(&mut self) {
        if self.rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn received(&self) -> bool {
        *self.rx.borrow()
    }
}
