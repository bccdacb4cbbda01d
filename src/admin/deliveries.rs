//! The delivery and webhook routes: `GET /v1/deliveries` (filtered),
//! `GET /v1/deliveries/{id}` (what was sent, and every attempt),
//! `POST /v1/deliveries/{id}/retry`, `GET /v1/webhooks`,
//! `POST /v1/webhooks/{name}/resume`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tracing::info;

use super::{AdminState, ApiError, Json, MAX_PAGE, parse_limit, query};
use crate::config::Config;
use crate::store::{AttemptRecord, DeliveryDetail, DeliveryFilter, OperatorStore, StoreError};
use crate::vocab::{DeliveryState, now_ms, parse_job_id};

/// What stands in for a secret in what is shown.
const REDACTED: &str = "<redacted>";

/// One row of `GET /v1/webhooks` and `dari-relay webhooks list`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WebhookRow {
    pub name: String,
    /// `active` or `paused`.
    pub state: String,
    pub paused_reason: Option<String>,
    /// `false` for a name that only the database still knows (its deliveries wait).
    pub in_config: bool,
    pub pending: i64,
    pub failed: i64,
    pub oldest_pending_age_seconds: Option<i64>,
    /// The adaptive concurrency a running daemon published lately (within
    /// `deliver::CONCURRENCY_STALE`), if any.
    #[serde(default)]
    pub concurrency: Option<u64>,
}

/// Every webhook of the config (`names`, in order), then any name only the
/// database still holds deliveries or a pause for, with state and backlog.
pub async fn webhook_rows(names: &[String], store: &dyn OperatorStore) -> Result<Vec<WebhookRow>, StoreError> {
    let paused = store.webhook_pauses().await?;
    let backlog = store.backlog().await?;
    let concurrency = store.webhook_concurrency().await?;
    let stale_ms = crate::deliver::CONCURRENCY_STALE.as_millis() as i64;
    let configured: BTreeSet<&String> = names.iter().collect();
    let gone: BTreeSet<&String> = backlog.keys().chain(paused.keys()).filter(|n| !configured.contains(n)).collect();
    let now = now_ms();
    Ok(names
        .iter()
        .chain(gone)
        .map(|name| {
            let b = backlog.get(name).copied().unwrap_or_default();
            WebhookRow {
                state: if paused.contains_key(name) { "paused" } else { "active" }.to_owned(),
                paused_reason: paused.get(name).map(|(reason, _)| reason.clone()),
                in_config: configured.contains(name),
                pending: b.pending,
                failed: b.failed,
                oldest_pending_age_seconds: b.oldest_pending.map(|t| (now - t).max(0) / 1000),
                concurrency: concurrency.get(name).filter(|(_, at)| now - at <= stale_ms).map(|(n, _)| *n),
                name: name.clone(),
            }
        })
        .collect())
}

/// A delivery as `GET /v1/deliveries/{id}` and `deliveries show --json` give
/// it: the row, the body as rendered for its webhook (from the stored
/// standard body, the same bytes every attempt sent), the headers every
/// attempt carried with secrets redacted (the signature, headers from the
/// environment), and every attempt. Without the config, or when the webhook
/// is no longer in it, the standard body is shown and `rendered` is false.
pub fn delivery_json(config: Option<&Config>, detail: &DeliveryDetail) -> Value {
    let d = &detail.summary;
    let webhook = config.and_then(|c| c.webhook(&d.webhook));
    let (body, rendered, note) = match webhook.map(|w| w.render(&detail.body)) {
        Some(Ok(body)) => (body, true, None),
        Some(Err(e)) => (detail.body.clone(), false, Some(format!("cannot render for the webhook: {e}"))),
        None => (detail.body.clone(), false, Some("the webhook is not in the config: the standard body".to_owned())),
    };
    let mut headers = serde_json::Map::new();
    if let Some(w) = webhook {
        for extra in &w.headers {
            let value = match extra.source {
                Some(_) => REDACTED.to_owned(),
                None => extra.value.to_str().unwrap_or(REDACTED).to_owned(),
            };
            headers.insert(extra.name.to_string(), value.into());
        }
        headers.insert("content-type".into(), w.content_type().into());
    }
    headers.insert("user-agent".into(), crate::USER_AGENT.into());
    headers.insert("webhook-id".into(), d.msg_id.clone().into());
    headers.insert("webhook-timestamp".into(), "<the Unix seconds of each attempt>".into());
    if webhook.is_some_and(|w| w.secret.is_some()) {
        headers.insert("webhook-signature".into(), format!("v1,{REDACTED}").into());
    }
    let mut v = serde_json::to_value(d).expect("rows serialise");
    // A JSON body is shown as JSON, anything else (a template's text) as text.
    v["body"] = serde_json::from_str(&body).unwrap_or(Value::String(body));
    v["body_rendered"] = rendered.into();
    if let Some(note) = note {
        v["body_note"] = note.into();
    }
    v["headers"] = headers.into();
    v["attempts_log"] = detail.attempts.iter().map(attempt_json).collect();
    v
}

/// One attempt as JSON: when (RFC 3339), how long, the answer.
pub fn attempt_json(a: &AttemptRecord) -> Value {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(a.attempted_at.max(0) as u64);
    json!({
        "at": humantime::format_rfc3339_millis(at).to_string(),
        "duration_ms": a.duration_ms,
        "http_status": a.http_status,
        "error": a.error,
        "response_excerpt": a.response_excerpt,
    })
}

