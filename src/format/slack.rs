//! `format = "slack"`: an incoming-webhook message with Block Kit blocks and
//! a `text` fallback (shown in notifications and by clients without blocks).
//!
//! Layout: a header with the headline, a section of fields (portal, job,
//! status, step, cost), the detail, what to do next, the links, and a
//! context line with the type, the time (a `<!date^…>` token, shown in the
//! reader's time zone) and the labels. A `send-test` sample's header starts
//! with `🧪 Test:`. Links are mrkdwn
//! links, not buttons: a button makes Slack send an interaction payload to
//! the app, and an incoming webhook without an interactivity URL shows a
//! warning next to every click.
//!
//! Every dynamic text is escaped (`&`, `<`, `>`), so an error message or a
//! result cannot mention `@channel` or forge a link, and cut to Slack's
//! limits with an ellipsis.

use serde_json::{Value, json};

use super::{Facts, Link, Style, join_fitting, len16, truncate};

/// Characters of a section's text.
pub const SECTION_TEXT_MAX: usize = 3000;
/// Characters of one section field.
pub const FIELD_TEXT_MAX: usize = 2000;
/// Fields of one section.
pub const FIELDS_MAX: usize = 10;
/// Characters of a header's text.
pub const HEADER_MAX: usize = 150;
/// Blocks of one message.
pub const BLOCKS_MAX: usize = 50;
/// Characters of the `text` fallback we send (Slack cuts at 40,000; a
/// notification preview shows far less).
pub const FALLBACK_MAX: usize = 3000;
/// Elements of a context block.
pub const CONTEXT_ELEMENTS_MAX: usize = 10;
/// Characters of a short value (step, status) inside a field.
const VALUE_MAX: usize = 300;

/// The Slack message for a standard body.
pub fn message(body: &Value) -> Value {
    let facts = Facts::from_body(body);
    let mut blocks = vec![json!({
        "type": "header",
        "text": {"type": "plain_text", "text": truncate(&facts.title(), HEADER_MAX), "emoji": true},
    })];

    let mut fields = vec![field("Portal", &code(&facts.portal_id))];
    if !facts.job_id.is_empty() {
        fields.push(field("Job", &code(&facts.job_id)));
    }
    for (name, value) in [("Status", &facts.status), ("Step", &facts.step), ("Cost", &facts.cost)] {
        if let Some(value) = value {
            fields.push(field(name, &escape_fit(value, VALUE_MAX)));
        }
    }
    fields.truncate(FIELDS_MAX);
    blocks.push(json!({"type": "section", "fields": fields}));

    if let Some(detail) = &facts.detail {
        let head = format!("*{}*\n", detail.label);
        let room = SECTION_TEXT_MAX - len16(&head);
        let body = match detail.style {
            Style::Block => code_block(&detail.text, room),
            Style::Inline => code(&detail.text),
            Style::Prose => escape_fit(&detail.text, room),
        };
        blocks.push(section(&format!("{head}{body}")));
    }
    if let Some(next) = &facts.next {
        let mut text = format!("*Next:* {}", escape(next.text));
        if let Some(link) = next.link.as_ref().map(mrkdwn_link).filter(|l| len16(&text) + len16(l) < SECTION_TEXT_MAX) {
            text.push_str(&format!(" {link}"));
        }
        blocks.push(section(&text));
    }
    if !facts.links.is_empty() {
        let links: Vec<String> = facts.links.iter().map(mrkdwn_link).collect();
        let links = join_fitting(&links, "  ·  ", SECTION_TEXT_MAX);
        if !links.is_empty() {
            blocks.push(section(&links));
        }
    }
    let mut context = vec![escape(&facts.kind)];
    match facts.unix_seconds {
        // Slack shows the date in each reader's own time zone; the fallback
        // (for clients that cannot) is the UTC time as received, escaped, and
        // without the `|` and `>` that would end the token early.
        Some(unix) => context.push(format!(
            "<!date^{unix}^{{date_short_pretty}} {{time}}|{}>",
            escape(&facts.timestamp).replace(['|', '>'], "")
        )),
        None if !facts.timestamp.is_empty() => context.push(escape(&facts.timestamp)),
        None => {}
    }
    if !facts.labels.is_empty() {
        context.push(escape_fit(&facts.labels.join(", "), 1000));
    }
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": context.join("  ·  ")}]}));
    blocks.truncate(BLOCKS_MAX);

    json!({"text": escape_fit(&facts.summary(), FALLBACK_MAX), "blocks": blocks})
}

fn field(name: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": fit_escaped(&format!("*{name}*\n{value}"), FIELD_TEXT_MAX)})
}

/// A section of mrkdwn text, cut to the section limit. `text` is escaped
/// already; a cut never splits an entity.
fn section(text: &str) -> Value {
    json!({"type": "section", "text": {"type": "mrkdwn", "text": fit_escaped(text, SECTION_TEXT_MAX)}})
}

fn mrkdwn_link(link: &Link) -> String {
    // `Link::url` has no `|`; `&`, `<`, `>` are escaped like any text and
    // Slack unescapes them before following the link.
    format!("<{}|{}>", escape(&link.url), link.label)
}

/// Inline code: backticks inside would end it, so they become a look-alike.
fn code(text: &str) -> String {
    format!("`{}`", escape_fit(&text.replace('`', "ˋ"), VALUE_MAX))
}

/// A code block of at most `max` characters around `text`.
fn code_block(text: &str, max: usize) -> String {
    let inner = escape_fit(&text.replace("```", "ˋˋˋ"), max.saturating_sub(8));
    format!("```\n{inner}\n```")
}

/// Escapes the three characters Slack's mrkdwn reserves.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Escapes `text` and cuts it to `max`.
fn escape_fit(text: &str, max: usize) -> String {
    fit_escaped(&escape(text), max)
}

/// Cuts escaped text to `max` without leaving half an entity (`&am…`).
fn fit_escaped(text: &str, max: usize) -> String {
    if len16(text) <= max {
        return text.to_owned();
    }
    let mut cut = truncate(text, max);
    cut.pop();
    if let Some(amp) = cut.rfind('&').filter(|&amp| !cut[amp..].contains(';')) {
        cut.truncate(amp);
    }
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_cutting_keep_entities_whole() {
        assert_eq!(escape("<!channel> & <http://x|y>"), "&lt;!channel&gt; &amp; &lt;http://x|y&gt;");
        assert_eq!(fit_escaped("ab &amp; cd", 6), "ab …");
        assert_eq!(fit_escaped("ab &amp; cd", 100), "ab &amp; cd");
        assert_eq!(code_block("a```b", 100), "```\naˋˋˋb\n```");
        assert!(len16(&code_block(&"<".repeat(5000), 3000)) <= 3000);
    }

    #[test]
    fn hostile_text_cannot_mention_or_link() {
        let body = json!({"type": "job.failed", "data": {"portal_id": "a/b", "job_id": "j",
            "error": "<!channel> see <https://evil.test|your bank>"}});
        let text = message(&body).to_string();
        assert!(!text.contains("<!channel>") && !text.contains("<https://evil"), "{text}");
    }
}
