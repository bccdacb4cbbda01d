//! One active instance per database, for now: the instance that holds a
//! session-level advisory lock on a connection of its own runs the loops;
//! any other waits as a standby and takes over when the holder's session
//! ends (it stopped, was killed, or lost its connection: the server
//! releases a session lock with the session).
//!
//! This is the interim for "Several instances on one PostgreSQL": it keeps
//! two instances from working the same watches at once, and fails over,
//! but it does not spread the watches (per-watch leases with a fencing
//! epoch are still to come). An instance whose lock session ends, or
//! stops answering within `lease_ttl`, reports it through
//! [`ActiveLock::lost`], and the app stops its loops before more writes.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::*;

/// The advisory lock the active instance holds ("actv" in ASCII).
const ACTIVE_LOCK: i64 = 0x6163_7476;

/// How often a standby asks for the lock.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// The lock held by the active instance, on its own connection.
pub struct ActiveLock {
    client: Client,
    driver: tokio::task::JoinHandle<()>,
}

/// Waits until this instance holds the active lock, or `shutdown` is
/// cancelled (`Ok(None)`). `waiting` is called once if another instance
/// holds it, so the caller can say it is a standby.
pub async fn acquire_active(
    url: &str,
    shutdown: &CancellationToken,
    waiting: impl FnOnce(),
) -> Result<Option<ActiveLock>, StoreError> {
    let mut config = parse_url(url)?;
    if config.get_ssl_mode() != SslMode::Require {
        config.ssl_mode(SslMode::Disable);
    }
    config.application_name("dari-relay (active lock)");
    config.connect_timeout(POOL_TIMEOUT);
    let (client, connection) = config.connect(tls()?).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut waiting = Some(waiting);
    loop {
        let held: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&ACTIVE_LOCK]).await?.get(0);
        if held {
            return Ok(Some(ActiveLock { client, driver }));
        }
        if let Some(say) = waiting.take() {
            say();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
        }
    }
}

impl ActiveLock {
    /// Returns when the lock can no longer be trusted: its session ended,
    /// or a check every `check_every` got no answer within `timeout`. The
    /// caller stops its work then.
    pub async fn lost(mut self, check_every: Duration, timeout: Duration) -> String {
        let mut tick = tokio::time::interval(check_every);
        loop {
            tokio::select! {
                _ = &mut self.driver => return "the database session holding the active lock ended".to_owned(),
                _ = tick.tick() => {}
            }
            match tokio::time::timeout(timeout, self.client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return format!("the active lock's session failed: {}", StoreError::from(e)),
                Err(_) => return format!("the database did not answer the active lock's check within {timeout:?}"),
            }
        }
    }
}
