//! The admin HTTP API (axum), enabled by `[admin] listen`.
//!
//! Routes, all JSON but `/metrics`:
//! - `POST /v1/watches`, `GET /v1/watches`, `GET /v1/watches/{job_id}`,
//!   `DELETE /v1/watches/{job_id}`: the same watches as `dari-relay watch`,
//!   with the same rules ([`Config::check_watch`]).
//! - `GET /v1/deliveries`, `POST /v1/deliveries/{id}/retry`.
//! - `POST /v1/watches/{job_id}/poll`: polls an active watch now (the
//!   same trigger as Dari's webhook on the inbound listener).
//! - `POST /v1/jobs/{org_id}/{endpoint_name}/start`: starts a Dari job with
//!   the org's key and watches it in the same call.
//! - `GET /healthz` (alive), `GET /readyz` (database writable, loops making
//!   progress), `GET /metrics` (Prometheus text).
//! - `/ui/...`: the status page (`ui`, merged in by `app`), which checks its own
//!   session and CSRF token instead of the bearer token; the browser checks
//!   below apply to it too, but for the JSON-body rule (its POSTs are forms).
//!
//! Every request needs `Authorization: Bearer <token>` when a token is
//! configured; config loading refuses a non-local listener without one.
//! Before that, [`refuse_browsers`] turns away what a web page in the
//! operator's browser could send: a `Host` that is not the API's own (DNS
//! rebinding), an `Origin` of another site or `Sec-Fetch-Site: cross-site`
//! (403), and a body that is not JSON (415: the content types a page may
//! POST without asking, such as `text/plain`). Bodies over [`MAX_BODY`] are
//! refused with 413. The API never sends webhooks: it writes to the store,
//! and the deliverer does the rest.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ListenAddr, split_host_port};
use crate::health::Health;
use crate::metrics::{Metrics, Snapshot};
use crate::store::{Store, StoreError, WatchQuery};
use crate::upstream::UpstreamClient;
use crate::vocab::{DeliveryState, NewWatch, PortalId, WatchState, now_ms, parse_job_id};

/// How long `/readyz` trusts its last look at whether the database takes writes.
const WRITABLE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Page size of `GET /v1/watches` unless `limit` says otherwise, and its maximum.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// What the handlers share. Created by `app`, dropped when the server stops.
#[derive(Clone)]
pub struct AdminState {
    /// The live config (reloads included).
    pub config: watch::Receiver<Arc<Config>>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Asks the poller to poll a watch now (`POST /v1/watches/{job_id}/poll`).
    pub poll_now: crate::poller::PollNow,
    /// The token in force when the listener was bound (see [`Listener`]);
    /// set by [`serve`].
    pub startup_token: Option<secrecy::SecretString>,
}

/// A bound admin listener, with the token in force when it was bound.
pub struct Listener {
    socket: Socket,
    /// A reload may change the token but never remove it: the listener stays
    /// bound where it was, so dropping auth would expose it (even on a public
    /// address). Captured here, at bind time, so no reload can race it.
    token: Option<secrecy::SecretString>,
}

enum Socket {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Binds `[admin] listen`, keeping its token.
    pub async fn bind_admin(admin: &crate::config::Admin) -> std::io::Result<Listener> {
        Listener::bind(&admin.listen, admin.token.clone()).await
    }

    /// Binds `addr`. A Unix socket left over from an earlier run is replaced,
    /// and the new one is made 0660 so only the service's user and group use it.
    pub async fn bind(addr: &ListenAddr, token: Option<secrecy::SecretString>) -> std::io::Result<Listener> {
        let socket = Listener::socket(addr).await?;
        Ok(Listener { socket, token })
    }

