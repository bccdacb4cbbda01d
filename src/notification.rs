//! Notifications: the transitions of a diff turned into the body receivers
//! get (`format = "standard"`, INTERFACE.md), built once when a change is
//! detected and stored. Retries and replays send the stored body, so it is
//! byte-for-byte the same every time; only the headers change per attempt.
//!
//! Slack, Discord and template bodies are derived from this one at delivery
//! time (see `format`), so the standard body is the single source of truth.
//! [`sample`] builds realistic bodies of every type for `send-test` and the
//! format tests, through the same [`build`].

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::diff::Transition;
use crate::upstream::StatusAnswer;
use crate::vocab::NotificationKind;

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
    pub kind: NotificationKind,
    /// The standard JSON body, in parts.
    pub body: Body,
}

/// A standard body as it is built and stored. Every notification of one
/// answer carries that answer's whole `data` (a 200 KB `final_result` in
/// each of 50 `job.event`s), so the part they share is held once, behind an
/// `Arc`, and stored once; [`Body::compose`] gives the exact bytes sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A body with nothing shared (`watch.failed`, and samples).
    Whole(String),
    /// One notification of an answer: its own head and `event` member
    /// around the answer's shared members.
    Parts {
        /// `{"type":...,"timestamp":...,"data":{`.
        head: String,
        /// The answer's members of `data`, shared by its notifications.
        shared: Arc<SharedAnswer>,
        /// The `"event":...` member, when the body has one.
        event: Option<String>,
    },
}

/// The members of an answer's `data` that all its notifications share:
/// every key but `event`, split around where `event` sorts (`data` is a
/// sorted map, so its position is fixed). Each half is a comma-separated
/// list of `"key":value` members without braces, possibly empty.
#[derive(Debug, PartialEq, Eq)]
pub struct SharedAnswer {
    /// The members whose keys sort before `event`.
    pub before: String,
    /// The members whose keys sort after `event`.
    pub after: String,
}

impl Body {
    /// The standard body, byte for byte as INTERFACE.md gives it.
    pub fn compose(&self) -> String {
        match self {
            Body::Whole(body) => body.clone(),
            Body::Parts { head, shared, event } => compose(head, &shared.before, event.as_deref(), &shared.after),
        }
    }
}

/// Joins a body's stored parts into the standard body: the same bytes that
/// serialising the whole envelope gives (tested below).
pub fn compose(head: &str, before: &str, event: Option<&str>, after: &str) -> String {
    let mut out = String::with_capacity(head.len() + before.len() + after.len() + event.map_or(0, str::len) + 4);
    out.push_str(head);
    let mut first = true;
    for part in [Some(before), event, Some(after)].into_iter().flatten().filter(|p| !p.is_empty()) {
        if !first {
            out.push(',');
        }
        out.push_str(part);
        first = false;
    }
    out.push_str("}}");
    out
}

/// `"key":value` members of `entries`, comma-separated, as serde_json
/// writes them inside an object.
fn members<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>) -> String {
    let mut out = String::new();
    for (key, value) in entries {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).expect("a string serialises"));
        out.push(':');
        out.push_str(&serde_json::to_string(value).expect("a JSON value serialises"));
    }
    out
}

