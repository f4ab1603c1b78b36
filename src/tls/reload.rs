//! Hot reload: the certificate files are watched (mtime poll) and re-read on SIGHUP.
//!
//! A new pair replaces the served one only if it loads completely; a broken file keeps the old
//! certificate serving and logs exactly what is wrong. Open connections are never touched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{signal, SignalKind};

use super::{load_certified_key, CertStore};
use crate::shutdown::Shutdown;

/// What identifies one version of the files: modification time and length of both.
type Fingerprint = [(Option<SystemTime>, u64); 2];

fn fingerprint(cert: &PathBuf, key: &PathBuf) -> Fingerprint {
    let stat =
        |p: &PathBuf| std::fs::metadata(p).map_or((None, 0), |m| (m.modified().ok(), m.len()));
    [stat(cert), stat(key)]
}

/// Starts the task that keeps `store` in step with the files at `cert` and `key`.
///
/// It checks the files every `interval` and re-reads them at once on SIGHUP (when `on_sighup`).
/// It ends when `shutdown` fires.
pub fn spawn_reloader(
    store: Arc<CertStore>,
    cert: PathBuf,
    key: PathBuf,
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
        let mut seen = fingerprint(&cert, &key);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = shutdown.recv() => return,
                _ = ticks.tick() => false,
                Some(()) = async { hangups.as_mut()?.recv().await } => true,
            };
            let now = fingerprint(&cert, &key);
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
