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

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::deliver::Deliverer;
use crate::health::{self, Health};
use crate::inbound;
use crate::metrics::Metrics;
use crate::poller::Poller;
use crate::store::{
    DelivererStore, OperatorStore, PollerStore, Postgres, PruneSummary, RunningLock, Sqlite, Storage, Store, StoreError,
};
use crate::vocab::now_ms;

/// Why the relay stopped other than by request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The database could not be opened or used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The inbound listener (Dari's webhook) could not listen.
    #[error("cannot listen on {listen} for Dari's webhook ([inbound]): {source}")]
    Inbound { listen: String, source: std::io::Error },
    /// The admin API could not listen.
    #[error("cannot listen on {listen} for the admin API: {source}")]
    Admin { listen: String, source: std::io::Error },
    /// Another relay (or a `db copy`) holds the SQLite database's running
    /// lock: two relays on one file would both send every notification.
    #[error("the database {path} is in use by {by}: stop it first")]
    InUse { path: String, by: String },
    /// A loop ended on its own.
    #[error("the {task} loop stopped unexpectedly: {reason}")]
    TaskEnded { task: &'static str, reason: String },
}

/// Beyond the delivery request timeout, how long a watch handed to another
/// instance stays unclaimed (see `store::postgres::cluster`).
const HANDOFF_MARGIN: Duration = Duration::from_secs(1);

/// How often delivered deliveries and ended watches past `retention` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Opens the database named by the config, binds the admin API if it is
/// enabled, and runs the relay until `shutdown` is cancelled, following
/// config reloads sent on `config`.
pub async fn run(config: watch::Receiver<Arc<Config>>, shutdown: CancellationToken) -> Result<(), AppError> {
    run_with_reload(config, None, shutdown).await
}

/// [`run`], with what the admin API's `POST /v1/reload` runs (the command
/// line's `run` passes the same reload as SIGHUP's).
pub async fn run_with_reload(
    config: watch::Receiver<Arc<Config>>,
    reload: Option<admin::Reload>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let postgres = config.borrow().postgres.clone();
    if let Some(pg) = postgres {
        let store = Postgres::open(pg.url()).await?;
        // Bound before joining the cluster, so a taken port fails at start.
        let listeners = bind_listeners(&config, reload).await?;
        let cluster = config.borrow().cluster.clone();
        let instance = cluster.as_ref().map_or_else(crate::config::default_instance, |c| c.instance.clone());
        let lease_ttl = cluster.as_ref().map_or(crate::config::defaults::LEASE_TTL.default, |c| c.lease_ttl);
        // A watch handed to another instance waits this long before it is
        // claimed: the longest a send already started here can take.
        let handoff = config.borrow().delivery.request_timeout + HANDOFF_MARGIN;
        info!(database = %pg.shown, %instance, "opened the PostgreSQL database");
        let store = Arc::new(store);
        let membership = crate::store::postgres::join(&store, &instance, lease_ttl, handoff).await?;
        let metrics = Arc::new(Metrics::default());
        // The first share is claimed before the loops start, so the poller
        // starts with it.
        match membership.balance(&store).await {
            Ok(b) => {
                metrics.set_cluster(b.instances, b.owned, b.took_over);
                info!(%instance, epoch = membership.epoch(), instances = b.instances, watches = b.owned, "joined the cluster");
            }
            Err(e) => warn!(error = %e, "cannot claim watches yet; will retry at the next renewal"),
        }
        let serving =
            serve_postgres_with(config, Arc::clone(&store), Arc::clone(&metrics), listeners, shutdown.clone());
        tokio::pin!(serving);
        let each = |b: &crate::store::postgres::Balance| {
            metrics.set_cluster(b.instances, b.owned, b.took_over);
            if b.claimed > 0 || b.released > 0 {
                info!(
                    instances = b.instances,
                    claimed = b.claimed,
                    took_over = b.took_over,
                    handed_over = b.released,
                    watches = b.owned,
                    "watches rebalanced"
                );
            }
        };
        let result = tokio::select! {
            result = &mut serving => result,
            reason = membership.keep(&store, each) => {
                // Stop before more writes (the store's fence refuses them
                // already): the other instances take the watches over.
                error!(%reason, "lost this instance's leases; stopping the relay");
                shutdown.cancel();
                let _ = serving.await;
                return Err(AppError::TaskEnded { task: "lease", reason });
            }
        };
        // Stopped on request: hand the watches over at once.
        match membership.leave(&store).await {
            Ok(()) => info!(%instance, "left the cluster; the other instances take its watches over"),
            Err(e) => {
                warn!(error = %e, "cannot leave the cluster; the other instances take over when its leases expire")
            }
        }
        return result;
    }
    let path = config.borrow().database.clone();
    let opened = path.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&opened)).await.map_err(StoreError::Task)??;
    // Held for as long as the relay runs (dropped when this returns, or by
    // the kernel when the process dies): `db copy` refuses a database a
    // relay runs on, and a second relay on the same file is refused here.
    let _running = match RunningLock::take(&path, &format!("dari-relay run, pid {}", std::process::id())) {
        Ok(lock) => lock,
        Err(StoreError::InUse(by)) => return Err(AppError::InUse { path: path.display().to_string(), by }),
        Err(e) => return Err(e.into()),
    };
    let listeners = bind_listeners(&config, reload).await?;
    serve_with(config, Arc::new(store), Arc::new(Metrics::default()), listeners, shutdown).await
}

