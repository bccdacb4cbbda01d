//! Issue 15, Teams: `format = "teams"` posts an Adaptive Card 1.4 in the
//! Workflows message envelope, at most 28 KB, with the same facts as the
//! Slack message. Every body is snapshotted and checked against the
//! required fields of the Adaptive Card 1.4 schema (adaptivecards.io,
//! `adaptive-card.json` v1.4) for each element type the format uses.

use dari_relay::format::{self, teams};
use dari_relay::vocab::Format;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, config_text, watch_on};
use crate::formats::{bodies, settings};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

/// What is wrong with a Teams message: the envelope, then the card against
/// the schema's required properties and allowed values, then the size.
fn teams_problems(msg: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let size = msg.to_string().len();
    if size > teams::MESSAGE_MAX {
        out.push(format!("{size} bytes, over {}", teams::MESSAGE_MAX));
    }
    if msg["type"] != "message" {
        out.push("envelope type is not \"message\"".into());
    }
    let Some([attachment]) = msg["attachments"].as_array().map(Vec::as_slice) else {
        out.push("not exactly one attachment".into());
        return out;
    };
    if attachment["contentType"] != "application/vnd.microsoft.card.adaptive" {
        out.push(format!("contentType {}", attachment["contentType"]));
    }
    let card = &attachment["content"];
    // AdaptiveCard: required "type" and "version" (1.4 schema).
    if card["type"] != "AdaptiveCard" || card["version"] != "1.4" {
        out.push(format!("card type {} version {}", card["type"], card["version"]));
    }
    let Some(body) = card["body"].as_array() else {
        out.push("card has no body".into());
        return out;
    };
    for element in body {
        match element["type"].as_str() {
            // TextBlock: required "type", "text" (a string).
            Some("TextBlock") => {
                if !element["text"].is_string() {
                    out.push(format!("TextBlock without text: {element}"));
                }
                for (key, allowed) in [
                    ("size", &["Default", "Small", "Medium", "Large", "ExtraLarge"][..]),
                    ("weight", &["Default", "Lighter", "Bolder"][..]),
                    ("color", &["Default", "Dark", "Light", "Accent", "Good", "Warning", "Attention"][..]),
                    ("fontType", &["Default", "Monospace"][..]),
                    ("spacing", &["None", "Small", "Default", "Medium", "Large", "ExtraLarge", "Padding"][..]),
                ] {
                    if let Some(v) = element.get(key)
                        && !allowed.iter().any(|a| v == a)
                    {
                        out.push(format!("TextBlock {key} {v} is not one of {allowed:?}"));
                    }
                }
            }
            // FactSet: required "type", "facts"; Fact: required "title", "value".
            Some("FactSet") => match element["facts"].as_array() {
                Some(facts) if !facts.is_empty() => {
                    for fact in facts {
                        if !fact["title"].is_string() || !fact["value"].is_string() {
                            out.push(format!("Fact without title or value: {fact}"));
                        }
                    }
                }
                _ => out.push("FactSet without facts".into()),
            },
            other => out.push(format!("element type {other:?} is not one this format uses")),
        }
    }
    for action in card["actions"].as_array().into_iter().flatten() {
        // Action.OpenUrl: required "type", "url".
        let url = action["url"].as_str().unwrap_or_default();
        if action["type"] != "Action.OpenUrl" || !(url.starts_with("https://") || url.starts_with("http://")) {
            out.push(format!("bad action {action}"));
        }
        if !action["title"].is_string() {
            out.push(format!("action without a title {action}"));
        }
    }
    out
}

/// The card's texts, joined: what a reader sees.
fn texts(msg: &Value) -> String {
    let card = &msg["attachments"][0]["content"];
    let mut out = String::new();
    for element in card["body"].as_array().into_iter().flatten() {
        if let Some(t) = element["text"].as_str() {
            out.push_str(t);
            out.push('\n');
        }
        for fact in element["facts"].as_array().into_iter().flatten() {
            out.push_str(&format!("{}: {}\n", fact["title"].as_str().unwrap(), fact["value"].as_str().unwrap()));
        }
    }
    out
}

