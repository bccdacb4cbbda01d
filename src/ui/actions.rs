//! Logging in and out, and the buttons (each a POST with the session's CSRF token).

use crate::vocab::parse_job_id;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde_json::{Value, json};
use session::Session;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

use super::*;

pub(super) async fn login_page(
    State(ui): State<Arc<Ui>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
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

pub(super) async fn login(
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

pub(super) async fn logout(
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
pub(super) fn notice(q: &HashMap<String, String>) -> Option<&'static str> {
    Some(match q.get("notice")?.as_str() {
        "retried" => "The delivery was put back in the queue; it is sent again shortly.",
        "retried-all" => "Every failed delivery of that webhook was put back in the queue.",
        "resumed" => "The webhook was resumed; its waiting deliveries go out now.",
        "removed" => "The watch was removed; nothing more is polled or announced for it.",
        "nothing" => "Nothing to do: it had changed meanwhile.",
        "polled" => "The job is polled now; what it finds appears here shortly.",
        "busy" => "The relay has too many polls waiting; try again in a moment.",
        _ => return None,
    })
}

pub(super) async fn retry_delivery(
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
    let requeued = ui.admin.store.retry_failed(Some(id)).await?;
    info!(delivery_id = id, requeued, "status page: retry pressed");
    Ok(back(&form, if requeued > 0 { "retried" } else { "nothing" }))
}

pub(super) async fn retry_webhook(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let webhook = name.clone();
    let requeued = ui.admin.store.retry_failed_of_webhook(webhook).await?;
    info!(webhook = %name, requeued, "status page: retry all failed pressed");
    Ok(back(&form, if requeued > 0 { "retried-all" } else { "nothing" }))
}

pub(super) async fn resume_webhook(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let webhook = name.clone();
    let resumed = ui.admin.store.resume_webhook(webhook).await?;
    info!(webhook = %name, resumed, "status page: resume pressed");
    Ok(back(&form, if resumed { "resumed" } else { "nothing" }))
}

pub(super) async fn remove_watch(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(job_id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let job_id = parse_job_id(&job_id).map_err(|e| UiError::new(StatusCode::BAD_REQUEST, e))?;
    let id = job_id.clone();
    let removed = ui.admin.store.remove_watch(id).await?;
    info!(job_id = %job_id, removed, "status page: remove pressed");
    Ok(back(&form, if removed { "removed" } else { "nothing" }))
}

/// "Poll now": the same request as `POST /v1/watches/{job_id}/poll`, for an
/// active watch; it jumps the schedule but not the org's limits.
pub(super) async fn poll_now(
    State(ui): State<Arc<Ui>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(job_id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_csrf(&session, &form)?;
    let job_id = parse_job_id(&job_id).map_err(|e| UiError::new(StatusCode::BAD_REQUEST, e))?;
    let notice = match crate::admin::poll_now(&ui.admin, &job_id).await {
        Ok(()) => "polled",
        Err(crate::admin::PollNowRefused::Store(e)) => return Err(e.into()),
        Err(crate::admin::PollNowRefused::Poller(_)) => "busy",
        Err(_) => "nothing",
    };
    info!(job_id = %job_id, notice, "status page: poll now pressed");
    Ok(back(&form, notice))
}
