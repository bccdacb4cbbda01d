//! Body formats. The standard body is built once at detection (see
//! `notification`) and sent as stored; Slack, Discord and template bodies
//! are derived from it at delivery time, so every format says the same
//! thing and a retry renders the same bytes again.
//!
//! The chat formats share one reading of the standard body, [`Facts`]: a
//! headline per type, the portal and job, the status, step and cost, one
//! detail (the result, the error, the question, the event's message or why
//! a watch ended), what to do next, and the links. [`slack`] and [`discord`]
//! only lay those facts out within each platform's limits, truncating with
//! an ellipsis, never failing. [`template`] renders a webhook's own
//! minijinja template instead.

pub mod discord;
pub mod live;
pub mod slack;
pub mod teams;
pub mod template;

use serde_json::{Map, Value};

use crate::vocab::Format;

pub use template::{BodyTemplate, TemplateSource};

/// Why a body could not be rendered. A delivery that hits this is `failed`
/// at once: the same stored body would not render next time either.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The stored standard body is not JSON (it always is, unless the
    /// database was edited by hand).
    #[error("cannot render the {format} body: the stored body is not JSON: {source}")]
    Body { format: &'static str, source: serde_json::Error },
    /// The webhook's template failed: an undefined value, a wrong type, a
    /// missing filter, or it ran out of fuel.
    #[error("cannot render {name}: {source}")]
    Template { name: String, source: minijinja::Error },
    /// The template's content type is JSON but what it wrote is not.
    #[error(
        "{name} did not render valid JSON: {source}; values are inserted as JSON, so write {{{{ data.error }}}}, not \"{{{{ data.error }}}}\", and join text with ~"
    )]
    NotJson { name: String, source: serde_json::Error },
}

/// Renders the body a webhook of `format` with `template` gets for the
/// stored standard body: its template if it has one, else its format.
pub fn render(format: Format, template: Option<&BodyTemplate>, standard_body: &str) -> Result<String, RenderError> {
    match template {
        Some(template) => template.render(&parse(standard_body, "template")?),
        None => render_format(format, standard_body),
    }
}

/// Renders the body of `format` from the stored standard body.
pub fn render_format(format: Format, standard_body: &str) -> Result<String, RenderError> {
    match format {
        Format::Standard => Ok(standard_body.to_owned()),
        Format::Slack => Ok(slack::message(&parse(standard_body, "slack")?).to_string()),
        Format::Discord => Ok(discord::message(&parse(standard_body, "discord")?).to_string()),
        Format::Teams => Ok(teams::message(&parse(standard_body, "teams")?).to_string()),
    }
}

fn parse(standard_body: &str, format: &'static str) -> Result<Value, RenderError> {
    serde_json::from_str(standard_body).map_err(|source| RenderError::Body { format, source })
}

/// Length as Slack and Discord count it: UTF-16 code units, which is at
/// least the number of characters, so a text within this length is within
/// either platform's limit however it counts.
pub fn len16(text: &str) -> usize {
    text.encode_utf16().count()
}

/// Cuts `text` to at most `max` UTF-16 units (see [`len16`]), ending with an
/// ellipsis if cut.
pub fn truncate(text: &str, max: usize) -> String {
    if len16(text) <= max {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        if used + c.len_utf16() > max.saturating_sub(1) {
            break;
        }
        used += c.len_utf16();
        out.push(c);
    }
    out.push('…');
    out
}

/// Joins as many of `items` as fit in `max` with `separator`, in order,
/// leaving out whole items rather than cutting one (a cut link is broken).
pub fn join_fitting(items: &[String], separator: &str, max: usize) -> String {
    let mut out = String::new();
    for item in items {
        let extra = if out.is_empty() { len16(item) } else { len16(separator) + len16(item) };
        if len16(&out) + extra > max {
            continue;
        }
        if !out.is_empty() {
            out.push_str(separator);
        }
        out.push_str(item);
    }
    out
}

