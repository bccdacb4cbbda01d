//! Several instances on one database: each active watch (its polls and its
//! deliveries, to every webhook) is owned by one instance at a time.
//!
//! - **Membership.** An instance joins with a row in `instances`: its name
//!   and an epoch from a sequence (never reused, bumped by every join). It
//!   renews the row every `lease_ttl / 3`; a row not renewed for `lease_ttl`
//!   is dead. Times are the database's (`now()`), never the instances'.
//! - **Leases.** A watch's lease is `(lease_owner, lease_epoch)` on its row:
//!   valid while that instance's row is alive under that epoch. So a lease
//!   ends with its owner's silence, and one renewal keeps all of an
//!   instance's leases, whatever their number.
//! - **Fair shares.** At every renewal, and at once when another instance
//!   joins or leaves or watches are added (LISTEN/NOTIFY), each instance
//!   claims unowned watches (new, released, or of a dead owner) up to
//!   `ceil(work / instances)`, with `FOR UPDATE SKIP LOCKED` so two never
//!   claim the same, and hands over what it holds above that share. A
//!   handed-over watch stays unclaimable for `handoff` (the longest a send
//!   it already started can last), so two instances never send one chain
//!   at once.
//! - **Fencing.** Every write of a watch's state or deliveries (a poll's
//!   commit, giving up, an attempt's record, a live message) checks, on the
//!   row it locks, that this instance still owns the watch under its epoch
//!   and that its row is alive; the deliverer is handed only the heads of
//!   owned watches. A lease is only taken over after its owner's row died,
//!   so an instance that comes back from a freeze finds its writes refused
//!   ([`StoreError::Fenced`]), and its own keeper, finding its renewal
//!   refused, stops the relay.
//! - **SIGTERM.** The instance stops its loops, then marks its row dead and
//!   notifies: the others claim its watches at once.
//!
//! Without a membership (a single store opened by a test, a CLI command)
//! there is no fencing and every watch counts as owned.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::AsyncMessage;

use super::*;
pub use crate::store::InstanceInfo;
use crate::vocab::ms_to_rfc3339;

/// The channel instances notify each other on: `joined`, `left`, `watches`.
pub const CHANNEL: &str = "dari_relay";

/// The longest a keeper waits before it tries to reconnect its listening
/// connection (it starts at a tenth of a second and doubles).
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// The most watches one claim takes, so that one transaction stays short;
/// the next round takes the rest.
const CLAIM_BATCH: i64 = 5_000;

/// Whether the watch row read (alias-free `watches`) is this instance's:
/// leased under `$2` (its name) and `$3` (its epoch), with its row alive.
pub(super) const OWNED: &str = "(lease_owner IS NOT DISTINCT FROM $2 AND lease_epoch IS NOT DISTINCT FROM $3
     AND EXISTS (SELECT 1 FROM instances i WHERE i.name = $2 AND i.epoch = $3 AND i.expires_at > now()))";

/// This instance as the store's writes check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The instance's name.
    pub name: String,
    /// The epoch it joined under: the fencing token of its leases.
    pub epoch: i64,
}

/// A joined instance: renews its row, claims and hands over watches.
#[derive(Debug)]
pub struct Membership {
    member: Member,
    ttl: Duration,
    handoff: Duration,
}

/// What one round of [`Membership::balance`] found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    /// Live instances, this one included.
    pub instances: i64,
    /// Watches with work (active, or with deliveries still pending).
    pub work: i64,
    /// Watches this instance owns after the round.
    pub owned: i64,
    /// Watches claimed in this round.
    pub claimed: usize,
    /// Of those, watches whose owner had died (takeovers).
    pub took_over: usize,
    /// Watches handed over in this round.
    pub released: usize,
}

