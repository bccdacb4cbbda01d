//! The PostgreSQL implementation of the store, on tokio-postgres with a
//! deadpool pool (connections checked with a query before reuse:
//! `RecyclingMethod::Verified`) and rustls for `sslmode=require`.
//!
//! Same rules as SQLite, word for word: a poll's read of the last-seen
//! state (`SELECT ... FOR UPDATE`), its decision and its writes are one
//! transaction; deliveries are ordered per (job, webhook) chain by id; adds
//! are idempotent; pauses, replays and batched pruning mirror the SQLite
//! SQL. There is no writer thread: PostgreSQL takes concurrent writers
//! itself, and each call runs on a pooled connection, fully async.
//!
//! Files by role: [`schema`] (migrations under an advisory lock),
//! [`watches`] (adds, removals, the schedule and the poll's commit),
//! [`outbox`] (heads, sends, attempts, listings, pauses), [`prune`],
//! [`cluster`] (several instances: membership, per-watch leases, fencing),
//! and [`copy`] (`db copy`'s end on PostgreSQL).

pub mod cluster;
pub mod copy;
mod live;
mod ops;
mod outbox;
mod prune;
mod schema;
mod ui;
mod watches;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::{Map, Value};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use cluster::{Balance, InstanceInfo, Membership, join};

use crate::store::*;
use crate::vocab::{DeliveryState, NewWatch, WatchState};

/// Connections the pool keeps at most: the poller, the deliverer, the
/// pruner and the admin API each hold one for the length of a call.
const POOL_SIZE: usize = 16;

/// How long a call waits for a connection from the pool, or for a new one
/// to be made, before it fails (and is retried by its loop).
const POOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the server lets a session sit in an open transaction waiting
/// for this client before it ends the session. A frozen instance (SIGSTOP)
/// caught mid-transaction would otherwise hold its row locks (a watch
/// `FOR UPDATE`, the lease `FOR SHARE`) for as long as it is frozen, and
/// no other instance could take its watches over. The relay's own
/// transactions never wait on anything but the database.
const IDLE_IN_TRANSACTION: &str = "-c idle_in_transaction_session_timeout=2000";

/// Ids read by one statement of [`Postgres::outbound_many`] at most.
const OUTBOUND_CHUNK: usize = 500;

/// The PostgreSQL store: a connection pool on one database.
pub struct Postgres {
    /// Connections, made on demand and checked before reuse.
    pool: Pool,
    /// Write transactions committed through this handle, for the benchmark.
    commits: AtomicU64,
    /// The cluster membership every write of a watch checks (`None`: no
    /// cluster joined, no check, every watch owned); set by [`join`].
    member: RwLock<Option<Arc<cluster::Member>>>,
    /// The server's settings and the TLS connector, for the connection
    /// that listens for the other instances.
    connect: (tokio_postgres::Config, MakeRustlsConnect),
    /// Until when (ms after [`cluster::clock_base`], on this process's
    /// monotonic clock) this instance's leases surely hold: the start of
    /// its last successful renewal plus `lease_ttl` (0: no cluster joined).
    lease_deadline: AtomicU64,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.write_str("Postgres")
    }
}

pub use crate::vocab::is_postgres_url;

/// Parses a PostgreSQL URL into the driver's settings. The error names
/// what is wrong without repeating the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| StoreError::Url(format!("not a valid PostgreSQL URL ({e})")))?;
    if config.get_hosts().is_empty() {
        return Err(StoreError::Url("the PostgreSQL URL names no host".into()));
    }
    Ok(config)
}

/// The TLS connector: rustls with the webpki roots, as reqwest uses.
/// `sslmode=require` insists on TLS and verifies the server's certificate
/// against those roots (stricter than libpq's `require`, which verifies
/// nothing); `sslmode=disable`, and a URL without `sslmode`, never start
/// TLS. `prefer` counts as `disable`: a preference that silently falls
/// back protects nothing, and the driver cannot fall back after a
/// certificate it refused anyway.
fn tls() -> Result<MakeRustlsConnect, StoreError> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Url(format!("cannot set up TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

impl Postgres {
    /// Opens the database at `url`: checks that it answers, migrates the
    /// schema (once, under an advisory lock, however many instances start
    /// at once) and returns a pool of connections made on demand.
    pub async fn open(url: &str) -> Result<Postgres, StoreError> {
        let mut config = parse_url(url)?;
        if config.get_ssl_mode() != SslMode::Require {
            config.ssl_mode(SslMode::Disable);
        }
        if config.get_application_name().is_none() {
            config.application_name("dari-relay");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_TIMEOUT);
        }
        let options = match config.get_options() {
            Some(given) => format!("{given} {IDLE_IN_TRANSACTION}"),
            None => IDLE_IN_TRANSACTION.to_owned(),
        };
        config.options(&options);
        let tls = tls()?;
        // The migrations run on a connection of their own, closed right
        // after: the pool starts empty, so its connections are made on the
        // runtime that uses them.
        let (mut client, connection) = config.connect(tls.clone()).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let migrated = schema::migrate(&mut client).await;
        drop(client);
        let _ = driver.await;
        migrated?;
        let connect = (config.clone(), tls.clone());
        let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Verified });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Url(format!("cannot build the connection pool: {e}")))?;
        Ok(Postgres {
            pool,
            commits: AtomicU64::new(0),
            member: RwLock::new(None),
            connect,
            lease_deadline: AtomicU64::new(0),
        })
    }

    /// Write transactions committed through this handle so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The server's settings and TLS connector, for a connection of one's own.
    fn connect_config(&self) -> (tokio_postgres::Config, MakeRustlsConnect) {
        self.connect.clone()
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    fn committed(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Fails unless the database accepts a write (tried, then rolled back),
    /// for `/readyz` and `check-config`.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("UPDATE meta SET value = value WHERE key = 'watch_rev'", &[]).await?;
        tx.rollback().await?;
        Ok(())
    }

    /// Closes the pool: idle connections are closed, later calls fail.
    pub fn close(&self) {
        self.pool.close();
    }
}