    async fn socket(addr: &ListenAddr) -> std::io::Result<Socket> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Socket::Tcp(tokio::net::TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Socket::Unix(listener))
            }
        }
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Socket::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_default(),
        }
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled, with the
/// routes `pages` makes (the status page, which `app` supplies: the admin
/// API does not import it) merged in behind the browser checks but not the
/// bearer token: they check their own session.
pub async fn serve(
    listener: Listener,
    mut state: AdminState,
    pages: impl FnOnce(AdminState) -> Router<AdminState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    info!(listen = %listener.describe(), "admin API listening");
    state.startup_token = listener.token;
    let bound = match &listener.socket {
        Socket::Tcp(l) => Some(l.local_addr()?),
        Socket::Unix(_) => None,
    };
    let pages = pages(state.clone());
    let app = router(state, bound, pages);
    match listener.socket {
        Socket::Tcp(l) => axum::serve(l, app).with_graceful_shutdown(shutdown.cancelled_owned()).await,
        Socket::Unix(l) => axum::serve(l, app).with_graceful_shutdown(shutdown.cancelled_owned()).await,
    }
}

/// The routes, with the browser checks, auth and the body limit. `bound` is
/// the TCP address the listener is bound to (its port is what `Host` must
/// name), `None` on a Unix socket.
pub fn router(state: AdminState, bound: Option<SocketAddr>, pages: Router<AdminState>) -> Router {
    Router::new()
        .route("/v1/watches", post(create_watch).get(list_watches))
        .route("/v1/watches/{job_id}", get(get_watch).delete(delete_watch))
        .route("/v1/watches/{job_id}/poll", post(poll_watch))
        .route("/v1/deliveries", get(list_deliveries))
        .route("/v1/deliveries/{id}/retry", post(retry_delivery))
        .route("/v1/jobs/{org_id}/{endpoint_name}/start", post(start_job))
        .route("/healthz", get(|| async { Json(json!({"status": "alive"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        // The status page checks its own session (and CSRF token) instead
        // of the bearer token; the browser checks below still apply to it.
        .merge(pages)
        // Added last, so it runs first: a browser's request is refused
        // before anything else looks at it.
        .layer(middleware::from_fn_with_state((state.clone(), bound), refuse_browsers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// A JSON response.
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0.to_string()).into_response()
    }
}

/// An error response: `{"error": ..., "field": ...}` with a status.
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn bad(field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), field: Some(field) }
    }

    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), field: None }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        warn!(error = %e, "admin API: database error");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message});
        if let Some(field) = self.field {
            body["field"] = field.into();
        }
        (self.status, Json(body)).into_response()
    }
}

/// Refuses requests without the configured bearer token.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let config = Arc::clone(&state.config.borrow());
    let Some(token) = config.admin.as_ref().and_then(|a| a.token.as_ref()).or(state.startup_token.as_ref()) else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose_secret().as_bytes()) {
        next.run(request).await
    } else {
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "a valid Authorization: Bearer token is required").into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static header value"));
        response
    }
}

/// Refuses what a web page in the operator's browser could make the browser
/// send, token or not (a page cannot read the token, but without one the
/// loopback address was all that stood between a page and a paid job):
///
/// - a `Host` (or HTTP/2 authority) other than the listener's own address,
///   `localhost`, `127.0.0.1` or `[::1]` with the listener's port, or a name
///   in `[admin] allowed_hosts`: 403. This defeats DNS rebinding, where a
///   page's own name is pointed at 127.0.0.1 and the page then reads the
///   API as same-origin. A Unix socket has no host to check (a browser
///   cannot reach it), so only configured names count there for `Origin`.
/// - an `Origin` that is not one of those hosts (including `null`), or
///   `Sec-Fetch-Site` other than `same-origin` or `none`: 403.
/// - a request with a body whose `content-type` is not JSON: 415. Browsers
///   send `text/plain`, form and multipart bodies cross-site without a
///   preflight; a JSON content type always needs one, which this API never
///   answers.
async fn refuse_browsers(
    State((state, bound)): State<(AdminState, Option<SocketAddr>)>,
    request: Request,
    next: Next,
) -> Response {
    let config = Arc::clone(&state.config.borrow());
    let names: &[String] = config.admin.as_ref().map_or(&[], |a| a.allowed_hosts.as_slice());
    let headers = request.headers();
    if let Some(bound) = bound {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.to_string()));
        let Some(host) = host else {
            return ApiError::new(StatusCode::BAD_REQUEST, "a Host header is required").into_response();
        };
        if !host_allowed(&host, 80, Some(bound), names) {
            warn!(host = %host, "admin API: refused a request for a foreign Host");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!("Host {host:?} is not this API's address; add it to [admin] allowed_hosts if it should be"),
            )
            .into_response();
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if !origin_allowed(origin, bound, names) {
            warn!(origin = %origin, "admin API: refused a cross-origin request");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-origin requests are refused (Origin {origin:?})"),
            )
            .into_response();
        }
    }
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        warn!(sec_fetch_site = ?site, "admin API: refused a cross-site request");
        return ApiError::new(StatusCode::FORBIDDEN, "cross-site requests are refused").into_response();
    }
    // The status page's POSTs are forms; its CSRF token and SameSite=Strict
    // session cookie refuse what another site's page could send there.
    let status_page = request.uri().path().starts_with("/ui/");
    if !status_page && has_body(&request) && !is_json(headers.get(header::CONTENT_TYPE)) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a request body must be sent as content-type: application/json",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether the authority `host` (`name[:port]`, `default_port` when it has
