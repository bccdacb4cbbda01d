//! `format = "discord"`: a webhook message with one embed per notification,
//! coloured by outcome, and `allowed_mentions` empty so that nothing in a
//! job's text can ping anyone.
//!
//! Layout: the headline as the title (linked to the live browser when there
//! is one), the detail and what to do next as the description, the portal,
//! job, status, step, cost, when (`<t:…:f>`, shown in the reader's time
//! zone) and links as fields, the type and labels in the footer, and the
//! detection time as the embed's timestamp. A `send-test` sample's title
//! starts with `🧪 Test:`. Prose from the
//! job is Markdown-escaped, results and errors go in code blocks, and every
//! part is cut to Discord's limits, the description last so the whole embed
//! stays within 6000 characters.

use serde_json::{Value, json};

use super::{Facts, Link, Outcome, Style, join_fitting, len16, truncate};

/// Characters of a message's `content` (this format sends none).
pub const CONTENT_MAX: usize = 2000;
/// Characters of an embed's title.
pub const TITLE_MAX: usize = 256;
/// Characters of an embed's description.
pub const DESCRIPTION_MAX: usize = 4096;
/// Characters of a field's name.
pub const FIELD_NAME_MAX: usize = 256;
/// Characters of a field's value.
pub const FIELD_VALUE_MAX: usize = 1024;
/// Fields of an embed.
pub const FIELDS_MAX: usize = 25;
/// Characters of a footer's text.
pub const FOOTER_MAX: usize = 2048;
/// Characters of all embeds of a message together: titles, descriptions,
/// field names and values, footers and author names.
pub const EMBEDS_TOTAL_MAX: usize = 6000;
/// Longest URL linked (Discord refuses an embed `url` beyond 2048).
const URL_MAX: usize = 2048;
/// Characters of a short value (step, status) inside a field.
const VALUE_MAX: usize = 300;

/// The embed colour of an outcome (0xRRGGBB).
pub fn colour(outcome: Outcome) -> u32 {
    match outcome {
        Outcome::Completed => 0x2E_CC_71,
        Outcome::Failed => 0xE7_4C_3C,
        Outcome::NeedsHuman | Outcome::Question => 0xF3_9C_12,
        Outcome::Paused => 0xF1_C4_0F,
        Outcome::Running => 0x34_98_DB,
        Outcome::Pending | Outcome::OtherStatus => 0x95_A5_A6,
        Outcome::Event => 0x58_65_F2,
        Outcome::WatchFailed => 0x99_2D_22,
    }
}

/// The Discord message for a standard body.
pub fn message(body: &Value) -> Value {
    let facts = Facts::from_body(body);
    let title = truncate(&facts.title(), TITLE_MAX);

    let mut fields = vec![field("Portal", &code(&facts.portal_id), true)];
    if !facts.job_id.is_empty() {
        fields.push(field("Job", &code(&facts.job_id), true));
    }
    for (name, value) in [("Status", &facts.status), ("Step", &facts.step), ("Cost", &facts.cost)] {
        if let Some(value) = value {
            fields.push(field(name, &escape(&truncate(value, VALUE_MAX)), true));
        }
    }
    // Discord shows `<t:…:f>` as a date and time in each reader's own zone.
    if let Some(unix) = facts.unix_seconds {
        fields.push(field("When", &format!("<t:{unix}:f>"), true));
    }
    if !facts.links.is_empty() {
        let links: Vec<String> = facts.links.iter().map(markdown_link).collect();
        let links = join_fitting(&links, " · ", FIELD_VALUE_MAX);
        if !links.is_empty() {
            fields.push(field("Links", &links, false));
        }
    }
    fields.truncate(FIELDS_MAX);

    let mut footer = facts.kind.clone();
    if !facts.labels.is_empty() {
        footer.push_str(&format!(" · {}", facts.labels.join(", ")));
    }
    let footer = truncate(&footer, FOOTER_MAX);

    let mut description = String::new();
    if let Some(detail) = &facts.detail {
        description.push_str(&format!("**{}**\n", detail.label));
        match detail.style {
            Style::Block => description.push_str(&format!("```\n{}\n```", detail.text.replace("```", "ˋˋˋ"))),
            Style::Inline => description.push_str(&code(&detail.text)),
            Style::Prose => description.push_str(&escape(&detail.text)),
        }
    }
    // What to do next comes first when there is no room for everything.
    let mut next = String::new();
    if let Some(n) = &facts.next {
        next = format!("**Next:** {}", escape(n.text));
        if let Some(link) = n.link.as_ref().map(markdown_link).filter(|l| len16(l) <= URL_MAX) {
            next.push_str(&format!(" {link}"));
        }
    }
    let others = len16(&title)
        + len16(&footer)
        + fields
            .iter()
            .map(|f| len16(f["name"].as_str().unwrap_or_default()) + len16(f["value"].as_str().unwrap_or_default()))
            .sum::<usize>();
    let room = EMBEDS_TOTAL_MAX.saturating_sub(others).min(DESCRIPTION_MAX);
    let description = fit_description(&description, &next, room);

    let mut embed =
        json!({"title": title, "color": colour(facts.outcome), "fields": fields, "footer": {"text": footer}});
    if !description.is_empty() {
        embed["description"] = description.into();
    }
    if let Some(live) = facts.links.iter().find(|l| l.label == "Watch live" && len16(&l.url) <= URL_MAX) {
        embed["url"] = live.url.clone().into();
    }
    // Discord refuses the whole message over a malformed timestamp, so only
    // a valid RFC 3339 one is sent.
    if humantime::parse_rfc3339(&facts.timestamp).is_ok() {
        embed["timestamp"] = facts.timestamp.clone().into();
    }
    json!({"embeds": [embed], "allowed_mentions": {"parse": []}})
}

