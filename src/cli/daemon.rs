//! `run`: the daemon, its signals, and the reload that SIGHUP and the admin
//! API's `POST /v1/reload` share.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Failure, block_on, database_hint, init_logging, load_config, runtime};
use crate::config::{Config, LogFormat};

pub(super) fn run(path: &Path, log_format: Option<LogFormat>) -> Result<(), Failure> {
    let config = Arc::new(load_config(path)?);
    init_logging(log_format.or(config.log_format), "info");
    let database = config.database.clone();
    let path = path.to_owned();
    block_on(async move {
        let (config_tx, config_rx) = tokio::sync::watch::channel(config);
        let config_tx = Arc::new(config_tx);
        let on_hup = reloader(path.clone(), Arc::clone(&config_tx), "SIGHUP");
        let reload = reloader(path, config_tx, "POST /v1/reload");
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            handle_signals(&*on_hup).await;
            signals.cancel();
        });
        crate::app::run_with_reload(config_rx, Some(reload), shutdown)
            .await
            .map_err(|e| runtime(database_hint(e.into(), &database)))
    })
}

/// The one reload, shared by SIGHUP and `POST /v1/reload`: reads the config
/// file at `path` again and hands it to the loops, or, if the new file is
/// invalid, logs why and keeps the running config. The sender lives here,
/// in an `Arc`, for as long as either of them can reload.
/// `trigger` names what asked, for the log.
fn reloader(
    path: std::path::PathBuf,
    config: Arc<tokio::sync::watch::Sender<Arc<Config>>>,
    trigger: &'static str,
) -> crate::admin::Reload {
    Arc::new(move || match Config::load(&path) {
        Ok(new) => {
            tracing::info!(config = %path.display(), "{trigger}: config reloaded");
            config.send_replace(Arc::new(new));
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "{trigger}: the new config is invalid; keeping the running one");
            Err(e.to_string())
        }
    })
}

/// Waits for SIGTERM or SIGINT (then returns, to stop the relay); on each
/// SIGHUP runs `reload`.
async fn handle_signals(reload: &(dyn Fn() -> Result<(), String> + Send + Sync)) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // The outcome is logged by the reload itself.
            _ = hup.recv() => { let _ = reload(); }
        }
    }
    tracing::info!("shutdown requested");
}
