//! `GET /v1/events`: a live stream of notifications and delivery outcomes as
//! server-sent events, for `dari-relay tail`.
//!
//! The stream reads the store, not the loops: every [`POLL_EVERY`] it asks
//! for notifications and attempts newer than the last it sent (two primary
//! key range reads), so no stage needs a hook and a slow reader holds back
//! nobody. Events: `notification` (`TailNotification`) and `delivery`
//! (`TailAttempt`, one per attempt, with the delivery's state after it),
//! plus a `: keepalive` comment every [`KEEPALIVE`]. It ends when the relay
//! stops (the writer task follows the shutdown token, so a stream never holds
//! a graceful shutdown open) or the reader goes away.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncWriteExt;
use tracing::warn;

use super::{AdminState, ApiError};

/// How often the store is asked for what is new.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How often an idle stream sends a comment, so proxies and readers see it alive.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Most events of each kind read per look; the rest come on the next.
const BATCH: usize = 500;
/// Bytes buffered between the writer task and the connection.
const PIPE: usize = 64 * 1024;

#[utoipa::path(get, path = "/v1/events", tag = "operations",
    responses((status = 200, description = "text/event-stream: `notification` and `delivery` events", content_type = "text/event-stream"),
        (status = 401, description = "No valid bearer token")))]
pub(super) async fn events(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let (mut notification, mut attempt) = state.store.tail_start().await?;
    let (reader, mut writer) = tokio::io::duplex(PIPE);
    let stopping = state.stopping.clone().unwrap_or_default();
    tokio::spawn(async move {
        let mut idle = Duration::ZERO;
        loop {
            tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
            let found = state.store.tail_after(notification, attempt, BATCH).await;
            let (notifications, attempts) = match found {
                Ok(found) => found,
                Err(e) => {
                    warn!(error = %e, "admin API: event stream cannot read the store");
                    continue;
                }
            };
            let mut text = String::new();
            for n in &notifications {
                notification = n.id;
                text.push_str(&event("notification", &serde_json::to_string(n).expect("events serialise")));
            }
            for a in &attempts {
                attempt = a.id;
                text.push_str(&event("delivery", &serde_json::to_string(a).expect("events serialise")));
            }
            idle = if text.is_empty() { idle + POLL_EVERY } else { Duration::ZERO };
            if idle >= KEEPALIVE {
                idle = Duration::ZERO;
                text.push_str(": keepalive\n\n");
            }
            // A write that fails means the reader went away.
            if !text.is_empty() && (writer.write_all(text.as_bytes()).await.is_err() || writer.flush().await.is_err()) {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
    Ok(([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response())
}

/// One server-sent event; `data` is one line of JSON.
fn event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}
