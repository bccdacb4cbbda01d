//! The status page: `/ui/` on the admin listener, HTML rendered on the
//! server from templates compiled into the binary (minijinja), one CSS file
//! and a few lines of JavaScript, all served from here: no build step, no
//! CDN. Every page reads fine with JavaScript off (a `<noscript>` refresh
//! stands in for the script's); the script only refreshes the page in place
//! and asks before the buttons that cannot be undone.
//!
//! Pages: the overview (`/ui/`), watches with search and paging
//! (`/ui/watches`), one job's timeline (`/ui/jobs/{job_id}`), deliveries
//! with the dead letters by default (`/ui/deliveries`), and the login
//! (`/ui/login`). Buttons are forms that POST with the session's CSRF token
//! ([`session`]): Retry one delivery or all failed of a webhook, Resume a
//! paused webhook, Remove a watch, Log out. Every query is bounded
//! ([`crate::store::ui`]): pages list at most [`PAGE`] rows and go on with a
//! cursor.
//!
//! What never appears on a page: API keys, signing secrets, the admin
//! token, webhook URLs (from `url` or `url_env`: the page names webhooks
//! only) and extra header values. The only URLs shown as links are the
//! job's own `browser_url`, `video_recording_url` and `log_url` from Dari,
//! and only when they are `http(s)://`.
//!
//! The admin API's `refuse_browsers` guard runs before all of this (Host,
//! Origin, `Sec-Fetch-Site`); its JSON-body rule does not apply under
//! `/ui/`, whose POSTs are forms: the CSRF token and `SameSite=Strict` do
//! that job here.

mod actions;
use actions::*;
pub mod chart;
mod pages;
use pages::*;
pub mod session;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use secrecy::ExposeSecret;
use serde_json::Value;
use tracing::warn;

use crate::admin::AdminState;
use crate::store::StoreError;
use crate::vocab::now_ms;
use session::{Session, Sessions};

/// Rows per page of a list.
pub const PAGE: usize = 50;
/// Notifications per page of a job's timeline.
pub const TIMELINE: usize = 100;
/// The newest deliveries on the overview.
const NEWEST: usize = 15;
/// How often the overview's per-org poll counters are sampled (at most):
/// the "last hour" is the difference with the sample taken an hour ago.
const SAMPLE_EVERY: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
/// Longest text of a notification's body shown on a job page.
const BODY_EXCERPT: usize = 4096;
/// A failed login waits this long before answering, so guessing the token
/// through the page is no faster than through the API's 401s.
const LOGIN_FAILURE_DELAY: Duration = Duration::from_millis(300);

/// What the pages share. Created by [`router`], dropped with the server.
pub struct Ui {
    admin: AdminState,
    sessions: Sessions,
    templates: Environment<'static>,
    /// When the status page (and so the admin listener) started: the uptime.
    started: Instant,
    /// (Unix ms, every org's poll counters) at most every [`SAMPLE_EVERY`],
    /// for an hour and one more: the upstream outcomes of the last hour.
    samples: Mutex<VecDeque<PollSample>>,
}

type PollSample = (i64, BTreeMap<String, BTreeMap<&'static str, u64>>);

/// The `/ui` routes, with their session check. They carry their own state,
/// so the admin router can merge them as they are.
pub fn router<S: Clone + Send + Sync + 'static>(admin: AdminState) -> Router<S> {
    let ui = Arc::new(Ui {
        samples: Mutex::new(VecDeque::from([(now_ms(), admin.metrics.polls_by_org())])),
        admin,
        sessions: Sessions::default(),
        templates: templates(),
        started: Instant::now(),
    });
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(overview))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/watches", get(watches))
        .route("/ui/jobs/{job_id}", get(job))
        .route("/ui/jobs/{job_id}/remove", post(remove_watch))
        .route("/ui/jobs/{job_id}/poll", post(poll_now))
        .route("/ui/deliveries", get(deliveries))
        .route("/ui/deliveries/{id}/retry", post(retry_delivery))
        .route("/ui/webhooks/{name}/retry", post(retry_webhook))
        .route("/ui/webhooks/{name}/resume", post(resume_webhook))
        .route("/ui/static/style.css", get(|| async { asset("text/css; charset=utf-8", include_str!("style.css")) }))
        .route("/ui/static/ui.js", get(|| async { asset("text/javascript; charset=utf-8", include_str!("ui.js")) }))
        .layer(middleware::from_fn_with_state(Arc::clone(&ui), require_session))
        .with_state(ui)
}

