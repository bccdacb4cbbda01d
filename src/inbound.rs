//! Push assist: the `[inbound]` listener for Dari's own webhook.
//!
//! Dari calls a portal's `webhook_url` when a job ends. Pointed at
//! `POST /v1/dari/webhook`, that call becomes a trigger: the relay polls the
//! job at once ([`PollNow`]) instead of up to `max_poll_interval` later. The
//! posted body is read only for its `job_id` (and the portal, for
//! `auto_watch`); it is never used as the job's state, so a forged or stale
//! body can cause a poll and nothing else. Polling stays the source of truth.
//!
//! This listener is separate from the admin API because it faces the
//! internet: it has one route, no token, and its own limits. In the order
//! they are checked: a per-source rate limit (429 past
//! [`INBOUND_RATE_PER_SOURCE`] a second), the body size (413 past
//! [`INBOUND_MAX_BODY`], from `Content-Length` before anything is read, else
//! as soon as the read passes it), the signature when a key is set (401,
//! compared in constant time by `hmac`'s `verify_slice`), a UUID `job_id`
//! (400). Everything else is answered 202: a watched job's poll is
//! scheduled, a job nobody watches is ignored unless its portal matches
//! `auto_watch`, which watches it as `watch add` would (whole history).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::config::defaults::{INBOUND_MAX_BODY, INBOUND_MAX_SOURCES, INBOUND_RATE_PER_SOURCE};
use crate::metrics::Metrics;
use crate::poller::{PollNow, PollNowError};
use crate::retry::TokenBucket;
use crate::store::{OperatorStore, WatchQuery};
use crate::vocab::{NewWatch, PortalId, WatchState, parse_job_id};

/// The header Dari signs its webhook with.
pub const SIGNATURE_HEADER: &str = "x-webhook-signature";

/// What one request to the listener came to; its label is the `outcome` of
/// `dari_relay_inbound_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A watched job: its poll is scheduled (202).
    Triggered,
    /// A job nobody watched, on an `auto_watch` portal: watched now, and
    /// its poll scheduled (202).
    AutoWatched,
    /// A job not watched (or no longer active): nothing done (202).
    Ignored,
    /// Past the per-source rate, or the poll queue is full (429).
    RateLimited,
    /// The body is larger than [`INBOUND_MAX_BODY`] (413).
    TooLarge,
    /// A key is set and the signature is missing or wrong (401).
    BadSignature,
    /// The body is not JSON with a UUID `job_id` (400).
    BadBody,
    /// The database could not answer, or the poller has stopped (503).
    Unavailable,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Triggered => "triggered",
            Outcome::AutoWatched => "auto_watched",
            Outcome::Ignored => "ignored",
            Outcome::RateLimited => "rate_limited",
            Outcome::TooLarge => "too_large",
            Outcome::BadSignature => "bad_signature",
            Outcome::BadBody => "bad_body",
            Outcome::Unavailable => "unavailable",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Outcome::Triggered | Outcome::AutoWatched | Outcome::Ignored => StatusCode::ACCEPTED,
            Outcome::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Outcome::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::BadSignature => StatusCode::UNAUTHORIZED,
            Outcome::BadBody => StatusCode::BAD_REQUEST,
            Outcome::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The bound inbound listener. Bound by `app::run` (or a test, on port 0)
/// before the loops start, so a bad address fails the start.
pub struct Listener(tokio::net::TcpListener);

impl Listener {
    /// Binds `[inbound] listen`.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
        Ok(Listener(tokio::net::TcpListener::bind(addr).await?))
    }

    /// The address it is bound to (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// What the handler shares. Created by `app`, dropped when the server stops.
#[derive(Clone)]
pub struct InboundState {
    /// The live config: the key and `auto_watch` follow reloads.
    pub config: watch::Receiver<Arc<Config>>,
    /// The database, whichever engine holds it.
    pub store: Arc<dyn OperatorStore>,
    pub metrics: Arc<Metrics>,
    /// Asks the poller to poll a job now.
    pub poll_now: PollNow,
    /// The per-source rate limit.
    pub limiter: Arc<SourceLimiter>,
}

