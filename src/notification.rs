//! Notifications: the transitions of a diff turned into the body receivers
//! get (`format = "standard"`, INTERFACE.md), built once when a change is
//! detected and stored. Retries and replays send the stored body, so it is
//! byte-for-byte the same every time; only the headers change per attempt.
//!
//! Slack, Discord and template bodies are derived from this one at delivery
//! time (see `format`), so the standard body is the single source of truth.
//! [`sample`] builds realistic bodies of every type for `send-test` and the
//! format tests, through the same [`build`].

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
    // An extension of INTERFACE.md's body: chat formats need the question a
    // `job.waiting_for_input` is about, and a status body carries no events.
    // A field of that name sent by Dari itself still passes through as sent.
    data.entry("latest_question").or_insert_with(|| latest_question(&answer.events));
    // One map for every notification of this answer: a `job.event` borrows
    // it with its `event` set, a status change with Dari's own `event` field
    // (if it sent one) put back. No clone of the answer per notification.
    let dari_event = data.get("event").cloned();
    transitions
        .iter()
        .map(|transition| {
            let kind = match transition {
                Transition::Event { index } => {
                    let event = match answer.events.get(*index) {
                        Some(Value::Object(fields)) => {
                            let mut event = fields.clone();
                            event.insert("index".into(), (*index).into());
                            Value::Object(event)
                        }
                        other => json!({"index": index, "value": other}),
                    };
                    data.insert("event".into(), event);
                    "job.event".to_owned()
                }
                Transition::Status { status, .. } => {
                    match &dari_event {
                        Some(value) => data.insert("event".into(), value.clone()),
                        None => data.remove("event"),
                    };
                    status_kind(status)
                }
            };
            Notification { body: envelope(&kind, timestamp, &data), kind }
        })
        .collect()
}

/// The last event whose `data.question_id` is set, as `event` is shown
/// (the entry plus its `index`), or null when no event asks a question.
fn latest_question(events: &[Value]) -> Value {
    let asked = events.iter().enumerate().rev().find(|(_, e)| !e["data"]["question_id"].is_null());
    let Some((index, event)) = asked else {
        return Value::Null;
    };
    let mut event = event.as_object().cloned().unwrap_or_default();
    event.insert("index".into(), index.into());
    Value::Object(event)
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
    let Value::Object(data) = data else { unreachable!("json! of an object is an object") };
    Notification { body: envelope(&kind, timestamp, &data), kind }
}

fn envelope(kind: &str, timestamp: &str, data: &Map<String, Value>) -> String {
    /// The standard body, serialised straight from borrowed parts.
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        timestamp: &'a str,
        data: &'a Map<String, Value>,
    }
    serde_json::to_string(&Envelope { kind, timestamp, data }).expect("a JSON map serialises")
}

/// The current time as RFC 3339 with milliseconds, the `timestamp` format.
pub fn now_timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The notification types `send-test` sends by default: the common ones.
pub const SAMPLE_KINDS: [&str; 8] = [
    "job.event",
    "job.pending",
    "job.running",
    "job.paused",
    "job.waiting_for_input",
    "job.completed",
    "job.failed",
    "watch.failed",
];

/// The job every sample is about.
pub const SAMPLE_JOB_ID: &str = "00000000-0000-4000-8000-000000000000";
/// The portal every sample is about.
pub const SAMPLE_PORTAL_ID: &str = "example-org/example_portal";

