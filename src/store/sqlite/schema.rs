//! The SQLite schema: versioned migrations, applied in order on open.

/// Versioned schema migrations, applied in order on open. Append only: a
/// released migration is never edited.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
-- Bumped by every change to a watch's row made outside the poller (add,
-- import, rm), so the daemon notices such changes with one cheap query.
INSERT INTO meta (key, value) VALUES ('watch_rev', 0);

CREATE TABLE watches (
    job_id        TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL,
    endpoint_name TEXT NOT NULL,
    webhooks      TEXT,              -- JSON list of webhook names; NULL: by portal patterns
    labels        TEXT NOT NULL,     -- JSON object
    from_now      INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('active', 'finished', 'failed', 'removed')),
    state_reason  TEXT,
    rev           INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,  -- Unix milliseconds
    updated_at    INTEGER NOT NULL,
    last_status   TEXT,              -- NULL until the first successful poll
    event_fps     BLOB NOT NULL DEFAULT x'',  -- 8 bytes per announced event
    body_hash     INTEGER            -- hash of the last answer's raw bytes
) STRICT;
CREATE INDEX watches_rev ON watches (rev);
CREATE INDEX watches_state ON watches (state);

CREATE TABLE notifications (
    id         INTEGER PRIMARY KEY,
    job_id     TEXT NOT NULL,
    type       TEXT NOT NULL,
    body       TEXT NOT NULL,        -- the standard body, fixed at detection
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX notifications_job ON notifications (job_id, id);

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,  -- also the order within (job, webhook)
    notification_id INTEGER NOT NULL REFERENCES notifications (id),
    job_id          TEXT NOT NULL,
    webhook         TEXT NOT NULL,
    msg_id          TEXT NOT NULL UNIQUE, -- the webhook-id header
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    last_error      TEXT
) STRICT;
CREATE INDEX deliveries_chain ON deliveries (job_id, webhook, state, id);
CREATE INDEX deliveries_pending ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_state ON deliveries (state, id);

CREATE TABLE attempts (
    id               INTEGER PRIMARY KEY,
    delivery_id      INTEGER NOT NULL REFERENCES deliveries (id),
    attempted_at     INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    http_status      INTEGER,
    response_excerpt TEXT,
    error            TEXT
) STRICT;
CREATE INDEX attempts_delivery ON attempts (delivery_id);
"#,
    r#"
-- Webhooks paused by a 410 Gone, until `webhooks resume`.
CREATE TABLE webhook_pauses (
    webhook   TEXT PRIMARY KEY,
    reason    TEXT NOT NULL,
    paused_at INTEGER NOT NULL
) STRICT;
-- The deliverer asks for due heads one webhook at a time, so that one
-- webhook's backlog never hides another's.
CREATE INDEX deliveries_pending_by_webhook ON deliveries (webhook, next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_finished ON deliveries (finished_at) WHERE state = 'delivered';
"#,
    r#"
-- Pruning and `notifications_of` look deliveries up by notification: without
-- this index each lookup scanned every delivery, so pruning grew with history.
CREATE INDEX deliveries_notification ON deliveries (notification_id);
-- Pruning walks old notifications in (created_at, id) order, in batches.
CREATE INDEX notifications_created ON notifications (created_at, id);
-- The part of a poll's answer that all its notifications share (everything
-- in `data` but `event`), stored once per poll instead of once per
-- notification: a first poll with 50 events no longer stores the answer 50
-- times. `before` and `after` are the JSON members sorting before and after
-- `event`, without braces.
CREATE TABLE answers (
    id     INTEGER PRIMARY KEY,
    before TEXT NOT NULL,
    after  TEXT NOT NULL
) STRICT;
-- With an answer, `body` is the notification's own head (type, timestamp,
-- the opening of `data`) and `event` its `"event":...` member, if any; the
-- standard body is composed from the parts when it is read for sending.
-- Without (every row stored before this migration, and `watch.failed`),
-- `body` is the whole standard body, as before.
ALTER TABLE notifications ADD COLUMN answer_id INTEGER REFERENCES answers (id);
ALTER TABLE notifications ADD COLUMN event TEXT;
CREATE INDEX notifications_answer ON notifications (answer_id) WHERE answer_id IS NOT NULL;
"#,
    r#"
