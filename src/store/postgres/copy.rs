//! `db copy` on PostgreSQL: the neutral rows of `store::copy` read from and
//! written to a PostgreSQL database, ids as they are (`seq` standing for
//! SQLite's `rowid`), and [`Postgres::relay_in_use`], the one place that says
//! whether a relay runs on the database.
//!
//! The copy works on one connection of its own, taken out of the pool (so
//! that dropping it mid-way closes the session, and the server rolls back
//! what it had begun), without the relay's idle-in-transaction limit: a
//! copy's transaction waits for the other end between its statements. As a
//! source it reads in one `REPEATABLE READ READ ONLY` transaction (one
//! snapshot for every batch); as a target it writes each batch with one
//! `INSERT ... SELECT FROM UNNEST(...)` in one transaction, and before the
//! commit moves the identity sequences past the copied ids, so the relay's
//! next notification or delivery never takes an id that is already there.

use deadpool_postgres::ClientWrapper;
use tokio_postgres::Row;

use super::*;
use crate::store::copy::*;

/// Which identity column each table's sequence feeds, reset after a copy.
const SEQUENCES: [(&str, &str); 5] =
    [("watches", "seq"), ("answers", "id"), ("notifications", "id"), ("deliveries", "id"), ("attempts", "id")];

impl Postgres {
    /// The relays that run on this database now, if any: the live
    /// instances of its cluster (rows not expired on the database's clock),
    /// by name.
    pub async fn relay_in_use(&self) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT string_agg(name, ', ' ORDER BY name) FROM instances WHERE expires_at > now()", &[])
            .await?;
        Ok(row.get::<_, Option<String>>(0).map(|names| format!("instance {names}")))
    }
}

/// One end of a copy on PostgreSQL.
pub struct PostgresCopy {
    store: Postgres,
    /// The copy's own session, once begun.
    session: Option<ClientWrapper>,
}

impl std::fmt::Debug for PostgresCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.write_str("PostgresCopy")
    }
}

impl PostgresCopy {
    /// Opens the database at `url` (migrating it, as every command does).
    pub async fn open(url: &str) -> Result<PostgresCopy, StoreError> {
        Ok(PostgresCopy { store: Postgres::open(url).await?, session: None })
    }

    /// The copy's session, made on first use.
    async fn session(&mut self) -> Result<&ClientWrapper, StoreError> {
        if self.session.is_none() {
            let client = deadpool_postgres::Object::take(self.store.client().await?);
            client.batch_execute("SET idle_in_transaction_session_timeout = 0").await?;
            self.session = Some(client);
        }
        self.session.as_ref().ok_or_else(|| StoreError::Corrupt("the copy's session is gone".into()))
    }

    async fn counts(&mut self) -> Result<Counts, StoreError> {
        let session = self.session().await?;
        let mut counts = [0u64; 7];
        for (slot, table) in counts.iter_mut().zip(Table::ALL) {
            let n: i64 = session.query_one(&format!("SELECT COUNT(*) FROM {}", table.name()), &[]).await?.get(0);
            *slot = u64::try_from(n).unwrap_or(0);
        }
        Ok(counts)
    }