/// none) is the listener's own address, localhost, or a configured name.
/// A configured name without a port matches any port.
fn host_allowed(host: &str, default_port: u16, bound: Option<SocketAddr>, names: &[String]) -> bool {
    let Some((name, port)) = split_host_port(host) else { return false };
    let name = name.to_ascii_lowercase();
    let port = port.unwrap_or(default_port);
    let configured = names.iter().any(|allowed| match split_host_port(allowed) {
        Some((n, p)) => n == name && p.is_none_or(|p| p == port),
        None => false,
    });
    let own = bound.is_some_and(|bound| {
        let ip = name.parse::<IpAddr>().ok();
        port == bound.port()
            && (name == "localhost"
                || ip.is_some_and(|ip| ip.is_loopback() || ip == bound.ip())
                // Bound to every address: any IP literal is this machine's
                // (a rebinding attack needs a name, never an IP literal).
                || (bound.ip().is_unspecified() && ip.is_some()))
    });
    configured || own
}

/// Whether an `Origin` header names an allowed host (`null` never does).
fn origin_allowed(origin: &str, bound: Option<SocketAddr>, names: &[String]) -> bool {
    // The API itself speaks plain HTTP, so an https:// origin can only be a
    // configured name (a TLS proxy in front of it).
    let (authority, default_port, bound) = if let Some(rest) = origin.strip_prefix("http://") {
        (rest, 80, bound)
    } else if let Some(rest) = origin.strip_prefix("https://") {
        (rest, 443, None)
    } else {
        return false;
    };
    !authority.contains('/') && host_allowed(authority, default_port, bound, names)
}

/// Whether a request carries a body: a non-zero `content-length`, a
/// `transfer-encoding`, or (HTTP/2) a body stream that is not empty.
fn has_body(request: &Request) -> bool {
    use axum::body::HttpBody as _;
    let headers = request.headers();
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) => n > 0,
        None => headers.contains_key(header::TRANSFER_ENCODING) || !request.body().is_end_stream(),
    }
}

