//! Live chat messages (`mode = "live"`): one message per job and webhook,
//! edited as the job moves, and a short follow-up for what needs people.
//!
//! The message is rendered from the job's latest state, not from one
//! notification: the newest standard body read as its status (so a
//! `job.event` shows "running", with the event among the recent ones),
//! plus the last few events. It uses the same layout and limits as the
//! `slack` and `discord` formats, so the platform's limits hold after
//! every edit. A question waiting for a human, a failure and the end each
//! get a [`follow_up`] too: an edit alone notifies nobody.

use serde_json::{Value, json};

use super::{Facts, Outcome, discord, join_fitting, len16, slack, truncate};
use crate::vocab::NotificationKind;

/// Recent events a live message lists.
pub const RECENT_EVENTS: usize = 5;
/// Characters of one event's line.
const EVENT_LINE_MAX: usize = 160;
/// Characters of a follow-up (Discord's `content` allows 2,000).
pub const FOLLOW_UP_MAX: usize = 600;
/// The start of an error quoted in a follow-up.
const ERROR_START_MAX: usize = 300;

/// What a live message shows: the job's newest standard body and its recent
/// `job.event` bodies, oldest first (only the last [`RECENT_EVENTS`] count).
#[derive(Debug, Clone, Copy)]
pub struct LiveView<'a> {
    /// The newest notification's standard body.
    pub latest: &'a Value,
    /// Recent `job.event` standard bodies, oldest first.
    pub events: &'a [Value],
}

/// The newest body read as the job's status: a `job.event` body becomes the
/// `job.<status>` of its `data.status`, so the headline says where the job is.
fn as_status(latest: &Value) -> Value {
    let mut body = latest.clone();
    if body["type"] == "job.event"
        && let Some(status) = latest["data"]["status"].as_str()
        && !status.trim().is_empty()
    {
        body["type"] = NotificationKind::of_status(status).to_string().into();
    }
    body
}

/// One line per recent event: `type: message`, newest last.
fn event_lines(events: &[Value], escape: fn(&str) -> String) -> Vec<String> {
    let skip = events.len().saturating_sub(RECENT_EVENTS);
    events[skip..]
        .iter()
        .map(|body| {
            let event = &body["data"]["event"];
            let kind = event["event_type"].as_str().unwrap_or("event");
            let line = match event["message"].as_str() {
                Some(message) if !message.is_empty() => format!("{kind}: {message}"),
                _ => kind.to_owned(),
            };
            format!("• {}", escape(&truncate(&line, EVENT_LINE_MAX)))
        })
        .collect()
}

/// The Discord message of a live view: the `discord` format's embed of the
/// job's status with a "Recent events" field, within the embed limits.
pub fn discord(view: LiveView<'_>) -> Value {
    let mut message = discord::message(&as_status(view.latest));
    let lines = event_lines(view.events, discord::escape);
    let embed = &mut message["embeds"][0];
    let used = embed_size(embed);
    let name = "Recent events";
    let room = discord::EMBEDS_TOTAL_MAX.saturating_sub(used + len16(name)).min(discord::FIELD_VALUE_MAX);
    let value = join_fitting(&lines, "\n", room);
    if let Some(fields) = embed["fields"].as_array_mut()
        && !value.is_empty()
        && fields.len() < discord::FIELDS_MAX
    {
        // Before the links, which stay last.
        let at = fields.iter().position(|f| f["name"] == "Links").unwrap_or(fields.len());
        fields.insert(at, json!({"name": name, "value": value, "inline": false}));
    }
    message
}

/// Characters Discord counts towards an embed's 6,000.
fn embed_size(embed: &Value) -> usize {
    let s = |v: &Value| v.as_str().map_or(0, len16);
    s(&embed["title"])
        + s(&embed["description"])
        + s(&embed["footer"]["text"])
        + embed["fields"].as_array().map_or(0, |fields| fields.iter().map(|f| s(&f["name"]) + s(&f["value"])).sum())
}

