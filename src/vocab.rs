//! The relay's shared vocabulary: the ids, states and kinds every stage
//! speaks, and the clock. It imports no other module of the crate, so any
//! stage may use it without pulling in another stage (ARCHITECTURE.md,
//! "Layers").

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ----- ids -----------------------------------------------------------------

/// A portal, written `org_id/endpoint_name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortalId {
    /// The org, which selects the API key.
    pub org: String,
    /// The portal's endpoint name.
    pub endpoint: String,
}

impl fmt::Display for PortalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.endpoint)
    }
}

impl FromStr for PortalId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((org, endpoint)) if is_valid_segment(org) && is_valid_segment(endpoint) => {
                Ok(PortalId { org: org.to_owned(), endpoint: endpoint.to_owned() })
            }
            _ => Err(format!(
                "{s:?} is not a portal id: expected <org_id>/<endpoint_name>, each non-empty, \
                 without spaces or a further '/'"
            )),
        }
    }
}

/// Parses a job id: a UUID, normalised to lower-case hyphenated form.
pub fn parse_job_id(s: &str) -> Result<String, String> {
    uuid::Uuid::parse_str(s.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| format!("{s:?} is not a UUID (expected e.g. 550e8400-e29b-41d4-a716-446655440000)"))
}

/// Whether `s` can be one path segment of a portal id.
pub fn is_valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c == '/' || c.is_whitespace() || c.is_control())
}

// ----- databases -----------------------------------------------------------

/// Whether a `database` value names a PostgreSQL database (a `postgres://`
/// or `postgresql://` URL) rather than a SQLite path: config and the store
/// both decide the engine by it.
pub fn is_postgres_url(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

// ----- watches -------------------------------------------------------------

/// The state of a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchState {
    /// Being polled.
    Active,
    /// Reached a terminal status; its notifications are stored.
    Finished,
    /// The relay gave up on it (`watch.failed` was stored).
    Failed,
    /// Removed by `watch rm`.
    Removed,
}

impl WatchState {
    /// Every state, in the order `watch list` counts them.
    pub const ALL: [WatchState; 4] =
        [WatchState::Active, WatchState::Finished, WatchState::Failed, WatchState::Removed];

    /// The name stored in the database and shown by `watch list`.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchState::Active => "active",
            WatchState::Finished => "finished",
            WatchState::Failed => "failed",
            WatchState::Removed => "removed",
        }
    }

    /// Parses a state name, as stored or given to a filter.
    pub fn from_name(s: &str) -> Option<WatchState> {
        WatchState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// A watch to add.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWatch {
    /// The job's UUID, lower-case hyphenated.
    pub job_id: String,
    /// The portal the job runs on.
    pub portal: PortalId,
    /// Webhooks named on the command line; `None` means by portal patterns.
    pub webhooks: Option<Vec<String>>,
    /// Labels passed through to every notification.
    pub labels: BTreeMap<String, String>,
    /// Whether the first poll's answer counts as already known.
    pub from_now: bool,
}

/// What the relay has already announced for one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenState {
    /// The status of the last successful poll, as Dari wrote it; `None`
    /// until the first one.
    pub status: Option<String>,
    /// Fingerprints of every announced event, in announcement order. It only
    /// grows, which is what makes "never re-announce" hold across anomalies.
    pub event_fingerprints: Vec<u64>,
}

/// Lower-cases a status and turns every character outside `[a-z0-9_]` into
/// `_`, giving the suffix of its `job.<status>` notification type.
pub fn normalize_status(status: &str) -> String {
    status
        .trim()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '_' })
        .collect()
}

// ----- notifications and deliveries ---------------------------------------

/// The type of a notification, as its body's `type` names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NotificationKind {
    /// `job.event`: one new entry of the job's event list.
    Event,
    /// `job.<status>`: the status changed; holds the normalised status.
    Status(String),
    /// `watch.failed`: the relay gave up on the watch.
    WatchFailed,
}