/// Whether a `content-type` is JSON: `application/json` or
/// `application/<anything>+json`, parameters (`; charset=utf-8`) allowed.
fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Compares without stopping at the first difference, so response timing
/// says nothing about how much of a guessed token was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a watch from a JSON object, naming the field at fault.
fn parse_watch(config: &Config, body: &Value, portal: Option<PortalId>) -> Result<NewWatch, ApiError> {
    let Value::Object(fields) = body else {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    };
    let allowed = ["portal_id", "job_id", "webhooks", "labels", "from_now"];
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad("body", format!("unknown field {unknown:?}")));
    }
    let portal = match portal {
        Some(p) => p,
        None => match fields.get("portal_id") {
            Some(Value::String(s)) => s.parse().map_err(|e: String| ApiError::bad("portal_id", e))?,
            _ => return Err(ApiError::bad("portal_id", "portal_id is required: \"<org_id>/<endpoint_name>\"")),
        },
    };
    let job_id = match fields.get("job_id") {
        Some(Value::String(s)) => parse_job_id(s).map_err(|e| ApiError::bad("job_id", e))?,
        _ => return Err(ApiError::bad("job_id", "job_id is required: a UUID")),
    };
    let webhooks = match fields.get("webhooks") {
        None | Some(Value::Null) => None,
        Some(Value::Array(names)) => Some(
            names
                .iter()
                .map(|n| n.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::bad("webhooks", "webhooks must be a list of webhook names"))?,
        )
        .filter(|names: &Vec<String>| !names.is_empty()),
        Some(_) => return Err(ApiError::bad("webhooks", "webhooks must be a list of webhook names")),
    };
    let labels = match fields.get("labels") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::bad("labels", "labels must be an object of strings"))?,
        Some(_) => return Err(ApiError::bad("labels", "labels must be an object of strings")),
    };
    let from_now = match fields.get("from_now") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("from_now", "from_now must be true or false")),
    };
    let watch = NewWatch { job_id, portal, webhooks, labels, from_now };
    config.check_watch(&watch).map_err(|e| ApiError::bad(e.field, e.message))?;
    Ok(watch)
}

/// The query string, or a JSON 400 naming what is wrong with it (axum's own
/// rejection is plain text).
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::bad("query", format!("invalid query string: {}", e.body_text())))
}

/// The body, or a JSON error: 413 past [`MAX_BODY`], 400 if it cannot be read.
fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| ApiError { status: e.status(), message: e.body_text(), field: Some("body") })
}

/// A `limit` query parameter: 1 to [`MAX_PAGE`].
fn parse_limit(value: &str) -> Result<usize, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| ApiError::bad("limit", format!("limit is a number from 1 to {MAX_PAGE}")))
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad("body", format!("the body is not JSON: {e}")))
}

/// Stores a watch; 201 if new, 200 if it already existed.
async fn add_watch(state: &AdminState, watch: NewWatch) -> Result<(StatusCode, Value), ApiError> {
    let job_id = watch.job_id.clone();
    let (added, row) = state
        .store
        .call(move |s| {
            let summary = s.add_watches(std::slice::from_ref(&watch))?;
            let row = s.query_watches(&WatchQuery { job_id: Some(watch.job_id.clone()), ..WatchQuery::default() })?;
            Ok((summary.added == 1, row))
        })
        .await?;
    let watch = serde_json::to_value(row.first()).expect("rows serialise");
    if added {
        info!(job_id = %job_id, "admin API: watch added");
    }
    Ok((if added { StatusCode::CREATED } else { StatusCode::OK }, watch))
}

async fn create_watch(
    State(state): State<AdminState>,
    given: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body(given)?;
    let config = Arc::clone(&state.config.borrow());
    let watch = parse_watch(&config, &parse_json(&body)?, None)?;
    let (status, watch) = add_watch(&state, watch).await?;
    Ok((status, Json(watch)).into_response())
}

