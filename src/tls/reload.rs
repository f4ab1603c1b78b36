//! Hot reload: the certificate files are polled for changes and re-read on SIGHUP.
//!
//! Changes are detected by content, not modification time: a coarse filesystem clock can give a
//! file rewritten moments after the last check the same mtime, and the files are small.
//!
//! A new pair replaces the served one only if it loads completely; a broken file keeps the old
//! certificate serving and logs exactly what is wrong. Open connections are never touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use super::{load_certified_key, CertStore};
use crate::shutdown::Shutdown;

/// What identifies one version of the files: a hash of both contents (`None` if unreadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(Option<u64>);

impl Fingerprint {
    /// Reads both files now. Take it *before* loading them at startup, so that a change made
    /// between startup and the first poll is never mistaken for the loaded version.
    pub fn of(cert: &Path, key: &Path) -> Fingerprint {
        use std::hash::{Hash, Hasher};
        let read = || {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(cert).ok()?.hash(&mut hasher);
            std::fs::read(key).ok()?.hash(&mut hasher);
            Some(hasher.finish())
        };
        Fingerprint(read())
    }
}

/// Starts the task that keeps `store` in step with the files at `cert` and `key`, which were at
/// version `loaded` when the current certificate was read.
///
/// It checks the files every `interval` and re-reads them at once on SIGHUP (when `on_sighup`).
/// It ends when `shutdown` fires.
pub fn spawn_reloader(
    store: Arc<CertStore>,
    cert: PathBuf,
    key: PathBuf,
    loaded: Fingerprint,
    interval: Duration,
    on_sighup: bool,
    mut shutdown: Shutdown,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangups = if on_sighup {
        Some(signal(SignalKind::hangup())?)
    } else {
        None
    };
    Ok(tokio::spawn(async move {
        let mut seen = loaded;
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = shutdown.recv() => return,
                _ = ticks.tick() => false,
                Some(()) = async { hangups.as_mut()?.recv().await } => true,
            };
            let (c, k) = (cert.clone(), key.clone());
            let Ok(now) = tokio::task::spawn_blocking(move || Fingerprint::of(&c, &k)).await else {
                continue;
            };
            if !forced && now == seen {
                continue;
            }
            seen = now;
            let (c, k) = (cert.clone(), key.clone());
            let loaded = tokio::task::spawn_blocking(move || load_certified_key(&c, &k)).await;
            match loaded {
                Ok(Ok(new_key)) => {
                    store.replace(new_key);
                    tracing::info!(cert = %cert.display(), "certificate reloaded");
                }
                Ok(Err(e)) => {
                    tracing::error!(
                        "certificate reload failed, still serving the previous one: {e}"
                    );
                    store.record_failure(e.to_string());
                }
                Err(join) => {
                    tracing::error!("certificate reload task failed: {join}");
                    store.record_failure(join.to_string());
                }
            }
        }
    }))
}