/// A realistic notification of type `kind` (any `job.<status>`, `job.event`
/// or `watch.failed`) about a sample job that filled in a contact form, built
/// through [`build`] so it has exactly the shape of a real one. Deterministic
/// for a given `timestamp`, so format tests can snapshot it.
pub fn sample(kind: &str, labels: &Map<String, Value>, timestamp: &str) -> Notification {
    let watch = WatchContext { job_id: SAMPLE_JOB_ID, portal_id: SAMPLE_PORTAL_ID, labels };
    if kind == "watch.failed" {
        return watch_failed(watch, "job_not_found", Some("running"), timestamp);
    }
    let status = match kind {
        "job.event" => "running",
        other => other.strip_prefix("job.").unwrap_or(other),
    };
    let mut events = vec![
        json!({"event_type": "step_started", "message": "Opening https://example.com/contact",
               "data": {}, "timestamp": "2026-11-30T10:29:58.000Z"}),
        json!({"event_type": "step_completed", "message": "Filled in name, email and message",
               "data": {"fields": 3}, "timestamp": "2026-11-30T10:30:07.000Z"}),
    ];
    if status == "waiting_for_input" {
        events.push(json!({"event_type": "question", "message": "Which plan should the quote be for: Basic or Pro?",
                           "data": {"question_id": "q_1", "options": ["Basic", "Pro"]},
                           "timestamp": "2026-11-30T10:30:12.000Z"}));
    }
    let mut fields = json!({
        "current_step": "Submit the contact form",
        "browser_url": "https://example.com/live/00000000",
        "video_recording_url": "https://example.com/recordings/00000000.mp4",
        "log_url": "https://example.com/logs/00000000",
        "total_cost_usd": 0.12,
        "created_at": "2026-11-30T10:29:55.000Z",
        "updated_at": timestamp,
    });
    match status {
        "completed" => {
            fields["current_step"] = Value::Null;
            fields["downloads_link"] = "https://example.com/downloads/00000000.zip".into();
            fields["final_result"] = json!({"confirmation_number": "CF-10234", "submitted": true,
                                             "plan": "Pro", "reply_expected_within_days": 2});
        }
        "failed" => fields["error"] = "Timed out after 30s waiting for the Submit button".into(),
        "pending" => {
            fields = json!({"created_at": "2026-11-30T10:29:55.000Z", "updated_at": timestamp});
            events.clear();
        }
        _ => {}
    }
    let answer =
        StatusAnswer { status: status.to_owned(), events, fields: serde_json::from_value(fields).expect("an object") };
    // The status seen before this answer: an event arrives while the job
    // keeps running; a status change comes from the usual predecessor.
    let previous = match (kind, status) {
        ("job.event", _) => Some("running"),
        (_, "pending") => None,
        (_, "running") => Some("pending"),
        _ => Some("running"),
    };
    let transition = match kind {
        "job.event" => Transition::Event { index: 1 },
        _ => Transition::Status { previous: previous.map(String::from), status: status.to_owned() },
    };
    build(&[transition], &answer, previous, watch, timestamp).remove(0)
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

    #[test]
    fn the_latest_question_rides_along_and_samples_have_the_real_shape() {
        let answer = StatusAnswer {
            status: "waiting_for_input".into(),
            events: vec![
                json!({"event_type": "question", "message": "old?", "data": {"question_id": "q1"}}),
                json!({"event_type": "step", "message": "s", "data": {"question_id": null}}),
                json!({"event_type": "question", "message": "Basic or Pro?", "data": {"question_id": "q2"}}),
                json!("not an object"),
            ],
            fields: Map::new(),
        };
        let labels = Map::new();
        let watch = WatchContext { job_id: "j", portal_id: "o/e", labels: &labels };
        let transitions = [Transition::Status { previous: None, status: "waiting_for_input".into() }];
        let n = build(&transitions, &answer, None, watch, "t");
        let body: Value = serde_json::from_str(&n[0].body).unwrap();
        assert_eq!(body["data"]["latest_question"]["message"], "Basic or Pro?");
        assert_eq!(body["data"]["latest_question"]["index"], 2);
        let none = StatusAnswer { events: vec![], ..answer };
        let body: Value = serde_json::from_str(&build(&transitions, &none, None, watch, "t")[0].body).unwrap();
        assert_eq!(body["data"]["latest_question"], Value::Null);

        for kind in SAMPLE_KINDS.iter().copied().chain(["job.archived"]) {
            let n = sample(kind, &labels, "2026-11-30T10:30:15.123Z");
            assert_eq!(n.kind, kind);
            let body: Value = serde_json::from_str(&n.body).unwrap();
            assert_eq!(body["data"]["job_id"], SAMPLE_JOB_ID, "{kind}");
        }
        let waiting: Value = serde_json::from_str(&sample("job.waiting_for_input", &labels, "t").body).unwrap();
        assert_eq!(waiting["data"]["latest_question"]["data"]["question_id"], "q_1");
    }
}
