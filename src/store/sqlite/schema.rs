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
];