-- The head of every (job, webhook) chain that has pending deliveries: its
-- first pending delivery, kept by the triggers below on every insert and
-- state change, so the deliverer finds a webhook's next heads through one
-- index (`chain_heads_due`) at a cost that does not grow with the backlog.
-- Before, `pending_heads` walked the pending deliveries in due order and
-- skipped every one that had an earlier pending delivery in its chain: with
-- 100,000 waiting behind 1,000 heads, each wake-up read most of them.
CREATE TABLE chain_heads (
    job_id          TEXT NOT NULL,
    webhook         TEXT NOT NULL,
    delivery_id     INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, webhook)
) STRICT, WITHOUT ROWID;
CREATE INDEX chain_heads_due ON chain_heads (webhook, next_attempt_at, delivery_id);
-- The old heads query's own index serves no query now; it cost an update
-- on every delivery's insert, attempt and end. (`deliveries_pending_by_webhook`
-- stays: the status page counts each webhook's pending deliveries from it.)
DROP INDEX deliveries_pending;
-- SQLite takes the bare columns from the row holding the MIN.
INSERT INTO chain_heads (job_id, webhook, delivery_id, next_attempt_at)
    SELECT job_id, webhook, MIN(id), next_attempt_at FROM deliveries WHERE state = 'pending' GROUP BY job_id, webhook;
-- A new pending delivery heads its chain only if the chain has none (ids
-- grow, so an existing head is earlier).
CREATE TRIGGER chain_heads_insert AFTER INSERT ON deliveries WHEN NEW.state = 'pending'
BEGIN
    INSERT INTO chain_heads (job_id, webhook, delivery_id, next_attempt_at)
        VALUES (NEW.job_id, NEW.webhook, NEW.id, NEW.next_attempt_at)
        ON CONFLICT (job_id, webhook) DO UPDATE SET delivery_id = excluded.delivery_id,
            next_attempt_at = excluded.next_attempt_at
        WHERE excluded.delivery_id < chain_heads.delivery_id;
END;
-- A pending delivery rescheduled (the head's retry time) or made pending
-- again (`deliveries retry`: an earlier id may become the head).
CREATE TRIGGER chain_heads_pending AFTER UPDATE OF state, next_attempt_at ON deliveries WHEN NEW.state = 'pending'
BEGIN
    INSERT INTO chain_heads (job_id, webhook, delivery_id, next_attempt_at)
        VALUES (NEW.job_id, NEW.webhook, NEW.id, NEW.next_attempt_at)
        ON CONFLICT (job_id, webhook) DO UPDATE SET delivery_id = excluded.delivery_id,
            next_attempt_at = excluded.next_attempt_at
        WHERE excluded.delivery_id <= chain_heads.delivery_id;
END;
-- A head that leaves `pending` (delivered, failed) hands the chain to its
-- next pending delivery, found through `deliveries_chain`.
CREATE TRIGGER chain_heads_done AFTER UPDATE OF state ON deliveries
    WHEN OLD.state = 'pending' AND NEW.state <> 'pending'
BEGIN
    DELETE FROM chain_heads WHERE job_id = OLD.job_id AND webhook = OLD.webhook AND delivery_id = OLD.id;
    INSERT INTO chain_heads (job_id, webhook, delivery_id, next_attempt_at)
        SELECT job_id, webhook, id, next_attempt_at FROM deliveries
        WHERE job_id = OLD.job_id AND webhook = OLD.webhook AND state = 'pending' ORDER BY id LIMIT 1
        ON CONFLICT (job_id, webhook) DO NOTHING;
END;
-- Each webhook's adaptive concurrency as the running deliverer last
-- published it (every few seconds), for `webhooks list` in another process.
CREATE TABLE webhook_concurrency (
    webhook     TEXT PRIMARY KEY,
    concurrency INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
-- Pruning deletes only finished deliveries; a pending one deleted anyway
-- must not leave a head behind.
CREATE TRIGGER chain_heads_delete AFTER DELETE ON deliveries WHEN OLD.state = 'pending'
BEGIN
    DELETE FROM chain_heads WHERE job_id = OLD.job_id AND webhook = OLD.webhook AND delivery_id = OLD.id;
    INSERT INTO chain_heads (job_id, webhook, delivery_id, next_attempt_at)
        SELECT job_id, webhook, id, next_attempt_at FROM deliveries
        WHERE job_id = OLD.job_id AND webhook = OLD.webhook AND state = 'pending' ORDER BY id LIMIT 1
        ON CONFLICT (job_id, webhook) DO NOTHING;
END;
"#,
    r#"
-- The message a live webhook (`mode = "live"`) posted for a job, edited by
-- the job's later notifications: Discord's message id, or Slack's channel
-- and ts. One row per (job, webhook); pruned with the job's watch.
CREATE TABLE live_messages (
    job_id     TEXT NOT NULL,
    webhook    TEXT NOT NULL,
    message_id TEXT NOT NULL,
    channel    TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, webhook)
) STRICT;
"#,
];