/// Binds the admin listener and the `[inbound]` listener the config asks for.
async fn bind_listeners(
    config: &watch::Receiver<Arc<Config>>,
    reload: Option<admin::Reload>,
) -> Result<Listeners, AppError> {
    let admin_config = config.borrow().admin.clone();
    let admin = match admin_config {
        Some(a) => Some(
            admin::Listener::bind_admin(&a)
                .await
                .map_err(|source| AppError::Admin { listen: a.listen.to_string(), source })?,
        ),
        None => None,
    };
    let inbound_listen = config.borrow().inbound.as_ref().map(|i| i.listen);
    let inbound = match inbound_listen {
        Some(listen) => Some(
            inbound::Listener::bind(listen)
                .await
                .map_err(|source| AppError::Inbound { listen: listen.to_string(), source })?,
        ),
        None => None,
    };
    let admin = admin.map(|l| match reload {
        Some(reload) => l.with_reload(reload),
        None => l,
    });
    Ok(Listeners { admin, inbound })
}

/// The listeners bound before the relay starts, each optional.
#[derive(Default)]
pub struct Listeners {
    /// The admin API (`[admin] listen`).
    pub admin: Option<admin::Listener>,
    /// Dari's webhook (`[inbound] listen`), never the admin API's listener.
    pub inbound: Option<inbound::Listener>,
}

/// Runs the poller, the deliverer, the pruner, the systemd watchdog and (with
/// a listener) the admin API on an open store until `shutdown` is cancelled,
/// then waits for them to finish their shutdown.
pub async fn serve(
    config: watch::Receiver<Arc<Config>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    admin: Option<admin::Listener>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    serve_with(config, store, metrics, Listeners { admin, inbound: None }, shutdown).await
}

/// [`serve`] with every listener: also the inbound listener for Dari's
/// webhook, which shares the poller's "poll now" handle with the admin API.
pub async fn serve_with(
    config: watch::Receiver<Arc<Config>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    serve_engine(config, Engine::Sqlite(store), metrics, listeners, shutdown).await
}

/// [`serve`] on a PostgreSQL database, without listeners.
pub async fn serve_postgres(
    config: watch::Receiver<Arc<Config>>,
    store: Arc<Postgres>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    serve_postgres_with(config, store, metrics, Listeners::default(), shutdown).await
}

/// [`serve_with`] on a PostgreSQL database: the admin API, the status page
/// and push assist read it through the operator interface, as on SQLite.
pub async fn serve_postgres_with(
    config: watch::Receiver<Arc<Config>>,
    store: Arc<Postgres>,
    metrics: Arc<Metrics>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    serve_engine(config, Engine::Postgres(store), metrics, listeners, shutdown).await
}

/// The open database, by engine: the loops, the admin API and the inbound
/// listener get it through the storage traits; the watchdog asks it for
/// its problems.
#[derive(Clone)]
enum Engine {
    Sqlite(Arc<Store>),
    Postgres(Arc<Postgres>),
}

impl Engine {
    /// Every storage role, for the loops.
    fn storage(&self) -> Arc<dyn Storage> {
        match self {
            Engine::Sqlite(store) => Arc::new(Sqlite(Arc::clone(store))),
            Engine::Postgres(store) => Arc::clone(store) as Arc<dyn Storage>,
        }
    }

    /// What keeps the relay from being live at `now`. PostgreSQL has no
    /// writer thread; its failing calls show as stale loops, since a loop
    /// whose store calls fail does not beat.
    fn problems(&self, health: &Health, now: std::time::Instant) -> Vec<String> {
        match self {
            Engine::Sqlite(store) => health::problems(health, &Sqlite(Arc::clone(store)), now),
            Engine::Postgres(_) => health.stale_at(now),
        }
    }
}

