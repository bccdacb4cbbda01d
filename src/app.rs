//! App wiring: opens the store, starts the poller and the deliverer, tells
//! systemd it is ready, and stops them when the shutdown token is cancelled.
//!
//! The shutdown token is a parameter (as in mini-redis), so `run`, `demo`
//! and the tests drive exactly the same code: `main` cancels it on SIGTERM or
//! SIGINT, a test cancels it whenever it likes. If either loop ends on its
//! own, with an error or not, the other is stopped too and the app says which
//! one ended and why.

use std::sync::Arc;

use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::deliver::Deliverer;
use crate::metrics::Metrics;
use crate::poller::Poller;
use crate::store::{PruneSummary, Store, StoreError, now_ms};

/// Why the relay stopped other than by request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The database could not be opened or used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// A loop ended on its own.
    #[error("the {task} loop stopped unexpectedly: {reason}")]
    TaskEnded { task: &'static str, reason: String },
}

/// How often delivered deliveries and ended watches past `retention` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Opens the database named by the config and runs the relay on it until
/// `shutdown` is cancelled, following config reloads sent on `config`.
pub async fn run(config: watch::Receiver<Arc<Config>>, shutdown: CancellationToken) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::default());
    let path = config.borrow().database.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&path))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    serve(config, Arc::new(store), metrics, shutdown).await
}

/// Runs the poller, the deliverer and the pruner on an open store until
/// `shutdown` is cancelled, then waits for them to finish their shutdown.
pub async fn serve(
    config: watch::Receiver<Arc<Config>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let wake_delivery = Arc::new(Notify::new());
    let poller = Poller::new(config.clone(), Arc::clone(&store), Arc::clone(&metrics), Arc::clone(&wake_delivery))?;
    let deliverer = Deliverer::new(config.clone(), Arc::clone(&store), metrics, wake_delivery)?;

    // Every long-lived task goes into this one set, named, so the app can say
    // which ended and why.
    let mut tasks: JoinSet<(&'static str, Result<(), StoreError>)> = JoinSet::new();
    let token = shutdown.clone();
    tasks.spawn(async move { ("poller", poller.run(token).await) });
    let token = shutdown.clone();
    tasks.spawn(async move { ("deliverer", deliverer.run(token).await) });
    let token = shutdown.clone();
    let pruning = Arc::clone(&store);
    tasks.spawn(async move { ("pruner", prune_loop(config, pruning, token).await) });

    // The database is open and migrated and the loops are running.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!("dari-relay running");

    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (task, reason) = match joined {
            Ok((task, Ok(()))) if shutdown.is_cancelled() => {
                info!(task, "stopped");
                continue;
            }
            Ok((task, Ok(()))) => (task, "it returned".to_owned()),
            Ok((task, Err(e))) => (task, e.to_string()),
            Err(e) => ("a relay", e.to_string()),
        };
        error!(task, %reason, "loop ended; stopping the relay");
        failure.get_or_insert(AppError::TaskEnded { task, reason });
        shutdown.cancel();
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Prunes what is past `retention`, at start and every [`PRUNE_EVERY`]. A
/// failed prune is logged and tried again next time: it only costs space.
async fn prune_loop(
    config: watch::Receiver<Arc<Config>>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let cutoff = now_ms() - config.borrow().retention.as_millis() as i64;
        match store.call(move |s| s.prune(cutoff)).await {
            Ok(pruned) if pruned != PruneSummary::default() => info!(?pruned, "pruned past retention"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot prune; will retry"),
        }
    }
}