/// What a notification is about, which decides its emoji and colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `job.completed`.
    Completed,
    /// `job.failed`.
    Failed,
    /// `job.waiting_for_input`.
    NeedsHuman,
    /// `job.paused`.
    Paused,
    /// `job.running`.
    Running,
    /// `job.pending`.
    Pending,
    /// Any other `job.<status>`, such as `job.stopped` or `job.cancelled`.
    OtherStatus,
    /// `job.event` of an ordinary event.
    Event,
    /// `job.event` of an event that asks a question (`data.question_id`).
    Question,
    /// `watch.failed`.
    WatchFailed,
}

impl Outcome {
    /// The emoji that starts the headline, readable at a glance in a channel.
    pub fn emoji(self) -> &'static str {
        match self {
            Outcome::Completed => "✅",
            Outcome::Failed => "❌",
            Outcome::NeedsHuman => "🙋",
            Outcome::Paused => "⏸️",
            Outcome::Running => "▶️",
            Outcome::Pending => "⏳",
            Outcome::OtherStatus => "🔄",
            Outcome::Event => "📝",
            Outcome::Question => "❓",
            Outcome::WatchFailed => "⚠️",
        }
    }
}

/// A link worth a click: the live browser, the recording, the log, the
/// downloads. Only `http(s)` URLs become links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// What the link is called in the message.
    pub label: &'static str,
    /// The URL, parsed and re-serialised, with `|`, `(` and `)` percent-encoded
    /// so it cannot end a Slack or Markdown link early.
    pub url: String,
}

/// The one longer piece of text a message shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detail {
    /// `Result`, `Error`, `Question`, `Message` or `Reason`.
    pub label: &'static str,
    /// The text, already shortened to [`DETAIL_MAX`].
    pub text: String,
    /// How it is shown.
    pub style: Style,
}

/// How a detail is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Escaped prose: a question, an event's message, a result that is text.
    Prose,
    /// A code block: results and errors, kept verbatim.
    Block,
    /// Inline code: a machine word such as a `watch.failed` reason.
    Inline,
}

/// What to do next: a sentence and, where it helps, the link to do it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    /// A full sentence.
    pub text: &'static str,
    /// The link that acts on it.
    pub link: Option<Link>,
}

/// What a chat message says, read once from a standard body.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// The notification type.
    pub kind: String,
    /// What it is about.
    pub outcome: Outcome,
    /// The headline without its emoji, such as "Job completed".
    pub headline: String,
    /// `org_id/endpoint_name`.
    pub portal_id: String,
    /// The job's UUID.
    pub job_id: String,
    /// The status as Dari wrote it, with the previous one: "completed (was running)".
    pub status: Option<String>,
    /// `current_step`, when set.
    pub step: Option<String>,
    /// `total_cost_usd` as dollars, when set.
    pub cost: Option<String>,
    /// The detail the type calls for.
    pub detail: Option<Detail>,
    /// What to do next, for the types that call for action.
    pub next: Option<Next>,
    /// Watch live, recording, log, downloads: those that are present.
    pub links: Vec<Link>,
    /// The watch's labels, as `key=value`.
    pub labels: Vec<String>,
    /// When the relay detected the transition.
    pub timestamp: String,
    /// The same instant in Unix seconds, when `timestamp` parses: chat
    /// clients show it in each reader's own time zone.
    pub unix_seconds: Option<u64>,
    /// A sample sent by `send-test` (it carries [`TEST_LABEL`]): the
    /// headline says so, so nobody takes it for a real alert.
    pub test: bool,
}

/// The label `send-test` puts on its samples (`sent_by`), which marks
/// their chat messages as tests.
pub const TEST_LABEL: (&str, &str) = ("sent_by", "dari-relay send-test");

