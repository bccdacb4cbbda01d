//! The watch routes (`/v1/watches...`) and start-and-watch
//! (`POST /v1/jobs/{org_id}/{endpoint_name}/start`): the request and the
//! use case are `watches`' (shared with the CLI); this is the HTTP side.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::info;

use super::{AdminState, ApiError, Json, PAGE, body, parse_json, parse_limit, query};
use crate::store::{StoreError, WatchQuery};
use crate::vocab::{NewWatch, PortalId, WatchState, parse_job_id};
use crate::watches::{InvalidRequest, StartError, WatchRequest, start_and_watch};

/// A watch request that is wrong, as a 400 naming the field.
fn invalid(e: InvalidRequest) -> ApiError {
    ApiError::bad(e.field, e.message)
}

/// Stores a watch; 201 if new, 200 if it already existed.
async fn add_watch(state: &AdminState, watch: NewWatch) -> Result<(StatusCode, Value), ApiError> {
    let job_id = watch.job_id.clone();
    let summary = state.store.add_watches(vec![watch]).await?;
    let row = state.store.query_watches(WatchQuery { job_id: Some(job_id.clone()), ..WatchQuery::default() }).await?;
    let added = summary.added == 1;
    let watch = serde_json::to_value(row.first()).expect("rows serialise");
    if added {
        info!(job_id = %job_id, "admin API: watch added");
    }
    Ok((if added { StatusCode::CREATED } else { StatusCode::OK }, watch))
}