#[test]
fn teams_bodies_match_their_snapshots_and_the_card_schema() {
    settings().bind(|| {
        for (name, body) in bodies() {
            let msg: Value = serde_json::from_str(&format::render_format(Format::Teams, &body).unwrap()).unwrap();
            let problems = teams_problems(&msg);
            assert!(problems.is_empty(), "{name}: {problems:?}");
            insta::assert_json_snapshot!(format!("teams-{name}"), msg);
        }
    });
}

/// The same facts as the Slack message: headline, portal, job, status,
/// the detail (result, error or question) and the links.
#[test]
fn teams_cards_say_what_slack_says() {
    for (name, body) in bodies() {
        let teams: Value = serde_json::from_str(&format::render_format(Format::Teams, &body).unwrap()).unwrap();
        let slack = format::render_format(Format::Slack, &body).unwrap();
        let facts = format::Facts::from_body(&serde_json::from_str(&body).unwrap());
        let seen = texts(&teams);
        assert!(seen.contains(&facts.headline), "{name}: no headline in {seen}");
        assert!(slack.contains(&facts.headline));
        if !facts.job_id.is_empty() {
            assert!(seen.contains(&facts.job_id), "{name}: no job id");
        }
        if let Some(status) = &facts.status {
            assert!(seen.contains(&teams::escape(status)), "{name}: no status");
        }
        if let Some(detail) = &facts.detail {
            assert!(seen.contains(detail.label), "{name}: no {}", detail.label);
        }
        let actions = teams["attachments"][0]["content"]["actions"].as_array().map_or(0, Vec::len);
        assert_eq!(actions, facts.links.len().min(6), "{name}: every link is a button");
    }
}

/// A 20 KB result and a 5,000-character error fit in 28 KB, with the start
/// of the error shown.
#[test]
fn huge_results_and_errors_fit() {
    for (name, body) in bodies().into_iter().filter(|(n, _)| n.contains("20kb") || n.contains("5000")) {
        let msg: Value = serde_json::from_str(&format::render_format(Format::Teams, &body).unwrap()).unwrap();
        assert!(msg.to_string().len() <= teams::MESSAGE_MAX, "{name}");
        if name.contains("5000") {
            assert!(texts(&msg).contains("Traceback (most recent call last):"), "{name}: the error's start");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Hostile and huge text never breaks the schema, the size or the
    /// escaping: no link or emphasis can come from the job's text.
    #[test]
    fn hostile_text_keeps_the_card_valid(
        kind in prop::sample::select(vec!["job.event", "job.completed", "job.failed", "watch.failed", "weird"]),
        text in prop_oneof![".{0,40}", "[\\[\\]()*_`\\\\<>&]{0,60}", (".{1,3}", 0usize..9000).prop_map(|(s, n)| s.repeat(n))],
        url in prop_oneof![Just("https://example.com/x".to_owned()), ".{0,30}"],
    ) {
        let body = json!({"type": kind, "timestamp": "2026-11-30T10:30:15.123Z", "data": {
            "job_id": JOB, "portal_id": text, "status": text, "error": text, "current_step": text,
            "final_result": {"a": text, "b": [text]}, "browser_url": url, "reason": text,
            "labels": {text.clone(): text}, "event": {"event_type": text, "message": text},
        }}).to_string();
        let msg: Value = serde_json::from_str(&format::render_format(Format::Teams, &body).unwrap()).unwrap();
        prop_assert!(teams_problems(&msg).is_empty(), "{:?}", teams_problems(&msg));
        for line in texts(&msg).lines() {
            let mut chars = line.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    chars.next();
                    continue;
                }
                prop_assert!(!matches!(c, '[' | ']' | '`'), "unescaped {} in {}", c, line);
            }
        }
    }
}

/// Through the relay: a `format = "teams"` webhook gets the card, as JSON.
#[tokio::test]
async fn a_teams_webhook_gets_the_card() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(
        JOB,
        vec![Reply::Json(json!({"status": "failed", "events": [], "error": "The form rejected the date"}))],
    );
    let extra = format!("\n[[webhooks]]\nname = \"teams\"\nurl = \"{}\"\nformat = \"teams\"\n", receiver.url);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &extra)).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.next().await;
    let msg = got.json();
    assert!(teams_problems(&msg).is_empty(), "{:?}", teams_problems(&msg));
    assert!(texts(&msg).contains("Job failed"));
    assert!(texts(&msg).contains("The form rejected the date"));
    assert_eq!(got.header("content-type"), "application/json");
    relay.stop().await;
}
