//! The one shutdown path: a signal every task can wait on, and a way to wait for them all.
//!
//! [`ShutdownController::trigger`] flips a flag that every [`Shutdown`] handle sees; each handle also
//! holds a drop guard, so [`ShutdownController::drained`] completes once every task that held one has
//! finished. Accept loops, HTTP connections, WebSocket sessions and the TURN relay all hold a handle;
//! that is how upgraded WebSockets — which hyper's graceful shutdown does not track — are drained too.

use tokio::sync::{mpsc, watch};

/// Owns the shutdown signal and waits for every [`Shutdown`] handle to be dropped.
#[derive(Debug)]
pub struct ShutdownController {
    /// `true` once shutdown has begun.
    signal: watch::Sender<bool>,
    /// Cloned into every handle; `drained` ends when the last clone is gone.
    guard: mpsc::Sender<()>,
    /// Receives nothing; reports `None` once all guards are dropped.
    done: mpsc::Receiver<()>,
}

/// A task's view of shutdown: wait for the signal, and keep the server alive while held.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Watches the controller's flag.
    signal: watch::Receiver<bool>,
    /// Dropped with the task, which is how the controller knows it ended.
    _guard: mpsc::Sender<()>,
}

impl Default for ShutdownController {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownController {
    /// A controller that has not fired.
    pub fn new() -> Self {
        let (guard, done) = mpsc::channel(1);
        ShutdownController {
            signal: watch::Sender::new(false),
            guard,
            done,
        }
    }

    /// A handle for a task that must finish before the server exits.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            signal: self.signal.subscribe(),
            _guard: self.guard.clone(),
        }
    }

    /// Tells every handle that shutdown has begun.
    pub fn trigger(&self) {
        self.signal.send_replace(true);
    }

    /// Whether [`trigger`](Self::trigger) has been called.
    pub fn is_triggered(&self) -> bool {
        *self.signal.borrow()
    }

    /// Waits until every handle handed out has been dropped.
    pub async fn drained(self) {
        let ShutdownController {
            guard, mut done, ..
        } = self;
        drop(guard);
        let _ = done.recv().await;
    }
}

impl Shutdown {
    /// Completes once shutdown has begun (at once if it already has).
    pub async fn recv(&mut self) {
        // An error means the controller is gone, which also means: stop.
        let _ = self.signal.wait_for(|fired| *fired).await;
    }

    /// Whether shutdown has begun.
    pub fn is_shutdown(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drained_waits_for_every_handle() {
        let controller = ShutdownController::new();
        let mut a = controller.handle();
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            a.recv().await;
            finished_tx.send("a").unwrap();
        });
        let b = controller.handle();
        controller.trigger();
        assert!(b.is_shutdown());
        let drained = tokio::spawn(controller.drained());
        assert_eq!(finished_rx.recv().await, Some("a"));
        assert!(!drained.is_finished() || b.is_shutdown());
        drop(b);
        drained.await.unwrap();
    }
}