/// The longest detail text, before any platform's own limit: enough for an
/// error's useful part, short enough to read in a channel.
pub const DETAIL_MAX: usize = 1800;
/// The most fields of a `final_result` object shown.
pub const RESULT_FIELDS: usize = 8;
/// The longest line shown for one field of a `final_result`.
const RESULT_LINE_MAX: usize = 200;

impl Facts {
    /// Reads the facts of a standard body. Never fails: what is missing or
    /// of an unexpected type is left out.
    pub fn from_body(body: &Value) -> Facts {
        let data = &body["data"];
        let kind = text(&body["type"]).unwrap_or_else(|| "notification".to_owned());
        let status_text = text(&data["status"]);
        let event = &data["event"];
        let outcome = match kind.as_str() {
            "job.completed" => Outcome::Completed,
            "job.failed" => Outcome::Failed,
            "job.waiting_for_input" => Outcome::NeedsHuman,
            "job.paused" => Outcome::Paused,
            "job.running" => Outcome::Running,
            "job.pending" => Outcome::Pending,
            "job.event" if !event["data"]["question_id"].is_null() => Outcome::Question,
            "job.event" => Outcome::Event,
            "watch.failed" => Outcome::WatchFailed,
            _ => Outcome::OtherStatus,
        };
        let headline = match outcome {
            Outcome::Completed => "Job completed".to_owned(),
            Outcome::Failed => "Job failed".to_owned(),
            Outcome::NeedsHuman => "Job needs a human".to_owned(),
            Outcome::Paused => "Job paused".to_owned(),
            Outcome::Running => "Job running".to_owned(),
            Outcome::Pending => "Job pending".to_owned(),
            Outcome::Question => "The agent asks a question".to_owned(),
            Outcome::Event => match text(&event["event_type"]) {
                Some(t) => format!("New event: {}", t.replace('_', " ")),
                None => "New event".to_owned(),
            },
            Outcome::WatchFailed => "Stopped watching a job".to_owned(),
            Outcome::OtherStatus => {
                let status = status_text.clone().unwrap_or_else(|| kind.trim_start_matches("job.").to_owned());
                format!("Job is now {status}")
            }
        };
        let status = status_text.map(|s| match text(&data["previous_status"]) {
            Some(p) if kind.starts_with("job.") && kind != "job.event" => format!("{s} (was {p})"),
            _ => s,
        });
        let browser = link("Watch live", &data["browser_url"]);
        let recording = link("Recording", &data["video_recording_url"]);
        let log = link("Log", &data["log_url"]);
        let downloads = link("Downloads", &data["downloads_link"]);
        let detail = match outcome {
            Outcome::Completed => result_detail(&data["final_result"]),
            Outcome::Failed => text(&data["error"]).map(|e| detail("Error", &e, Style::Block)),
            Outcome::NeedsHuman => {
                question_text(&data["latest_question"]).map(|q| detail("Question", &q, Style::Prose))
            }
            Outcome::Question => question_text(event).map(|q| detail("Question", &q, Style::Prose)),
            Outcome::Event => text(&event["message"]).map(|m| detail("Message", &m, Style::Prose)),
            Outcome::WatchFailed => text(&data["reason"]).map(|r| detail("Reason", &r, Style::Inline)),
            _ => text(&data["error"]).map(|e| detail("Error", &e, Style::Block)),
        };
        let next = match outcome {
            Outcome::NeedsHuman | Outcome::Question => Some(match &browser {
                Some(b) => Next {
                    text: "A human is needed: answer in the live browser.",
                    link: Some(Link { label: "Open the live browser", url: b.url.clone() }),
                },
                None => Next { text: "A human is needed: answer in Dari.", link: None },
            }),
            Outcome::Failed => log
                .as_ref()
                .or(recording.as_ref())
                .map(|l| Next { text: "See what went wrong in the log or the recording.", link: Some(l.clone()) }),
            Outcome::WatchFailed => text(&data["reason"]).and_then(|r| watch_failed_next(&r)),
            _ => None,
        };
        let labels = match &data["labels"] {
            Value::Object(map) => label_pairs(map),
            _ => Vec::new(),
        };
        Facts {
            outcome,
            headline,
            portal_id: text(&data["portal_id"]).unwrap_or_default(),
            job_id: text(&data["job_id"]).unwrap_or_default(),
            status,
            step: text(&data["current_step"]),
            cost: cost(&data["total_cost_usd"]),
            detail,
            next,
            links: [browser, recording, log, downloads].into_iter().flatten().collect(),
            labels,
            unix_seconds: text(&body["timestamp"])
                .and_then(|t| humantime::parse_rfc3339(&t).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            test: data["labels"][TEST_LABEL.0].as_str() == Some(TEST_LABEL.1),
            timestamp: text(&body["timestamp"]).unwrap_or_default(),
            kind,
        }
    }

    /// The emoji and the headline, marked `🧪 Test:` for a `send-test` sample.
    pub fn title(&self) -> String {
        let marker = if self.test { "🧪 Test: " } else { "" };
        format!("{marker}{} {}", self.outcome.emoji(), self.headline)
    }

    /// One line for notifications and previews: emoji, headline, portal and,
    /// when there is one, the start of the detail (not of a result, whose
    /// first field says little on its own).
    pub fn summary(&self) -> String {
        let mut line = format!("{} · {}", self.title(), self.portal_id);
        if let Some(detail) = self.detail.as_ref().filter(|d| d.label != "Result") {
            let first = detail.text.lines().next().unwrap_or_default();
            line.push_str(&format!(" · {}", truncate(first, 200)));
        }
        line
    }
}

/// A value as text: strings as they are, null and empty strings as `None`,
/// anything else as compact JSON.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) if s.trim().is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn detail(label: &'static str, text: &str, style: Style) -> Detail {
    Detail { label, text: truncate(text.trim_end(), DETAIL_MAX), style }
}

