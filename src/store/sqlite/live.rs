//! Live messages (`mode = "live"`): the message each (job, webhook) posted,
//! and the reads an edit needs (the chain's pending run, its recent events).

use rusqlite::{OptionalExtension, params};

use super::*;
use crate::vocab::now_ms;

impl Store {
    /// The live message of (job, webhook), if one was posted.
    pub fn live_message(&self, job_id: &str, webhook: &str) -> Result<Option<LiveMessage>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT message_id, channel FROM live_messages WHERE job_id = ?1 AND webhook = ?2")?;
        let row = stmt
            .query_row(params![job_id, webhook], |r| Ok(LiveMessage { id: r.get(0)?, channel: r.get(1)? }))
            .optional()?;
        Ok(row)
    }

    /// Keeps the live message of (job, webhook), replacing any before.
    pub fn save_live_message(&self, job_id: &str, webhook: &str, message: &LiveMessage) -> Result<(), StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "INSERT INTO live_messages (job_id, webhook, message_id, channel, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (job_id, webhook) DO UPDATE SET message_id = excluded.message_id, channel = excluded.channel,
                 created_at = excluded.created_at",
        )?;
        stmt.execute(params![job_id, webhook, message.id, message.channel, now_ms()])?;
        Ok(())
    }

    /// The chain's pending deliveries, oldest first, at most `limit`
    /// (through the `deliveries_chain` index).
    pub fn pending_chain(
        &self,
        job_id: &str,
        webhook: &str,
        limit: usize,
    ) -> Result<Vec<OutboundDelivery>, StoreError> {
        let ids: Vec<i64> = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM deliveries WHERE job_id = ?1 AND webhook = ?2 AND state = 'pending' ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![job_id, webhook, sql_limit(limit)], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        self.outbound_many(&ids)
    }

    /// The bodies of the chain's last `limit` `job.event` notifications up
    /// to delivery `up_to`, oldest first.
    pub fn recent_events(
        &self,
        job_id: &str,
        webhook: &str,
        up_to: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {BODY_COLUMNS}
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id LEFT JOIN answers a ON a.id = n.answer_id
             WHERE d.job_id = ?1 AND d.webhook = ?2 AND d.id <= ?3 AND n.type = 'job.event'
             ORDER BY d.id DESC LIMIT ?4"
        ))?;
        let rows = stmt.query_map(params![job_id, webhook, up_to, sql_limit(limit)], |r| read_body(r, 0))?;
        let mut bodies: Vec<String> = rows.collect::<Result<_, _>>()?;
        bodies.reverse();
        Ok(bodies)
    }
}
