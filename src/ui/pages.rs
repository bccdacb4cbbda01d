//! The pages: overview, watches, a job's timeline, deliveries.

use crate::store::ui::{DeliverySearch, WatchSearch};
use crate::vocab::{DeliveryState, PortalId, now_ms, parse_job_id};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};
use session::Session;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

pub(super) async fn overview(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let config = Arc::clone(&ui.admin.config.borrow());
    let now = now_ms();
    let store = Arc::clone(&ui.admin.store);
    let counts = store.watch_counts().await?;
    let backlog = store.webhook_backlog().await?;
    let paused = store.webhook_pauses().await?;
    let errors = store.last_errors().await?;
    let activity = store.activity(now, chart::MINUTES).await?;
    let newest = store.search_deliveries(DeliverySearch { limit: NEWEST, ..DeliverySearch::default() }).await?;
    let writable = store.writable(Duration::from_secs(5)).await?;
    let stale = ui.admin.health.stale();
    let loop_state = |name: &str| {
        stale.iter().find(|p| p.contains(&format!("the {name} loop"))).cloned().unwrap_or_else(|| "running".into())
    };
    let problems = crate::health::problems(&ui.admin.health, store.as_ref(), Instant::now());
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
                // The adaptive concurrency in force now (the
                // `dari_relay_webhook_concurrency` gauge), beside its bound.
                "concurrency": ui.admin.metrics.webhook_concurrency(name),
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
pub(super) fn parse_search(q: &str) -> Result<WatchSearch, UiError> {
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

pub(super) async fn watches(
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
    let mut rows = ui.admin.store.search_watches(search).await?;
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
pub(super) fn http_link(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    (s.starts_with("https://") || s.starts_with("http://")).then(|| s.to_owned())
}

pub(super) fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

pub(super) async fn job(
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
    let store = &ui.admin.store;
    let watch = store.search_watches(WatchSearch { job_id: Some(id.clone()), limit: 1, ..WatchSearch::default() });
    let watch = watch.await?.into_iter().next();
    let mut timeline = store.job_timeline(id.clone(), after, TIMELINE + 1).await?;
    let total = store.notification_count(id).await?;
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

pub(super) async fn deliveries(
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
    let store = &ui.admin.store;
    let mut rows = store.search_deliveries(search).await?;
    let (paused, backlog) = (store.webhook_pauses().await?, store.webhook_backlog().await?);
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
