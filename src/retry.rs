//! Retry and backoff arithmetic, as small pure functions so each rule can be
//! tested on its own: the poll interval of a quiet job, the backoff of a
//! failing poll, the delivery retry schedule with jitter, and `Retry-After`.
//!
//! Randomness comes in as an argument (`unit` in `[0, 1)`), which keeps these
//! functions deterministic under test.

use std::time::{Duration, SystemTime};

/// How much an unchanged answer stretches a watch's poll interval.
pub const QUIET_GROWTH: f64 = 1.5;

/// The next poll interval after an answer: back to `base` when the job
/// changed, 1.5x longer (up to `cap`) when it did not.
pub fn next_poll_interval(current: Duration, changed: bool, base: Duration, cap: Duration) -> Duration {
    if changed { base } else { current.mul_f64(QUIET_GROWTH).clamp(base, cap) }
}

/// The wait after the `streak`-th consecutive failed poll (1 for the first):
/// exponential from `base`, capped at `cap`, with full jitter over
/// `[base, ceiling]` so that many watches failing together spread out
/// instead of retrying in lockstep, and never below `base`.
pub fn error_backoff(streak: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32 << streak.saturating_sub(1).min(20)).min(cap).max(base);
    base + (ceiling - base).mul_f64(unit.clamp(0.0, 1.0))
}

/// The wait before delivery retry number `attempt` (the first retry is 1),
/// or `None` when the schedule is exhausted. Applies ±20% jitter; a
/// receiver's `Retry-After` replaces the scheduled wait.
pub fn delivery_retry_delay(
    schedule: &[Duration],
    attempt: usize,
    retry_after: Option<Duration>,
    unit: f64,
) -> Option<Duration> {
    let scheduled = *schedule.get(attempt.checked_sub(1)?)?;
    if let Some(wait) = retry_after {
        // Honour the receiver, within the documented bounds.
        return Some(clamp_retry_after(wait));
    }
    Some(scheduled.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0)))
}

/// The shortest wait a `Retry-After` (from Dari or from a receiver) is taken
/// to ask for. `0`, a date in the past or a tiny fraction would otherwise
/// turn "slow down" into a tight loop against a server that is struggling.
pub const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);

/// The longest wait a `Retry-After` is honoured for. Anything longer (an
/// absurd `9999999999`, a date next year) is read as this: the org or the
/// webhook is asked again within the hour instead of being silenced until a
/// restart, and no `Instant` arithmetic can overflow on it.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// Bounds a wait that came from outside to `[RETRY_AFTER_MIN, RETRY_AFTER_MAX]`.
pub fn clamp_retry_after(wait: Duration) -> Duration {
    wait.clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX)
}

/// Parses a `Retry-After` value, delay-seconds (whole or, as Discord sends,
/// fractional) or an HTTP date, into a wait within
/// `[RETRY_AFTER_MIN, RETRY_AFTER_MAX]`. `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(clamp_retry_after(Duration::from_secs(secs.min(RETRY_AFTER_MAX.as_secs()))));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return seconds_f64(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(clamp_retry_after(at.duration_since(now).unwrap_or(Duration::ZERO)))
}

/// A wait given as a float number of seconds, bounded; `None` when it is
/// negative or not a number.
fn seconds_f64(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0)
        .then(|| clamp_retry_after(Duration::from_secs_f64(secs.min(RETRY_AFTER_MAX.as_secs_f64()))))
}

/// The wait a JSON answer states in its `retry_after` field, in seconds
/// (fractions allowed), as Discord's 429 body does: `{"message": "You are
/// being rate limited.", "retry_after": 0.52, "global": false}`. Used only
/// when the answer has no usable `Retry-After` header. Bounded like a header.
pub fn retry_after_in_body(body: &str) -> Option<Duration> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    seconds_f64(value.get("retry_after")?.as_f64()?)
}

/// The named retry policies for store writes made in the middle of a
/// loop's step. A brief lock (the CLI, the pruner) clears within them; a
/// lasting refusal (a full or read-only disk) becomes the step's outcome,
/// which has its own, slower schedule (the poll's error backoff, the
/// deliverer's `Unrecorded` writes).
pub mod policy {
    use std::time::Duration;

    use backon::ExponentialBuilder;