/// The instant the lease deadlines count from (the first use in this process).
pub(super) fn clock_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Joins the cluster as `name`: a fresh epoch (fencing whatever an earlier
/// process of that name still holds), the others told. From then on
/// `store` fences its writes with it and sees only the watches it owns.
pub async fn join(store: &Postgres, name: &str, ttl: Duration, handoff: Duration) -> Result<Membership, StoreError> {
    let asked = Instant::now();
    let client = store.client().await?;
    let row = client
        .query_one(
            "INSERT INTO instances (name, epoch, expires_at)
             VALUES ($1, nextval('instance_epochs'), now() + $2::BIGINT * INTERVAL '1 millisecond')
             ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch, started_at = now(), renewed_at = now(),
                 expires_at = excluded.expires_at, watches = 0
             RETURNING epoch",
            &[&name, &ms(ttl)],
        )
        .await?;
    client.execute("SELECT pg_notify($1, 'joined')", &[&CHANNEL]).await?;
    let member = Member { name: name.to_owned(), epoch: row.get(0) };
    store.set_member(Some(member.clone()));
    store.leases_hold_until(asked + ttl);
    Ok(Membership { member, ttl, handoff })
}

impl Membership {
    /// The epoch this instance joined under.
    pub fn epoch(&self) -> i64 {
        self.member.epoch
    }

    /// Renews the membership every `lease_ttl / 3` and balances the watches
    /// after each renewal, and at once when another instance joins or
    /// leaves or watches are added (a notification on a connection of its
    /// own; after it reconnects, a round at once, for whatever it missed).
    /// `each` sees every round. Returns why the membership was lost: the
    /// row was taken or had expired (a freeze), or no renewal succeeded
    /// within `lease_ttl` on this instance's monotonic clock. The caller
    /// stops the relay then; the store's fence already refuses its writes.
    pub async fn keep(&self, store: &Postgres, mut each: impl FnMut(&Balance)) -> String {
        let (wake_tx, mut wake) = tokio::sync::mpsc::channel::<()>(1);
        // Aborted when this returns or is dropped (the relay stopping).
        let _listener = AbortOnDrop(tokio::spawn(listen(store.connect_config(), wake_tx)));
        self.keep_with(store, &mut wake, &mut each).await
    }

    async fn keep_with(
        &self,
        store: &Postgres,
        wake: &mut tokio::sync::mpsc::Receiver<()>,
        each: &mut impl FnMut(&Balance),
    ) -> String {
        let period = self.ttl / 3;
        let mut renewed = Instant::now();
        let mut next_renewal;
        let mut owned = 0;
        loop {
            let left = self.ttl.saturating_sub(renewed.elapsed());
            if left.is_zero() {
                return format!("no renewal of this instance's leases succeeded within {:?}", self.ttl);
            }
            match tokio::time::timeout(left, self.round(store, owned)).await {
                Ok(Ok(Some(balance))) => {
                    renewed = Instant::now();
                    next_renewal = renewed + period;
                    owned = balance.owned;
                    each(&balance);
                }
                Ok(Ok(None)) => return "this instance's leases expired or another process took its name".to_owned(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew this instance's leases; will retry");
                    next_renewal = Instant::now() + period.min(Duration::from_secs(1));
                }
                Err(_) => return format!("no renewal of this instance's leases succeeded within {:?}", self.ttl),
            }
            // The next round: the renewal's time, or a wake-up from another
            // instance (a join, a departure, new watches), or the moment the
            // next of the others' rows would expire unrenewed or the next
            // handed-over watch becomes claimable, so a dead owner's watches
            // and a newcomer's share are taken without waiting a period.
            let expiry = match store.next_expiry(&self.member).await {
                Ok(Some(after)) => Some(Instant::now() + after),
                _ => None,
            };
            let until = expiry.map_or(next_renewal, |at| at.min(next_renewal));
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                Some(()) = wake.recv() => {}
            }
        }
    }

    /// One round of [`Membership::keep`]: renew (saying `owned` watches
    /// are held here), then balance. `None` if the renewal was refused.
    pub async fn round(&self, store: &Postgres, owned: i64) -> Result<Option<Balance>, StoreError> {
        // The database sets the new expiry after this moment, so the
        // leases surely hold until this moment plus the ttl.
        let asked = Instant::now();
        if !store.renew(&self.member, self.ttl, owned).await? {
            return Ok(None);
        }
        store.leases_hold_until(asked + self.ttl);
        let balance = self.balance(store).await?;
        if balance.owned != owned
            && let Err(e) = store.say_owned(&self.member, balance.owned).await
        {
            // Advisory (`GET /v1/cluster`): the renewal stands, and the
            // next one writes the count anyway.
            tracing::debug!(error = %e, "cannot record this instance's watch count yet");
        }
        Ok(Some(balance))
    }

    /// Claims unowned watches up to this instance's fair share and hands
    /// over what it holds above it.
    pub async fn balance(&self, store: &Postgres) -> Result<Balance, StoreError> {
        store.drop_finished(&self.member).await?;
        let (instances, work, mut owned) = store.shares(&self.member).await?;
        let fair = if instances > 0 { (work + instances - 1) / instances } else { work };
        let mut balance = Balance { instances, work, ..Balance::default() };
        if owned < fair {
            let (claimed, took_over) = store.claim(&self.member, (fair - owned).min(CLAIM_BATCH)).await?;
            owned += claimed as i64;
            balance.claimed = claimed;
            balance.took_over = took_over;
        } else if owned > fair {
            let released = store.hand_over(&self.member, owned - fair, self.handoff).await?;
            owned -= released as i64;
            balance.released = released;
        }
        balance.owned = owned;
        Ok(balance)
    }

    /// Leaves the cluster (on SIGTERM, once the loops have stopped): the
    /// row is marked dead and the others are told, so they take the
    /// watches over at once instead of after `lease_ttl`.
    pub async fn leave(&self, store: &Postgres) -> Result<(), StoreError> {
        let client = store.client().await?;
        client
            .execute(
                "UPDATE instances SET expires_at = now() - INTERVAL '1 millisecond', watches = 0
                 WHERE name = $1 AND epoch = $2",
                &[&self.member.name, &self.member.epoch],
            )
            .await?;
        client.execute("SELECT pg_notify($1, 'left')", &[&CHANNEL]).await?;
        Ok(())
    }
}

