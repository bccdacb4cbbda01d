//! One active instance per database, for now: the instance that holds the
//! lease (the one row of `active_lease`) runs the loops; any other waits
//! as a standby and takes the lease over once it expires. Times are the
//! database's (`now()`), never the instances' clocks.
//!
//! The holder renews every `lease_ttl / 3`. Every takeover bumps the
//! lease's epoch, and the holder's store checks its epoch (with the row
//! locked `FOR SHARE`, so no takeover comes between) in every write and
//! before it hands out heads to send: an instance that was frozen, or cut
//! off, past its lease finds its next write refused ([`StoreError::Fenced`])
//! and stops, so two instances never work the same watches at once. On
//! SIGTERM the holder releases the lease and a standby takes over within
//! a second.
//!
//! This is the interim for "Several instances on one PostgreSQL": it fails
//! over but does not spread the watches (per-watch leases are still to
//! come).

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;

/// How often a standby asks for the lease, at most.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// The lease this instance holds.
#[derive(Debug)]
pub struct ActiveLease {
    /// The fencing epoch this instance's writes carry.
    pub epoch: i64,
    ttl: Duration,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Waits until this instance holds the lease, or `shutdown` is cancelled
/// (`Ok(None)`). `waiting` is called once if another instance holds it, so
/// the caller can say it is a standby. From then on `store` fences its
/// writes with the lease's epoch.
pub async fn acquire_active(
    store: &Postgres,
    instance: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
    waiting: impl FnOnce(),
) -> Result<Option<ActiveLease>, StoreError> {
    let mut waiting = Some(waiting);
    loop {
        let client = store.client().await?;
        // Taken if free, expired, or held under this instance's own name
        // (a restart); every take bumps the epoch, fencing the last holder.
        let row = client
            .query_opt(
                "INSERT INTO active_lease (id, instance, epoch, expires_at)
                 VALUES (1, $1, 1, now() + $2::BIGINT * INTERVAL '1 millisecond')
                 ON CONFLICT (id) DO UPDATE SET instance = $1, epoch = active_lease.epoch + 1,
                     expires_at = now() + $2::BIGINT * INTERVAL '1 millisecond'
                 WHERE active_lease.expires_at < now() OR active_lease.instance = $1
                 RETURNING epoch",
                &[&instance, &ms(ttl)],
            )
            .await?;
        drop(client);
        if let Some(row) = row {
            let epoch: i64 = row.get(0);
            store.fence.store(epoch, Ordering::Relaxed);
            return Ok(Some(ActiveLease { epoch, ttl }));
        }
        if let Some(say) = waiting.take() {
            say();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(STANDBY_RETRY.min(ttl / 3)) => {}
        }
    }
}

impl ActiveLease {
    /// Renews the lease every `lease_ttl / 3` and returns when it is lost:
    /// taken over or expired (the renewal finds another epoch, or it is
    /// past its time), or no renewal succeeded within `lease_ttl` on this
    /// instance's monotonic clock. The caller stops its work then; the
    /// store's fence already refuses its writes.
    pub async fn lost(&self, store: &Postgres) -> String {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed = Instant::now();
        loop {
            tick.tick().await;
            let left = self.ttl.saturating_sub(renewed.elapsed());
            if left.is_zero() {
                return format!("no renewal of the lease succeeded within {:?}", self.ttl);
            }
            match tokio::time::timeout(left, self.renew(store)).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => return "the lease expired or another instance took it over".to_owned(),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the lease; will retry"),
                Err(_) => return format!("no renewal of the lease succeeded within {:?}", self.ttl),
            }
        }
    }

    async fn renew(&self, store: &Postgres) -> Result<bool, StoreError> {
        let client = store.client().await?;
        let changed = client
            .execute(
                "UPDATE active_lease SET expires_at = now() + $2::BIGINT * INTERVAL '1 millisecond'
                 WHERE id = 1 AND epoch = $1 AND expires_at > now()",
                &[&self.epoch, &ms(self.ttl)],
            )
            .await?;
        Ok(changed == 1)
    }

    /// Gives the lease up (on SIGTERM, once the loops have stopped), so a
    /// standby takes over at its next try instead of after `lease_ttl`.
    pub async fn release(&self, store: &Postgres) -> Result<(), StoreError> {
        let client = store.client().await?;
        client
            .execute(
                "UPDATE active_lease SET expires_at = now() - INTERVAL '1 millisecond' WHERE id = 1 AND epoch = $1",
                &[&self.epoch],
            )
            .await?;
        Ok(())
    }
}

impl Postgres {
    /// Fails with [`StoreError::Fenced`] unless this instance still holds
    /// the lease it took (no check before it took one). In a write's
    /// transaction the row is locked `FOR SHARE`: a takeover waits for the
    /// write to commit, and the write never lands after a takeover.
    pub(super) async fn check_fence(&self, client: &impl deadpool_postgres::GenericClient) -> Result<(), StoreError> {
        let epoch = self.fence.load(Ordering::Relaxed);
        if epoch == 0 {
            return Ok(());
        }
        let stmt = client
            .prepare_cached("SELECT 1 FROM active_lease WHERE id = 1 AND epoch = $1 AND expires_at > now() FOR SHARE")
            .await?;
        match client.query_opt(&stmt, &[&epoch]).await? {
            Some(_) => Ok(()),
            None => Err(StoreError::Fenced),
        }
    }
}