/// The head of a standard body: everything before `data`'s members.
fn head(kind: &str, timestamp: &str) -> String {
    let kind = serde_json::to_string(kind).expect("a string serialises");
    let timestamp = serde_json::to_string(timestamp).expect("a string serialises");
    format!("{{\"type\":{kind},\"timestamp\":{timestamp},\"data\":{{")
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
    // Everything but `event` is the same in every notification of this
    // answer: serialised once and shared. A status change carries Dari's own
    // `event` field, if it sent one; a `job.event` its event instead.
    let dari_event = data.remove("event");
    let shared = Arc::new(SharedAnswer {
        before: members(data.iter().filter(|(k, _)| k.as_str() < "event")),
        after: members(data.iter().filter(|(k, _)| k.as_str() > "event")),
    });
    let member =
        |value: &Value| format!("\"event\":{}", serde_json::to_string(value).expect("a JSON value serialises"));
    transitions
        .iter()
        .map(|transition| {
            let (kind, event) = match transition {
                Transition::Event { index } => {
                    let event = match answer.events.get(*index) {
                        Some(Value::Object(fields)) => {
                            let mut event = fields.clone();
                            event.insert("index".into(), (*index).into());
                            Value::Object(event)
                        }
                        other => json!({"index": index, "value": other}),
                    };
                    (NotificationKind::Event, Some(member(&event)))
                }
                Transition::Status { status, .. } => {
                    (NotificationKind::of_status(status), dari_event.as_ref().map(member))
                }
            };
            let body = Body::Parts { head: head(&kind.to_string(), timestamp), shared: Arc::clone(&shared), event };
            Notification { body, kind }
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
    let kind = NotificationKind::WatchFailed;
    let Value::Object(data) = data else { unreachable!("json! of an object is an object") };
    Notification { body: Body::Whole(envelope(&kind.to_string(), timestamp, &data)), kind }
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
        assert_eq!(n[0].kind, NotificationKind::Event);
        assert_eq!(n[1].kind.to_string(), "job.completed");
        let body: Value = serde_json::from_str(&n[1].body.compose()).unwrap();
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
        let event: Value = serde_json::from_str(&n[0].body.compose()).unwrap();
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
        let body: Value = serde_json::from_str(&n[0].body.compose()).unwrap();
        assert_eq!(body["data"]["latest_question"]["message"], "Basic or Pro?");
        assert_eq!(body["data"]["latest_question"]["index"], 2);
        let none = StatusAnswer { events: vec![], ..answer };
        let body: Value =
            serde_json::from_str(&build(&transitions, &none, None, watch, "t")[0].body.compose()).unwrap();
        assert_eq!(body["data"]["latest_question"], Value::Null);

        for kind in SAMPLE_KINDS.iter().copied().chain(["job.archived"]) {
            let n = sample(kind, &labels, "2026-11-30T10:30:15.123Z");
            assert_eq!(n.kind.to_string(), kind);
            let body: Value = serde_json::from_str(&n.body.compose()).unwrap();
            assert_eq!(body["data"]["job_id"], SAMPLE_JOB_ID, "{kind}");
        }
        let waiting: Value =
            serde_json::from_str(&sample("job.waiting_for_input", &labels, "t").body.compose()).unwrap();
        assert_eq!(waiting["data"]["latest_question"]["data"]["question_id"], "q_1");
    }

    /// The bodies composed from shared parts are byte for byte the bodies
    /// of the old composition (the whole envelope serialised per
    /// notification), whatever keys Dari sends, `event` included.
    #[test]
    fn composed_bodies_are_the_serialised_envelope() {
        let events: Vec<Value> = (0..5)
            .map(|i| json!({"event_type": "step", "message": format!("s\"{i}\u{e9}"), "data": {"i": i}}))
            .chain([json!("not an object"), json!(null)])
            .collect();
        let big = "x".repeat(10_000);
        for fields in [
            json!({"final_result": {"text": big}, "total_cost_usd": 0.5, "aaa": 1, "zzz": [1, 2]}),
            json!({"event": {"from": "dari"}, "evenT": 1, "event_": 2, "eventa": 3, "eve": 4}),
            json!({}),
        ] {
            let answer = StatusAnswer {
                status: "Completed".into(),
                events: events.clone(),
                fields: serde_json::from_value(fields).unwrap(),
            };
            let labels: Map<String, Value> = serde_json::from_value(json!({"team": "a\nb"})).unwrap();
            let watch = WatchContext { job_id: "j", portal_id: "o/e", labels: &labels };
            let mut transitions: Vec<Transition> = (0..events.len()).map(|index| Transition::Event { index }).collect();
            transitions.push(Transition::Status { previous: Some("running".into()), status: "Completed".into() });
            let built = build(&transitions, &answer, Some("running"), watch, "2026-11-30T10:30:15.123Z");
            for (n, transition) in built.iter().zip(&transitions) {
                // The old composition: the whole `data` map per notification.
                let mut data = answer.fields.clone();
                for key in PASSTHROUGH_DEFAULTS {
                    data.entry(key).or_insert(Value::Null);
                }
                data.insert("status".into(), Value::String(answer.status.clone()));
                data.insert("job_id".into(), "j".into());
                data.insert("portal_id".into(), "o/e".into());
                data.insert("previous_status".into(), "running".into());
                data.insert("labels".into(), Value::Object(labels.clone()));
                data.entry("latest_question").or_insert_with(|| latest_question(&answer.events));
                if let Transition::Event { index } = transition {
                    let event = match &answer.events[*index] {
                        Value::Object(fields) => {
                            let mut event = fields.clone();
                            event.insert("index".into(), (*index).into());
                            Value::Object(event)
                        }
                        other => json!({"index": index, "value": other}),
                    };
                    data.insert("event".into(), event);
                }
                assert_eq!(n.body.compose(), envelope(&n.kind.to_string(), "2026-11-30T10:30:15.123Z", &data));
            }
            // One shared part for the whole answer, not one per notification.
            let Body::Parts { shared, .. } = &built[0].body else { panic!("a poll's body is in parts") };
            for n in &built {
                let Body::Parts { shared: other, .. } = &n.body else { panic!("a poll's body is in parts") };
                assert!(Arc::ptr_eq(shared, other));
            }
        }
    }
}
