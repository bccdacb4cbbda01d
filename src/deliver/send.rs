//! Sending and classifying: the one place that POSTs to receivers
//! ([`send`]), and the pure rule of what an answer means ([`classify`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};

use super::EXCERPT_BYTES;
use crate::config::{Config, Webhook};
use crate::retry::{self};
use crate::store::DeliveryOutcome;
use crate::vocab::Format;

/// What a receiver said of its own rate limit before enforcing it:
/// Discord's `X-RateLimit-Remaining` and `X-RateLimit-Reset-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests left in the current window.
    pub remaining: u32,
    /// When the window resets, bounded to `RETRY_AFTER_MAX`.
    pub reset_after: Duration,
}

impl Quota {
    /// Reads the two headers; `None` unless both are present and valid
    /// (a negative, fractional-count or non-finite value is ignored, and a
    /// reset past an hour is taken as an hour).
    pub fn from_headers(headers: &HeaderMap) -> Option<Quota> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let remaining = text("x-ratelimit-remaining")?.parse::<u32>().ok()?;
        let seconds = text("x-ratelimit-reset-after")?.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0)?;
        let reset_after =
            Duration::try_from_secs_f64(seconds).unwrap_or(retry::RETRY_AFTER_MAX).min(retry::RETRY_AFTER_MAX);
        Some(Quota { remaining, reset_after })
    }

    /// How long the webhook should wait before its next request: the reset
    /// time once the window is used up, else nothing.
    pub fn wait(&self) -> Option<Duration> {
        (self.remaining == 0 && !self.reset_after.is_zero()).then_some(self.reset_after)
    }
}

/// The raw result of one HTTP POST to a receiver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    /// Its `Retry-After`, parsed.
    pub retry_after: Option<Duration>,
    /// The start of its body.
    pub excerpt: Option<String>,
    /// A transport error (timeout, refused, TLS), never containing the URL.
    pub error: Option<String>,
    /// The receiver's own rate-limit window, when it says.
    pub quota: Option<Quota>,
}

impl Response {
    /// Whether this counts as delivered.
    pub fn is_success(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// The HTTP client for receivers: redirects are never followed (a 3xx is a
/// failed attempt), and the timeout is `[delivery] request_timeout`. It
/// trusts the built-in (Mozilla) roots, and takes a proxy from
/// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` unless `NO_PROXY` exempts the
/// receiver's host (reqwest's system proxy, read when the client is built).
pub fn http_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(config).build()
}

/// The HTTP client for `webhook`: [`http_client`]'s, plus its `ca_file`
/// certificates as trust roots when it has one. A webhook without a
/// `ca_file` is served by the shared client; the deliverer keeps one of
/// these per webhook that has one, so a private CA is trusted for that
/// receiver and no other.
pub fn webhook_client(config: &Config, webhook: &Webhook) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = client_builder(config);
    for certificate in webhook.ca_file.iter().flat_map(|ca| &ca.certificates) {
        builder = builder.add_root_certificate(certificate.clone());
    }
    builder.build()
}

fn client_builder(config: &Config) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(crate::USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.delivery.request_timeout)
        .connect_timeout(config.delivery.request_timeout)
}

/// Sends `body` (already rendered for the webhook's format or template) to
/// `webhook` with the Standard Webhooks headers, signing it for this
/// attempt's timestamp, and the webhook's own headers.
pub async fn send(http: &reqwest::Client, webhook: &Webhook, msg_id: &str, body: String) -> Response {
    let headers = match webhook_headers(webhook, msg_id, body.as_bytes()) {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let request = http.post(webhook.url.clone()).headers(headers).body(body);
    exchange(request, webhook.format, EXCERPT_BYTES).await.0
}

/// The headers of a request to `webhook`: its own extra headers, the
/// content type and the Standard Webhooks headers, signed for now. A stored
/// `webhook-id` that is not a valid header value is a failed attempt (the
/// `Err` answer), not a panic.
pub(super) fn webhook_headers(webhook: &Webhook, msg_id: &str, body: &[u8]) -> Result<HeaderMap, Response> {
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let mut headers = HeaderMap::new();
    // Config loading refused the names the relay sets below, so these never
    // replace a Standard Webhooks header.
    for extra in &webhook.headers {
        headers.insert(extra.name.clone(), extra.value.clone());
    }
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(webhook.content_type()).expect("config loading checked the content type"),
    );
    // The id comes from the database: a corrupt row is a failed attempt, not a panic.
    let Ok(id_header) = HeaderValue::from_str(msg_id) else {
        let error = Some("the stored webhook-id is not a valid header value".to_owned());
        return Err(Response { error, ..Response::default() });
    };
    let text_header = |s: &str| HeaderValue::from_str(s).expect("digits and base64 are valid header values");
    headers.insert("webhook-id", id_header);
    headers.insert("webhook-timestamp", text_header(&timestamp.to_string()));
    if let Some(key) = &webhook.secret {
        headers.insert("webhook-signature", text_header(&key.sign(msg_id, timestamp, body)));
    }
    Ok(headers)
}

