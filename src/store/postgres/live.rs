//! Live messages on PostgreSQL: SQLite's `live_messages` reads and write in
//! PostgreSQL's dialect.

use super::outbox::{BODY_COLUMNS, read_body};
use super::*;
use crate::vocab::now_ms;

impl Postgres {
    /// The live message of (job, webhook), if one was posted.
    pub(super) async fn live(&self, job_id: &str, webhook: &str) -> Result<Option<LiveMessage>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT message_id, channel FROM live_messages WHERE job_id = $1 AND webhook = $2")
            .await?;
        let row = client.query_opt(&stmt, &[&job_id, &webhook]).await?;
        Ok(row.map(|r| LiveMessage { id: r.get(0), channel: r.get(1) }))
    }

    /// Keeps the live message of (job, webhook), replacing any before; fenced
    /// like every write of the deliverer.
    pub(super) async fn save_live(&self, job_id: &str, webhook: &str, message: &LiveMessage) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        self.check_owner(&tx, job_id).await?;
        let stmt = tx
            .prepare_cached(
                "INSERT INTO live_messages (job_id, webhook, message_id, channel, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (job_id, webhook) DO UPDATE SET message_id = excluded.message_id,
                     channel = excluded.channel, created_at = excluded.created_at",
            )
            .await?;
        tx.execute(&stmt, &[&job_id, &webhook, &message.id, &message.channel, &now_ms()]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The chain's pending deliveries, oldest first, at most `limit`.
    pub(super) async fn chain_pending(
        &self,
        job_id: &str,
        webhook: &str,
        limit: usize,
    ) -> Result<Vec<OutboundDelivery>, StoreError> {
        let ids: Vec<i64> = {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id FROM deliveries WHERE job_id = $1 AND webhook = $2 AND state = 'pending' ORDER BY id LIMIT $3",
                )
                .await?;
            client.query(&stmt, &[&job_id, &webhook, &sql_limit(limit)]).await?.iter().map(|r| r.get(0)).collect()
        };
        self.outbound_many(&ids).await
    }

    /// The bodies of the chain's last `limit` `job.event` notifications up
    /// to delivery `up_to`, oldest first.
    pub(super) async fn chain_events(
        &self,
        job_id: &str,
        webhook: &str,
        up_to: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {BODY_COLUMNS}
                 FROM deliveries d JOIN notifications n ON n.id = d.notification_id LEFT JOIN answers a ON a.id = n.answer_id
                 WHERE d.job_id = $1 AND d.webhook = $2 AND d.id <= $3 AND n.type = 'job.event'
                 ORDER BY d.id DESC LIMIT $4"
            ))
            .await?;
        let rows = client.query(&stmt, &[&job_id, &webhook, &up_to, &sql_limit(limit)]).await?;
        let mut bodies: Vec<String> = rows.iter().map(|r| read_body(r, 0)).collect();
        bodies.reverse();
        Ok(bodies)
    }
}
