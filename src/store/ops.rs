//! Operator queries (issue 17): deliveries filtered by webhook, job and
//! state, and one delivery with what was sent and every attempt, for
//! `GET /v1/deliveries[/{id}]` and `dari-relay deliveries list|show`.

use rusqlite::{OptionalExtension, params};

use super::{
    AttemptRecord, BODY_COLUMNS, DeliveryState, DeliverySummary, Store, StoreError, ms_to_rfc3339, read_body, sql_limit,
};

/// Which deliveries to list: every `Some` must match; newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    /// Only this webhook's deliveries.
    pub webhook: Option<String>,
    /// Only this job's deliveries.
    pub job_id: Option<String>,
    /// Only deliveries in this state.
    pub state: Option<DeliveryState>,
    /// At most this many (bounded by the caller).
    pub limit: usize,
}

/// One delivery with the standard body of its notification and every attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryDetail {
    /// The row as `deliveries list` shows it.
    pub summary: DeliverySummary,
    /// The standard body, as stored when the transition was detected; the
    /// receiver got it rendered for its webhook's format.
    pub body: String,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

const SUMMARY_COLUMNS: &str =
    "d.id, d.msg_id, d.job_id, d.webhook, n.type, d.state, d.attempts, d.next_attempt_at, d.created_at, d.last_error";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<DeliverySummary, StoreError>> {
    let state: String = r.get(5)?;
    let Some(parsed) = DeliveryState::parse(&state) else {
        return Ok(Err(StoreError::Corrupt(format!("delivery state {state:?}"))));
    };
    let next: i64 = r.get(7)?;
    Ok(Ok(DeliverySummary {
        id: r.get(0)?,
        msg_id: r.get(1)?,
        job_id: r.get(2)?,
        webhook: r.get(3)?,
        kind: r.get(4)?,
        state: parsed.as_str(),
        attempts: r.get(6)?,
        next_attempt_at: (parsed == DeliveryState::Pending).then(|| ms_to_rfc3339(next)),
        created_at: ms_to_rfc3339(r.get(8)?),
        last_error: r.get(9)?,
    }))
}

impl Store {
    /// Deliveries matching `filter`, newest first. A job filter is served by
    /// the `deliveries_chain` index, a state filter by `deliveries_state`; a
    /// webhook alone walks ids from the newest and stops at `limit` matches.
    pub fn query_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<DeliverySummary>, StoreError> {
        let mut conditions = Vec::new();
        if filter.job_id.is_some() {
            conditions.push("d.job_id = ?1");
        }
        if filter.webhook.is_some() {
            conditions.push("d.webhook = ?2");
        }
        if filter.state.is_some() {
            conditions.push("d.state = ?3");
        }
        // Unused parameters are still bound; `?1 IS ?1` keeps each one named
        // in the statement so the numbering holds whatever is filtered.
        let filter_sql = if conditions.is_empty() { "1".to_owned() } else { conditions.join(" AND ") };
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE {filter_sql} AND (?1 IS ?1) AND (?2 IS ?2) AND (?3 IS ?3) ORDER BY d.id DESC LIMIT ?4"
        ))?;
        let rows = stmt.query_map(
            params![filter.job_id, filter.webhook, filter.state.map(DeliveryState::as_str), sql_limit(filter.limit)],
            summary,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    /// One delivery by id, with its body and attempts; `None` if there is none.
    pub fn delivery(&self, id: i64) -> Result<Option<DeliveryDetail>, StoreError> {
        let found = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS}, {BODY_COLUMNS}
                 FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                 LEFT JOIN answers a ON a.id = n.answer_id WHERE d.id = ?1"
            ))?;
            stmt.query_row([id], |r| Ok((summary(r)?, read_body(r, 10)?))).optional()?
        };
        let Some((summary, body)) = found else { return Ok(None) };
        let attempts = self.attempts(id)?;
        Ok(Some(DeliveryDetail { summary: summary?, body, attempts }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_delivery_is_none_and_an_empty_store_lists_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db")).unwrap();
        assert_eq!(store.delivery(1).unwrap(), None);
        let filter =
            DeliveryFilter { webhook: Some("h".into()), job_id: None, state: Some(DeliveryState::Failed), limit: 10 };
        assert!(store.query_deliveries(&filter).unwrap().is_empty());
        assert!(store.query_deliveries(&DeliveryFilter { limit: 10, ..Default::default() }).unwrap().is_empty());
    }
}