/// The answer of an [`OWNED`] check: fenced if the row says another owns
/// it; no row (the watch is gone) fences nothing.
fn owned_or_fenced(row: Option<tokio_postgres::Row>) -> Result<(), StoreError> {
    match row {
        Some(r) if !r.get::<_, bool>(0) => Err(StoreError::Fenced),
        _ => Ok(()),
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on [`CHANNEL`] on a connection of its own, sending a wake-up
/// for every notification, and one after every (re)connection (what was
/// missed while it was down is found by the round it starts). Runs until
/// aborted.
async fn listen(config: (tokio_postgres::Config, MakeRustlsConnect), wake: tokio::sync::mpsc::Sender<()>) {
    let (config, tls) = config;
    let mut retry = Duration::from_millis(100);
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let listening = async {
                    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                    Ok::<_, tokio_postgres::Error>(())
                };
                // The LISTEN needs the connection driven while it runs.
                let driven = tokio::select! {
                    r = listening => r,
                    m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                        Some(Err(e)) => Err(e),
                        _ => Ok(()),
                    },
                };
                if let Err(e) = driven {
                    tracing::debug!(error = %e, "cannot listen for the other instances; will retry");
                } else {
                    retry = Duration::from_millis(100);
                    let _ = wake.try_send(());
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(_))) => {
                                let _ = wake.try_send(());
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "lost the connection that listens for the other instances; reconnecting (renewals go on every lease_ttl / 3 meanwhile)");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                drop(client);
            }
            Err(e) => tracing::debug!(error = %e, "cannot connect to listen for the other instances; will retry"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LISTEN_RETRY_MAX);
    }
}

impl Postgres {
    /// Sets (or clears) the membership the writes check.
    pub(super) fn set_member(&self, member: Option<Member>) {
        *self.member.write().unwrap_or_else(std::sync::PoisonError::into_inner) = member.map(Arc::new);
    }