    async fn read(&mut self, table: Table, after: After, limit: usize) -> Result<Batch, StoreError> {
        let limit = sql_limit(limit);
        let id = match after {
            After::Id(id) => id,
            _ => i64::MIN,
        };
        let (first, key_a, key_b) = match after {
            After::Key(a, b) => (false, a, b),
            _ => (true, String::new(), String::new()),
        };
        let session = self.session().await?;
        let by_id = async |sql: &str| session.query(sql, &[&id, &limit]).await;
        let rows: Vec<Row> = match table {
            Table::Watches => {
                by_id(
                    "SELECT seq, job_id, org_id, endpoint_name, webhooks, labels, from_now, state, state_reason,
                            rev, created_at, updated_at, last_status, event_fps, body_hash
                     FROM watches WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .await?
            }
            Table::Answers => by_id("SELECT id, before, after FROM answers WHERE id > $1 ORDER BY id LIMIT $2").await?,
            Table::Notifications => {
                by_id(
                    "SELECT id, job_id, type, body, created_at, answer_id, event
                     FROM notifications WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .await?
            }
            Table::Deliveries => {
                by_id(
                    "SELECT id, notification_id, job_id, webhook, msg_id, state, attempts, next_attempt_at,
                            created_at, finished_at, last_error
                     FROM deliveries WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .await?
            }
            Table::Attempts => {
                by_id(
                    "SELECT id, delivery_id, attempted_at, duration_ms, http_status, response_excerpt, error
                     FROM attempts WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .await?
            }
            Table::WebhookPauses => {
                session
                    .query(
                        "SELECT webhook, reason, paused_at FROM webhook_pauses
                         WHERE $1 OR webhook > $2 ORDER BY webhook LIMIT $3",
                        &[&first, &key_a, &limit],
                    )
                    .await?
            }
            Table::LiveMessages => {
                session
                    .query(
                        "SELECT job_id, webhook, message_id, channel, created_at FROM live_messages
                         WHERE $1 OR (job_id, webhook) > ($2, $3) ORDER BY job_id, webhook LIMIT $4",
                        &[&first, &key_a, &key_b, &limit],
                    )
                    .await?
            }
        };
        Ok(batch_of(table, &rows))
    }

    async fn begin_write(&mut self) -> Result<u64, StoreError> {
        let session = self.session().await?;
        session.batch_execute("BEGIN").await?;
        let n: i64 = session.query_one("SELECT COUNT(*) FROM watches", &[]).await?.get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Inserts the rows with explicit column lists (a column a later
    /// migration adds takes its default), one statement per batch.
    async fn write(&mut self, batch: Batch) -> Result<(), StoreError> {
        let session = self.session().await?;
        match batch {
            Batch::Watches(rows) => {
                let col = |f: fn(&WatchRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
                let opt = |f: fn(&WatchRow) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
                let int = |f: fn(&WatchRow) -> i64| rows.iter().map(f).collect::<Vec<_>>();
                let from_now: Vec<bool> = rows.iter().map(|w| w.from_now).collect();
                let fps: Vec<Vec<u8>> = rows.iter().map(|w| w.event_fps.clone()).collect();
                let hash: Vec<Option<i64>> = rows.iter().map(|w| w.body_hash).collect();
                session
                    .execute(
                        "INSERT INTO watches (seq, job_id, org_id, endpoint_name, webhooks, labels, from_now, state,
                             state_reason, rev, created_at, updated_at, last_status, event_fps, body_hash)
                         SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                             $6::TEXT[], $7::BOOLEAN[], $8::TEXT[], $9::TEXT[], $10::BIGINT[], $11::BIGINT[],
                             $12::BIGINT[], $13::TEXT[], $14::BYTEA[], $15::BIGINT[])",
                        &[
                            &int(|w| w.order),
                            &col(|w| w.job_id.clone()),
                            &col(|w| w.org_id.clone()),
                            &col(|w| w.endpoint_name.clone()),
                            &opt(|w| w.webhooks.clone()),
                            &col(|w| w.labels.clone()),
                            &from_now,
                            &col(|w| w.state.clone()),
                            &opt(|w| w.state_reason.clone()),
                            &int(|w| w.rev),
                            &int(|w| w.created_at),
                            &int(|w| w.updated_at),
                            &opt(|w| w.last_status.clone()),
                            &fps,
                            &hash,
                        ],
                    )
                    .await?;
            }
            Batch::Answers(rows) => {
                let ids: Vec<i64> = rows.iter().map(|a| a.id).collect();
                let before: Vec<&str> = rows.iter().map(|a| a.before.as_str()).collect();
                let after: Vec<&str> = rows.iter().map(|a| a.after.as_str()).collect();
                session
                    .execute(
                        "INSERT INTO answers (id, before, after)
                         SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[])",
                        &[&ids, &before, &after],
                    )
                    .await?;
            }
            Batch::Notifications(rows) => {
                let ids: Vec<i64> = rows.iter().map(|n| n.id).collect();
                let jobs: Vec<&str> = rows.iter().map(|n| n.job_id.as_str()).collect();
                let kinds: Vec<&str> = rows.iter().map(|n| n.kind.as_str()).collect();
                let bodies: Vec<&str> = rows.iter().map(|n| n.body.as_str()).collect();
                let created: Vec<i64> = rows.iter().map(|n| n.created_at).collect();
                let answers: Vec<Option<i64>> = rows.iter().map(|n| n.answer_id).collect();
                let events: Vec<Option<&str>> = rows.iter().map(|n| n.event.as_deref()).collect();
                session
                    .execute(
                        "INSERT INTO notifications (id, job_id, type, body, created_at, answer_id, event)
                         SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[],
                             $6::BIGINT[], $7::TEXT[])",
                        &[&ids, &jobs, &kinds, &bodies, &created, &answers, &events],
                    )
                    .await?;
            }
            Batch::Deliveries(rows) => {
                let ids: Vec<i64> = rows.iter().map(|d| d.id).collect();
                let notes: Vec<i64> = rows.iter().map(|d| d.notification_id).collect();
                let jobs: Vec<&str> = rows.iter().map(|d| d.job_id.as_str()).collect();
                let hooks: Vec<&str> = rows.iter().map(|d| d.webhook.as_str()).collect();
                let msg_ids: Vec<&str> = rows.iter().map(|d| d.msg_id.as_str()).collect();
                let states: Vec<&str> = rows.iter().map(|d| d.state.as_str()).collect();
                let attempts: Vec<i32> = rows.iter().map(|d| d.attempts).collect();
                let next: Vec<i64> = rows.iter().map(|d| d.next_attempt_at).collect();
                let created: Vec<i64> = rows.iter().map(|d| d.created_at).collect();
                let finished: Vec<Option<i64>> = rows.iter().map(|d| d.finished_at).collect();
                let errors: Vec<Option<&str>> = rows.iter().map(|d| d.last_error.as_deref()).collect();
                session
                    .execute(
                        "INSERT INTO deliveries (id, notification_id, job_id, webhook, msg_id, state, attempts,
                             next_attempt_at, created_at, finished_at, last_error)
                         SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                             $6::TEXT[], $7::INTEGER[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], $11::TEXT[])",
                        &[
                            &ids, &notes, &jobs, &hooks, &msg_ids, &states, &attempts, &next, &created, &finished,
                            &errors,
                        ],
                    )
                    .await?;
            }
            Batch::Attempts(rows) => {
                let ids: Vec<i64> = rows.iter().map(|a| a.id).collect();
                let deliveries: Vec<i64> = rows.iter().map(|a| a.delivery_id).collect();
                let at: Vec<i64> = rows.iter().map(|a| a.attempted_at).collect();
                let took: Vec<i64> = rows.iter().map(|a| a.duration_ms).collect();
                let status: Vec<Option<i32>> = rows.iter().map(|a| a.http_status).collect();
                let excerpts: Vec<Option<&str>> = rows.iter().map(|a| a.response_excerpt.as_deref()).collect();
                let errors: Vec<Option<&str>> = rows.iter().map(|a| a.error.as_deref()).collect();
                session
                    .execute(
                        "INSERT INTO attempts (id, delivery_id, attempted_at, duration_ms, http_status,
                             response_excerpt, error)
                         SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                             $5::INTEGER[], $6::TEXT[], $7::TEXT[])",
                        &[&ids, &deliveries, &at, &took, &status, &excerpts, &errors],
                    )
                    .await?;
            }
            Batch::WebhookPauses(rows) => {
                let hooks: Vec<&str> = rows.iter().map(|p| p.webhook.as_str()).collect();
                let reasons: Vec<&str> = rows.iter().map(|p| p.reason.as_str()).collect();
                let at: Vec<i64> = rows.iter().map(|p| p.paused_at).collect();
                session
                    .execute(
                        "INSERT INTO webhook_pauses (webhook, reason, paused_at)
                         SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[])",
                        &[&hooks, &reasons, &at],
                    )
                    .await?;
            }
            Batch::LiveMessages(rows) => {
                let jobs: Vec<&str> = rows.iter().map(|m| m.job_id.as_str()).collect();
                let hooks: Vec<&str> = rows.iter().map(|m| m.webhook.as_str()).collect();
                let messages: Vec<&str> = rows.iter().map(|m| m.message_id.as_str()).collect();
                let channels: Vec<Option<&str>> = rows.iter().map(|m| m.channel.as_deref()).collect();
                let created: Vec<i64> = rows.iter().map(|m| m.created_at).collect();
                session
                    .execute(
                        "INSERT INTO live_messages (job_id, webhook, message_id, channel, created_at)
                         SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[])",
                        &[&jobs, &hooks, &messages, &channels, &created],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn commit(&mut self, watch_rev: i64) -> Result<(), StoreError> {
        let session = self.session().await?;
        session.execute("UPDATE meta SET value = $1 WHERE key = 'watch_rev'", &[&watch_rev]).await?;
        // Copied watches have no lease: an active one is claimed as it is,
        // but an ended one with deliveries still pending needs an owner to
        // be claimed (and its deliveries sent): one that is never alive, as
        // migration 4 gives them (store::postgres::cluster).
        session
            .execute(
                "UPDATE watches w SET lease_owner = '', lease_epoch = 0
                 WHERE w.state <> 'active' AND w.lease_owner IS NULL
                   AND EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = w.job_id AND d.state = 'pending')",
                &[],
            )
            .await?;
        for (table, column) in SEQUENCES {
            // The next id is one past the largest copied (1 when none was).
            session
                .execute(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', '{column}'),
                                       COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
                    ),
                    &[],
                )
                .await?;
        }
        session.batch_execute("COMMIT").await?;
        Ok(())
    }
}