/// The templates, compiled once. Names end in `.html`, so minijinja escapes
/// every value for HTML unless it is marked safe (only the chart's SVG is).
fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("login.html", include_str!("templates/login.html")),
        ("overview.html", include_str!("templates/overview.html")),
        ("watches.html", include_str!("templates/watches.html")),
        ("job.html", include_str!("templates/job.html")),
        ("deliveries.html", include_str!("templates/deliveries.html")),
    ] {
        env.add_template(name, text).expect("the embedded templates compile (checked by the tests)");
    }
    env.add_filter("when", |ms: i64| when(ms));
    env.add_filter("ago", |ms: i64| ago(now_ms() - ms));
    env.add_filter("ms", |ms: i64| chart::short_ms(ms as f64));
    // Percent-encoding for a path segment or query value (webhook names).
    env.add_filter("urlencode", |s: String| percent_encode(&s));
    env
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// A Unix-ms time as `2026-12-02 13:40:05Z`.
fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string().replace('T', " ")
}

/// A duration in milliseconds, the way a person says it.
fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A page's error: its status and what to tell the operator.
#[derive(Debug)]
pub struct UiError {
    status: StatusCode,
    message: String,
}

impl UiError {
    fn new(status: StatusCode, message: impl Into<String>) -> UiError {
        UiError { status, message: message.into() }
    }
}

impl From<StoreError> for UiError {
    fn from(e: StoreError) -> UiError {
        warn!(error = %e, "status page: database error");
        UiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}"))
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        // A plain page, rendered without a session (it may be the reason).
        let text = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>dari-relay: error</title><link rel=\"stylesheet\" href=\"/ui/static/style.css\"></head><body><main><h1>{}</h1><p role=\"alert\">{}</p><p><a href=\"/ui/\">Back to the overview</a></p></main></body></html>",
            self.status,
            minijinja::HtmlEscape(&self.message)
        );
        (self.status, Html(text)).into_response()
    }
}

impl Ui {
    /// The admin token in force (a reload may rotate it; the listener's own
    /// is the fallback, as for the API).
    fn token(&self) -> Option<String> {
        let config = self.admin.config.borrow();
        config
            .admin
            .as_ref()
            .and_then(|a| a.token.as_ref())
            .or(self.admin.startup_token.as_ref())
            .map(|t| t.expose_secret().to_owned())
    }