/// The detail, then the next step, within `room`: the next step is kept
/// whole and the detail cut (closing its code block again if cut inside).
fn fit_description(detail: &str, next: &str, room: usize) -> String {
    let join = if detail.is_empty() || next.is_empty() { "" } else { "\n\n" };
    if len16(detail) + len16(join) + len16(next) <= room {
        return format!("{detail}{join}{next}");
    }
    let next = truncate(next, room);
    let left = room.saturating_sub(len16(&next) + len16(join));
    let mut detail = truncate(detail, left.saturating_sub(4));
    if detail.matches("```").count() % 2 == 1 {
        detail.push_str("\n```");
    }
    if detail.chars().count() <= 1 {
        return next;
    }
    format!("{detail}{join}{next}")
}

fn field(name: &str, value: &str, inline: bool) -> Value {
    json!({"name": truncate(name, FIELD_NAME_MAX), "value": truncate(value, FIELD_VALUE_MAX), "inline": inline})
}

fn markdown_link(link: &Link) -> String {
    // `Link::url` has `(`, `)` and `|` percent-encoded, so it cannot end early.
    format!("[{}]({})", link.label, link.url)
}

/// Inline code: backticks inside would end it, so they become a look-alike.
fn code(text: &str) -> String {
    format!("`{}`", truncate(&text.replace('`', "ˋ"), VALUE_MAX))
}

/// Escapes Discord Markdown in prose: emphasis, code, spoilers, masked
/// links, mentions and channel links anywhere; quotes, headings and lists at
/// the start of a line.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut line_start = true;
    for c in text.chars() {
        let special = matches!(c, '\\' | '*' | '_' | '~' | '`' | '|' | '[' | ']' | '<')
            || (line_start && matches!(c, '>' | '#' | '-' | '+'));
        if special {
            out.push('\\');
        }
        out.push(c);
        line_start = c == '\n' || (line_start && c == ' ');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_is_escaped() {
        assert_eq!(escape("**bold** [x](y) <@1>"), "\\*\\*bold\\*\\* \\[x\\](y) \\<@1>");
        assert_eq!(escape("> quote\n# head\na > b"), "\\> quote\n\\# head\na > b");
    }

    #[test]
    fn the_description_keeps_the_next_step_and_closes_its_code_block() {
        let detail = format!("**Error**\n```\n{}\n```", "x".repeat(5000));
        let out = fit_description(&detail, "**Next:** do it", 1000);
        assert!(len16(&out) <= 1000, "{}", len16(&out));
        assert!(out.ends_with("```\n\n**Next:** do it"), "{out}");
        assert_eq!(out.matches("```").count(), 2);
        assert_eq!(fit_description("", "**Next:** x", 10), "**Next:**…");
    }
}