#[utoipa::path(get, path = "/v1/deliveries", tag = "deliveries",
    params(("state" = Option<String>, Query, description = "pending, delivered or failed (also `status`)"),
        ("webhook" = Option<String>, Query, description = "A webhook's name"),
        ("job" = Option<String>, Query, description = "A job's UUID (also `job_id`)"),
        ("limit" = Option<usize>, Query, description = "1 to 1000; default 1000")),
    responses((status = 200, description = "`{deliveries}`, newest first; failed ones with `attempts_log`"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn list_deliveries(
    State(state): State<AdminState>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json, ApiError> {
    let q = query(q)?;
    let mut filter = DeliveryFilter { limit: MAX_PAGE, ..DeliveryFilter::default() };
    for (key, value) in &q {
        match key.as_str() {
            // `status` is v1's name; `state` matches `GET /v1/watches`.
            "status" | "state" => {
                filter.state = Some(DeliveryState::parse(value).ok_or_else(|| {
                    ApiError::bad(
                        if key == "status" { "status" } else { "state" },
                        "status is one of pending, delivered, failed",
                    )
                })?)
            }
            "webhook" => {
                if value.is_empty() || value.len() > crate::config::defaults::MAX_NAME_LEN {
                    return Err(ApiError::bad("webhook", "webhook is a webhook's name"));
                }
                filter.webhook = Some(value.clone());
            }
            "job" | "job_id" => filter.job_id = Some(parse_job_id(value).map_err(|e| ApiError::bad("job", e))?),
            "limit" => filter.limit = parse_limit(value)?,
            other => return Err(ApiError::bad("query", format!("unknown query parameter {other:?}"))),
        }
    }
    // Failed deliveries come with every attempt: that is what a dead
    // letter is for (as in `deliveries list`).
    let rows = delivery_rows(state.store.as_ref(), filter).await?;
    Ok(Json(json!({"deliveries": rows})))
}

/// The deliveries `filter` picks, as `GET /v1/deliveries` and `deliveries
/// list --json` give them: failed ones with every attempt.
pub async fn delivery_rows(store: &dyn OperatorStore, filter: DeliveryFilter) -> Result<Vec<Value>, StoreError> {
    let rows = store.query_deliveries(filter).await?;
    let mut out = Vec::with_capacity(rows.len());
    for d in rows {
        let mut v = serde_json::to_value(&d).expect("rows serialise");
        if d.state == DeliveryState::Failed.as_str() {
            v["attempts_log"] = store.attempts(d.id).await?.iter().map(attempt_json).collect();
        }
        out.push(v);
    }
    Ok(out)
}

/// `GET /v1/deliveries/{id}`: what was sent, as [`delivery_json`] shows it.
#[utoipa::path(get, path = "/v1/deliveries/{id}", tag = "deliveries",
    params(("id" = i64, Path, description = "The delivery's id")),
    responses((status = 200, description = "The row, `body` as rendered for its webhook, `headers` (secrets redacted), `attempts_log`"), (status = 404, description = "No such delivery"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn get_delivery(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json, ApiError> {
    let id = parse_id(&id)?;
    let Some(detail) = state.store.delivery(id).await? else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no delivery {id}")));
    };
    let config = Arc::clone(&state.config.borrow());
    Ok(Json(delivery_json(Some(&config), &detail)))
}

/// `GET /v1/webhooks`: every webhook's state and backlog ([`webhook_rows`]).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, description = "`{webhooks}`: name, state, paused_reason, in_config, pending, failed, oldest_pending_age_seconds"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn list_webhooks(State(state): State<AdminState>) -> Result<Json, ApiError> {
    let config = Arc::clone(&state.config.borrow());
    let names: Vec<String> = config.webhooks.iter().map(|w| w.name.clone()).collect();
    let rows = webhook_rows(&names, state.store.as_ref()).await?;
    Ok(Json(json!({"webhooks": rows})))
}

/// `POST /v1/webhooks/{name}/resume`: resumes a webhook paused by a 410
/// Gone; 409 when it is not paused.
#[utoipa::path(post, path = "/v1/webhooks/{name}/resume", tag = "webhooks",
    params(("name" = String, Path, description = "The webhook's name")),
    responses((status = 200, description = "`{resumed: name}`"), (status = 409, description = "Not paused"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn resume_webhook(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json, ApiError> {
    let webhook = name.clone();
    if !state.store.resume_webhook(webhook).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("webhook {name:?} is not paused")));
    }
    info!(webhook = %name, "admin API: webhook resumed");
    Ok(Json(json!({"resumed": name})))
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse().ok().filter(|&n| n > 0).ok_or_else(|| ApiError::bad("id", "a delivery id is a positive number"))
}

#[utoipa::path(post, path = "/v1/deliveries/{id}/retry", tag = "deliveries",
    params(("id" = i64, Path, description = "The delivery's id")),
    responses((status = 200, description = "`{requeued: id}`"), (status = 409, description = "Does not exist or is not failed"), (status = 400, description = "A bad parameter: `{\"error\", \"field\"}`"), (status = 401, description = "No valid bearer token")))]
pub(super) async fn retry_delivery(State(state): State<AdminState>, Path(id): Path<String>) -> Result<Json, ApiError> {
    let id = parse_id(&id)?;
    let requeued = state.store.retry_failed(Some(id)).await?;
    if requeued == 0 {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("delivery {id} does not exist or is not failed")));
    }
    info!(delivery_id = id, "admin API: failed delivery requeued");
    Ok(Json(json!({"requeued": id})))
}