/// Serves `POST /v1/dari/webhook` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: Listener, state: InboundState, shutdown: CancellationToken) -> std::io::Result<()> {
    info!(listen = %listener.local_addr()?, "inbound listener (Dari webhook) listening");
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener.0, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// The one route. Served with connect info, so the rate limit knows the source.
pub fn router(state: InboundState) -> Router {
    Router::new().route("/v1/dari/webhook", post(dari_webhook)).with_state(state)
}

async fn dari_webhook(State(state): State<InboundState>, request: Request) -> Response {
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ConnectInfo(addr)| addr.ip());
    let (outcome, detail) = handle(&state, source, request).await;
    state.metrics.inbound(outcome.label());
    let mut body = json!({"outcome": outcome.label()});
    if let Some(detail) = detail {
        let key = if outcome.status().is_success() { "detail" } else { "error" };
        body[key] = detail.into();
    }
    let mut response = (outcome.status(), axum::Json(body)).into_response();
    if outcome == Outcome::RateLimited {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

/// The checks, in order; returns the outcome and a short explanation.
async fn handle(state: &InboundState, source: IpAddr, request: Request) -> (Outcome, Option<String>) {
    if !state.limiter.allow(source) {
        return (Outcome::RateLimited, Some(format!("at most {INBOUND_RATE_PER_SOURCE} requests a second")));
    }
    let (parts, body) = request.into_parts();
    let too_large = || (Outcome::TooLarge, Some(format!("the body is larger than {INBOUND_MAX_BODY} bytes")));
    if content_length(&parts.headers).is_some_and(|n| n > INBOUND_MAX_BODY as u64) {
        return too_large();
    }
    // Reads at most the limit: a body without Content-Length (chunked) that
    // goes past it is refused as soon as it does, never held whole.
    let Ok(body) = axum::body::to_bytes(body, INBOUND_MAX_BODY).await else {
        return too_large();
    };
    let config = Arc::clone(&state.config.borrow());
    let Some(inbound) = config.inbound.as_ref() else {
        return (Outcome::Unavailable, Some("[inbound] is no longer configured".into()));
    };
    if let Some(key) = &inbound.webhook_key {
        let header = parts.headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
        if !header.is_some_and(|h| signature_matches(key.expose_secret().as_bytes(), &body, h)) {
            warn!(source = %source, signed = header.is_some(), "inbound: refused a Dari webhook with a bad signature");
            return (Outcome::BadSignature, Some(format!("missing or wrong {SIGNATURE_HEADER}")));
        }
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
        return (Outcome::BadBody, Some("the body is not a JSON object".into()));
    };
    let Some(job_id) = fields.get("job_id").and_then(Value::as_str).and_then(|s| parse_job_id(s).ok()) else {
        return (Outcome::BadBody, Some("the body has no UUID job_id".into()));
    };
    let id = job_id.clone();
    let found =
        state.store.query_watches(WatchQuery { job_id: Some(id), limit: Some(1), ..WatchQuery::default() }).await;
    let watch = match found {
        Ok(rows) => rows.into_iter().next(),
        Err(e) => {
            warn!(job_id = %job_id, error = %e, "inbound: cannot read the watch");
            return (Outcome::Unavailable, Some("database error".into()));
        }
    };
    match watch {
        Some(w) if w.state == WatchState::Active.as_str() => match trigger(state, &job_id) {
            Ok(()) => {
                debug!(job_id = %job_id, "inbound: Dari announced a watched job; poll scheduled");
                (Outcome::Triggered, None)
            }
            Err(refused) => refused,
        },
        Some(w) => (Outcome::Ignored, Some(format!("the watch is {}", w.state))),
        None => {
            let portal = announced_portal(parts.uri.query(), &fields);
            let Some(portal) = portal.filter(|p| inbound.auto_watch.iter().any(|g| g.matches(&p.to_string()))) else {
                return (Outcome::Ignored, Some("the job is not watched".into()));
            };
            auto_watch(state, &config, job_id, portal).await
        }
    }
}

/// Watches a job Dari announced on an `auto_watch` portal, as `watch add`
/// would (by the webhooks' portal patterns, its whole history), and polls it.
async fn auto_watch(
    state: &InboundState,
    config: &Config,
    job_id: String,
    portal: PortalId,
) -> (Outcome, Option<String>) {
    let watch =
        NewWatch { job_id: job_id.clone(), portal, webhooks: None, labels: Default::default(), from_now: false };
    if let Err(e) = config.check_watch(&watch) {
        warn!(job_id = %job_id, portal_id = %watch.portal, error = %e.message, "inbound: cannot auto-watch the job");
        return (Outcome::Ignored, Some(format!("cannot watch the job: {}", e.message)));
    }
    let portal_id = watch.portal.to_string();
    if let Err(e) = state.store.add_watches(vec![watch]).await {
        warn!(job_id = %job_id, error = %e, "inbound: cannot store the auto-watch");
        return (Outcome::Unavailable, Some("database error".into()));
    }
    info!(job_id = %job_id, portal_id = %portal_id, "inbound: Dari announced a job on an auto_watch portal; watching it");
    match trigger(state, &job_id) {
        Ok(()) => (Outcome::AutoWatched, None),
        Err(refused) => refused,
    }
}

fn trigger(state: &InboundState, job_id: &str) -> Result<(), (Outcome, Option<String>)> {
    state.poll_now.request(job_id).map_err(|e| match e {
        PollNowError::Busy => (Outcome::RateLimited, Some(e.to_string())),
        PollNowError::Stopped => (Outcome::Unavailable, Some(e.to_string())),
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The portal a webhook names: `?portal=org/endpoint` on the URL (one
/// `webhook_url` per portal makes this reliable), else the body's
/// `portal_id`, else its `org_id` and `endpoint_name`.
pub fn announced_portal(query: Option<&str>, fields: &serde_json::Map<String, Value>) -> Option<PortalId> {
    let from_query = query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| {
        let value = pair.strip_prefix("portal=")?;
        Some(value.replace("%2F", "/").replace("%2f", "/"))
    });
    let text =
        from_query.or_else(|| fields.get("portal_id").and_then(Value::as_str).map(str::to_owned)).or_else(|| {
            let org = fields.get("org_id").and_then(Value::as_str)?;
            let endpoint = fields.get("endpoint_name").and_then(Value::as_str)?;
            Some(format!("{org}/{endpoint}"))
        })?;
    text.parse().ok()
}

/// Whether `header` is the HMAC-SHA256 of `body` under `key`: hex or base64
/// (standard or URL-safe, padded or not), with or without a `sha256=`
/// prefix. The comparison is `hmac`'s constant-time `verify_slice`.
pub fn signature_matches(key: &[u8], body: &[u8], header: &str) -> bool {
    let text = header.trim();
    let text = match text.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256=") => &text[7..],
        _ => text,
    };
    let Some(given) = decode_signature(text) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// The 32 bytes a signature is written as: 64 hex digits, else base64.
fn decode_signature(text: &str) -> Option<Vec<u8>> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..32).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect();
    }
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .filter(|bytes| bytes.len() == 32)
}

/// The per-source rate limit: a token bucket per source address, at most
/// [`INBOUND_MAX_SOURCES`] of them, on the monotonic clock.
#[derive(Debug)]
pub struct SourceLimiter {
    epoch: Instant,
    /// Each source's bucket and when it last asked. A std `Mutex`: held for
    /// a map lookup, never across an await.
    sources: Mutex<HashMap<IpAddr, (TokenBucket, Duration)>>,
}

impl Default for SourceLimiter {
    fn default() -> SourceLimiter {
        SourceLimiter { epoch: Instant::now(), sources: Mutex::default() }
    }
}

impl SourceLimiter {
    /// Whether `source` may send one more request now.
    pub fn allow(&self, source: IpAddr) -> bool {
        self.allow_at(source, Instant::now().saturating_duration_since(self.epoch))
    }

    /// [`SourceLimiter::allow`] at `now` since the limiter's epoch: the
    /// step a test drives with a scripted clock.
    pub fn allow_at(&self, source: IpAddr, now: Duration) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if !sources.contains_key(&source) && sources.len() >= INBOUND_MAX_SOURCES {
            // A bucket idle for a second is full again: forgetting it
            // changes nothing. If every tracked source is busy, a new one
            // waits (429) until one goes quiet; the known ones keep going.
            sources.retain(|_, (_, seen)| now.saturating_sub(*seen) < Duration::from_secs(1));
            if sources.len() >= INBOUND_MAX_SOURCES {
                return false;
            }
        }
        let (bucket, seen) =
            sources.entry(source).or_insert_with(|| (TokenBucket::new(INBOUND_RATE_PER_SOURCE, now), now));
        *seen = now;
        bucket.take(now).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"dari-webhook-key";
    const BODY: &[u8] = br#"{"job_id":"550e8400-e29b-41d4-a716-446655440000","status":"completed"}"#;

    fn mac() -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(KEY).unwrap();
        mac.update(BODY);
        mac.finalize().into_bytes().to_vec()
    }

    #[test]
    fn signatures_in_every_accepted_spelling_match() {
        let bytes = mac();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        for header in [
            hex.clone(),
            hex.to_uppercase(),
            format!("sha256={hex}"),
            format!("SHA256={hex}"),
            b64.clone(),
            format!("sha256={b64}"),
            url,
            format!("  {hex} "),
        ] {
            assert!(signature_matches(KEY, BODY, &header), "{header}");
        }
    }

    #[test]
    fn wrong_or_malformed_signatures_do_not_match() {
        let bytes = mac();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut flipped = bytes.clone();
        flipped[0] ^= 1;
        let flipped_hex: String = flipped.iter().map(|b| format!("{b:02x}")).collect();
        for header in [
            String::new(),
            "sha256=".into(),
            flipped_hex,
            hex[..62].to_owned(),
            format!("{hex}00"),
            "not a signature".into(),
            base64::engine::general_purpose::STANDARD.encode(&bytes[..16]),
        ] {
            assert!(!signature_matches(KEY, BODY, &header), "{header:?}");
        }
        assert!(!signature_matches(b"another key", BODY, &hex));
        assert!(!signature_matches(KEY, b"{}", &hex));
    }

    #[test]
    fn the_portal_comes_from_the_query_then_the_body() {
        let body = |v: Value| v.as_object().unwrap().clone();
        let p = |s: &str| Some(s.parse::<PortalId>().unwrap());
        assert_eq!(announced_portal(Some("portal=acme%2Fform"), &body(json!({"portal_id": "x/y"}))), p("acme/form"));
        assert_eq!(announced_portal(None, &body(json!({"portal_id": "x/y"}))), p("x/y"));
        assert_eq!(announced_portal(None, &body(json!({"org_id": "a", "endpoint_name": "b"}))), p("a/b"));
        assert_eq!(announced_portal(None, &body(json!({"org_id": "a"}))), None);
        assert_eq!(announced_portal(Some("portal=nonsense"), &body(json!({}))), None);
    }

    #[tokio::test]
    async fn a_source_gets_fifty_a_second_and_others_are_not_held_back() {
        let limiter = SourceLimiter::default();
        let (a, b): (IpAddr, IpAddr) = ("203.0.113.1".parse().unwrap(), "203.0.113.2".parse().unwrap());
        let t = Duration::from_millis;
        assert_eq!((0..60).filter(|_| limiter.allow_at(a, t(0))).count(), 50);
        assert!(limiter.allow_at(b, t(0)), "another source has its own bucket");
        assert_eq!((0..10).filter(|_| limiter.allow_at(a, t(100))).count(), 5, "refilled at 50 a second");
    }

    #[tokio::test]
    async fn the_table_of_sources_is_bounded_and_forgets_idle_ones() {
        let limiter = SourceLimiter::default();
        let ip = |i: usize| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
        for i in 0..INBOUND_MAX_SOURCES {
            assert!(limiter.allow_at(ip(i), Duration::ZERO));
        }
        assert!(!limiter.allow_at(ip(INBOUND_MAX_SOURCES), Duration::ZERO), "every tracked source is busy");
        assert!(limiter.allow_at(ip(INBOUND_MAX_SOURCES), Duration::from_secs(1)), "idle sources were forgotten");
        assert!(limiter.sources.lock().unwrap().len() <= INBOUND_MAX_SOURCES);
    }
}
