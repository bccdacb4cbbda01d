//! `db copy` on SQLite: the neutral rows of `store::copy` read from and
//! written to a SQLite file, ids and `rowid`s as they are.
//!
//! The copy has a connection of its own (with the relay's settings) and
//! holds the database's running lock ([`RunningLock`]) for as long as it
//! copies, so no daemon starts on either end meanwhile. As a source it reads
//! in one deferred transaction: WAL gives it one snapshot, and other
//! connections (a CLI command) may still write. As a target it writes in
//! one `BEGIN IMMEDIATE` transaction; the triggers of migration 4 fill
//! `chain_heads` as the deliveries go in (in id order, so each chain's head
//! is its first pending delivery). SQLite calls are short and synchronous,
//! so they run right where they are called: `db copy` is a one-shot
//! command, with nothing else on its runtime to stall.

use std::future::ready;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::running::RunningLock;
use super::{Store, open_connection, sql_limit};
use crate::store::copy::*;
use crate::store::{StoreError, StoreFuture};

/// One end of a copy on SQLite.
pub struct SqliteCopy {
    path: PathBuf,
    conn: Connection,
    /// The database's running lock, once [`CopySource::in_use`] or
    /// [`CopyTarget::in_use`] took it; held until the copy is dropped.
    lock: Option<RunningLock>,
}

impl std::fmt::Debug for SqliteCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteCopy").field("path", &self.path).finish()
    }
}