/// The store's JSON columns, read back.
fn parse_webhooks(text: Option<&str>) -> Result<Option<Vec<String>>, StoreError> {
    text.map(|t| serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("webhook list: {e}")))).transpose()
}

fn parse_labels(text: &str) -> Result<Map<String, Value>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

fn watch_state(name: &str) -> Result<WatchState, StoreError> {
    WatchState::from_name(name).ok_or_else(|| StoreError::Corrupt(format!("watch state {name:?}")))
}

fn delivery_state(name: &str) -> Result<DeliveryState, StoreError> {
    DeliveryState::parse(name).ok_or_else(|| StoreError::Corrupt(format!("delivery state {name:?}")))
}

/// A row limit for SQL, bounded (a huge `usize` must not wrap).
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A counter read back from the database, which holds it as `INTEGER`.
fn count(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

impl PollerStore for Postgres {
    fn schedule(&self) -> StoreFuture<'_, Schedule> {
        Box::pin(self.schedule_all())
    }

    fn schedule_since(&self, rev: i64) -> StoreFuture<'_, Schedule> {
        Box::pin(self.schedule_changed(rev))
    }

    fn diff_context(&self, job_id: String) -> StoreFuture<'_, Option<DiffContext>> {
        Box::pin(async move { self.read_diff_context(&job_id).await })
    }

    fn commit_poll(&self, job_id: String, decide: Decide) -> StoreFuture<'_, PollWrite> {
        Box::pin(self.commit_decided(job_id, decide))
    }

    fn fail_watch(
        &self,
        job_id: String,
        reason: String,
        notification: NewNotification,
    ) -> StoreFuture<'_, CommitOutcome> {
        Box::pin(async move { self.fail(&job_id, &reason, &notification).await })
    }
}

impl DelivererStore for Postgres {
    fn paused_webhooks(&self) -> StoreFuture<'_, BTreeMap<String, (String, i64)>> {
        Box::pin(self.paused())
    }

    fn pause_webhook(&self, webhook: String, reason: String) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.pause(&webhook, &reason).await })
    }

    fn pending_heads(&self, webhook: String, limit: usize) -> StoreFuture<'_, Vec<PendingHead>> {
        Box::pin(async move { self.heads(&webhook, limit).await })
    }

    fn outbound(&self, ids: Vec<i64>) -> StoreFuture<'_, Vec<OutboundDelivery>> {
        Box::pin(async move { self.outbound_many(&ids).await })
    }

    fn first_attempt_at(&self, id: i64) -> StoreFuture<'_, Option<i64>> {
        Box::pin(self.first_attempt(id))
    }

    fn record_attempt(&self, id: i64, attempt: AttemptRecord, outcome: DeliveryOutcome) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.record(id, &attempt, &outcome).await })
    }

    fn live_message(&self, job_id: String, webhook: String) -> StoreFuture<'_, Option<LiveMessage>> {
        Box::pin(async move { self.live(&job_id, &webhook).await })
    }

    fn save_live_message(&self, job_id: String, webhook: String, message: LiveMessage) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.save_live(&job_id, &webhook, &message).await })
    }

    fn pending_chain(&self, job_id: String, webhook: String, limit: usize) -> StoreFuture<'_, Vec<OutboundDelivery>> {
        Box::pin(async move { self.chain_pending(&job_id, &webhook, limit).await })
    }

    fn recent_events(&self, job_id: String, webhook: String, up_to: i64, limit: usize) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move { self.chain_events(&job_id, &webhook, up_to, limit).await })
    }

    fn still_owner(&self) -> bool {
        self.leases_hold()
    }
}