impl NotificationKind {
    /// The kind of a change to `status` (normalised here).
    pub fn of_status(status: &str) -> NotificationKind {
        NotificationKind::Status(normalize_status(status))
    }

    /// Reads a type name: `job.event`, `watch.failed` or `job.<status>`.
    pub fn parse(name: &str) -> Option<NotificationKind> {
        match name {
            "job.event" => Some(NotificationKind::Event),
            "watch.failed" => Some(NotificationKind::WatchFailed),
            _ => match name.strip_prefix("job.") {
                Some(status) if !status.is_empty() && normalize_status(status) == status => {
                    Some(NotificationKind::Status(status.to_owned()))
                }
                _ => None,
            },
        }
    }

    /// The type name (`job.completed`, ...).
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for NotificationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotificationKind::Event => f.write_str("job.event"),
            NotificationKind::Status(status) => write!(f, "job.{status}"),
            NotificationKind::WatchFailed => f.write_str("watch.failed"),
        }
    }
}

/// The state of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its turn or its next attempt.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// Every retry failed; kept for `deliveries retry`.
    Failed,
}

impl DeliveryState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    /// Parses a stored or command-line name.
    pub fn parse(s: &str) -> Option<DeliveryState> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "failed" => Some(DeliveryState::Failed),
            _ => None,
        }
    }
}

/// Body format of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The Standard Webhooks JSON body of INTERFACE.md.
    Standard,
    /// A Slack incoming-webhook message.
    Slack,
    /// A Discord webhook message.
    Discord,
    /// A Microsoft Teams Workflows message (an Adaptive Card).
    Teams,
}

impl Format {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Standard => "standard",
            Format::Slack => "slack",
            Format::Discord => "discord",
            Format::Teams => "teams",
        }
    }
}

/// How a chat webhook shows a job: a message per notification, or one live
/// message per job, edited as it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A message per notification (the default).
    Each,
    /// One message per (job, webhook), posted once and then edited, with a
    /// short reply for questions, failures and the end.
    Live,
}

impl Mode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Each => "each",
            Mode::Live => "live",
        }
    }
}

// ----- the clock -----------------------------------------------------------

/// Where the loops read the wall-clock time they store (attempt times,
/// next-attempt times, detection times). Waiting is always on tokio's clock,
/// so a test that pauses tokio's time and uses [`TokioClock`] drives every
/// schedule without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in Unix milliseconds.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// A wall clock that advances with tokio's clock: the wall time when it was
/// made plus tokio's elapsed time since. Under `tokio::time::pause` it
/// moves only when the test advances time (or the runtime auto-advances).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall_ms: i64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading the wall time now.
    pub fn new() -> TokioClock {
        TokioClock { wall_ms: now_ms(), start: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        let elapsed = self.start.elapsed().as_millis().min(i64::MAX as u128) as i64;
        self.wall_ms.saturating_add(elapsed)
    }
}

/// The system's wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis().min(i64::MAX as u128) as i64
}

/// Unix milliseconds as RFC 3339 with milliseconds, in UTC.
pub fn ms_to_rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_back_what_they_write() {
        for name in ["job.event", "watch.failed", "job.completed", "job.waiting_for_input"] {
            assert_eq!(NotificationKind::parse(name).unwrap().to_string(), name);
        }
        assert_eq!(NotificationKind::of_status(" Needs Input "), NotificationKind::Status("needs_input".into()));
        for bad in ["job.", "job.Completed", "completed", "job.a b", ""] {
            assert_eq!(NotificationKind::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn watch_states_read_back_what_they_write() {
        for state in WatchState::ALL {
            assert_eq!(WatchState::from_name(state.as_str()), Some(state));
        }
        assert_eq!(WatchState::from_name("paused"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time() {
        let clock = TokioClock::new();
        let before = clock.now_ms();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_ms() - before, 3_600_000);
    }
}
