//! Watches on PostgreSQL: adding, removing, listing, the schedule, and the
//! poll's read-decide-write in one transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use deadpool_postgres::Transaction;
use tokio_postgres::IsolationLevel;
use tokio_postgres::Row;

use super::*;
use crate::notification::Body;
use crate::vocab::{PortalId, SeenState, ms_to_rfc3339, now_ms};

/// The columns [`diff_context_of`] reads, in order.
const DIFF_COLUMNS: &str = "org_id, endpoint_name, webhooks, labels, from_now, state, last_status, event_fps";

impl Postgres {
    /// Adds watches in one transaction, exactly as SQLite's
    /// `Store::add_watches`: a job already watched (active, finished or
    /// failed) is left unchanged; a removed one becomes active again with
    /// its last-seen state, the new webhooks and labels, a fresh age and
    /// its answer hash forgotten.
    pub async fn add(&self, watches: &[NewWatch]) -> Result<AddSummary, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rev = bump_rev(&tx).await?;
        let now = now_ms();
        let insert = tx
            .prepare_cached(
                "INSERT INTO watches (job_id, org_id, endpoint_name, webhooks, labels, from_now, state, rev, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $8)
                 ON CONFLICT (job_id) DO UPDATE SET state = 'active', state_reason = NULL, rev = $7, updated_at = $8,
                     created_at = $8, webhooks = excluded.webhooks, labels = excluded.labels, body_hash = NULL
                 WHERE watches.state = 'removed'",
            )
            .await?;
        let mut summary = AddSummary::default();
        for w in watches {
            let webhooks = w.webhooks.as_ref().map(|names| serde_json::to_string(names).expect("names serialise"));
            let labels = serde_json::to_string(&w.labels).expect("labels serialise");
            let changed = tx
                .execute(
                    &insert,
                    &[&w.job_id, &w.portal.org, &w.portal.endpoint, &webhooks, &labels, &w.from_now, &rev, &now],
                )
                .await?;
            if changed == 1 {
                summary.added += 1;
            } else {
                summary.existing += 1;
            }
        }
        if summary.added > 0 {
            // Delivered at the commit: an instance claims them at once.
            self.notify_watches(&tx).await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(summary)
    }

    /// Marks a watch removed; `false` when no such job is watched. Its
    /// pending deliveries are still sent.
    pub async fn remove(&self, job_id: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rev = bump_rev(&tx).await?;
        let changed = tx
            .execute(
                "UPDATE watches SET state = 'removed', state_reason = 'watch rm', rev = $2, updated_at = $3
                 WHERE job_id = $1 AND state != 'removed'",
                &[&job_id, &rev, &now_ms()],
            )
            .await?;
        tx.commit().await?;
        self.committed();
        Ok(changed == 1)
    }