/// The rows of a read of `table`, in the column order its query selects.
fn batch_of(table: Table, rows: &[Row]) -> Batch {
    match table {
        Table::Watches => Batch::Watches(
            rows.iter()
                .map(|r| WatchRow {
                    order: r.get(0),
                    job_id: r.get(1),
                    org_id: r.get(2),
                    endpoint_name: r.get(3),
                    webhooks: r.get(4),
                    labels: r.get(5),
                    from_now: r.get(6),
                    state: r.get(7),
                    state_reason: r.get(8),
                    rev: r.get(9),
                    created_at: r.get(10),
                    updated_at: r.get(11),
                    last_status: r.get(12),
                    event_fps: r.get(13),
                    body_hash: r.get(14),
                })
                .collect(),
        ),
        Table::Answers => {
            Batch::Answers(rows.iter().map(|r| AnswerRow { id: r.get(0), before: r.get(1), after: r.get(2) }).collect())
        }
        Table::Notifications => Batch::Notifications(
            rows.iter()
                .map(|r| NotificationRow {
                    id: r.get(0),
                    job_id: r.get(1),
                    kind: r.get(2),
                    body: r.get(3),
                    created_at: r.get(4),
                    answer_id: r.get(5),
                    event: r.get(6),
                })
                .collect(),
        ),
        Table::Deliveries => Batch::Deliveries(
            rows.iter()
                .map(|r| DeliveryRow {
                    id: r.get(0),
                    notification_id: r.get(1),
                    job_id: r.get(2),
                    webhook: r.get(3),
                    msg_id: r.get(4),
                    state: r.get(5),
                    attempts: r.get(6),
                    next_attempt_at: r.get(7),
                    created_at: r.get(8),
                    finished_at: r.get(9),
                    last_error: r.get(10),
                })
                .collect(),
        ),
        Table::Attempts => Batch::Attempts(
            rows.iter()
                .map(|r| AttemptRow {
                    id: r.get(0),
                    delivery_id: r.get(1),
                    attempted_at: r.get(2),
                    duration_ms: r.get(3),
                    http_status: r.get(4),
                    response_excerpt: r.get(5),
                    error: r.get(6),
                })
                .collect(),
        ),
        Table::WebhookPauses => Batch::WebhookPauses(
            rows.iter().map(|r| PauseRow { webhook: r.get(0), reason: r.get(1), paused_at: r.get(2) }).collect(),
        ),
        Table::LiveMessages => Batch::LiveMessages(
            rows.iter()
                .map(|r| LiveMessageRow {
                    job_id: r.get(0),
                    webhook: r.get(1),
                    message_id: r.get(2),
                    channel: r.get(3),
                    created_at: r.get(4),
                })
                .collect(),
        ),
    }
}