    /// A poll's commit: 50, 100, 200 ms, then the poll's outcome is
    /// `store_error` and the whole poll is redone later (nothing was
    /// acknowledged).
    pub fn poll_commit() -> ExponentialBuilder {
        ExponentialBuilder::default().with_min_delay(Duration::from_millis(50)).with_max_times(3)
    }

    /// An attempt's record: 50, 100 ms, then the outcome is kept in memory
    /// and the chain held until it is written.
    pub fn attempt_record() -> ExponentialBuilder {
        ExponentialBuilder::default().with_min_delay(Duration::from_millis(50)).with_max_times(2)
    }
}

/// `send-test`'s policy for a receiver that answers 429 (Discord allows only
/// a few messages a second to a webhook, and one run sends up to eight): up
/// to [`SEND_TEST_RETRIES`] more tries, each after the receiver's
/// `Retry-After` (1 s without one), unless it asks for more than
/// [`SEND_TEST_MAX_WAIT`], which a person at a terminal should not sit through.
pub const SEND_TEST_RETRIES: u32 = 3;
/// The longest `Retry-After` that `send-test` waits out.
pub const SEND_TEST_MAX_WAIT: Duration = Duration::from_secs(30);

/// The wait before `send-test`'s try number `retry` (1 for the first
/// retry) after an answer with `status` and `retry_after`, or `None` to stop.
pub fn send_test_retry(retry: u32, status: Option<u16>, retry_after: Option<Duration>) -> Option<Duration> {
    let wait = retry_after.unwrap_or(Duration::from_secs(1));
    (status == Some(429) && retry <= SEND_TEST_RETRIES && wait <= SEND_TEST_MAX_WAIT).then_some(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_test_retries_a_429_three_times_within_its_wait() {
        let s = Duration::from_secs;
        assert_eq!(send_test_retry(1, Some(429), None), Some(s(1)));
        assert_eq!(send_test_retry(3, Some(429), Some(s(30))), Some(s(30)));
        assert_eq!(send_test_retry(4, Some(429), Some(s(1))), None, "three retries at most");
        assert_eq!(send_test_retry(1, Some(429), Some(s(31))), None, "too long to sit through");
        assert_eq!(send_test_retry(1, Some(500), None), None, "only a 429 is retried");
        assert_eq!(send_test_retry(1, None, None), None);
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn quiet_jobs_slow_down_and_changes_reset() {
        let (base, cap) = (S(2), S(60));
        let mut d = base;
        let mut seen = vec![];
        for _ in 0..12 {
            d = next_poll_interval(d, false, base, cap);
            seen.push(d.as_millis());
        }
        assert_eq!(&seen[..4], &[3000, 4500, 6750, 10125]);
        assert_eq!(*seen.last().unwrap(), 60_000);
        assert_eq!(next_poll_interval(S(60), true, base, cap), base);
    }

    #[test]
    fn error_backoff_grows_and_is_capped() {
        let (base, cap) = (S(2), S(60));
        assert_eq!(error_backoff(1, base, cap, 1.0), S(2));
        assert_eq!(error_backoff(3, base, cap, 1.0), S(8));
        assert_eq!(error_backoff(3, base, cap, 0.0), S(2));
        assert_eq!(error_backoff(40, base, cap, 1.0), S(60));
        assert_eq!(error_backoff(40, base, cap, 0.5), S(31));
    }

    #[test]
    fn delivery_schedule_with_jitter_and_retry_after() {
        let schedule = [S(5), S(300)];
        assert_eq!(delivery_retry_delay(&schedule, 1, None, 0.0), Some(S(4)));
        assert_eq!(delivery_retry_delay(&schedule, 1, None, 1.0), Some(S(6)));
        assert_eq!(delivery_retry_delay(&schedule, 2, None, 0.5), Some(S(300)));
        assert_eq!(delivery_retry_delay(&schedule, 2, Some(S(7)), 0.5), Some(S(7)));
        assert_eq!(delivery_retry_delay(&schedule, 3, Some(S(7)), 0.5), None);
        assert_eq!(delivery_retry_delay(&schedule, 0, None, 0.5), None);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + S(1_000_000_000);
        assert_eq!(parse_retry_after("120", now), Some(S(120)));
        assert_eq!(parse_retry_after("1.5", now), Some(Duration::from_millis(1500)));
        let date = httpdate::fmt_http_date(now + S(30));
        assert_eq!(parse_retry_after(&date, now), Some(S(30)));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn retry_after_is_bounded_both_ways() {
        let now = SystemTime::UNIX_EPOCH + S(1_000_000_000);
        let cases = [
            ("0", RETRY_AFTER_MIN),
            ("0.0001", RETRY_AFTER_MIN),
            ("18446744073709551615", RETRY_AFTER_MAX),
            ("9999999999", RETRY_AFTER_MAX),
            ("1e300", RETRY_AFTER_MAX),
            ("3601", RETRY_AFTER_MAX),
            ("3600", RETRY_AFTER_MAX),
            ("1", S(1)),
        ];
        for (value, want) in cases {
            assert_eq!(parse_retry_after(value, now), Some(want), "{value}");
        }
        let past = httpdate::fmt_http_date(now - S(30));
        assert_eq!(parse_retry_after(&past, now), Some(RETRY_AFTER_MIN));
        let far = httpdate::fmt_http_date(now + S(400 * 86_400));
        assert_eq!(parse_retry_after(&far, now), Some(RETRY_AFTER_MAX));
    }

    #[test]
    fn retry_after_in_a_json_body() {
        let cases = [
            (r#"{"message": "You are being rate limited.", "retry_after": 0.52, "global": false}"#, Some(1000)),
            (r#"{"retry_after": 3}"#, Some(3000)),
            (r#"{"retry_after": 1e9}"#, Some(3_600_000)),
            (r#"{"retry_after": -1}"#, None),
            (r#"{"retry_after": "soon"}"#, None),
            (r#"{"message": "no hint"}"#, None),
            ("[1]", None),
            ("<html>rate limited</html>", None),
        ];
        for (body, want) in cases {
            assert_eq!(retry_after_in_body(body), want.map(Duration::from_millis), "{body}");
        }
    }
}

/// The longest wait [`TokenBucket::take`] reports: a slower bucket is asked
/// again after this long (and still says no until a token is due), so no
/// caller ever adds an absurd wait to a clock.
pub const BUCKET_WAIT_MAX: Duration = Duration::from_secs(86_400);

/// A token bucket: `rate` tokens a second, holding at most `max(rate, 1)`,
/// so a burst never exceeds one second's worth.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    /// The most tokens held: the largest burst.
    burst: f64,
    tokens: f64,
    updated: std::time::Duration,
}

impl TokenBucket {
    /// A full bucket at time `now` (any monotonic origin).
    pub fn new(rate: f64, now: Duration) -> TokenBucket {
        TokenBucket::with_burst(rate, rate.max(1.0), now)
    }

    /// A full bucket holding at most `burst` tokens (at least one).
    pub fn with_burst(rate: f64, burst: f64, now: Duration) -> TokenBucket {
        let burst = burst.max(1.0);
        TokenBucket { rate, burst, tokens: burst, updated: now }
    }

    /// Takes a token at `now`, or says how long until one is available.
    pub fn take(&mut self, now: Duration) -> Result<(), Duration> {
        let elapsed = now.saturating_sub(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now.max(self.updated);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // A tiny rate (1e-300 a second) would make this wait too long
            // for a `Duration`, and `from_secs_f64` would panic; past
            // BUCKET_WAIT_MAX the caller simply asks again then.
            let wait = Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate).unwrap_or(BUCKET_WAIT_MAX);
            Err(wait.min(BUCKET_WAIT_MAX))
        }
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    #[test]
    fn bucket_allows_rate_per_second() {
        let ms = Duration::from_millis;
        let mut b = TokenBucket::new(2.0, ms(0));
        assert!(b.take(ms(0)).is_ok() && b.take(ms(0)).is_ok());
        assert_eq!(b.take(ms(0)), Err(ms(500)));
        assert!(b.take(ms(500)).is_ok());
        assert!(b.take(ms(600)).is_err());
        let mut slow = TokenBucket::new(0.5, ms(0));
        assert!(slow.take(ms(0)).is_ok());
        assert_eq!(slow.take(ms(1000)), Err(ms(1000)));
    }

    #[test]
    fn a_tiny_rate_waits_a_bounded_time_and_never_panics() {
        let mut tiny = TokenBucket::new(1e-300, Duration::ZERO);
        assert!(tiny.take(Duration::ZERO).is_ok());
        assert_eq!(tiny.take(Duration::from_secs(1)), Err(BUCKET_WAIT_MAX));
        assert_eq!(tiny.take(Duration::from_secs(200_000)), Err(BUCKET_WAIT_MAX), "still no token after the wait");
    }
}
