//! `format = "teams"`: a Microsoft Teams Workflows message, an Adaptive Card
//! 1.4 in the message envelope Workflows' "When a Teams webhook request is
//! received" trigger reads (Teams retired its incoming-webhook connectors).
//!
//! Layout, the same facts as the Slack message: the headline (coloured by
//! outcome), a fact set (portal, job, status, step, cost), the detail, what
//! to do next, the type and labels in small print, and the links as
//! `Action.OpenUrl` buttons (a Workflows card opens them in the browser; no
//! interaction payload comes back). Text from the job is escaped for the
//! card's Markdown, and the detail is cut so the whole message stays within
//! [`MESSAGE_MAX`] bytes, the size Teams accepts for one message.

use serde_json::{Value, json};

use super::{Facts, Outcome, Style, truncate};

/// Bytes of the whole message (envelope and card), Teams' limit of 28 KB.
pub const MESSAGE_MAX: usize = 28 * 1024;
/// The Adaptive Card schema version Workflows renders.
pub const CARD_VERSION: &str = "1.4";
/// Characters of the headline.
const HEADLINE_MAX: usize = 200;
/// Characters of a fact's value.
const FACT_MAX: usize = 300;
/// Links shown as buttons (Teams shows at most six actions).
const ACTIONS_MAX: usize = 6;
/// Characters of a URL linked; a longer one is left out.
const URL_MAX: usize = 2048;
/// Characters of the small print (type and labels).
const FOOTER_MAX: usize = 500;

/// The card's colour name for an outcome (TextBlock `color`).
fn colour(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Completed => "Good",
        Outcome::Failed | Outcome::WatchFailed => "Attention",
        Outcome::NeedsHuman | Outcome::Question | Outcome::Paused => "Warning",
        Outcome::Running | Outcome::Event => "Accent",
        Outcome::Pending | Outcome::OtherStatus => "Default",
    }
}

/// The Teams message for a standard body.
pub fn message(body: &Value) -> Value {
    let facts = Facts::from_body(body);
    let detail = facts.detail.as_ref().map(|d| d.text.clone()).unwrap_or_default();
    // The detail is the only long part: start from all of it (within the
    // shared cap) and cut until the whole message fits. Each round cuts by
    // the overshoot, so a handful of rounds at most.
    let mut room = detail.chars().count();
    loop {
        let message = envelope(card(&facts, &truncate(&detail, room)));
        let size = message.to_string().len();
        if size <= MESSAGE_MAX || room == 0 {
            return message;
        }
        room = room.saturating_sub((size - MESSAGE_MAX).max(64));
    }
}

/// The Workflows envelope around one card.
fn envelope(card: Value) -> Value {
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": card,
        }],
    })
}

fn card(facts: &Facts, detail: &str) -> Value {
    let mut body = vec![json!({
        "type": "TextBlock",
        "text": escape(&truncate(&format!("{} {}", facts.outcome.emoji(), facts.headline), HEADLINE_MAX)),
        "weight": "Bolder",
        "size": "Medium",
        "color": colour(facts.outcome),
        "wrap": true,
    })];
    let mut rows = vec![fact("Portal", &facts.portal_id)];
    if !facts.job_id.is_empty() {
        rows.push(fact("Job", &facts.job_id));
    }
    for (name, value) in [("Status", &facts.status), ("Step", &facts.step), ("Cost", &facts.cost)] {
        if let Some(value) = value {
            rows.push(fact(name, value));
        }
    }
    body.push(json!({"type": "FactSet", "facts": rows}));
    if let Some(d) = &facts.detail {
        body.push(json!({"type": "TextBlock", "text": format!("**{}**", d.label), "wrap": true, "spacing": "Medium"}));
        let mut block = json!({"type": "TextBlock", "text": escape(detail), "wrap": true});
        if matches!(d.style, Style::Block | Style::Inline) {
            block["fontType"] = "Monospace".into();
        }
        body.push(block);
    }
    if let Some(next) = &facts.next {
        body.push(json!({"type": "TextBlock", "text": format!("**Next:** {}", escape(next.text)), "wrap": true}));
    }
    let mut footer = facts.kind.clone();
    if !facts.labels.is_empty() {
        footer.push_str(&format!(" · {}", facts.labels.join(", ")));
    }
    body.push(json!({
        "type": "TextBlock",
        "text": escape(&truncate(&footer, FOOTER_MAX)),
        "isSubtle": true,
        "size": "Small",
        "wrap": true,
    }));
    let actions: Vec<Value> = facts
        .links
        .iter()
        .filter(|l| l.url.len() <= URL_MAX && (l.url.starts_with("https://") || l.url.starts_with("http://")))
        .take(ACTIONS_MAX)
        .map(|l| json!({"type": "Action.OpenUrl", "title": l.label, "url": l.url}))
        .collect();
    let mut card = json!({
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": CARD_VERSION,
        "body": body,
        "msteams": {"width": "Full"},
    });
    if !actions.is_empty() {
        card["actions"] = actions.into();
    }
    card
}

fn fact(title: &str, value: &str) -> Value {
    json!({"title": title, "value": escape(&truncate(value, FACT_MAX))})
}

/// Escapes the characters an Adaptive Card's Markdown reads, so a job's text
/// cannot make a link, a list or bold text out of itself.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '*' | '_' | '[' | ']' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_is_escaped() {
        assert_eq!(escape("[click](http://x) *now* a_b"), r"\[click\](http://x) \*now\* a\_b");
    }
}
