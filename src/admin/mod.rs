//! The admin HTTP API (axum), enabled by `[admin] listen`.
//!
//! Routes, all JSON but `/metrics`:
//! - `POST /v1/watches`, `GET /v1/watches`, `GET /v1/watches/{job_id}`,
//!   `DELETE /v1/watches/{job_id}`: the same watches as `dari-relay watch`,
//!   with the same rules ([`Config::check_watch`]) ([`watches`]).
//! - `GET /v1/deliveries` (`?webhook=&job=&state=&limit=`),
//!   `GET /v1/deliveries/{id}` (the body as rendered for its webhook, the
//!   headers with secrets redacted, every attempt),
//!   `POST /v1/deliveries/{id}/retry`, `GET /v1/webhooks`,
//!   `POST /v1/webhooks/{name}/resume` ([`deliveries`]).
//! - `POST /v1/watches/{job_id}/poll`: polls an active watch now (the
//!   same trigger as Dari's webhook on the inbound listener).
//! - `POST /v1/jobs/{org_id}/{endpoint_name}/start`: starts a Dari job with
//!   the org's key and watches it in the same call.
//! - `POST /v1/reload`: reads the config file again, as SIGHUP does.
//! - `GET /v1/events`: notifications and delivery outcomes, live, as
//!   server-sent events ([`events`]; `dari-relay tail`).
//! - `GET /v1/openapi.json`: this API described as OpenAPI 3.1 ([`openapi`]),
//!   generated from the handlers' `#[utoipa::path]` attributes.
//! - `GET /healthz` (alive; the one route answered without the token, and
//!   it says nothing else), `GET /readyz` (database writable, loops making
//!   progress), `GET /metrics` (Prometheus text).
//! - `/ui/...`: the status page (`ui`, merged in by `app`), which checks its
//!   own session and CSRF token instead of the bearer token; the browser
//!   checks apply to it too, but for the JSON-body rule (its POSTs are forms).
//! - Any other path: a JSON 404 (`{"error": ...}`).
//!
//! Every request but `/healthz` needs `Authorization: Bearer <token>` when a
//! token is configured; config loading refuses a non-local listener without
//! one. Before that, [`guard`] turns away what a web page in the
//! operator's browser could send: a `Host` that is not the API's own (DNS
//! rebinding), an `Origin` of another site or `Sec-Fetch-Site: cross-site`
//! (403), and a body that is not JSON (415: the content types a page may
//! POST without asking, such as `text/plain`). Bodies over [`MAX_BODY`] are
//! refused with 413. The API never sends webhooks: it writes to the store,
//! and the deliverer does the rest.

pub(crate) use guard::constant_time_eq;
pub(crate) use watches::{PollNowRefused, poll_now};
mod deliveries;
mod events;
mod guard;
mod openapi;
mod watches;

pub use deliveries::{WebhookRow, attempt_json, delivery_json, delivery_rows, webhook_rows};

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ListenAddr};
use crate::health::Health;
use crate::metrics::{Metrics, Snapshot};
use crate::store::{OperatorStore, StoreError};
use crate::vocab::now_ms;

/// How long `/readyz` trusts its last look at whether the database takes writes.
const WRITABLE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Page size of `GET /v1/watches` unless `limit` says otherwise, and its maximum.
pub(crate) const PAGE: usize = 100;
pub(crate) const MAX_PAGE: usize = 1000;

/// What the handlers share. Created by `app`, dropped when the server stops.
#[derive(Clone)]
pub struct AdminState {
    /// The live config (reloads included).
    pub config: watch::Receiver<Arc<Config>>,
    /// The database, whichever engine holds it.
    pub store: Arc<dyn OperatorStore>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Asks the poller to poll a watch now (`POST /v1/watches/{job_id}/poll`).
    pub poll_now: crate::poller::PollNow,
    /// The token in force when the listener was bound (see [`Listener`]);
    /// set by [`serve`].
    pub startup_token: Option<secrecy::SecretString>,
    /// What `POST /v1/reload` runs (see [`Reload`]); set by [`serve`] from
    /// the [`Listener`], `None` when the daemon was started without one.
    pub reload: Option<Reload>,
    /// The relay's shutdown token, set by [`serve`], so a live stream
    /// (`GET /v1/events`) ends when the relay stops.
    pub stopping: Option<CancellationToken>,
}

