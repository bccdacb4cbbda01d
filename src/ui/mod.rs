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

pub mod chart;
pub mod session;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::admin::AdminState;
use crate::store::ui::{DeliverySearch, WatchSearch};
use crate::store::{DeliveryState, StoreError, now_ms};
use crate::upstream::{PortalId, parse_job_id};
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
        // TODO(coordinator): "Poll now". When `POST /v1/watches/{job_id}/poll`
        // lands in the admin API, add `.route("/ui/jobs/{job_id}/poll",
        // post(poll_now))` here, a handler that checks the CSRF token as
        // `remove_watch` does and calls the same code as that route, and
        // un-comment the button marked POLL-NOW in templates/job.html.
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

async fn login_page(State(ui): State<Arc<Ui>>, Query(q): Query<HashMap<String, String>>) -> Result<Response, UiError> {
    if ui.token().is_none() {
        return Ok(Redirect::to("/ui/").into_response());
    }
    let html = ui
        .templates
        .get_template("login.html")
        .and_then(|t| t.render(json!({"next": local_page(q.get("next").map(String::as_str)), "error": Value::Null})))
        .map_err(render_error)?;
    Ok(Html(html).into_response())
}

async fn login(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let Some(token) = ui.token() else { return Ok(Redirect::to("/ui/").into_response()) };
    let next = local_page(form.get("next").map(String::as_str));
    let given = form.get("token").map(|t| t.trim()).unwrap_or("");
    if !crate::admin::constant_time_eq(given.as_bytes(), token.as_bytes()) {
        warn!("status page: a login with a wrong token");
        tokio::time::sleep(LOGIN_FAILURE_DELAY).await;
        let html = ui
            .templates
            .get_template("login.html")
            .and_then(|t| t.render(json!({"next": next, "error": "That is not the admin token."})))
            .map_err(render_error)?;
        return Ok((StatusCode::UNAUTHORIZED, Html(html)).into_response());
    }
    let session = ui.sessions.open(session::token_hash(Some(&token)), Instant::now());
    info!("status page: logged in");
    let mut response = Redirect::to(&next).into_response();
    set_cookie(&mut response, Some(&session), behind_tls(&headers));
    Ok(response)
}

async fn logout(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    ui.sessions.close(&session.id);
    let mut response = Redirect::to(if ui.token().is_some() { "/ui/login" } else { "/ui/" }).into_response();
    set_cookie(&mut response, None, behind_tls(&headers));
    Ok(response)
}

// ----- pages ---------------------------------------------------------------

/// The fixed notices a button's redirect may show.
fn notice(q: &HashMap<String, String>) -> Option<&'static str> {
    Some(match q.get("notice")?.as_str() {
        "retried" => "The delivery was put back in the queue; it is sent again shortly.",
        "retried-all" => "Every failed delivery of that webhook was put back in the queue.",
        "resumed" => "The webhook was resumed; its waiting deliveries go out now.",
        "removed" => "The watch was removed; nothing more is polled or announced for it.",
        "nothing" => "Nothing to do: it had changed meanwhile.",
        _ => return None,
    })
}