#[utoipa::path(post, path = "/v1/watches", tag = "watches",
    request_body(description = "`{portal_id, job_id, webhooks?, labels?, from_now?}`", content_type = "application/json"),
    responses((status = 201, description = "Watch added; the watch"), (status = 200, description = "Already watched; unchanged"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn create_watch(
    State(state): State<AdminState>,
    given: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body(given)?;
    let config = Arc::clone(&state.config.borrow());
    let watch = WatchRequest::from_json(&parse_json(&body)?).and_then(|r| r.check(&config)).map_err(invalid)?;
    let (status, watch) = add_watch(&state, watch).await?;
    Ok((status, Json(watch)).into_response())
}

#[utoipa::path(get, path = "/v1/watches", tag = "watches",
    params(("state" = Option<String>, Query, description = "active, finished, failed or removed"),
        ("portal_id" = Option<String>, Query, description = "<org_id>/<endpoint_name>"),
        ("after" = Option<String>, Query, description = "The job id of the last watch of the previous page"),
        ("limit" = Option<usize>, Query, description = "1 to 1000; default 100")),
    responses((status = 200, description = "`{watches, next_after}`"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn list_watches(
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
    let rows = state.store.query_watches(query).await?;
    let next = (rows.len() == limit).then(|| rows.last().map(|w| w.job_id.clone())).flatten();
    Ok(Json(json!({"watches": rows, "next_after": next})))
}

#[utoipa::path(get, path = "/v1/watches/{job_id}", tag = "watches",
    params(("job_id" = String, Path, description = "The job's UUID")),
    responses((status = 200, description = "The watch with its notifications and their deliveries"), (status = 404, description = "No such watch"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn get_watch(State(state): State<AdminState>, Path(job_id): Path<String>) -> Result<Json, ApiError> {
    let job_id = parse_job_id(&job_id).map_err(|e| ApiError::bad("job_id", e))?;
    let rows = state.store.query_watches(WatchQuery { job_id: Some(job_id.clone()), ..WatchQuery::default() }).await?;
    let notifications = state.store.notifications_of(job_id).await?;
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

#[utoipa::path(delete, path = "/v1/watches/{job_id}", tag = "watches",
    params(("job_id" = String, Path, description = "The job's UUID")),
    responses((status = 204, description = "Stopped watching (pending deliveries are still sent)"), (status = 404, description = "No such watch"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn delete_watch(
    State(state): State<AdminState>,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let job_id = parse_job_id(&job_id).map_err(|e| ApiError::bad("job_id", e))?;
    let id = job_id.clone();
    if state.store.remove_watch(id).await? {
        info!(job_id = %job_id, "admin API: watch removed");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "no such watch"))
    }
}

/// Why "poll now" was not asked for.
#[derive(Debug)]
pub(crate) enum PollNowRefused {
    /// No such watch.
    Unknown,
    /// The watch is in this state, not active.
    NotActive(String),
    /// The poller's trigger queue is full, or the poller has stopped.
    Poller(crate::poller::PollNowError),
    /// The store could not be read.
    Store(StoreError),
}

/// "Poll now" for an active watch, as the admin route and the status page's
/// button ask it: the trigger jumps the schedule, not the org's limits.
pub(crate) async fn poll_now(state: &AdminState, job_id: &str) -> Result<(), PollNowRefused> {
    let id = job_id.to_owned();
    let rows = state
        .store
        .query_watches(WatchQuery { job_id: Some(id), limit: Some(1), ..WatchQuery::default() })
        .await
        .map_err(PollNowRefused::Store)?;
    let watch = rows.into_iter().next().ok_or(PollNowRefused::Unknown)?;
    if watch.state != WatchState::Active.as_str() {
        return Err(PollNowRefused::NotActive(watch.state.to_string()));
    }
    state.poll_now.request(job_id).map_err(PollNowRefused::Poller)
}

/// Polls an active watch now: 202 once the poll is scheduled (it still
/// waits for its org's 429 pause, rate and `max_in_flight`), 404 for no such
/// watch, 409 for a watch that is no longer polled.
#[utoipa::path(post, path = "/v1/watches/{job_id}/poll", tag = "watches",
    params(("job_id" = String, Path, description = "The job's UUID")),
    responses((status = 202, description = "The poll is scheduled"), (status = 404, description = "No such watch"), (status = 409, description = "The watch is not active"), (status = 429, description = "Too many polls waiting"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn poll_watch(
    State(state): State<AdminState>,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let job_id = parse_job_id(&job_id).map_err(|e| ApiError::bad("job_id", e))?;
    poll_now(&state, &job_id).await.map_err(|refused| match refused {
        PollNowRefused::Unknown => ApiError::new(StatusCode::NOT_FOUND, "no such watch"),
        PollNowRefused::NotActive(s) => {
            ApiError::new(StatusCode::CONFLICT, format!("the watch is {s}; only active watches are polled"))
        }
        PollNowRefused::Poller(e @ crate::poller::PollNowError::Busy) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
        PollNowRefused::Poller(e @ crate::poller::PollNowError::Stopped) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        PollNowRefused::Store(e) => e.into(),
    })?;
    info!(job_id = %job_id, "admin API: poll now");
    Ok((StatusCode::ACCEPTED, Json(json!({"job_id": job_id, "poll": "scheduled"}))).into_response())
}

/// Starts a Dari job and watches it. The body goes to Dari unchanged; the
/// query may name `webhook`s, `label`s (`key=value`) and `from_now`.
#[utoipa::path(post, path = "/v1/jobs/{org_id}/{endpoint_name}/start", tag = "watches",
    params(("org_id" = String, Path), ("endpoint_name" = String, Path),
        ("webhook" = Option<Vec<String>>, Query, description = "Deliver to this webhook (repeatable)"),
        ("label" = Option<Vec<String>>, Query, description = "key=value (repeatable)"),
        ("from_now" = Option<bool>, Query)),
    request_body(description = "The body for Dari's start endpoint, unchanged", content_type = "application/json"),
    responses((status = 201, description = "`{job_id, dari, watch}`"), (status = 502, description = "Dari did not start the job"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn start_job(
    State(state): State<AdminState>,
    Path((org, endpoint)): Path<(String, String)>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    given: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (q, body) = (query(q)?, body(given)?);
    let config = Arc::clone(&state.config.borrow());
    let portal: PortalId = format!("{org}/{endpoint}").parse().map_err(|e: String| ApiError::bad("portal_id", e))?;
    if !config.orgs.contains_key(&portal.org) {
        return Err(ApiError::bad("portal_id", format!("org {:?} is not configured", portal.org)));
    }
    parse_json(&body)?;
    let mut request = WatchRequest { portal_id: Some(portal.to_string()), ..WatchRequest::default() };
    let mut webhooks = Vec::new();
    for (key, value) in q {
        match key.as_str() {
            "webhook" => webhooks.push(value),
            "label" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or_else(|| ApiError::bad("label", format!("{value:?} is not key=value")))?;
                request.labels.insert(k.to_owned(), v.to_owned());
            }
            "from_now" => {
                request.from_now = value.parse().map_err(|_| ApiError::bad("from_now", "from_now is true or false"))?;
            }
            other => return Err(ApiError::bad("query", format!("unknown query parameter {other:?}"))),
        }
    }
    request.webhooks = Some(webhooks);
    let add = |watch| add_watch(&state, watch);
    let started = start_and_watch(&config, request, body.to_vec(), add).await.map_err(|e| match e {
        StartError::Invalid(e) => invalid(e),
        e @ StartError::Client(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        e @ StartError::Dari(_) => ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()),
        // The job is running and paid for: say which it is.
        StartError::NotWatched { job_id, error } => ApiError {
            message: format!(
                "Dari started job {job_id}, but it could not be watched ({}); add it with POST /v1/watches",
                error.message
            ),
            ..error
        },
    })?;
    let (job_id, (_, watch)) = (started.job_id, started.stored);
    info!(job_id = %job_id, "admin API: job started and watched");
    Ok((StatusCode::CREATED, Json(json!({"job_id": job_id, "dari": started.dari, "watch": watch}))).into_response())
}