/// `final_result` compactly. Text is shown as it is. An object shows its
/// first fields, one `key: value` line each (text as it is, anything else as
/// compact JSON, a list with its length), each line cut, then how many
/// fields were left out. Anything else is compact JSON.
fn result_detail(result: &Value) -> Option<Detail> {
    let line = |key: &str, value: &Value| {
        let line = match value {
            Value::String(s) => format!("{key}: {}", s.replace('\n', " ")),
            // The length first: the line is likely cut before the list ends.
            Value::Array(items) if items.len() > 1 => format!("{key} ({} items): {value}", items.len()),
            other => format!("{key}: {other}"),
        };
        truncate(&line, RESULT_LINE_MAX)
    };
    match result {
        Value::Null => None,
        Value::String(s) => text(result).map(|_| detail("Result", s, Style::Prose)),
        Value::Object(map) if map.is_empty() => Some(detail("Result", "{}", Style::Block)),
        Value::Object(map) => {
            let mut lines: Vec<String> = map.iter().take(RESULT_FIELDS).map(|(k, v)| line(k, v)).collect();
            if map.len() > RESULT_FIELDS {
                lines.push(format!("… and {} more fields", map.len() - RESULT_FIELDS));
            }
            Some(detail("Result", &lines.join("\n"), Style::Block))
        }
        other => Some(detail("Result", &truncate(&other.to_string(), RESULT_LINE_MAX * 4), Style::Block)),
    }
}

/// The text of a question event: its `data.question` when that is a
/// string, else its `message`.
fn question_text(event: &Value) -> Option<String> {
    match &event["data"]["question"] {
        Value::String(q) if !q.trim().is_empty() => Some(q.clone()),
        _ => text(&event["message"]),
    }
}