/// Reads the config file again and hands it to the loops, as SIGHUP does;
/// `Err` says why the new file was refused (the running config is kept).
/// Made by the command line's `run`, which owns the config's sender.
pub type Reload = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A bound admin listener, with the token in force when it was bound.
pub struct Listener {
    socket: Socket,
    /// A reload may change the token but never remove it: the listener stays
    /// bound where it was, so dropping auth would expose it (even on a public
    /// address). Captured here, at bind time, so no reload can race it.
    token: Option<secrecy::SecretString>,
    /// What `POST /v1/reload` runs; see [`Listener::with_reload`].
    reload: Option<Reload>,
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
        Ok(Listener { socket, token, reload: None })
    }

    /// Gives `POST /v1/reload` something to run. Without it the route
    /// answers 501: there is no config file to read again.
    pub fn with_reload(mut self, reload: Reload) -> Listener {
        self.reload = Some(reload);
        self
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

/// Serves the API on `listener` until `shutdown` is cancelled.
///
/// The routes `pages` makes (the status page, which `app` supplies: the
/// admin API does not import it) are merged in behind the browser checks
/// but not the bearer token: they check their own session.
pub async fn serve(
    listener: Listener,
    mut state: AdminState,
    pages: impl FnOnce(AdminState) -> Router<AdminState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    info!(listen = %listener.describe(), "admin API listening");
    state.startup_token = listener.token;
    state.reload = listener.reload;
    state.stopping = Some(shutdown.clone());
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
        .route("/v1/watches", post(watches::create_watch).get(watches::list_watches))
        .route("/v1/watches/{job_id}", get(watches::get_watch).delete(watches::delete_watch))
        .route("/v1/watches/{job_id}/poll", post(watches::poll_watch))
        .route("/v1/deliveries", get(deliveries::list_deliveries))
        .route("/v1/deliveries/{id}", get(deliveries::get_delivery))
        .route("/v1/deliveries/{id}/retry", post(deliveries::retry_delivery))
        .route("/v1/webhooks", get(deliveries::list_webhooks))
        .route("/v1/webhooks/{name}/resume", post(deliveries::resume_webhook))
        .route("/v1/jobs/{org_id}/{endpoint_name}/start", post(watches::start_job))
        .route("/v1/reload", post(reload))
        .route("/v1/cluster", get(cluster))
        .route("/v1/events", get(events::events))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard::require_token))
        // The status page checks its own session (and CSRF token) instead
        // of the bearer token; the browser checks below still apply to it.
        .merge(pages)
        // Added last, so it runs first: a browser's request is refused
        // before anything else looks at it.
        .layer(middleware::from_fn_with_state((state.clone(), bound), guard::refuse_browsers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// A JSON response.
pub(crate) struct Json(pub(crate) Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0.to_string()).into_response()
    }
}

/// An error response: `{"error": ..., "field": ...}` with a status.
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) field: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn bad(field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), field: Some(field) }
    }

    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
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

/// The query string, or a JSON 400 naming what is wrong with it (axum's own
/// rejection is plain text).
pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::bad("query", format!("invalid query string: {}", e.body_text())))
}

/// The body, or a JSON error: 413 past [`MAX_BODY`], 400 if it cannot be read.
pub(crate) fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| ApiError { status: e.status(), message: e.body_text(), field: Some("body") })
}

/// A `limit` query parameter: 1 to [`MAX_PAGE`].
pub(crate) fn parse_limit(value: &str) -> Result<usize, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| ApiError::bad("limit", format!("limit is a number from 1 to {MAX_PAGE}")))
}

pub(crate) fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad("body", format!("the body is not JSON: {e}")))
}

/// Ready when the loops make progress, the store works (see
/// `health::problems`) and the database takes writes. The write check costs
/// nothing while the writer commits; otherwise one real check is made at
/// most every [`WRITABLE_CHECK_EVERY`]: probes never queue on the write lock.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "`{status: ready}`"), (status = 503, description = "`{status: not ready, reasons}`"), (status = 401, description = "No valid bearer token")))]
async fn readyz(State(state): State<AdminState>) -> Response {
    let mut reasons = crate::health::problems(&state.health, state.store.as_ref(), std::time::Instant::now());
    let writable = state.store.writable(WRITABLE_CHECK_EVERY).await;
    if let Err(e) = writable.map_err(|e| e.to_string()).and_then(|r| r) {
        reasons.push(format!("the database is not writable: {e}"));
    }
    if reasons.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "reasons": reasons}))).into_response()
    }
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"), (status = 401, description = "No valid bearer token")))]
async fn metrics(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let (watches, backlog) = (state.store.watch_counts().await?, state.store.backlog().await?);
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

/// `GET /v1/cluster`: every live instance sharing the PostgreSQL database,
/// with its watch count and last renewal; 404 on SQLite, which one relay
/// has to itself.
#[utoipa::path(get, path = "/v1/cluster", tag = "operations",
    responses((status = 200, description = "`{instance, instances: [{instance, epoch, watches, started_at, last_renewal, expires_at}]}`"), (status = 404, description = "A SQLite database: no cluster"), (status = 401, description = "No valid bearer token")))]
async fn cluster(State(state): State<AdminState>) -> Result<Json, ApiError> {
    let Some(instances) = state.store.cluster().await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "this relay runs on SQLite: there is no cluster (several instances need PostgreSQL)",
        ));
    };
    let this =
        state.config.borrow().cluster.as_ref().map_or_else(crate::config::default_instance, |c| c.instance.clone());
    Ok(Json(json!({"instance": this, "instances": instances})))
}

/// `GET /healthz`: liveness only, answered without the token; it says
/// nothing but that the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "`{status: alive}`")))]
async fn healthz() -> Json {
    Json(json!({"status": "alive"}))
}

/// Any route not in the table: a JSON 404 like every other error, naming
/// what was asked for (never an empty body a script cannot read).
async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {}; see GET /v1/openapi.json or docs/admin-api.md", uri.path()),
    )
}

/// `POST /v1/reload`: what SIGHUP does, answered: 200 with the config file
/// read again, 422 with the reason when the new file is invalid (the running
/// config is kept), 501 when this relay was started without a file to read.
#[utoipa::path(post, path = "/v1/reload", tag = "operations",
    responses((status = 200, description = "`{reloaded: true, config}`"), (status = 422, description = "The new file is invalid; the running config is kept"), (status = 501, description = "Started without a config file"), (status = 401, description = "No valid bearer token")))]
async fn reload(State(state): State<AdminState>) -> Result<Json, ApiError> {
    let Some(reload) = state.reload.clone() else {
        return Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "this relay was not started from a config file"));
    };
    // Reading and resolving the file is blocking I/O (secrets from files too).
    let outcome = tokio::task::spawn_blocking(move || reload())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reload task: {e}")))?;
    match outcome {
        Ok(()) => {
            info!("admin API: config reloaded");
            Ok(Json(json!({"reloaded": true, "config": state.config.borrow().path.display().to_string()})))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the new config is invalid; keeping the running one: {e}"),
        )),
    }
}