    /// Notes that this instance's leases surely hold until `until`.
    fn leases_hold_until(&self, until: Instant) {
        let ms = until.saturating_duration_since(clock_base()).as_millis().max(1);
        self.lease_deadline.fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether this instance's leases surely hold now (always without a
    /// cluster): what [`DelivererStore::still_owner`] answers.
    pub(super) fn leases_hold(&self) -> bool {
        let deadline = self.lease_deadline.load(Ordering::Relaxed);
        deadline == 0 || clock_base().elapsed().as_millis() < u128::from(deadline)
    }

    /// The membership the writes check, if this store joined a cluster.
    pub(super) fn member(&self) -> Option<Arc<Member>> {
        self.member.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Renews this instance's row; `false` if it is no longer alive under
    /// its epoch (expired during a freeze, or joined again by another
    /// process of the same name).
    async fn renew(&self, member: &Member, ttl: Duration, owned: i64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE instances SET renewed_at = now(), expires_at = now() + $3::BIGINT * INTERVAL '1 millisecond',
                     watches = $4
                 WHERE name = $1 AND epoch = $2 AND expires_at > now()",
            )
            .await?;
        Ok(client.execute(&stmt, &[&member.name, &member.epoch, &ms(ttl), &owned]).await? == 1)
    }

    /// Gives up the leases of this instance's ended watches whose
    /// deliveries are all done: they are no work any more. (A delivery made
    /// pending again by `deliveries retry` gives its watch a dead owner, so
    /// it is claimed again.)
    async fn drop_finished(&self, member: &Member) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE watches w SET lease_owner = NULL, lease_epoch = NULL
                 WHERE w.lease_owner = $1 AND w.lease_epoch = $2 AND w.state <> 'active'
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = w.job_id AND d.state = 'pending')",
            )
            .await?;
        client.execute(&stmt, &[&member.name, &member.epoch]).await?;
        Ok(())
    }

    /// Records how many watches this instance owns on its row.
    async fn say_owned(&self, member: &Member, owned: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("UPDATE instances SET watches = $3 WHERE name = $1 AND epoch = $2").await?;
        client.execute(&stmt, &[&member.name, &member.epoch, &owned]).await?;
        Ok(())
    }

    /// (live instances, watches with work, watches this instance owns).
    async fn shares(&self, member: &Member) -> Result<(i64, i64, i64), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT (SELECT COUNT(*) FROM instances WHERE expires_at > now()),
                        (SELECT COUNT(*) FROM watches WHERE lease_owner IS NOT NULL OR state = 'active'),
                        (SELECT COUNT(*) FROM watches WHERE lease_owner = $1 AND lease_epoch = $2)",
            )
            .await?;
        let row = client.query_one(&stmt, &[&member.name, &member.epoch]).await?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// How long until the next of the other live instances' rows expires
    /// unrenewed, or the next handed-over watch becomes claimable (plus a
    /// little, so it has), if any.
    async fn next_expiry(&self, member: &Member) -> Result<Option<Duration>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT CEIL(EXTRACT(EPOCH FROM LEAST(
                     (SELECT MIN(expires_at) FROM instances WHERE expires_at > now() AND name <> $1),
                     (SELECT MIN(claimable_at) FROM watches
                      WHERE lease_owner IS NULL AND state = 'active' AND claimable_at > now())) - now()) * 1000)::BIGINT",
            )
            .await?;
        let left: Option<i64> = client.query_one(&stmt, &[&member.name]).await?.get(0);
        Ok(left.map(|ms| Duration::from_millis(ms.max(0) as u64 + 50)))
    }

    /// Claims up to `want` watches with work and no live owner (new, handed
    /// over and past their hand-over time, or of a dead instance), oldest
    /// first, skipping rows another transaction holds; (claimed, of which
    /// taken over from a dead owner).
    async fn claim(&self, member: &Member, want: i64) -> Result<(usize, usize), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rev = super::watches::bump_rev(&tx).await?;
        let stmt = tx
            .prepare_cached(
                "WITH picked AS (
                     SELECT w.job_id, w.lease_owner AS was FROM watches w
                     LEFT JOIN instances i ON i.name = w.lease_owner AND i.epoch = w.lease_epoch AND i.expires_at > now()
                     WHERE (w.lease_owner IS NOT NULL OR w.state = 'active') AND i.name IS NULL
                       AND (w.claimable_at IS NULL OR w.claimable_at <= now())
                     ORDER BY w.seq LIMIT $3
                     FOR UPDATE OF w SKIP LOCKED)
                 UPDATE watches w SET lease_owner = $1, lease_epoch = $2, claimable_at = NULL, rev = $4
                 FROM picked WHERE w.job_id = picked.job_id
                 RETURNING picked.was IS NOT NULL",
            )
            .await?;
        let rows = tx.query(&stmt, &[&member.name, &member.epoch, &want, &rev]).await?;
        tx.commit().await?;
        self.committed();
        let took_over = rows.iter().filter(|r| r.get::<_, bool>(0)).count();
        Ok((rows.len(), took_over))
    }

    /// Hands over up to `count` of this instance's active watches (the
    /// newest), unclaimable for `handoff`; how many. Rows a poll holds at
    /// the moment are skipped.
    async fn hand_over(&self, member: &Member, count: i64, handoff: Duration) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rev = super::watches::bump_rev(&tx).await?;
        let stmt = tx
            .prepare_cached(
                "WITH picked AS (
                     SELECT job_id FROM watches WHERE lease_owner = $1 AND lease_epoch = $2 AND state = 'active'
                     ORDER BY seq DESC LIMIT $3 FOR UPDATE SKIP LOCKED)
                 UPDATE watches w SET lease_owner = NULL, lease_epoch = NULL, rev = $5,
                     claimable_at = now() + $4::BIGINT * INTERVAL '1 millisecond'
                 FROM picked WHERE w.job_id = picked.job_id",
            )
            .await?;
        let released = tx.execute(&stmt, &[&member.name, &member.epoch, &count, &ms(handoff), &rev]).await?;
        tx.commit().await?;
        self.committed();
        Ok(released as usize)
    }

    /// Tells the other instances that watches were added, so their owner is
    /// found at once.
    pub(super) async fn notify_watches(
        &self,
        client: &impl deadpool_postgres::GenericClient,
    ) -> Result<(), StoreError> {
        client.execute("SELECT pg_notify($1, 'watches')", &[&CHANNEL]).await?;
        Ok(())
    }

    /// Every live instance, by name: what `GET /v1/cluster` shows.
    pub async fn instances(&self) -> Result<Vec<InstanceInfo>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, epoch, watches,
                        (EXTRACT(EPOCH FROM started_at) * 1000)::BIGINT,
                        (EXTRACT(EPOCH FROM renewed_at) * 1000)::BIGINT,
                        (EXTRACT(EPOCH FROM expires_at) * 1000)::BIGINT
                 FROM instances WHERE expires_at > now() ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| InstanceInfo {
                instance: r.get(0),
                epoch: r.get(1),
                watches: r.get(2),
                started_at: ms_to_rfc3339(r.get(3)),
                last_renewal: ms_to_rfc3339(r.get(4)),
                expires_at: ms_to_rfc3339(r.get(5)),
            })
            .collect())
    }

    /// The live instance that owns `job_id`'s watch, if any.
    pub async fn owner_of(&self, job_id: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT w.lease_owner FROM watches w
                 JOIN instances i ON i.name = w.lease_owner AND i.epoch = w.lease_epoch AND i.expires_at > now()
                 WHERE w.job_id = $1",
                &[&job_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Fails with [`StoreError::Fenced`] unless this instance is alive under
    /// its epoch (no check without a membership): checked before the
    /// deliverer is handed heads to send.
    pub(super) async fn check_alive(&self, client: &impl deadpool_postgres::GenericClient) -> Result<(), StoreError> {
        let Some(member) = self.member() else { return Ok(()) };
        let stmt = client
            .prepare_cached("SELECT 1 FROM instances WHERE name = $1 AND epoch = $2 AND expires_at > now()")
            .await?;
        match client.query_opt(&stmt, &[&member.name, &member.epoch]).await? {
            Some(_) => Ok(()),
            None => Err(StoreError::Fenced),
        }
    }

    /// Fails with [`StoreError::Fenced`] unless this instance owns
    /// `job_id`'s watch under its epoch and is alive (no check without a
    /// membership, or for a job whose watch row is gone). The watch row is
    /// locked `FOR SHARE` to the end of the write's transaction, so no claim
    /// can come between the check and the commit.
    pub(super) async fn check_owner(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        job_id: &str,
    ) -> Result<(), StoreError> {
        let Some(member) = self.member() else { return Ok(()) };
        let stmt = client.prepare_cached(&format!("SELECT {OWNED} FROM watches WHERE job_id = $1 FOR SHARE")).await?;
        owned_or_fenced(client.query_opt(&stmt, &[&job_id, &member.name, &member.epoch]).await?)
    }

    /// [`Postgres::check_owner`] of the job delivery `id` belongs to, in one
    /// statement (no check for a delivery or watch that is gone).
    pub(super) async fn check_owner_of_delivery(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        id: i64,
    ) -> Result<(), StoreError> {
        let Some(member) = self.member() else { return Ok(()) };
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {OWNED} FROM watches WHERE job_id = (SELECT job_id FROM deliveries WHERE id = $1) FOR SHARE"
            ))
            .await?;
        owned_or_fenced(client.query_opt(&stmt, &[&id, &member.name, &member.epoch]).await?)
    }
}
