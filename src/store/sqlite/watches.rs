//! Watches: adding, removing, listing, scheduling, and the poll's reads.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use rusqlite::{TransactionBehavior, params};

use super::*;
use crate::store::*;
use crate::vocab::{NewWatch, PortalId, WatchState, ms_to_rfc3339, now_ms};

impl Store {
    // ----- watches ------------------------------------------------------

    /// Adds watches in one transaction. A job already watched (active,
    /// finished or failed) is left unchanged; a removed one becomes active
    /// again with its last-seen state, so nothing is announced twice, but
    /// with the new webhooks and labels and a fresh age. Its answer hash is
    /// forgotten: if the job ended meanwhile (or before the removal), Dari
    /// answers the same bytes as at the last poll, and a kept hash would
    /// skip them as unchanged until `max_watch_age`; without it the first
    /// poll parses the answer once and a terminal status ends the watch.
    pub fn add_watches(&self, watches: &[NewWatch]) -> Result<AddSummary, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let rev = bump_rev(&tx)?;
        let now = now_ms();
        let mut summary = AddSummary::default();
        {
            let mut insert = tx.prepare(
                "INSERT INTO watches (job_id, org_id, endpoint_name, webhooks, labels, from_now, state, rev, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'active', ?7, ?8, ?8)
                 ON CONFLICT (job_id) DO UPDATE SET state = 'active', state_reason = NULL, rev = ?7, updated_at = ?8,
                     created_at = ?8, webhooks = excluded.webhooks, labels = excluded.labels, body_hash = NULL
                 WHERE state = 'removed'",
            )?;
            for w in watches {
                let webhooks = w.webhooks.as_ref().map(|names| serde_json::to_string(names).expect("names serialise"));
                let labels = serde_json::to_string(&w.labels).expect("labels serialise");
                let changed = insert.execute(params![
                    w.job_id,
                    w.portal.org,
                    w.portal.endpoint,
                    webhooks,
                    labels,
                    w.from_now,
                    rev,
                    now
                ])?;
                if changed == 1 {
                    summary.added += 1;
                } else {
                    summary.existing += 1;
                }
            }
        }
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(summary)
    }

    /// Marks a watch removed. Returns `false` when no such job is watched.
    /// Its pending deliveries are still sent: they are transitions already seen.
    pub fn remove_watch(&self, job_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let rev = bump_rev(&tx)?;
        let changed = tx.execute(
            "UPDATE watches SET state = 'removed', state_reason = 'watch rm', rev = ?2, updated_at = ?3
             WHERE job_id = ?1 AND state != 'removed'",
            params![job_id, rev, now_ms()],
        )?;
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(changed == 1)
    }

    /// Watches for `watch list`: active ones, or all with `all`.
    pub fn list_watches(&self, all: bool) -> Result<Vec<WatchSummary>, StoreError> {
        let state = (!all).then_some(WatchState::Active);
        self.query_watches(&WatchQuery { state, ..WatchQuery::default() })
    }

    /// Watches matching `query`, in the order they were added.
    pub fn query_watches(&self, query: &WatchQuery) -> Result<Vec<WatchSummary>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT job_id, org_id, endpoint_name, state, state_reason, last_status, webhooks, labels, created_at, updated_at
             FROM watches
             WHERE (?1 IS NULL OR state = ?1)
               AND (?2 IS NULL OR org_id || '/' || endpoint_name = ?2)
               AND (?3 IS NULL OR job_id = ?3)
               AND (?4 IS NULL OR rowid > (SELECT rowid FROM watches WHERE job_id = ?4))
             ORDER BY rowid LIMIT ?5",
        )?;
        let limit = query.limit.map_or(-1, sql_limit);
        let bind = params![query.state.map(WatchState::as_str), query.portal_id, query.job_id, query.after, limit];
        let rows = stmt.query_map(bind, |r| {
            Ok((
                r.get::<_, String>(0)?,
                format!("{}/{}", r.get::<_, String>(1)?, r.get::<_, String>(2)?),
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, portal_id, state, state_reason, last_status, webhooks, labels, created, updated) = row?;
            out.push(WatchSummary {
                job_id,
                portal_id,
                state: watch_state(&state)?.as_str(),
                state_reason,
                last_status,
                webhooks: parse_webhooks(webhooks.as_deref())?,
                labels: parse_labels(&labels)?,
                created_at: ms_to_rfc3339(created),
                updated_at: ms_to_rfc3339(updated),
            });
        }
        Ok(out)
    }

    /// Watches per state.
    pub fn watch_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM watches GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The current watch revision; see the `meta` table.
    pub fn watch_rev(&self) -> Result<i64, StoreError> {
        Ok(self.conn().query_row("SELECT value FROM meta WHERE key = 'watch_rev'", [], |r| r.get(0))?)
    }

    /// Every active watch, for the scheduler at start.
    pub fn active_watches(&self) -> Result<Vec<ScheduledWatch>, StoreError> {
        self.scheduled("WHERE state = 'active'", 0)
    }

    /// Watches changed by the CLI since revision `rev` (any state), so the
    /// scheduler can start new ones and drop removed ones.
    pub fn watches_changed_since(&self, rev: i64) -> Result<Vec<ScheduledWatch>, StoreError> {
        self.scheduled("WHERE rev > ?1", rev)
    }

    pub(super) fn scheduled(&self, filter: &str, rev: i64) -> Result<Vec<ScheduledWatch>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT job_id, org_id, endpoint_name, state, body_hash, created_at FROM watches {filter} ORDER BY rev"
        );
        let mut stmt = conn.prepare(&sql)?;
        let bind = if filter.contains("?1") { vec![rev] } else { vec![] };
        let rows = stmt.query_map(rusqlite::params_from_iter(bind), |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, org, endpoint, state, body_hash, created_at) = row?;
            out.push(ScheduledWatch {
                job_id,
                portal: PortalId { org, endpoint },
                state: watch_state(&state)?,
                body_hash: body_hash.map(|h| h as u64),
                created_at,
                // One instance has a SQLite database to itself.
                owned: true,
            });
        }
        Ok(out)
    }

    /// What the diff needs about one watch; `None` if it does not exist.
    pub fn diff_context(&self, job_id: &str) -> Result<Option<DiffContext>, StoreError> {
        read_diff_context(&self.conn(), job_id)
    }

    /// Gives up on an active watch: marks it `failed` with `reason` and
    /// stores its `watch.failed` notification, in one transaction.
    pub fn fail_watch(
        &self,
        job_id: &str,
        reason: &str,
        notification: &NewNotification,
    ) -> Result<CommitOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let updated = tx.execute(
            "UPDATE watches SET state = 'failed', state_reason = ?2, updated_at = ?3 WHERE job_id = ?1 AND state = 'active'",
            params![job_id, reason, now],
        )?;
        if updated == 0 {
            return Ok(CommitOutcome::WatchGone);
        }
        let deliveries = insert_notifications(&tx, job_id, std::slice::from_ref(notification), now)?;
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(CommitOutcome::Stored { deliveries })
    }
}