/// The Slack message of a live view (for `chat.postMessage` and
/// `chat.update`; the sender adds `channel` and `ts`): the `slack` format's
/// blocks of the job's status with a "Recent events" section before the
/// context line, within Block Kit's limits.
pub fn slack(view: LiveView<'_>) -> Value {
    let mut message = slack::message(&as_status(view.latest));
    let lines = event_lines(view.events, slack::escape);
    let head = "*Recent events*\n";
    let text = join_fitting(&lines, "\n", slack::SECTION_TEXT_MAX - len16(head));
    if let Some(blocks) = message["blocks"].as_array_mut()
        && !text.is_empty()
        && blocks.len() < slack::BLOCKS_MAX
    {
        let at = blocks.iter().rposition(|b| b["type"] == "context").unwrap_or(blocks.len());
        blocks.insert(at, json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("{head}{text}")}}));
    }
    message
}

/// A short follow-up for a notification that needs people: a question
/// waiting for a human, a failure, the end (and a watch the relay gave up
/// on). `None` for everything else, which only edits the live message.
pub fn follow_up(body: &Value) -> Option<String> {
    let facts = Facts::from_body(body);
    let extra = match facts.outcome {
        Outcome::Completed | Outcome::WatchFailed => String::new(),
        Outcome::Failed => body["data"]["error"]
            .as_str()
            .map(|e| format!(": {}", truncate(e.lines().next().unwrap_or_default(), ERROR_START_MAX)))
            .unwrap_or_default(),
        Outcome::NeedsHuman | Outcome::Question => {
            facts.detail.as_ref().map(|d| format!(": {}", truncate(&d.text, ERROR_START_MAX))).unwrap_or_default()
        }
        _ => return None,
    };
    let job = if facts.job_id.is_empty() { String::new() } else { format!(" ({})", facts.job_id) };
    Some(truncate(&format!("{} {}{job}{extra}", facts.outcome.emoji(), facts.headline), FOLLOW_UP_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A standard body of `kind` (the fields the chat formats read).
    fn body(kind: &str) -> Value {
        let status = match kind {
            "job.event" | "watch.failed" => "running",
            other => other.trim_start_matches("job."),
        };
        let mut data = json!({
            "job_id": "00000000-0000-4000-8000-000000000000", "portal_id": "acme/form", "status": status,
            "current_step": "Submit the contact form", "labels": {},
        });
        match kind {
            "job.event" => data["event"] = json!({"event_type": "step_completed", "message": "Filled in the form"}),
            "job.failed" => data["error"] = "Timed out after 30s waiting for the Submit button".into(),
            "job.waiting_for_input" => {
                data["latest_question"] = json!({"message": "Which plan: Basic or Pro?", "data": {"question_id": "q"}})
            }
            "watch.failed" => data["reason"] = "job_not_found".into(),
            _ => {}
        }
        json!({"type": kind, "timestamp": "2026-11-30T10:30:15.123Z", "data": data})
    }

    #[test]
    fn an_event_shows_the_status_with_the_recent_events() {
        let event = body("job.event");
        let events = vec![event.clone(); 8];
        let msg = discord(LiveView { latest: &event, events: &events });
        let embed = &msg["embeds"][0];
        assert!(embed["title"].as_str().unwrap().contains("running"), "{}", embed["title"]);
        let recent = embed["fields"].as_array().unwrap().iter().find(|f| f["name"] == "Recent events").unwrap();
        assert_eq!(recent["value"].as_str().unwrap().lines().count(), RECENT_EVENTS);
        assert!(embed_size(embed) <= discord::EMBEDS_TOTAL_MAX);
        let slack = slack(LiveView { latest: &event, events: &events });
        assert!(slack.to_string().contains("Recent events"));
    }

    #[test]
    fn only_questions_failures_and_ends_get_a_follow_up() {
        for kind in ["job.completed", "job.failed", "job.waiting_for_input", "watch.failed"] {
            assert!(follow_up(&body(kind)).is_some(), "{kind}");
        }
        for kind in ["job.event", "job.running", "job.pending", "job.paused"] {
            assert_eq!(follow_up(&body(kind)), None, "{kind}");
        }
        let failed = follow_up(&body("job.failed")).unwrap();
        assert!(failed.contains("Job failed") && failed.contains("Timed out"), "{failed}");
    }
}