/// Sends one prepared request and reads its answer: the status, the
/// rate-limit headers, and up to `read_max` bytes of the body (the first
/// [`EXCERPT_BYTES`] of them are the excerpt kept with the attempt; the
/// live path reads more, to parse the message a chat platform answers).
/// Shared by [`send`] and the live path, so both read answers one way.
pub(super) async fn exchange(request: reqwest::RequestBuilder, format: Format, read_max: usize) -> (Response, Vec<u8>) {
    let result = request.send().await;
    let mut response = match result {
        Ok(r) => r,
        // The URL may be a secret (Slack, Discord): never let it into the message.
        Err(e) => {
            return (Response { error: Some(describe(e)), ..Response::default() }, Vec::new());
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    let quota = Quota::from_headers(response.headers());
    let read_max = read_max.max(EXCERPT_BYTES);
    let mut bytes = Vec::new();
    let mut error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                bytes.extend_from_slice(&chunk[..chunk.len().min(read_max - bytes.len())]);
                if bytes.len() >= read_max {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(describe(e));
                break;
            }
        }
    }
    let excerpt = &bytes[..bytes.len().min(EXCERPT_BYTES)];
    let excerpt = (!excerpt.is_empty()).then(|| String::from_utf8_lossy(excerpt).into_owned());
    // Discord's 429 says how long to wait in its JSON body as well.
    let retry_after = match (retry_after, &excerpt) {
        (None, Some(body)) if status == 429 && format == Format::Discord => retry::retry_after_in_body(body),
        (retry_after, _) => retry_after,
    };
    (Response { status: Some(status), retry_after, excerpt, error, quota }, bytes)
}

pub(super) fn describe(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        text = format!("{text}: {next}");
        cause = next;
    }
    if timeout { format!("timed out: {text}") } else { text }
}

/// Whether an answer asks the relay to slow down rather than says the
/// delivery failed: a 429, or a 503 that says when to come back.
pub fn is_rate_limit(response: &Response) -> bool {
    match response.status {
        Some(429) => true,
        Some(503) => response.retry_after.is_some(),
        _ => false,
    }
}

/// How long a delivery may keep being rate-limited, from its first attempt,
/// without giving up: the schedule's total time (27 hours by default). Each
/// rate-limit wait is at least `RETRY_AFTER_MIN` (1 s), so a receiver that
/// answers 429 forever costs at most one attempt a second for that long,
/// and then the delivery is `failed` like any other that ran out of time.
pub fn rate_limit_budget(schedule: &[Duration]) -> Duration {
    schedule.iter().fold(Duration::ZERO, |total, &d| total.saturating_add(d))
}

/// Decides what an attempt's response means for its delivery, given how many
/// attempts were counted before it and, for a rate-limit answer, when the
/// delivery was first attempted (`None`: this is its first attempt). Pure,
/// so the rule is tested on its own.
pub fn classify(
    response: &Response,
    attempts_before: u32,
    schedule: &[Duration],
    now_ms: i64,
    unit: f64,
    first_attempt_ms: Option<i64>,
) -> DeliveryOutcome {
    // 410 Gone: the receiver is gone for good; pause the whole webhook
    // rather than spend this delivery's retries.
    if response.status == Some(410) {
        return DeliveryOutcome::Paused;
    }
    if let Some(status) = response.status.filter(|_| response.is_success()) {
        return DeliveryOutcome::Delivered { status };
    }
    let error = match (&response.error, response.status) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "no answer".to_owned(),
    };
    let retry_number = attempts_before as usize + 1;
    if is_rate_limit(response) {
        // A receiver asking to slow down has not failed the delivery: wait
        // as asked (bounded to [1 s, 1 h]) without counting a retry, within
        // the schedule's total time from the first attempt.
        let budget = rate_limit_budget(schedule);
        let waited = now_ms.saturating_sub(first_attempt_ms.unwrap_or(now_ms)).max(0);
        if u128::from(waited.unsigned_abs()) >= budget.as_millis() {
            let error = format!("{error}: still rate limited after the retry schedule's total time");
            return DeliveryOutcome::GaveUp { error };
        }
        let wait = response.retry_after.unwrap_or_else(|| {
            // A 429 that does not say how long: the schedule's next wait.
            let scheduled = retry::delivery_retry_delay(schedule, retry_number, None, unit);
            scheduled.or_else(|| schedule.last().copied()).unwrap_or(retry::RETRY_AFTER_MIN)
        });
        let wait = retry::clamp_retry_after(wait);
        return DeliveryOutcome::RateLimited { at_ms: now_ms.saturating_add(millis(wait)), wait, error };
    }
    match retry::delivery_retry_delay(schedule, retry_number, response.retry_after, unit) {
        Some(wait) => DeliveryOutcome::RetryAt { at_ms: now_ms.saturating_add(millis(wait)), error },
        None => DeliveryOutcome::GaveUp { error },
    }
}

/// A duration in whole milliseconds, rounded up (so a wait of 0.4 ms is not
/// a wait of 0 that wakes the loop at once) and saturating: a wait from
/// the config or a receiver never overflows the Unix-ms clock.
pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX)
}