async fn list_watches(
    State(state): State<AdminState>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json, ApiError> {
    let q = query(q)?;
    let mut query = WatchQuery::default();
    for (key, value) in &q {
        match key.as_str() {
            "state" => {
                query.state = Some(
                    WatchState::from_name(value)
                        .ok_or_else(|| ApiError::bad("state", "state is one of active, finished, failed, removed"))?,
                )
            }
            "portal_id" => {
                let portal: PortalId = value.parse().map_err(|e: String| ApiError::bad("portal_id", e))?;
                query.portal_id = Some(portal.to_string());
            }
            // The cursor is the job id of the last watch of the previous page.
            "after" => query.after = Some(parse_job_id(value).map_err(|e| ApiError::bad("after", e))?),
            "limit" => query.limit = Some(parse_limit(value)?),
            other => return Err(ApiError::bad("query", format!("unknown query parameter {other:?}"))),
        }
    }
    let limit = *query.limit.get_or_insert(PAGE);
    let rows = state.store.call(move |s| s.query_watches(&query)).await?;
    let next = (rows.len() == limit).then(|| rows.last().map(|w| w.job_id.clone())).flatten();
    Ok(Json(json!({"watches": rows, "next_after": next})))
}

async fn get_watch(State(state): State<AdminState>, Path(job_id): Path<String>) -> Result<Json, ApiError> {
    let job_id = parse_job_id(&job_id).map_err(|e| ApiError::bad("job_id", e))?;
    let (rows, notifications) = state
        .store
        .call(move |s| {
            let rows = s.query_watches(&WatchQuery { job_id: Some(job_id.clone()), ..WatchQuery::default() })?;
            Ok((rows, s.notifications_of(&job_id)?))
        })
        .await?;
    let Some(watch) = rows.into_iter().next() else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such watch"));
    };
    let notifications: Vec<Value> = notifications
        .into_iter()
        .map(|n| {
            let body: Value = serde_json::from_str(&n.body).unwrap_or(Value::Null);
            json!({
                "id": n.id,
                "type": n.kind,
                "timestamp": body["timestamp"],
                "deliveries": n.deliveries.iter().map(|d| json!({
                    "webhook": d.webhook, "webhook_id": d.msg_id, "state": d.state.as_str(), "attempts": d.attempts,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut body = serde_json::to_value(watch).expect("rows serialise");
    body["notifications"] = notifications.into();
    Ok(Json(body))
}

async fn delete_watch(State(state): State<AdminState>, Path(job_id): Path<String>) -> Result<Response, ApiError> {
    let job_id = parse_job_id(&job_id).map_err(|e| ApiError::bad("job_id", e))?;
    let id = job_id.clone();
    if state.store.call(move |s| s.remove_watch(&id)).await? {
        info!(job_id = %job_id, "admin API: watch removed");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "no such watch"))
    }
}

/// Polls an active watch now: 202 once the poll is scheduled (it still
/// waits for its org's 429 pause, rate and `max_in_flight`), 404 for no such
/// watch, 409 for a watch that is no longer polled.
async fn poll_watch(State(state): State<AdminState>, Path(job_id): Path<String>) -> Result<Response, ApiError> {
    let job_id = parse_job_id(&job_id).map_err(|e| ApiError::bad("job_id", e))?;
    let id = job_id.clone();
    let rows = state
        .store
        .call(move |s| s.query_watches(&WatchQuery { job_id: Some(id), limit: Some(1), ..WatchQuery::default() }))
        .await?;
    let Some(watch) = rows.into_iter().next() else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such watch"));
    };
    if watch.state != WatchState::Active.as_str() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the watch is {}; only active watches are polled", watch.state),
        ));
    }
    state.poll_now.request(&job_id).map_err(|e| match e {
        crate::poller::PollNowError::Busy => ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
        crate::poller::PollNowError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    })?;
    info!(job_id = %job_id, "admin API: poll now");
    Ok((StatusCode::ACCEPTED, Json(json!({"job_id": job_id, "poll": "scheduled"}))).into_response())
}

async fn list_deliveries(
    State(state): State<AdminState>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json, ApiError> {
    let q = query(q)?;
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(
            DeliveryState::parse(s)
                .ok_or_else(|| ApiError::bad("status", "status is one of pending, delivered, failed"))?,
        ),
    };
    let limit = q.get("limit").map(|l| parse_limit(l)).transpose()?.unwrap_or(MAX_PAGE);
    if let Some(other) = q.keys().find(|k| !matches!(k.as_str(), "status" | "limit")) {
        return Err(ApiError::bad("query", format!("unknown query parameter {other:?}")));
    }
    let rows = state.store.call(move |s| s.list_deliveries(status, limit)).await?;
    Ok(Json(json!({"deliveries": rows})))
}

async fn retry_delivery(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json, ApiError> {
    let id: i64 =
        id.parse().ok().filter(|&n| n > 0).ok_or_else(|| ApiError::bad("id", "a delivery id is a positive number"))?;
    let requeued = state.store.call(move |s| s.retry_failed(Some(id))).await?;
    if requeued == 0 {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("delivery {id} does not exist or is not failed")));
    }
    info!(delivery_id = id, "admin API: failed delivery requeued");
    Ok(Json(json!({"requeued": id})))
}

