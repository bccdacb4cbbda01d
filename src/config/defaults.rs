//! Every default and every bound of the configuration, in one place.
//!
//! The resolver takes its defaults from here and checks every value against
//! the bounds here, so a number in `config.example.toml` and the one the code
//! uses cannot drift apart unnoticed: `tests::example_states_the_defaults`
//! loads the example and compares. The bounds exist because the values feed
//! `Instant` arithmetic, millisecond conversions, semaphores and token
//! buckets: a `retention` of a billion years used to wrap into a cutoff in the
//! future (deleting all history), a huge interval or a tiny rate panicked.
//! Each bound is generous for real use and far from any overflow.

use std::time::Duration;

use crate::vocab::{Format, Mode};

/// A duration's default and its inclusive bounds.
#[derive(Debug, Clone, Copy)]
pub struct DurationBounds {
    /// The value used when the key is absent.
    pub default: Duration,
    /// The smallest value accepted.
    pub min: Duration,
    /// The largest value accepted.
    pub max: Duration,
}

/// A whole number's default and its inclusive bounds.
#[derive(Debug, Clone, Copy)]
pub struct CountBounds {
    /// The value used when the key is absent.
    pub default: usize,
    /// The smallest value accepted.
    pub min: usize,
    /// The largest value accepted.
    pub max: usize,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// `database`: the SQLite file.
pub const DATABASE: &str = "/var/lib/dari-relay/relay.db";

/// `[cluster] lease_ttl`: how long a silent instance keeps its watches. At
/// least a second (renewals go every third of it), at most ten minutes.
pub const LEASE_TTL: DurationBounds = DurationBounds { default: secs(15), min: secs(1), max: secs(10 * MINUTE) };

/// `retention`: at most ten years, so `now - retention` in Unix milliseconds
/// stays far from `i64` overflow.
pub const RETENTION: DurationBounds = DurationBounds { default: secs(7 * DAY), min: secs(1), max: secs(3650 * DAY) };

/// `log_format`, when neither the file nor `--log-format` says.
pub const LOG_FORMAT: &str = "text";

/// `[upstream] base_url`.
pub const BASE_URL: &str = "https://agent.usedari.com";

/// `[upstream] poll_interval`.
pub const POLL_INTERVAL: DurationBounds = DurationBounds { default: secs(2), min: ms(1), max: secs(HOUR) };

/// `[upstream] max_poll_interval`.
pub const MAX_POLL_INTERVAL: DurationBounds = DurationBounds { default: secs(60), min: ms(1), max: secs(DAY) };

/// `[upstream] request_timeout`.
pub const UPSTREAM_REQUEST_TIMEOUT: DurationBounds =
    DurationBounds { default: secs(15), min: ms(100), max: secs(10 * MINUTE) };

/// `[upstream] max_in_flight`: each is a semaphore permit and a connection.
pub const UPSTREAM_MAX_IN_FLIGHT: CountBounds = CountBounds { default: 64, min: 1, max: 10_000 };

/// `[upstream] terminal_statuses`.
pub const TERMINAL_STATUSES: [&str; 4] = ["completed", "failed", "stopped", "cancelled"];

/// `[upstream] terminal_statuses`: the most entries, and the longest entry.
pub const MAX_TERMINAL_STATUSES: usize = 64;

/// `[upstream] max_response_bytes`: one answer is held in memory whole.
pub const MAX_RESPONSE_BYTES: CountBounds =
    CountBounds { default: 10 * 1024 * 1024, min: 1024, max: 256 * 1024 * 1024 };

/// `[upstream] not_found_grace`.
pub const NOT_FOUND_GRACE: DurationBounds =
    DurationBounds { default: secs(10 * MINUTE), min: ms(100), max: secs(30 * DAY) };

/// `[upstream] auth_grace`.
pub const AUTH_GRACE: DurationBounds = DurationBounds { default: secs(HOUR), min: ms(100), max: secs(30 * DAY) };

/// `[upstream] max_watch_age`.
pub const MAX_WATCH_AGE: DurationBounds =
    DurationBounds { default: secs(7 * DAY), min: ms(100), max: secs(3650 * DAY) };

/// `[delivery] retry_schedule`.
pub const RETRY_SCHEDULE: [Duration; 7] =
    [secs(5), secs(5 * MINUTE), secs(30 * MINUTE), secs(2 * HOUR), secs(5 * HOUR), secs(10 * HOUR), secs(10 * HOUR)];

/// `[delivery] retry_schedule`: the bounds of each wait (the default is the
/// list above, so `default` here is unused).
pub const RETRY_WAIT: DurationBounds = DurationBounds { default: secs(5), min: ms(10), max: secs(7 * DAY) };

/// `[delivery] retry_schedule`: the most retries.
pub const MAX_RETRIES: usize = 100;

/// `[delivery] request_timeout`.
pub const DELIVERY_REQUEST_TIMEOUT: DurationBounds =
    DurationBounds { default: secs(15), min: ms(100), max: secs(10 * MINUTE) };

/// `[delivery] shutdown_timeout`: zero is allowed (stop at once).
pub const SHUTDOWN_TIMEOUT: DurationBounds =
    DurationBounds { default: secs(10), min: Duration::ZERO, max: secs(10 * MINUTE) };

/// `[orgs.*] max_requests_per_second` and `[[webhooks]] max_per_second`: the
/// smallest and largest rate. Below the minimum the token bucket's wait
/// (`1 / rate` seconds) would not fit a `Duration`.
pub const MIN_RATE: f64 = 0.001;
/// See [`MIN_RATE`].
pub const MAX_RATE: f64 = 10_000.0;

/// `[[webhooks]] format`.
pub const WEBHOOK_FORMAT: Format = Format::Standard;

/// `[[webhooks]] mode`.
pub const WEBHOOK_MODE: Mode = Mode::Each;

/// `[[webhooks]] api_url` of a live Slack webhook: Slack's Web API.
pub const SLACK_API_URL: &str = "https://slack.com/api";

/// The longest `[[webhooks]] channel` (Slack ids are about 11 characters;
/// a `#name` is at most 80).
pub const MAX_CHANNEL_LEN: usize = 80;

/// `[[webhooks]] max_in_flight`.
/// The upper bound of the adaptive concurrency: the relay starts lower
/// and grows only while the receiver keeps up.
pub const WEBHOOK_MAX_IN_FLIGHT: CountBounds = CountBounds { default: 64, min: 1, max: 1_000 };

/// `[[webhooks]] max_per_second` of a `format = "slack"` webhook that sets
/// none: Slack accepts about one message a second per incoming webhook.
pub const SLACK_MAX_PER_SECOND: f64 = 1.0;
/// The burst such a webhook may send at once before the rate applies
/// (Slack tolerates short bursts).
pub const SLACK_BURST: f64 = 3.0;

/// The most `[orgs.*]` tables and `[[webhooks]]` tables.
pub const MAX_ORGS: usize = 1_000;
/// See [`MAX_ORGS`].
pub const MAX_WEBHOOKS: usize = 1_000;

/// The longest org id, webhook name, label, header name or status.
pub const MAX_NAME_LEN: usize = 128;

/// The most patterns in a webhook's `types` or `portals`, labels in its
/// `labels`, headers in `headers` and `headers_env` together, and names in
/// `[admin] allowed_hosts`.
pub const MAX_LIST_LEN: usize = 256;

/// The longest glob pattern, header value or label value.
pub const MAX_VALUE_LEN: usize = 4096;

/// The largest body template, inline or in a file.
pub const MAX_TEMPLATE_BYTES: usize = 1024 * 1024;

/// The largest `ca_file` read (a bundle of a few hundred certificates).
pub const MAX_CA_FILE_BYTES: usize = 1024 * 1024;

/// The most certificates in one `ca_file`.
pub const MAX_CA_CERTIFICATES: usize = 1_000;

/// The largest secret file (`*_file`) read.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// `[inbound]`: the largest body of `POST /v1/dari/webhook`; a longer one
/// is answered 413 (from its `Content-Length` before reading, else once the
/// read passes this).
pub const INBOUND_MAX_BODY: usize = 256 * 1024;

/// `[inbound]`: requests a second one source address may send before the
/// listener answers 429 (a burst of one second's worth is allowed).
pub const INBOUND_RATE_PER_SOURCE: f64 = 50.0;

/// `[inbound]`: the most source addresses whose rate is tracked at once. A
/// source idle for a second has a full bucket and is forgotten first.
pub const INBOUND_MAX_SOURCES: usize = 4096;
