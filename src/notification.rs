//! Notifications: the transitions of a diff turned into the body receivers
//! get (`format = "standard"`, INTERFACE.md), built once when a change is
//! detected and stored. Retries and replays send the stored body, so it is
//! byte-for-byte the same every time; only the headers change per attempt.
//!
//! Slack and Discord bodies are derived from this one at delivery time (see
//! `deliver`), so the standard body is the single source of truth.

use serde_json::{Map, Value, json};

use crate::diff::{Transition, normalize_status};
use crate::upstream::StatusAnswer;

/// Fields of the status answer that every body carries, null when Dari did
/// not send them, so receivers can rely on the keys being present.
const PASSTHROUGH_DEFAULTS: [&str; 12] = [
    "current_step",
    "browser_url",
    "result",
    "final_result",
    "error",
    "downloads_link",
    "video_recording_url",
    "log_url",
    "total_cost_usd",
    "created_at",
    "updated_at",
    "status",
];

/// One notification, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// `job.event`, `job.<status>` or `watch.failed`.
    pub kind: String,
    /// The standard JSON body.
    pub body: String,
}

/// What a notification says about its watch.
#[derive(Debug, Clone, Copy)]
pub struct WatchContext<'a> {
    /// The job's UUID.
    pub job_id: &'a str,
    /// `org_id/endpoint_name`.
    pub portal_id: &'a str,
    /// The watch's labels.
    pub labels: &'a Map<String, Value>,
}

/// The notification type of a status.
pub fn status_kind(status: &str) -> String {
    format!("job.{}", normalize_status(status))
}

/// Builds the notifications of `transitions`, in order. `previous_status`
/// is the status seen before `answer`; `timestamp` is the detection time
/// (RFC 3339 with milliseconds).
pub fn build(
    transitions: &[Transition],
    answer: &StatusAnswer,
    previous_status: Option<&str>,
    watch: WatchContext<'_>,
    timestamp: &str,
) -> Vec<Notification> {
    let mut data = answer.fields.clone();
    for key in PASSTHROUGH_DEFAULTS {
        data.entry(key).or_insert(Value::Null);
    }
    data.insert("status".into(), Value::String(answer.status.clone()));
    data.insert("job_id".into(), watch.job_id.into());
    data.insert("portal_id".into(), watch.portal_id.into());
    data.insert("previous_status".into(), previous_status.map_or(Value::Null, Value::from));
    data.insert("labels".into(), Value::Object(watch.labels.clone()));
    transitions
        .iter()
        .map(|transition| {
            let (kind, data) = match transition {
                Transition::Event { index } => {
                    let mut data = data.clone();
                    let event = match answer.events.get(*index) {
                        Some(Value::Object(fields)) => {
                            let mut event = fields.clone();
                            event.insert("index".into(), (*index).into());
                            Value::Object(event)
                        }
                        other => json!({"index": index, "value": other}),
                    };
                    data.insert("event".into(), event);
                    ("job.event".to_owned(), data)
                }
                Transition::Status { status, .. } => (status_kind(status), data.clone()),
            };
            Notification { body: envelope(&kind, timestamp, Value::Object(data)), kind }
        })
        .collect()
}

/// A `watch.failed` notification: the relay gave up on a watch.
pub fn watch_failed(watch: WatchContext<'_>, reason: &str, last_status: Option<&str>, timestamp: &str) -> Notification {
    let data = json!({
        "job_id": watch.job_id,
        "portal_id": watch.portal_id,
        "status": last_status,
        "reason": reason,
        "labels": watch.labels,
    });
    let kind = "watch.failed".to_owned();
    Notification { body: envelope(&kind, timestamp, data), kind }
}

fn envelope(kind: &str, timestamp: &str, data: Value) -> String {
    json!({"type": kind, "timestamp": timestamp, "data": data}).to_string()
}

/// The current time as RFC 3339 with milliseconds, the `timestamp` format.
pub fn now_timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_pass_through_and_missing_ones_are_null() {
        let answer = StatusAnswer {
            status: "Completed".into(),
            events: vec![json!({"event_type": "step_completed", "message": "done", "data": {}})],
            fields: serde_json::from_value(json!({"final_result": {"ok": true}, "total_cost_usd": 0.12, "extra": [1]}))
                .unwrap(),
        };
        let labels = serde_json::from_value(json!({"customer": "acme"})).unwrap();
        let watch = WatchContext { job_id: "j", portal_id: "o/e", labels: &labels };
        let transitions = [
            Transition::Event { index: 0 },
            Transition::Status { previous: Some("running".into()), status: "Completed".into() },
        ];
        let n = build(&transitions, &answer, Some("running"), watch, "2026-11-30T10:30:15.123Z");
        assert_eq!(n[0].kind, "job.event");
        assert_eq!(n[1].kind, "job.completed");
        let body: Value = serde_json::from_str(&n[1].body).unwrap();
        assert_eq!(body["type"], "job.completed");
        assert_eq!(body["timestamp"], "2026-11-30T10:30:15.123Z");
        let data = &body["data"];
        assert_eq!(data["status"], "Completed");
        assert_eq!(data["previous_status"], "running");
        assert_eq!(data["final_result"], json!({"ok": true}));
        assert_eq!(data["extra"], json!([1]));
        assert_eq!(data["log_url"], Value::Null);
        assert_eq!(data["labels"]["customer"], "acme");
        assert!(data.get("event").is_none() && data.get("events").is_none());
        let event: Value = serde_json::from_str(&n[0].body).unwrap();
        assert_eq!(event["data"]["event"]["index"], 0);
        assert_eq!(event["data"]["event"]["message"], "done");
    }
}