async fn overview(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let config = Arc::clone(&ui.admin.config.borrow());
    let now = now_ms();
    let store = Arc::clone(&ui.admin.store);
    let (counts, backlog, paused, errors, activity, newest, writable) = store
        .call(move |s| {
            Ok((
                s.watch_counts()?,
                s.webhook_backlog()?,
                s.paused_webhooks()?,
                s.last_errors()?,
                s.activity(now, chart::MINUTES)?,
                s.search_deliveries(&DeliverySearch { limit: NEWEST, ..DeliverySearch::default() })?,
                s.writable(Duration::from_secs(5)),
            ))
        })
        .await?;
    let stale = ui.admin.health.stale();
    let loop_state = |name: &str| {
        stale.iter().find(|p| p.contains(&format!("the {name} loop"))).cloned().unwrap_or_else(|| "running".into())
    };
    let problems = crate::health::problems(&ui.admin.health, &ui.admin.store, Instant::now());
    let mut names: Vec<String> = config.webhooks.iter().map(|w| w.name.clone()).collect();
    names.extend(backlog.keys().filter(|n| !names.contains(n)).cloned().collect::<Vec<_>>());
    let webhooks: Vec<Value> = names
        .iter()
        .map(|name| {
            let configured = config.webhooks.iter().find(|w| &w.name == name);
            let b = backlog.get(name).copied().unwrap_or_default();
            json!({
                "name": name,
                "configured": configured.is_some(),
                "format": configured.map(|w| w.format.as_str()),
                // TODO(coordinator): when adaptive concurrency lands, show its
                // current value here beside the bound (the
                // `dari_relay_webhook_concurrency` gauge's source).
                "max_in_flight": configured.map(|w| w.max_in_flight),
                "max_per_second": configured.and_then(|w| w.max_per_second),
                "paused": paused.get(name).map(|(reason, at)| json!({"reason": reason, "at": at})),
                "pending": b.pending,
                "failed": b.failed,
                "oldest_pending_age": b.oldest_pending.map(|t| ago(now - t)),
                "last_error": errors.get(name),
            })
        })
        .collect();
    let (since, polls) = ui.polls_last_hour(now);
    let mut orgs: Vec<String> = config.orgs.keys().cloned().collect();
    orgs.extend(polls.keys().filter(|o| !orgs.contains(o)).cloned().collect::<Vec<_>>());
    let upstream: Vec<Value> = orgs
        .iter()
        .map(|org| {
            let outcomes = polls.get(org).cloned().unwrap_or_default();
            let total: u64 = outcomes.values().sum();
            let ok: u64 = ["unchanged", "changed"].iter().map(|o| outcomes.get(o).copied().unwrap_or(0)).sum();
            json!({"org": org, "total": total, "ok": ok, "outcomes": outcomes})
        })
        .collect();
    let summary = chart::summary(&activity, now);
    let watch_states: Vec<Value> = ["active", "finished", "failed", "removed"]
        .iter()
        .map(|s| json!({"state": s, "count": counts.get(*s).copied().unwrap_or(0)}))
        .collect();
    let mut context = json!({
        "page": "overview",
        "notice": notice(&q),
        "health": {
            "poller": loop_state("poller"),
            "deliverer": loop_state("deliverer"),
            "database": match &writable { Ok(()) => "writable".to_owned(), Err(e) => format!("not writable: {e}") },
            "problems": problems,
            "uptime": ago(ui.started.elapsed().as_millis() as i64),
        },
        "watches": watch_states,
        "webhooks": webhooks,
        "upstream": upstream,
        "upstream_window": ago(now - since),
        "summary": summary,
        "newest": newest,
    });
    // The chart is markup made from numbers only (chart.rs): inserted as is.
    context["chart_svg"] = chart::svg(&activity, now).into();
    ui.render("overview.html", &session, context)
}

/// Reads the watches page's search box: a job id (UUID), a portal
/// (`org/endpoint`), or a label (`key=value`).
fn parse_search(q: &str) -> Result<WatchSearch, UiError> {
    let q = q.trim();
    let mut search = WatchSearch::default();
    if q.is_empty() {
        return Ok(search);
    }
    if let Ok(job) = parse_job_id(q) {
        search.job_id = Some(job);
    } else if let Some((k, v)) = q.split_once('=') {
        search.label = Some((k.trim().to_owned(), v.trim().to_owned()));
    } else if q.contains('/') {
        let portal: PortalId = q.parse().map_err(|e: String| UiError::new(StatusCode::BAD_REQUEST, e))?;
        search.portal_id = Some(portal.to_string());
    } else {
        return Err(UiError::new(
            StatusCode::BAD_REQUEST,
            format!("search for a job id (a UUID), a portal (org/endpoint) or a label (key=value), not {q:?}"),
        ));
    }
    Ok(search)
}

