//! The one source of process signals, for the node agent's daemon loop and
//! the build runner: SIGHUP is [`Signal::Reload`], SIGTERM and SIGINT are
//! [`Signal::Terminate`]. A signal-hook thread delivers them on a channel,
//! so a handler never runs code beyond setting a flag, and a busy task
//! cannot starve them: the receiver sees the next signal as soon as it
//! polls (#13: a blocked reconcile used to keep SIGTERM waiting).

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Reload,
    Terminate,
}

/// Installed handlers and the channel they feed. Dropping it stops the
/// thread; the default dispositions are not restored (signal-hook keeps
/// its handler and ignores signals it no longer delivers).
pub struct Signals {
    rx: mpsc::Receiver<Signal>,
    handle: signal_hook::iterator::Handle,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let (tx, rx) = mpsc::channel(16);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let s = if sig == SIGHUP {
                        Signal::Reload
                    } else {
                        Signal::Terminate
                    };
                    if tx.blocking_send(s).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Signals { rx, handle })
    }

    /// The next signal; `None` once the thread is gone.
    pub async fn recv(&mut self) -> Option<Signal> {
        self.rx.recv().await
    }

    /// Resolves at the first SIGTERM or SIGINT; reloads are ignored.
    pub async fn terminated(&mut self) {
        while let Some(s) = self.rx.recv().await {
            if s == Signal::Terminate {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.handle.close();
    }
}