async fn serve_engine(
    config: watch::Receiver<Arc<Config>>,
    engine: Engine,
    metrics: Arc<Metrics>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let Listeners { admin, inbound } = listeners;
    let wake_delivery = Arc::new(Notify::new());
    let health = Arc::new(Health::default());
    // The loops see the store only through the storage traits.
    let loops = engine.storage();
    let poller = Poller::new(
        config.clone(),
        Arc::clone(&loops) as Arc<dyn PollerStore>,
        Arc::clone(&metrics),
        Arc::clone(&health),
        Arc::clone(&wake_delivery),
    )?;
    let poll_now = poller.poll_now_handle();
    let deliverer = Deliverer::new(
        config.clone(),
        Arc::clone(&loops) as Arc<dyn DelivererStore>,
        Arc::clone(&metrics),
        Arc::clone(&health),
        wake_delivery,
    )?;

    // Every long-lived task goes into this one set, named, so the app can say
    // which ended and why.
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();
    let token = shutdown.clone();
    tasks.spawn(async move { ("poller", poller.run(token).await.map_err(|e| e.to_string())) });
    // The deliverer gets its own thread and single-threaded runtime: a burst
    // of polls on the main runtime never holds up sending (nor the other way
    // round), and each side keeps the low cost of one async thread.
    let token = shutdown.clone();
    let (delivered, delivery_ended) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dari-relay-deliver".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the delivery runtime: {e}"))
                .and_then(|runtime| runtime.block_on(deliverer.run(token)).map_err(|e| e.to_string()));
            let _ = delivered.send(result);
        })
        .map_err(|e| AppError::TaskEnded { task: "deliverer", reason: format!("cannot start its thread: {e}") })?;
    tasks.spawn(async move {
        ("deliverer", delivery_ended.await.unwrap_or_else(|_| Err("the delivery thread panicked".to_owned())))
    });
    let (token, pruning) = (shutdown.clone(), Arc::clone(&loops) as Arc<dyn OperatorStore>);
    let reloads = config.clone();
    tasks.spawn(async move { ("pruner", prune_loop(reloads, pruning, token).await.map_err(|e| e.to_string())) });
    let (token, watched, watched_store) = (shutdown.clone(), Arc::clone(&health), engine.clone());
    tasks.spawn(async move { ("watchdog", watchdog_loop(watched, watched_store, token).await) });
    // The inbound listener and the admin API see the store as operators do.
    let operator = Arc::clone(&loops) as Arc<dyn OperatorStore>;
    if let Some(listener) = inbound {
        let state = inbound::InboundState {
            config: config.clone(),
            store: Arc::clone(&operator),
            metrics: Arc::clone(&metrics),
            poll_now: poll_now.clone(),
            limiter: Arc::default(),
        };
        let token = shutdown.clone();
        tasks.spawn(async move {
            ("inbound listener", inbound::serve(listener, state, token).await.map_err(|e| e.to_string()))
        });
    }
    if let Some(listener) = admin {
        let state = AdminState {
            config,
            store: operator,
            metrics,
            health,
            poll_now,
            startup_token: None,
            reload: None,
            stopping: None,
        };
        let token = shutdown.clone();
        tasks.spawn(async move {
            ("admin API", admin::serve(listener, state, crate::ui::router, token).await.map_err(|e| e.to_string()))
        });
    }

    // The database is open and migrated and the loops are running. STOPPING
    // goes out as soon as shutdown begins, before deliveries drain.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    });
    info!("dari-relay running");

    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (task, reason) = match joined {
            Ok((task, Ok(()))) if shutdown.is_cancelled() => {
                info!(task, "stopped");
                continue;
            }
            Ok((task, Ok(()))) => (task, "it returned".to_owned()),
            Ok((task, Err(e))) => (task, e),
            Err(e) => ("a relay", e.to_string()),
        };
        error!(task, %reason, "task ended; stopping the relay");
        failure.get_or_insert(AppError::TaskEnded { task, reason });
        shutdown.cancel();
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Pings the systemd watchdog at half its interval, but only while every
/// loop makes progress and the store works (its writer thread alive, its
/// calls not all failing; see [`health::problems`]): a wedged relay stops
/// pinging and systemd restarts it. Without `WATCHDOG_USEC` (not under
/// systemd, or no `WatchdogSec=`) it just waits for shutdown.
async fn watchdog_loop(health: Arc<Health>, store: Engine, shutdown: CancellationToken) -> Result<(), String> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        shutdown.cancelled().await;
        return Ok(());
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let problems = store.problems(&health, std::time::Instant::now());
        if problems.is_empty() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        } else {
            warn!(?problems, "not pinging the systemd watchdog");
        }
    }
}

/// Prunes what is past `retention`, at start and every [`PRUNE_EVERY`]. A
/// failed prune is logged and tried again next time: it only costs space.
async fn prune_loop(
    config: watch::Receiver<Arc<Config>>,
    store: Arc<dyn OperatorStore>,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let cutoff = now_ms() - config.borrow().retention.as_millis() as i64;
        match store.prune(cutoff).await {
            Ok(pruned) if pruned != PruneSummary::default() => info!(?pruned, "pruned past retention"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot prune; will retry"),
        }
    }
}
