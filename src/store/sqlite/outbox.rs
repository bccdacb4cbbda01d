//! The outbox: heads, outbound reads, listings, retries, pauses, attempts.

use std::collections::BTreeMap;

use rusqlite::params;

use super::*;
use crate::store::*;
use crate::vocab::{DeliveryState, ms_to_rfc3339, now_ms};

impl Store {
    // ----- deliveries ---------------------------------------------------

    /// Deliveries with their notifications, for sending, in id order.
    pub fn outbound_many(&self, ids: &[i64]) -> Result<Vec<OutboundDelivery>, StoreError> {
        // In chunks: one statement with more bound ids than SQLite allows
        // (32,766) would fail every time it was tried.
        if ids.len() > OUTBOUND_CHUNK {
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(OUTBOUND_CHUNK) {
                out.extend(self.outbound_many(chunk)?);
            }
            out.sort_by_key(|d| d.id);
            return Ok(out);
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn();
        let marks = vec!["?"; ids.len()].join(",");
        let mut stmt = conn.prepare(&format!(
            "SELECT d.id, d.msg_id, d.webhook, d.job_id, n.type, {BODY_COLUMNS}, d.attempts, n.created_at
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id LEFT JOIN answers a ON a.id = n.answer_id
             WHERE d.id IN ({marks}) ORDER BY d.id"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(ids), |r| {
            Ok(OutboundDelivery {
                id: r.get(0)?,
                msg_id: r.get(1)?,
                webhook: r.get(2)?,
                job_id: r.get(3)?,
                kind: r.get(4)?,
                body: read_body(r, 5)?,
                attempts: r.get(9)?,
                detected_at: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deliveries for `deliveries list`, newest first, at most `limit`.
    pub fn list_deliveries(
        &self,
        state: Option<DeliveryState>,
        limit: usize,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        let conn = self.conn();
        // With a state, `d.state = ?1` alone, so the (state, id) index
        // serves it: `?1 IS NULL OR ...` made SQLite walk every delivery
        // ever kept to find the few failed ones.
        let filter = if state.is_some() { "d.state = ?1" } else { "?1 IS NULL" };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT d.id, d.msg_id, d.job_id, d.webhook, n.type, d.state, d.attempts, d.next_attempt_at, d.created_at, d.last_error
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE {filter} ORDER BY d.id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![state.map(DeliveryState::as_str), sql_limit(limit)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, u32>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, Option<String>>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, msg_id, job_id, webhook, kind, state, attempts, next, created, last_error) = row?;
            let state =
                DeliveryState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?;
            out.push(DeliverySummary {
                id,
                msg_id,
                job_id,
                webhook,
                kind,
                state: state.as_str(),
                attempts,
                next_attempt_at: (state == DeliveryState::Pending).then(|| ms_to_rfc3339(next)),
                created_at: ms_to_rfc3339(created),
                last_error,
            });
        }
        Ok(out)
    }

    /// Puts failed deliveries back to pending on a fresh schedule (their
    /// `webhook-id` unchanged): one by id, or every failed one with `None`.
    /// Returns how many were requeued.
    pub fn retry_failed(&self, id: Option<i64>) -> Result<usize, StoreError> {
        let conn = self.conn();
        Ok(conn.execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, finished_at = NULL
             WHERE state = 'failed' AND (?1 IS NULL OR id = ?1)",
            params![id, now_ms()],
        )?)
    }

    /// Pauses a webhook (a receiver answered 410 Gone). Idempotent.
    pub fn pause_webhook(&self, webhook: &str, reason: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO webhook_pauses (webhook, reason, paused_at) VALUES (?1, ?2, ?3) ON CONFLICT (webhook) DO NOTHING",
            params![webhook, reason, now_ms()],
        )?;
        Ok(())
    }

    /// Resumes a paused webhook. Returns `false` if it was not paused.
    pub fn resume_webhook(&self, webhook: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM webhook_pauses WHERE webhook = ?1", [webhook])? == 1)
    }

    /// Paused webhooks with why and since when (Unix ms).
    pub fn paused_webhooks(&self) -> Result<BTreeMap<String, (String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT webhook, reason, paused_at FROM webhook_pauses")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Per webhook: pending and failed deliveries, and the oldest pending
    /// one's creation time (Unix ms).
    pub fn backlog(&self) -> Result<BTreeMap<String, Backlog>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT webhook, SUM(state = 'pending'), SUM(state = 'failed'), MIN(CASE WHEN state = 'pending' THEN created_at END)
             FROM deliveries WHERE state IN ('pending', 'failed') GROUP BY webhook",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, Backlog { pending: r.get(1)?, failed: r.get(2)?, oldest_pending: r.get(3)? }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every attempt of a delivery, oldest first.
    pub fn attempts(&self, delivery_id: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT attempted_at, duration_ms, http_status, response_excerpt, error FROM attempts
             WHERE delivery_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([delivery_id], |r| {
            Ok(AttemptRecord {
                attempted_at: r.get(0)?,
                duration_ms: r.get(1)?,
                http_status: r.get(2)?,
                response_excerpt: r.get(3)?,
                error: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A job's notifications in order, each with its deliveries.
    pub fn notifications_of(&self, job_id: &str) -> Result<Vec<StoredNotification>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            &format!("SELECT n.id, n.type, {BODY_COLUMNS}, n.created_at, d.webhook, d.msg_id, d.state, d.attempts
             FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.id LEFT JOIN answers a ON a.id = n.answer_id
             WHERE n.job_id = ?1 ORDER BY n.id, d.id"),
        )?;
        let rows = stmt.query_map([job_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                read_body(r, 2)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<u32>>(10)?,
            ))
        })?;
        let mut out: Vec<StoredNotification> = Vec::new();
        for row in rows {
            let (id, kind, body, created, webhook, msg_id, state, attempts) = row?;
            if out.last().is_none_or(|n| n.id != id) {
                out.push(StoredNotification { id, kind, body, created_at: created, deliveries: Vec::new() });
            }
            if let (Some(webhook), Some(msg_id), Some(state)) = (webhook, msg_id, state) {
                let state = DeliveryState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?;
                let last = out.last_mut().expect("pushed above");
                last.deliveries.push(StoredDelivery { webhook, msg_id, state, attempts: attempts.unwrap_or(0) });
            }
        }
        Ok(out)
    }

    /// When a delivery was first attempted (Unix ms), if it was: the start of
    /// the time a rate-limited delivery may keep waiting without giving up.
    pub fn first_attempt_at(&self, id: i64) -> Result<Option<i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT MIN(attempted_at) FROM attempts WHERE delivery_id = ?1")?;
        Ok(stmt.query_row([id], |r| r.get(0))?)
    }
}
