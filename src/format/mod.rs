//! Body formats. The standard body is built once at detection (see
//! `notification`) and sent as stored; Slack and Discord bodies are derived
//! from it at delivery time, so every format says the same thing.
//!
//! These chat formats are deliberately plain (a headline and the key facts in
//! one message); they stay within each platform's message limits by
//! truncating, never by failing.

use serde_json::{Value, json};

use crate::config::Format;

/// Slack's limit on a message's `text`, kept well under.
const SLACK_TEXT_MAX: usize = 3000;
/// Discord's limit on a message's `content`.
const DISCORD_CONTENT_MAX: usize = 2000;

/// Renders the body for `format` from the stored standard body.
pub fn render(format: Format, standard_body: &str) -> Result<String, serde_json::Error> {
    match format {
        Format::Standard => Ok(standard_body.to_owned()),
        Format::Slack => {
            let text = summary(&serde_json::from_str(standard_body)?, "*", "`");
            Ok(json!({"text": truncate(&text, SLACK_TEXT_MAX)}).to_string())
        }
        Format::Discord => {
            let text = summary(&serde_json::from_str(standard_body)?, "**", "`");
            Ok(json!({"content": truncate(&text, DISCORD_CONTENT_MAX), "allowed_mentions": {"parse": []}}).to_string())
        }
    }
}

/// A short human summary: headline, then the key facts, one per line.
fn summary(body: &Value, bold: &str, code: &str) -> String {
    let data = &body["data"];
    let kind = body["type"].as_str().unwrap_or("notification");
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let headline = match kind {
        "job.completed" => "Job completed".to_owned(),
        "job.failed" => "Job failed".to_owned(),
        "job.waiting_for_input" => "Job needs a human".to_owned(),
        "job.event" => format!("Event: {}", text(&data["event"]["event_type"])),
        "watch.failed" => "Stopped watching a job".to_owned(),
        other => format!("Job is now {}", other.trim_start_matches("job.")),
    };
    let mut lines = vec![format!(
        "{bold}{headline}{bold} · {} · job {code}{}{code}",
        text(&data["portal_id"]),
        text(&data["job_id"])
    )];
    let mut fact = |label: &str, value: &Value| {
        let value = text(value);
        if !value.is_empty() {
            lines.push(format!("{label}: {value}"));
        }
    };
    fact("Message", &data["event"]["message"]);
    fact("Step", &data["current_step"]);
    fact("Error", &data["error"]);
    fact("Reason", &data["reason"]);
    fact("Result", &data["final_result"]);
    fact("Cost (USD)", &data["total_cost_usd"]);
    fact("Watch live", &data["browser_url"]);
    fact("Recording", &data["video_recording_url"]);
    fact("Log", &data["log_url"]);
    lines.join("\n")
}

/// Cuts `text` to at most `max` characters, ending with an ellipsis if cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_formats_summarise_within_limits() {
        let body = json!({"type": "job.failed", "timestamp": "t", "data": {
            "job_id": "j1", "portal_id": "acme/form", "error": "x".repeat(5000), "current_step": "Submit"}})
        .to_string();
        let slack: Value = serde_json::from_str(&render(Format::Slack, &body).unwrap()).unwrap();
        let text = slack["text"].as_str().unwrap();
        assert!(text.starts_with("*Job failed* · acme/form · job `j1`"), "{text}");
        assert!(text.chars().count() <= SLACK_TEXT_MAX && text.ends_with('…'));
        let discord: Value = serde_json::from_str(&render(Format::Discord, &body).unwrap()).unwrap();
        assert!(discord["content"].as_str().unwrap().chars().count() <= DISCORD_CONTENT_MAX);
        assert_eq!(render(Format::Standard, &body).unwrap(), body);
    }
}