impl SqliteCopy {
    /// The source at `path`, which must exist (a mistyped path must not
    /// become a new, empty database copied as "nothing"); migrated to the
    /// current schema, as every command does on open.
    pub fn open_source(path: &Path) -> Result<SqliteCopy, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Corrupt(format!("there is no SQLite database at {}", path.display())));
        }
        SqliteCopy::open_target(path)
    }

    /// The target at `path`, created if missing and migrated.
    pub fn open_target(path: &Path) -> Result<SqliteCopy, StoreError> {
        drop(Store::open(path)?);
        Ok(SqliteCopy { path: path.to_owned(), conn: open_connection(path)?, lock: None })
    }

    fn take_lock(&mut self) -> Result<Option<String>, StoreError> {
        if self.lock.is_some() {
            return Ok(None);
        }
        match RunningLock::take(&self.path, &format!("dari-relay db copy, pid {}", std::process::id())) {
            Ok(lock) => {
                self.lock = Some(lock);
                Ok(None)
            }
            Err(StoreError::InUse(by)) => Ok(Some(by)),
            Err(e) => Err(e),
        }
    }

    fn counts(&self) -> Result<Counts, StoreError> {
        let mut counts = [0u64; 7];
        for (slot, table) in counts.iter_mut().zip(Table::ALL) {
            let n: i64 = self.conn.query_row(&format!("SELECT COUNT(*) FROM {}", table.name()), [], |r| r.get(0))?;
            *slot = u64::try_from(n).unwrap_or(0);
        }
        Ok(counts)
    }

    fn read(&self, table: Table, after: &After, limit: usize) -> Result<Batch, StoreError> {
        let limit = sql_limit(limit);
        let id = match after {
            After::Id(id) => *id,
            _ => i64::MIN,
        };
        let (first, key_a, key_b) = match after {
            After::Key(a, b) => (false, a.as_str(), b.as_str()),
            _ => (true, "", ""),
        };
        let conn = &self.conn;
        Ok(match table {
            Table::Watches => {
                let mut stmt = conn.prepare_cached(
                    "SELECT rowid, job_id, org_id, endpoint_name, webhooks, labels, from_now, state, state_reason,
                            rev, created_at, updated_at, last_status, event_fps, body_hash
                     FROM watches WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![id, limit], |r| {
                    Ok(WatchRow {
                        order: r.get(0)?,
                        job_id: r.get(1)?,
                        org_id: r.get(2)?,
                        endpoint_name: r.get(3)?,
                        webhooks: r.get(4)?,
                        labels: r.get(5)?,
                        from_now: r.get(6)?,
                        state: r.get(7)?,
                        state_reason: r.get(8)?,
                        rev: r.get(9)?,
                        created_at: r.get(10)?,
                        updated_at: r.get(11)?,
                        last_status: r.get(12)?,
                        event_fps: r.get(13)?,
                        body_hash: r.get(14)?,
                    })
                })?;
                Batch::Watches(rows.collect::<Result<_, _>>()?)
            }
            Table::Answers => {
                let mut stmt =
                    conn.prepare_cached("SELECT id, before, after FROM answers WHERE id > ?1 ORDER BY id LIMIT ?2")?;
                let rows = stmt.query_map(params![id, limit], |r| {
                    Ok(AnswerRow { id: r.get(0)?, before: r.get(1)?, after: r.get(2)? })
                })?;
                Batch::Answers(rows.collect::<Result<_, _>>()?)
            }
            Table::Notifications => {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, job_id, type, body, created_at, answer_id, event
                     FROM notifications WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![id, limit], |r| {
                    Ok(NotificationRow {
                        id: r.get(0)?,
                        job_id: r.get(1)?,
                        kind: r.get(2)?,
                        body: r.get(3)?,
                        created_at: r.get(4)?,
                        answer_id: r.get(5)?,
                        event: r.get(6)?,
                    })
                })?;
                Batch::Notifications(rows.collect::<Result<_, _>>()?)
            }
            Table::Deliveries => {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, notification_id, job_id, webhook, msg_id, state, attempts, next_attempt_at,
                            created_at, finished_at, last_error
                     FROM deliveries WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![id, limit], |r| {
                    Ok(DeliveryRow {
                        id: r.get(0)?,
                        notification_id: r.get(1)?,
                        job_id: r.get(2)?,
                        webhook: r.get(3)?,
                        msg_id: r.get(4)?,
                        state: r.get(5)?,
                        attempts: r.get(6)?,
                        next_attempt_at: r.get(7)?,
                        created_at: r.get(8)?,
                        finished_at: r.get(9)?,
                        last_error: r.get(10)?,
                    })
                })?;
                Batch::Deliveries(rows.collect::<Result<_, _>>()?)
            }
            Table::Attempts => {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, delivery_id, attempted_at, duration_ms, http_status, response_excerpt, error
                     FROM attempts WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![id, limit], |r| {
                    Ok(AttemptRow {
                        id: r.get(0)?,
                        delivery_id: r.get(1)?,
                        attempted_at: r.get(2)?,
                        duration_ms: r.get(3)?,
                        http_status: r.get(4)?,
                        response_excerpt: r.get(5)?,
                        error: r.get(6)?,
                    })
                })?;
                Batch::Attempts(rows.collect::<Result<_, _>>()?)
            }
            Table::WebhookPauses => {
                let mut stmt = conn.prepare_cached(
                    "SELECT webhook, reason, paused_at FROM webhook_pauses
                     WHERE ?1 OR webhook > ?2 ORDER BY webhook LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![first, key_a, limit], |r| {
                    Ok(PauseRow { webhook: r.get(0)?, reason: r.get(1)?, paused_at: r.get(2)? })
                })?;
                Batch::WebhookPauses(rows.collect::<Result<_, _>>()?)
            }
            Table::LiveMessages => {
                let mut stmt = conn.prepare_cached(
                    "SELECT job_id, webhook, message_id, channel, created_at FROM live_messages
                     WHERE ?1 OR (job_id, webhook) > (?2, ?3) ORDER BY job_id, webhook LIMIT ?4",
                )?;
                let rows = stmt.query_map(params![first, key_a, key_b, limit], |r| {
                    Ok(LiveMessageRow {
                        job_id: r.get(0)?,
                        webhook: r.get(1)?,
                        message_id: r.get(2)?,
                        channel: r.get(3)?,
                        created_at: r.get(4)?,
                    })
                })?;
                Batch::LiveMessages(rows.collect::<Result<_, _>>()?)
            }
        })
    }

    fn begin_write(&self) -> Result<u64, StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let n: i64 = self.conn.query_row("SELECT COUNT(*) FROM watches", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Inserts the rows with explicit column lists: a column a later
    /// migration adds takes its default.
    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let conn = &self.conn;
        match batch {
            Batch::Watches(rows) => {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO watches (rowid, job_id, org_id, endpoint_name, webhooks, labels, from_now, state,
                         state_reason, rev, created_at, updated_at, last_status, event_fps, body_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                )?;
                for w in rows {
                    stmt.execute(params![
                        w.order,
                        w.job_id,
                        w.org_id,
                        w.endpoint_name,
                        w.webhooks,
                        w.labels,
                        w.from_now,
                        w.state,
                        w.state_reason,
                        w.rev,
                        w.created_at,
                        w.updated_at,
                        w.last_status,
                        w.event_fps,
                        w.body_hash
                    ])?;
                }
            }
            Batch::Answers(rows) => {
                let mut stmt = conn.prepare_cached("INSERT INTO answers (id, before, after) VALUES (?1, ?2, ?3)")?;
                for a in rows {
                    stmt.execute(params![a.id, a.before, a.after])?;
                }
            }
            Batch::Notifications(rows) => {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO notifications (id, job_id, type, body, created_at, answer_id, event)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for n in rows {
                    stmt.execute(params![n.id, n.job_id, n.kind, n.body, n.created_at, n.answer_id, n.event])?;
                }
            }
            Batch::Deliveries(rows) => {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO deliveries (id, notification_id, job_id, webhook, msg_id, state, attempts,
                         next_attempt_at, created_at, finished_at, last_error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?;
                for d in rows {
                    stmt.execute(params![
                        d.id,
                        d.notification_id,
                        d.job_id,
                        d.webhook,
                        d.msg_id,
                        d.state,
                        d.attempts,
                        d.next_attempt_at,
                        d.created_at,
                        d.finished_at,
                        d.last_error
                    ])?;
                }
            }
            Batch::Attempts(rows) => {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO attempts (id, delivery_id, attempted_at, duration_ms, http_status,
                         response_excerpt, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for a in rows {
                    stmt.execute(params![
                        a.id,
                        a.delivery_id,
                        a.attempted_at,
                        a.duration_ms,
                        a.http_status,
                        a.response_excerpt,
                        a.error
                    ])?;
                }
            }
            Batch::WebhookPauses(rows) => {
                let mut stmt =
                    conn.prepare_cached("INSERT INTO webhook_pauses (webhook, reason, paused_at) VALUES (?1, ?2, ?3)")?;
                for p in rows {
                    stmt.execute(params![p.webhook, p.reason, p.paused_at])?;
                }
            }
            Batch::LiveMessages(rows) => {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO live_messages (job_id, webhook, message_id, channel, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for m in rows {
                    stmt.execute(params![m.job_id, m.webhook, m.message_id, m.channel, m.created_at])?;
                }
            }
        }
        Ok(())
    }

    /// SQLite gives a new row the largest id plus one, so new ids start
    /// past the copied ones without being told.
    fn commit(&self, watch_rev: i64) -> Result<(), StoreError> {
        self.conn.execute("UPDATE meta SET value = ?1 WHERE key = 'watch_rev'", [watch_rev])?;
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }
}

impl CopySource for SqliteCopy {
    fn in_use(&mut self) -> StoreFuture<'_, Option<String>> {
        Box::pin(ready(self.take_lock()))
    }

    fn begin(&mut self) -> StoreFuture<'_, ()> {
        // The snapshot starts with the transaction's first read.
        let begun = self
            .conn
            .execute_batch("BEGIN")
            .and_then(|()| self.conn.query_row("SELECT COUNT(*) FROM meta", [], |r| r.get::<_, i64>(0)).map(drop));
        Box::pin(ready(begun.map_err(StoreError::from)))
    }

    fn counts(&mut self) -> StoreFuture<'_, Counts> {
        Box::pin(ready(SqliteCopy::counts(self)))
    }

    fn watch_rev(&mut self) -> StoreFuture<'_, i64> {
        let rev = self.conn.query_row("SELECT value FROM meta WHERE key = 'watch_rev'", [], |r| r.get(0));
        Box::pin(ready(rev.map_err(StoreError::from)))
    }

    fn read(&mut self, table: Table, after: After, limit: usize) -> StoreFuture<'_, Batch> {
        Box::pin(ready(SqliteCopy::read(self, table, &after, limit)))
    }
}

impl CopyTarget for SqliteCopy {
    fn in_use(&mut self) -> StoreFuture<'_, Option<String>> {
        Box::pin(ready(self.take_lock()))
    }

    fn begin(&mut self) -> StoreFuture<'_, u64> {
        Box::pin(ready(self.begin_write()))
    }

    fn write(&mut self, batch: Batch) -> StoreFuture<'_, ()> {
        Box::pin(ready(SqliteCopy::write(self, &batch)))
    }

    fn commit(&mut self, watch_rev: i64) -> StoreFuture<'_, ()> {
        Box::pin(ready(SqliteCopy::commit(self, watch_rev)))
    }
}