    /// Watches matching `query`, in the order they were added.
    pub async fn query_watches(&self, query: &WatchQuery) -> Result<Vec<WatchSummary>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT job_id, org_id, endpoint_name, state, state_reason, last_status, webhooks, labels, created_at, updated_at
                 FROM watches
                 WHERE ($1::TEXT IS NULL OR state = $1)
                   AND ($2::TEXT IS NULL OR org_id || '/' || endpoint_name = $2)
                   AND ($3::TEXT IS NULL OR job_id = $3)
                   AND ($4::TEXT IS NULL OR seq > (SELECT seq FROM watches WHERE job_id = $4))
                 ORDER BY seq LIMIT $5",
            )
            .await?;
        let limit = query.limit.map_or(i64::MAX, sql_limit);
        let state = query.state.map(WatchState::as_str);
        let rows = client.query(&stmt, &[&state, &query.portal_id, &query.job_id, &query.after, &limit]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let state: String = r.get(3);
            let webhooks: Option<String> = r.get(6);
            let labels: String = r.get(7);
            out.push(WatchSummary {
                job_id: r.get(0),
                portal_id: format!("{}/{}", r.get::<_, String>(1), r.get::<_, String>(2)),
                state: watch_state(&state)?.as_str(),
                state_reason: r.get(4),
                last_status: r.get(5),
                webhooks: parse_webhooks(webhooks.as_deref())?,
                labels: parse_labels(&labels)?,
                created_at: ms_to_rfc3339(r.get(8)),
                updated_at: ms_to_rfc3339(r.get(9)),
            });
        }
        Ok(out)
    }

    /// Watches per state.
    pub async fn watch_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let client = self.client().await?;
        let rows = client.query("SELECT state, COUNT(*) FROM watches GROUP BY state", &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every active watch this instance owns (every active one, without a
    /// cluster) and the revision, read in one snapshot.
    pub(super) async fn schedule_all(&self) -> Result<Schedule, StoreError> {
        match self.member() {
            Some(_) => {
                self.scheduled(
                    "WHERE state = 'active' AND $1::BIGINT IS NOT NULL AND lease_owner = $2 AND lease_epoch = $3",
                    0,
                )
                .await
            }
            None => self.scheduled("WHERE state = 'active' AND $1::BIGINT IS NOT NULL", 0).await,
        }
    }

    /// Watches changed since `rev` (any state, any owner: claims and hand-
    /// overs bump the revision too) and the revision, in one snapshot.
    pub(super) async fn schedule_changed(&self, rev: i64) -> Result<Schedule, StoreError> {
        self.scheduled("WHERE rev > $1", rev).await
    }

    async fn scheduled(&self, filter: &str, rev: i64) -> Result<Schedule, StoreError> {
        let member = self.member();
        let mut client = self.client().await?;
        // One snapshot: the revision read is the one the watches are at.
        let tx =
            client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
        let now: i64 = tx.query_one("SELECT value FROM meta WHERE key = 'watch_rev'", &[]).await?.get(0);
        let rows = match &member {
            Some(m) => {
                let sql = format!(
                    "SELECT job_id, org_id, endpoint_name, state, body_hash, created_at,
                         lease_owner IS NOT DISTINCT FROM $2 AND lease_epoch IS NOT DISTINCT FROM $3
                     FROM watches {filter} ORDER BY rev"
                );
                tx.query(&tx.prepare_cached(&sql).await?, &[&rev, &m.name, &m.epoch]).await?
            }
            None => {
                let sql = format!(
                    "SELECT job_id, org_id, endpoint_name, state, body_hash, created_at, TRUE
                     FROM watches {filter} ORDER BY rev"
                );
                tx.query(&tx.prepare_cached(&sql).await?, &[&rev]).await?
            }
        };
        tx.commit().await?;
        let mut watches = Vec::with_capacity(rows.len());
        for r in rows {
            let state: String = r.get(3);
            watches.push(ScheduledWatch {
                job_id: r.get(0),
                portal: PortalId { org: r.get(1), endpoint: r.get(2) },
                state: watch_state(&state)?,
                body_hash: r.get::<_, Option<i64>>(4).map(|h| h as u64),
                created_at: r.get(5),
                owned: r.get(6),
            });
        }
        Ok(Schedule { rev: now, watches })
    }

    /// What the diff needs about one watch; `None` if it does not exist.
    pub(super) async fn read_diff_context(&self, job_id: &str) -> Result<Option<DiffContext>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&format!("SELECT {DIFF_COLUMNS} FROM watches WHERE job_id = $1")).await?;
        client.query_opt(&stmt, &[&job_id]).await?.map(|r| diff_context_of(&r, job_id)).transpose()
    }

    /// A poll's read-decide-write in one transaction: the watch row is read
    /// `FOR UPDATE`, so no other write to it (a removal, another poll)
    /// comes between the read `decide` sees and the write it makes.
    pub(super) async fn commit_decided(&self, job_id: String, decide: Decide) -> Result<PollWrite, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // In a cluster the same read says whether this instance still owns
        // the watch; the row is locked, so no claim comes between this and
        // the commit.
        let row = match self.member() {
            Some(m) => {
                let stmt = tx
                    .prepare_cached(&format!(
                        "SELECT {DIFF_COLUMNS}, {OWNED} FROM watches WHERE job_id = $1 FOR UPDATE",
                        OWNED = super::cluster::OWNED
                    ))
                    .await?;
                let row = tx.query_opt(&stmt, &[&job_id, &m.name, &m.epoch]).await?;
                if row.as_ref().is_some_and(|r| !r.get::<_, bool>(8)) {
                    return Err(StoreError::Fenced);
                }
                row
            }
            None => {
                let stmt = tx
                    .prepare_cached(&format!("SELECT {DIFF_COLUMNS} FROM watches WHERE job_id = $1 FOR UPDATE"))
                    .await?;
                tx.query_opt(&stmt, &[&job_id]).await?
            }
        };
        let Some(row) = row else { return Ok(PollWrite::Skipped) };
        let before = diff_context_of(&row, &job_id)?;
        if before.state != WatchState::Active {
            return Ok(PollWrite::Skipped);
        }
        // A panic in `decide` fails this write only (the transaction is
        // rolled back when dropped), as on SQLite's writer.
        let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decide(&before)))
            .map_err(|panic| StoreError::Panicked(panic_message(&panic).to_owned()))?;
        let Some(commit) = decided else { return Ok(PollWrite::Skipped) };
        let now = now_ms();
        let fps: Vec<u8> = commit.seen.event_fingerprints.iter().flat_map(|f| f.to_be_bytes()).collect();
        let (state, reason) = match &commit.end {
            None => (WatchState::Active, None),
            Some((state, reason)) => (*state, Some(reason.as_str())),
        };
        let update = tx
            .prepare_cached(
                "UPDATE watches SET last_status = $2, event_fps = $3, body_hash = $4, state = $5, state_reason = $6, updated_at = $7
                 WHERE job_id = $1 AND state = 'active'",
            )
            .await?;
        let hash = commit.body_hash as i64;
        let updated = tx
            .execute(&update, &[&commit.job_id, &commit.seen.status, &fps, &hash, &state.as_str(), &reason, &now])
            .await?;
        if updated == 0 {
            return Ok(PollWrite::Gone);
        }
        let deliveries = insert_notifications(&tx, &commit.job_id, &commit.notifications, now).await?;
        tx.commit().await?;
        self.committed();
        Ok(PollWrite::Stored { before: Box::new(before), commit: Box::new(commit), deliveries })
    }

    /// Gives up on an active watch: `failed` with `reason`, and its
    /// `watch.failed` notification, in one transaction.
    pub(super) async fn fail(
        &self,
        job_id: &str,
        reason: &str,
        notification: &NewNotification,
    ) -> Result<CommitOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        self.check_owner(&tx, job_id).await?;
        let now = now_ms();
        let updated = tx
            .execute(
                "UPDATE watches SET state = 'failed', state_reason = $2, updated_at = $3 WHERE job_id = $1 AND state = 'active'",
                &[&job_id, &reason, &now],
            )
            .await?;
        if updated == 0 {
            return Ok(CommitOutcome::WatchGone);
        }
        let deliveries = insert_notifications(&tx, job_id, std::slice::from_ref(notification), now).await?;
        tx.commit().await?;
        self.committed();
        Ok(CommitOutcome::Stored { deliveries })
    }
}