async fn watches(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let text = q.get("q").cloned().unwrap_or_default();
    if text.len() > 512 {
        return Err(UiError::new(StatusCode::BAD_REQUEST, "the search is longer than 512 characters"));
    }
    let mut search = parse_search(&text)?;
    let state = q.get("state").filter(|s| !s.is_empty()).cloned();
    if let Some(s) = &state
        && !["active", "finished", "failed", "removed"].contains(&s.as_str())
    {
        return Err(UiError::new(StatusCode::BAD_REQUEST, "state is one of active, finished, failed, removed"));
    }
    search.state = state.clone();
    search.after = match q.get("after").filter(|s| !s.is_empty()) {
        Some(a) => Some(a.parse().map_err(|_| UiError::new(StatusCode::BAD_REQUEST, "after is a number"))?),
        None => None,
    };
    search.limit = PAGE + 1;
    let mut rows = ui.admin.store.call(move |s| s.search_watches(&search)).await?;
    let more = rows.len() > PAGE;
    rows.truncate(PAGE);
    let next = more.then(|| {
        let mut query = format!(
            "{}&{}",
            serde_urlencoded_pair("q", &text),
            serde_urlencoded_pair("state", state.as_deref().unwrap_or(""))
        );
        query.push_str(&format!("&after={}", rows.last().map_or(0, |w| w.seq)));
        format!("/ui/watches?{query}")
    });
    let context =
        json!({"page": "watches", "notice": notice(&q), "q": text, "state": state, "rows": rows, "next": next});
    ui.render("watches.html", &session, context)
}

/// A link from Dari's answer, if it is one a browser should follow.
fn http_link(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    (s.starts_with("https://") || s.starts_with("http://")).then(|| s.to_owned())
}

fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

