//! The status page's rows and filters (`/ui/`), the same on both engines:
//! each engine's `ui.rs` answers them (every query bounded by a `LIMIT` or
//! an index range, so 100,000 watches or deliveries never make a page
//! slow), and the page (the `ui` module) decides how to show them.

use crate::store::AttemptRecord;
use crate::vocab::DeliveryState;

/// How many of the newest attempts the "last error" of each webhook is
/// looked for in: a webhook that has not failed in that many attempts shows
/// none, and the query never walks the whole history.
pub(crate) const LAST_ERROR_WINDOW: i64 = 5000;
/// At most this many delivered deliveries of each minute are read for the
/// latency chart (the newest of the minute): a bounded sample, spread over
/// the whole hour, enough for a p99 per minute that means something.
pub(crate) const LATENCY_PER_MINUTE: usize = 200;

/// A filter over watches for the watches page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchSearch {
    /// Only this state.
    pub state: Option<String>,
    /// Only this job.
    pub job_id: Option<String>,
    /// Only this portal (`org/endpoint`).
    pub portal_id: Option<String>,
    /// Only watches with this label (`key`, `value`).
    pub label: Option<(String, String)>,
    /// Only watches added after the watch with this row number (a cursor).
    pub after: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// One row of the watches page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WatchRow {
    /// The cursor of the next page.
    pub seq: i64,
    pub job_id: String,
    pub portal_id: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub last_status: Option<String>,
    /// The labels as stored (a JSON object).
    pub labels: serde_json::Value,
    /// Unix ms.
    pub created_at: i64,
    pub updated_at: i64,
}

/// A filter over deliveries for the deliveries page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliverySearch {
    pub state: Option<DeliveryState>,
    pub webhook: Option<String>,
    pub job_id: Option<String>,
    /// Only deliveries with a smaller id (newest first; a cursor).
    pub before: Option<i64>,
    pub limit: usize,
}

/// One row of a deliveries list.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub job_id: String,
    pub webhook: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: &'static str,
    pub attempts: u32,
    /// Unix ms.
    pub created_at: i64,
    pub next_attempt_at: i64,
    pub finished_at: Option<i64>,
    pub last_error: Option<String>,
}

/// A webhook's most recent failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LastError {
    /// Unix ms.
    pub at: i64,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

/// One notification of a job page, with its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct JobNotification {
    pub id: i64,
    pub kind: String,
    /// The standard body.
    pub body: String,
    /// Unix ms.
    pub created_at: i64,
    pub deliveries: Vec<JobDelivery>,
}

/// One delivery of a job page, with every attempt.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobDelivery {
    pub id: i64,
    pub webhook: String,
    pub msg_id: String,
    pub state: &'static str,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub tries: Vec<AttemptRecord>,
}

/// The last hour of activity, per minute, for the overview's chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    /// (minute start in Unix ms, notifications stored in it).
    pub notifications: Vec<(i64, u64)>,
    /// (minute start, deliveries that reached 2xx in it).
    pub delivered: Vec<(i64, u64)>,
    /// (finished at, detection-to-2xx milliseconds) of delivered deliveries,
    /// at most [`LATENCY_PER_MINUTE`] of each minute.
    pub latencies: Vec<(i64, i64)>,
}