/// A watch row's [`DiffContext`].
fn diff_context_of(r: &Row, job_id: &str) -> Result<DiffContext, StoreError> {
    let fps: Vec<u8> = r.get(7);
    if !fps.len().is_multiple_of(8) {
        return Err(StoreError::Corrupt(format!("event fingerprints of job {job_id}")));
    }
    let event_fingerprints = fps.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect();
    let webhooks: Option<String> = r.get(2);
    let labels: String = r.get(3);
    let state: String = r.get(5);
    Ok(DiffContext {
        portal: PortalId { org: r.get(0), endpoint: r.get(1) },
        webhooks: parse_webhooks(webhooks.as_deref())?,
        labels: parse_labels(&labels)?,
        from_now: r.get(4),
        state: watch_state(&state)?,
        seen: SeenState { status: r.get(6), event_fingerprints },
    })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}

/// Bumps the watch revision; the row lock it takes is held to the commit,
/// so revisions are committed in the order they are handed out.
pub(super) async fn bump_rev(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    Ok(tx.query_one("UPDATE meta SET value = value + 1 WHERE key = 'watch_rev' RETURNING value", &[]).await?.get(0))
}

/// Stores notifications and their deliveries; a poll's shared answer part
/// is written once (its notifications share one `Arc`).
pub(super) async fn insert_notifications(
    tx: &Transaction<'_>,
    job_id: &str,
    notifications: &[NewNotification],
    now: i64,
) -> Result<usize, StoreError> {
    let notification = tx
        .prepare_cached(
            "INSERT INTO notifications (job_id, type, body, answer_id, event, created_at) VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING id",
        )
        .await?;
    let answer = tx.prepare_cached("INSERT INTO answers (before, after) VALUES ($1, $2) RETURNING id").await?;
    let delivery = tx
        .prepare_cached(
            "INSERT INTO deliveries (notification_id, job_id, webhook, msg_id, state, next_attempt_at, created_at)
             VALUES ($1, $2, $3, $4, 'pending', $5, $5)",
        )
        .await?;
    let mut count = 0;
    // By address (a `usize`, so the future stays `Send`).
    let mut stored: Option<(usize, i64)> = None;
    for n in notifications {
        let (body, answer_id, event) = match &n.body {
            Body::Whole(body) => (body.as_str(), None, None),
            Body::Parts { head, shared, event } => {
                let answer_id = match stored {
                    Some((ptr, id)) if ptr == Arc::as_ptr(shared) as usize => id,
                    _ => {
                        let id: i64 = tx.query_one(&answer, &[&shared.before, &shared.after]).await?.get(0);
                        stored = Some((Arc::as_ptr(shared) as usize, id));
                        id
                    }
                };
                (head.as_str(), Some(answer_id), event.as_deref())
            }
        };
        let kind = n.kind.to_string();
        let id: i64 = tx.query_one(&notification, &[&job_id, &kind, &body, &answer_id, &event, &now]).await?.get(0);
        for d in &n.deliveries {
            tx.execute(&delivery, &[&id, &job_id, &d.webhook, &d.msg_id, &now]).await?;
            count += 1;
        }
    }
    Ok(count)
}