async fn job(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(job_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let job_id = parse_job_id(&job_id).map_err(|e| UiError::new(StatusCode::BAD_REQUEST, e))?;
    let after = match q.get("after").filter(|s| !s.is_empty()) {
        Some(a) => a.parse::<i64>().map_err(|_| UiError::new(StatusCode::BAD_REQUEST, "after is a number"))?,
        None => 0,
    };
    let id = job_id.clone();
    let (watch, mut timeline, total) = ui
        .admin
        .store
        .call(move |s| {
            let watch =
                s.search_watches(&WatchSearch { job_id: Some(id.clone()), limit: 1, ..WatchSearch::default() })?;
            Ok((watch.into_iter().next(), s.job_timeline(&id, after, TIMELINE + 1)?, s.notification_count(&id)?))
        })
        .await?;
    let more = timeline.len() > TIMELINE;
    timeline.truncate(TIMELINE);
    let next = more.then(|| format!("/ui/jobs/{job_id}?after={}", timeline.last().map_or(0, |n| n.id)));
    let Some(watch) = watch else {
        return Err(UiError::new(StatusCode::NOT_FOUND, format!("no watch of job {job_id}")));
    };
    let mut links = BTreeMap::new();
    let notifications: Vec<Value> = timeline
        .iter()
        .map(|n| {
            let body: Value = serde_json::from_str(&n.body).unwrap_or(Value::Null);
            let data = &body["data"];
            for key in ["browser_url", "video_recording_url", "log_url"] {
                if let Some(link) = http_link(&data[key]) {
                    links.insert(key, link);
                }
            }
            let pretty = serde_json::to_string_pretty(data).unwrap_or_default();
            json!({
                "id": n.id,
                "type": n.kind,
                "created_at": n.created_at,
                "status": data["status"],
                "previous_status": data["previous_status"],
                "current_step": data["current_step"],
                "event": data.get("event"),
                "error": data["error"],
                "reason": data["reason"],
                "data": excerpt(&pretty, BODY_EXCERPT),
                "deliveries": n.deliveries.iter().map(|d| json!({
                    "id": d.id,
                    "webhook": d.webhook,
                    "msg_id": d.msg_id,
                    "state": d.state,
                    "attempts": d.attempts,
                    "next_attempt_at": d.next_attempt_at,
                    "last_error": d.last_error,
                    "tries": d.tries.iter().map(|a| json!({
                        "attempted_at": a.attempted_at,
                        "duration_ms": a.duration_ms,
                        "http_status": a.http_status,
                        "error": a.error,
                        "response": a.response_excerpt.as_deref().map(|r| excerpt(r, 300)),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let context = json!({
        "page": "job",
        "notice": notice(&q),
        "watch": watch,
        "links": links,
        "notifications": notifications,
        "total": total,
        "shown": timeline.len(),
        "paged": after > 0 || more,
        "next": next,
        "back": format!("/ui/jobs/{job_id}"),
    });
    ui.render("job.html", &session, context)
}

async fn deliveries(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let status = q.get("status").map(String::as_str).unwrap_or("failed");
    let state = match status {
        "all" => None,
        s => Some(DeliveryState::parse(s).ok_or_else(|| {
            UiError::new(StatusCode::BAD_REQUEST, "status is one of pending, delivered, failed, all")
        })?),
    };
    let webhook = q.get("webhook").filter(|w| !w.is_empty()).cloned();
    if webhook.as_ref().is_some_and(|w| w.len() > 200) {
        return Err(UiError::new(StatusCode::BAD_REQUEST, "webhook names are shorter than that"));
    }
    let job_id = match q.get("job_id").filter(|j| !j.trim().is_empty()) {
        Some(j) => Some(parse_job_id(j).map_err(|e| UiError::new(StatusCode::BAD_REQUEST, e))?),
        None => None,
    };
    let before = match q.get("before").filter(|s| !s.is_empty()) {
        Some(b) => Some(b.parse::<i64>().map_err(|_| UiError::new(StatusCode::BAD_REQUEST, "before is a number"))?),
        None => None,
    };
    let search = DeliverySearch { state, webhook: webhook.clone(), job_id: job_id.clone(), before, limit: PAGE + 1 };
    let (mut rows, paused, backlog) = ui
        .admin
        .store
        .call(move |s| Ok((s.search_deliveries(&search)?, s.paused_webhooks()?, s.webhook_backlog()?)))
        .await?;
    let more = rows.len() > PAGE;
    rows.truncate(PAGE);
    let mut base = format!("/ui/deliveries?{}", serde_urlencoded_pair("status", status));
    if let Some(w) = &webhook {
        base.push_str(&format!("&{}", serde_urlencoded_pair("webhook", w)));
    }
    if let Some(j) = &job_id {
        base.push_str(&format!("&job_id={j}"));
    }
    let next = more.then(|| format!("{base}&before={}", rows.last().map_or(0, |d| d.id)));
    let failed_by_webhook: Vec<Value> = backlog
        .iter()
        .filter(|(_, b)| b.failed > 0)
        .map(|(name, b)| json!({"name": name, "failed": b.failed}))
        .collect();
    let paused: Vec<Value> =
        paused.into_iter().map(|(name, (reason, at))| json!({"name": name, "reason": reason, "at": at})).collect();
    let context = json!({
        "page": "deliveries",
        "notice": notice(&q),
        "status": status,
        "webhook": webhook,
        "job_id": job_id,
        "rows": rows,
        "next": next,
        "paused": paused,
        "failed_by_webhook": failed_by_webhook,
        "back": base,
    });
    ui.render("deliveries.html", &session, context)
}

// ----- buttons -------------------------------------------------------------

async fn retry_delivery(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let id: i64 = id
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| UiError::new(StatusCode::BAD_REQUEST, "a delivery id is a positive number"))?;
    let requeued = ui.admin.store.call(move |s| s.retry_failed(Some(id))).await?;
    info!(delivery_id = id, requeued, "status page: retry pressed");
    Ok(back(&form, if requeued > 0 { "retried" } else { "nothing" }))
}

async fn retry_webhook(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let webhook = name.clone();
    let requeued = ui.admin.store.call(move |s| s.retry_failed_of_webhook(&webhook)).await?;
    info!(webhook = %name, requeued, "status page: retry all failed pressed");
    Ok(back(&form, if requeued > 0 { "retried-all" } else { "nothing" }))
}

async fn resume_webhook(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let webhook = name.clone();
    let resumed = ui.admin.store.call(move |s| s.resume_webhook(&webhook)).await?;
    info!(webhook = %name, resumed, "status page: resume pressed");
    Ok(back(&form, if resumed { "resumed" } else { "nothing" }))
}

async fn remove_watch(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(job_id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let job_id = parse_job_id(&job_id).map_err(|e| UiError::new(StatusCode::BAD_REQUEST, e))?;
    let id = job_id.clone();
    let removed = ui.admin.store.call(move |s| s.remove_watch(&id)).await?;
    info!(job_id = %job_id, removed, "status page: remove pressed");
    Ok(back(&form, if removed { "removed" } else { "nothing" }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