    fn render(&self, name: &str, session: &Session, mut context: Value) -> Result<Response, UiError> {
        context["csrf"] = session.csrf.clone().into();
        context["version"] = env!("CARGO_PKG_VERSION").into();
        context["login"] = self.token().is_some().into();
        let template = self.templates.get_template(name).map_err(render_error)?;
        let html = template.render(context).map_err(render_error)?;
        Ok(([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response())
    }

    /// The per-org poll outcomes since the baseline sample (the newest one
    /// at least an hour old, else the first), and the baseline's time.
    fn polls_last_hour(&self, now: i64) -> (i64, BTreeMap<String, BTreeMap<&'static str, u64>>) {
        let current = self.admin.metrics.polls_by_org();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.back().is_none_or(|(at, _)| now - at >= SAMPLE_EVERY) {
            samples.push_back((now, current.clone()));
        }
        // Keep one sample at or before an hour ago (the baseline) and the
        // ones since.
        while samples.len() > 1 && samples.get(1).is_some_and(|(at, _)| *at <= now - HOUR_MS) {
            samples.pop_front();
        }
        let (since, baseline) = samples.front().cloned().unwrap_or((now, BTreeMap::new()));
        let delta = current
            .into_iter()
            .map(|(org, outcomes)| {
                let base = baseline.get(&org);
                let outcomes = outcomes
                    .into_iter()
                    .map(|(o, n)| (o, n.saturating_sub(base.and_then(|b| b.get(o)).copied().unwrap_or(0))))
                    .filter(|(_, n)| *n > 0)
                    .collect();
                (org, outcomes)
            })
            .collect();
        // Normally about an hour; longer when nobody looked at the page
        // for a while (no sample was taken in between), shorter after a
        // start. The page says which.
        (since, delta)
    }
}

fn render_error(e: minijinja::Error) -> UiError {
    warn!(error = %e, "status page: a template failed");
    UiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered")
}

/// Whether the request came through TLS (a proxy in front says so).
fn behind_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// Finds the request's session, or answers for it: a page without one goes
/// to the login (or, without a token, gets a new session); a POST without
/// one is refused (403), since it cannot carry a CSRF token of a session.
async fn require_session(State(ui): State<Arc<Ui>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.starts_with("/ui/static/") || path == "/ui/login" || path == "/ui" {
        return next.run(request).await;
    }
    let now = Instant::now();
    let token = session::token_hash(ui.token().as_deref());
    let found = session::cookie_value(request.headers()).and_then(|id| ui.sessions.get(&id, token, now));
    if let Some(session) = found {
        request.extensions_mut().insert(session);
        return next.run(request).await;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        warn!(path = %path, "status page: refused a POST without a session");
        return UiError::new(StatusCode::FORBIDDEN, "no session: open the page again (and log in) first")
            .into_response();
    }
    if token.is_some() {
        let next_page = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/ui/".into());
        let query = serde_urlencoded_pair("next", &next_page);
        return Redirect::to(&format!("/ui/login?{query}")).into_response();
    }
    let secure = behind_tls(request.headers());
    let session = ui.sessions.open(None, now);
    request.extensions_mut().insert(session.clone());
    let mut response = next.run(request).await;
    set_cookie(&mut response, Some(&session), secure);
    response
}

fn set_cookie(response: &mut Response, session: Option<&Session>, secure: bool) {
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie(session, secure)) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// `key=value`, form-encoded.
fn serde_urlencoded_pair(key: &str, value: &str) -> String {
    format!("{key}={}", percent_encode(value))
}

/// Every byte but the unreserved ones, percent-encoded.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Where to go after a login or a button: a page of the status page only
/// (never another site: `//host` and `/ui/..` tricks are refused).
fn local_page(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.contains("//") && !n.contains('\\') && !n.contains("..") => n.to_owned(),
        _ => "/ui/".to_owned(),
    }
}

/// The CSRF check of every button.
fn check_csrf(session: &Session, form: &HashMap<String, String>) -> Result<(), UiError> {
    if session.csrf_ok(form.get("csrf").map(String::as_str)) {
        Ok(())
    } else {
        warn!("status page: refused a POST without its CSRF token");
        Err(UiError::new(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or stale: reload the page and try again",
        ))
    }
}

/// After a button: back to the page it was pressed on, with a notice.
fn back(form: &HashMap<String, String>, notice: &str) -> Response {
    let page = local_page(form.get("back").map(String::as_str));
    let sep = if page.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{page}{sep}{}", serde_urlencoded_pair("notice", notice))).into_response()
}

// ----- login ---------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ui::WatchSearch;
    use serde_json::json;

    #[test]
    fn templates_compile() {
        let env = templates();
        for name in ["base.html", "login.html", "overview.html", "watches.html", "job.html", "deliveries.html"] {
            assert!(env.get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn redirects_stay_on_the_status_page() {
        assert_eq!(local_page(Some("/ui/jobs/x?notice=1")), "/ui/jobs/x?notice=1");
        for bad in ["https://evil.example/", "//evil.example/ui/", "/ui//evil", "/ui/../v1/watches", "/v1/x", "/ui\\x"]
        {
            assert_eq!(local_page(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(local_page(None), "/ui/");
    }

    #[test]
    fn search_box() {
        let s = parse_search("550E8400-E29B-41D4-A716-446655440000").unwrap();
        assert_eq!(s.job_id.as_deref(), Some("550e8400-e29b-41d4-a716-446655440000"));
        assert_eq!(parse_search("acme/form").unwrap().portal_id.as_deref(), Some("acme/form"));
        assert_eq!(parse_search(" customer = acme ").unwrap().label, Some(("customer".into(), "acme".into())));
        assert!(parse_search("hello").is_err());
        assert_eq!(parse_search("").unwrap(), WatchSearch::default());
    }

    #[test]
    fn durations_and_links() {
        assert_eq!(ago(59_000), "59s");
        assert_eq!(ago(61_000), "1m 1s");
        assert_eq!(ago(3_600_000 * 25), "1d 1h");
        assert_eq!(http_link(&json!("javascript:alert(1)")), None);
        assert_eq!(http_link(&json!("https://x.example/v")), Some("https://x.example/v".into()));
        assert_eq!(excerpt("ééé", 3), "é…");
        assert_eq!(serde_urlencoded_pair("q", "a b/é"), "q=a%20b%2F%C3%A9");
    }
}