/// What to do after the relay gave up on a watch, per `reason`.
fn watch_failed_next(reason: &str) -> Option<Next> {
    let text = match reason {
        "job_not_found" => "Dari does not know this job: check the job id and portal, then watch it again.",
        "api_key_rejected" => "Dari rejected the org's API key: replace the key, then watch the job again.",
        "max_watch_age" => "The watch reached max_watch_age: watch the job again if it is still running.",
        _ => return None,
    };
    Some(Next { text, link: None })
}

fn cost(value: &Value) -> Option<String> {
    let usd = value.as_f64()?;
    Some(if usd != 0.0 && usd.abs() < 0.01 { format!("${usd:.4}") } else { format!("${usd:.2}") })
}

fn link(label: &'static str, value: &Value) -> Option<Link> {
    let url = reqwest::Url::parse(value.as_str()?.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let url = url.as_str().replace('|', "%7C").replace('(', "%28").replace(')', "%29");
    Some(Link { label, url })
}

fn label_pairs(labels: &Map<String, Value>) -> Vec<String> {
    labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn join_fitting_leaves_out_what_does_not_fit() {
        let items = ["aaaa".to_owned(), "b".repeat(20), "cc".to_owned()];
        assert_eq!(join_fitting(&items, " · ", 12), "aaaa · cc");
        assert_eq!(join_fitting(&items, " · ", 3), "cc");
    }

    #[test]
    fn truncate_counts_utf16_and_marks_the_cut() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "ab…");
        // An emoji outside the BMP is two UTF-16 units and is never split.
        assert_eq!(truncate("a😀b", 3), "a…");
        assert!(len16(&truncate(&"😀".repeat(100), 51)) <= 51);
        assert_eq!(truncate("", 0), "");
    }

    #[test]
    fn results_show_their_first_fields_one_line_each() {
        let big: Map<String, Value> = (0..40).map(|i| (format!("field_{i:02}"), json!("v".repeat(500)))).collect();
        let d = result_detail(&Value::Object(big)).unwrap();
        assert_eq!(d.style, Style::Block);
        let lines: Vec<&str> = d.text.lines().collect();
        assert_eq!(lines.len(), RESULT_FIELDS + 1, "{}", d.text);
        assert!(lines[0].starts_with("field_00: vvv") && lines[0].ends_with('…') && len16(lines[0]) == RESULT_LINE_MAX);
        assert_eq!(lines[RESULT_FIELDS], "… and 32 more fields");
        assert!(len16(&d.text) <= DETAIL_MAX);
        let mixed = result_detail(&json!({"ok": true, "rows": [{"a": 1}, {"a": 2}], "text": "two\nlines"})).unwrap();
        assert_eq!(mixed.text, "ok: true\nrows (2 items): [{\"a\":1},{\"a\":2}]\ntext: two lines");
        assert_eq!(result_detail(&json!([1, 2])).unwrap().text, "[1,2]");
        let text = result_detail(&json!("done")).unwrap();
        assert_eq!(text, Detail { label: "Result", text: "done".into(), style: Style::Prose });
        assert_eq!(result_detail(&Value::Null), None);
    }

    #[test]
    fn facts_read_any_body_without_failing() {
        for body in
            [json!(null), json!({}), json!({"type": 3, "data": []}), json!({"type": "job.x", "data": {"status": {}}})]
        {
            let f = Facts::from_body(&body);
            assert!(!f.headline.is_empty());
        }
        let f =
            Facts::from_body(&json!({"type": "job.Weird", "data": {"status": "Archived", "previous_status": "running",
            "browser_url": "javascript:alert(1)", "log_url": "https://x.test/a|b(c)", "total_cost_usd": 0.0042}}));
        assert_eq!(f.outcome, Outcome::OtherStatus);
        assert_eq!(f.headline, "Job is now Archived");
        assert_eq!(f.status.as_deref(), Some("Archived (was running)"));
        assert_eq!(f.cost.as_deref(), Some("$0.0042"));
        assert_eq!(f.links, vec![Link { label: "Log", url: "https://x.test/a%7Cb%28c%29".into() }]);
    }
}