/// Starts a Dari job and watches it. The body goes to Dari unchanged; the
/// query may name `webhook`s, `label`s (`key=value`) and `from_now`.
async fn start_job(
    State(state): State<AdminState>,
    Path((org, endpoint)): Path<(String, String)>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    given: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (q, body) = (query(q)?, body(given)?);
    let config = Arc::clone(&state.config.borrow());
    let portal: PortalId = format!("{org}/{endpoint}").parse().map_err(|e: String| ApiError::bad("portal_id", e))?;
    let Some(org) = config.orgs.get(&portal.org) else {
        return Err(ApiError::bad("portal_id", format!("org {:?} is not configured", portal.org)));
    };
    parse_json(&body)?;
    let mut options = Map::new();
    let (mut webhooks, mut labels) = (Vec::new(), Map::new());
    for (key, value) in q {
        match key.as_str() {
            "webhook" => webhooks.push(Value::String(value)),
            "label" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or_else(|| ApiError::bad("label", format!("{value:?} is not key=value")))?;
                labels.insert(k.to_owned(), v.into());
            }
            "from_now" => {
                let on = value.parse().map_err(|_| ApiError::bad("from_now", "from_now is true or false"))?;
                options.insert("from_now".into(), Value::Bool(on));
            }
            other => return Err(ApiError::bad("query", format!("unknown query parameter {other:?}"))),
        }
    }
    options.insert("webhooks".into(), webhooks.into());
    options.insert("labels".into(), labels.into());
    // Check the watch options before starting a paid job.
    options.insert("job_id".into(), "00000000-0000-4000-8000-000000000000".into());
    parse_watch(&config, &Value::Object(options.clone()), Some(portal.clone()))?;
    let client = UpstreamClient::new(&config.upstream)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("HTTP client: {e}")))?;
    let (job_id, answer) = client
        .start_job(&portal, body.to_vec(), &org.api_key)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("Dari did not start the job: {e}")))?;
    options.insert("job_id".into(), job_id.clone().into());
    let watch = parse_watch(&config, &Value::Object(options), Some(portal))?;
    // The job is running and paid for: if it cannot be watched, say which it is.
    let (_, watch) = add_watch(&state, watch).await.map_err(|e| ApiError {
        message: format!(
            "Dari started job {job_id}, but it could not be watched ({}); add it with POST /v1/watches",
            e.message
        ),
        ..e
    })?;
    info!(job_id = %job_id, "admin API: job started and watched");
    Ok((StatusCode::CREATED, Json(json!({"job_id": job_id, "dari": answer, "watch": watch}))).into_response())
}

/// Ready when the loops make progress, the store works (see
/// `health::problems`) and the database takes writes. The write check costs
/// nothing while the writer commits; otherwise one real check is made at
/// most every [`WRITABLE_CHECK_EVERY`]: probes never queue on the write lock.
async fn readyz(State(state): State<AdminState>) -> Response {
    let mut reasons = crate::health::problems(&state.health, &state.store, std::time::Instant::now());
    let writable = state.store.call(|s| Ok(s.writable(WRITABLE_CHECK_EVERY))).await;
    if let Err(e) = writable.map_err(|e| e.to_string()).and_then(|r| r) {
        reasons.push(format!("the database is not writable: {e}"));
    }
    if reasons.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "reasons": reasons}))).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let (watches, backlog) = state.store.call(|s| Ok((s.watch_counts()?, s.backlog()?))).await?;
    let now = now_ms();
    let snapshot = Snapshot {
        watches,
        backlog: backlog
            .into_iter()
            .map(|(w, b)| (w, (b.pending, b.failed, b.oldest_pending.map(|t| (now - t).max(0) as f64 / 1000.0))))
            .collect(),
    };
    let text = state.metrics.render(&snapshot);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let ct = |v: &str| is_json(Some(&header::HeaderValue::from_str(v).unwrap()));
        assert!(ct("application/json") && ct("Application/JSON; charset=utf-8") && ct("application/merge-patch+json"));
        assert!(!ct("text/plain") && !ct("application/x-www-form-urlencoded") && !ct("text/json") && !is_json(None));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }
}