impl CopySource for PostgresCopy {
    fn in_use(&mut self) -> StoreFuture<'_, Option<String>> {
        Box::pin(self.store.relay_in_use())
    }

    fn begin(&mut self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let session = self.session().await?;
            session.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
            Ok(())
        })
    }

    fn counts(&mut self) -> StoreFuture<'_, Counts> {
        Box::pin(PostgresCopy::counts(self))
    }

    fn watch_rev(&mut self) -> StoreFuture<'_, i64> {
        Box::pin(async move {
            let session = self.session().await?;
            Ok(session.query_one("SELECT value FROM meta WHERE key = 'watch_rev'", &[]).await?.get(0))
        })
    }

    fn read(&mut self, table: Table, after: After, limit: usize) -> StoreFuture<'_, Batch> {
        Box::pin(PostgresCopy::read(self, table, after, limit))
    }
}

impl CopyTarget for PostgresCopy {
    fn in_use(&mut self) -> StoreFuture<'_, Option<String>> {
        Box::pin(self.store.relay_in_use())
    }

    fn begin(&mut self) -> StoreFuture<'_, u64> {
        Box::pin(self.begin_write())
    }

    fn write(&mut self, batch: Batch) -> StoreFuture<'_, ()> {
        Box::pin(PostgresCopy::write(self, batch))
    }

    fn commit(&mut self, watch_rev: i64) -> StoreFuture<'_, ()> {
        Box::pin(PostgresCopy::commit(self, watch_rev))
    }
}
