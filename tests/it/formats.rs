//! Issue 5: Slack and Discord bodies people want to read, custom template
//! bodies, per-webhook headers and filters, and `send-test`.
//!
//! The chat bodies are snapshotted (insta) for every notification type and
//! checked against each platform's rules and limits, with huge and hostile
//! input too; the rest runs the real relay or the real binary against fake
//! servers on 127.0.0.1.

use dari_relay::diff::Transition;
use dari_relay::format::{self, len16};
use dari_relay::notification::{self, SAMPLE_KINDS, WatchContext};
use dari_relay::upstream::StatusAnswer;
use dari_relay::vocab::Format;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const TIMESTAMP: &str = "2026-11-30T10:30:15.123Z";

fn labels() -> Map<String, Value> {
    serde_json::from_value(json!({"customer": "acme", "team": "growth"})).unwrap()
}

/// Every body the chat formats must handle: a sample of each common type,
/// an unknown status, a question event, a 20 KB `final_result` and a
/// 5000-character error. Named for their snapshots.
pub(crate) fn bodies() -> Vec<(String, String)> {
    let labels = labels();
    let mut out: Vec<(String, String)> = SAMPLE_KINDS
        .iter()
        .chain(&["job.archived"])
        .map(|kind| (kind.to_string(), notification::sample(kind, &labels, TIMESTAMP).body.compose()))
        .collect();

    let watch = WatchContext {
        job_id: notification::SAMPLE_JOB_ID,
        portal_id: notification::SAMPLE_PORTAL_ID,
        labels: &labels,
    };
    let question = StatusAnswer {
        status: "waiting_for_input".into(),
        events: vec![
            json!({"event_type": "step_completed", "message": "Filled in the form", "data": {}}),
            json!({"event_type": "question", "message": "Which plan should the quote be for: Basic or Pro?",
                   "data": {"question_id": "q_1", "options": ["Basic", "Pro"]}, "timestamp": "2026-11-30T10:30:12.000Z"}),
        ],
        fields: serde_json::from_value(
            json!({"browser_url": "https://example.com/live/00000000", "total_cost_usd": 0.05}),
        )
        .unwrap(),
    };
    let n = notification::build(&[Transition::Event { index: 1 }], &question, Some("running"), watch, TIMESTAMP);
    out.push(("job.event.question".into(), n[0].body.compose()));

    let mut completed: Value =
        serde_json::from_str(&notification::sample("job.completed", &labels, TIMESTAMP).body.compose()).unwrap();
    let rows: Vec<Value> = (0..150)
        .map(|i| json!({"id": i, "name": format!("Customer {i:03}"), "email": format!("customer{i:03}@example.com"), "status": "submitted"}))
        .collect();
    completed["data"]["final_result"] = json!({
        "summary": "Submitted 150 contact forms",
        "rows": rows,
        "notes": "n".repeat(8000),
        "submitted": 150,
    });
    for i in 1..=30 {
        completed["data"]["final_result"][format!("x_answer_{i:02}")] = format!("Answer to form question {i}").into();
    }
    assert!(completed["data"]["final_result"].to_string().len() >= 20_000);
    out.push(("job.completed.20kb_result".into(), completed.to_string()));

    let mut failed: Value =
        serde_json::from_str(&notification::sample("job.failed", &labels, TIMESTAMP).body.compose()).unwrap();
    let trace: String =
        (0..).map(|i| format!("  at step {i}: <button id=\"submit\"> not found & retried\n")).take(100).collect();
    failed["data"]["error"] =
        format!("Traceback (most recent call last):\n{trace}").chars().take(5000).collect::<String>().into();
    assert_eq!(failed["data"]["error"].as_str().unwrap().chars().count(), 5000);
    out.push(("job.failed.5000_char_error".into(), failed.to_string()));
    out
}

pub(crate) fn settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("snapshots");
    settings.set_prepend_module_to_snapshot(false);
    settings
}

#[test]
fn slack_bodies_match_their_snapshots_and_stay_within_limits() {
    settings().bind(|| {
        for (name, body) in bodies() {
            let slack: Value = serde_json::from_str(&format::render_format(Format::Slack, &body).unwrap()).unwrap();
            let problems = block_kit_problems(&slack);
            assert!(problems.is_empty(), "{name}: {problems:?}");
            insta::assert_json_snapshot!(format!("slack-{name}"), slack);
        }
    });
}

#[test]
fn discord_bodies_match_their_snapshots_and_stay_within_limits() {
    settings().bind(|| {
        for (name, body) in bodies() {
            let discord: Value = serde_json::from_str(&format::render_format(Format::Discord, &body).unwrap()).unwrap();
            let problems = discord_problems(&discord);
            assert!(problems.is_empty(), "{name}: {problems:?}");
            insta::assert_json_snapshot!(format!("discord-{name}"), discord);
        }
    });
}

/// What each type must say at a glance, beyond what the snapshots pin.
#[test]
fn each_type_says_what_happened_and_what_to_do_next() {
    let all: std::collections::BTreeMap<String, (String, String)> = bodies()
        .into_iter()
        .map(|(name, body)| {
            let slack = format::render_format(Format::Slack, &body).unwrap();
            let discord = format::render_format(Format::Discord, &body).unwrap();
            (name, (slack, discord))
        })
        .collect();
    let says = |name: &str, what: &[&str]| {
        let (slack, discord) = &all[name];
        for w in what {
            assert!(slack.contains(w), "slack {name} lacks {w:?}: {slack}");
            assert!(discord.contains(w), "discord {name} lacks {w:?}: {discord}");
        }
    };
    let common = ["example-org/example_portal", notification::SAMPLE_JOB_ID];
    says("job.completed", &[&common[..], &["Job completed", "confirmation_number", "$0.12", "downloads"]].concat());
    says("job.failed", &[&common[..], &["Job failed", "Timed out after 30s", "Submit the contact form"]].concat());
    says(
        "job.waiting_for_input",
        &[
            "Job needs a human",
            "Which plan should the quote be for",
            "A human is needed",
            "https://example.com/live/00000000",
        ],
    );
    says("job.paused", &["Job paused"]);
    says("job.running", &["Job running", "running (was pending)"]);
    says("job.pending", &["Job pending"]);
    says("job.archived", &["Job is now archived"]);
    says("job.event", &["New event: step completed", "Filled in name, email and message"]);
    says("job.event.question", &["The agent asks a question", "Which plan", "A human is needed"]);
    says("watch.failed", &["Stopped watching a job", "job_not_found", "check the job id"]);
    says("job.completed.20kb_result", &["more fields", "Customer 000"]);
    says("job.failed.5000_char_error", &["Traceback", "…"]);
}

/// Issue 17 item 6: a `send-test` sample says it is a test in its headline
/// and its preview, and chat times are shown in the reader's time zone
/// (Slack's `<!date^…>` with the UTC time as fallback, Discord's `<t:…:f>`).
#[test]
fn samples_are_marked_as_tests_and_times_are_local_to_the_reader() {
    let mut labels = labels();
    labels.insert(format::TEST_LABEL.0.into(), format::TEST_LABEL.1.into());
    let body = notification::sample("job.failed", &labels, TIMESTAMP).body.compose();
    let slack: Value = serde_json::from_str(&format::render_format(Format::Slack, &body).unwrap()).unwrap();
    assert_eq!(slack["blocks"][0]["text"]["text"], "🧪 Test: ❌ Job failed");
    assert!(slack["text"].as_str().unwrap().starts_with("🧪 Test: ❌ Job failed · "), "{slack}");
    let discord: Value = serde_json::from_str(&format::render_format(Format::Discord, &body).unwrap()).unwrap();
    assert_eq!(discord["embeds"][0]["title"], "🧪 Test: ❌ Job failed");
    // 2026-11-30T10:30:15Z is 1796034615 Unix seconds.
    let unix = humantime::parse_rfc3339("2026-11-30T10:30:15Z").unwrap().duration_since(std::time::UNIX_EPOCH).unwrap();
    assert_eq!(unix.as_secs(), 1_796_034_615);
    let context =
        slack["blocks"].as_array().unwrap().last().unwrap()["elements"][0]["text"].as_str().unwrap().to_owned();
    assert!(context.contains("<!date^1796034615^{date_short_pretty} {time}|2026-11-30T10:30:15.123Z>"), "{context}");
    let when = discord["embeds"][0]["fields"].as_array().unwrap().iter().find(|f| f["name"] == "When").cloned();
    assert_eq!(when.unwrap()["value"], "<t:1796034615:f>");
    // A real notification is not marked.
    let real = notification::sample("job.failed", &self::labels(), TIMESTAMP).body.compose();
    let slack = format::render_format(Format::Slack, &real).unwrap();
    assert!(!slack.contains("Test:") && slack.contains("❌ Job failed"), "{slack}");
}

/// The chat formats never fail and never break a limit, whatever the job's
/// text holds: any Unicode, mrkdwn and Markdown syntax, huge values.
mod hostile {
    use super::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            "[<>&*_~`|\\[\\]()#@!\\\\\n -]{0,60}",
            (".{1,3}", 0usize..4000).prop_map(|(s, n)| s.repeat(n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn chat_bodies_hold_the_rules(
            kind in prop::sample::select(vec!["job.event", "job.completed", "job.failed", "job.waiting_for_input",
                "job.Some Status", "watch.failed", "weird"]),
            error in text(), message in text(), step in text(), portal in text(), label in text(),
            result in text(), url in prop_oneof![Just("https://example.com/x".to_owned()), text()],
        ) {
            let body = json!({"type": kind, "timestamp": TIMESTAMP, "data": {
                "job_id": "00000000-0000-4000-8000-000000000000", "portal_id": portal, "status": step,
                "previous_status": message, "error": error, "current_step": step, "final_result": {"a": result, "b": [result]},
                "browser_url": url, "log_url": format!("https://example.com/{label}"), "reason": error,
                "labels": {label.clone(): label}, "latest_question": {"message": message, "data": {"question_id": 1}},
                "event": {"event_type": message, "message": message, "data": {"question_id": error}},
            }}).to_string();
            let slack: Value = serde_json::from_str(&format::render_format(Format::Slack, &body).unwrap()).unwrap();
            prop_assert!(block_kit_problems(&slack).is_empty(), "{:?}", block_kit_problems(&slack));
            let discord: Value = serde_json::from_str(&format::render_format(Format::Discord, &body).unwrap()).unwrap();
            prop_assert!(discord_problems(&discord).is_empty(), "{:?}", discord_problems(&discord));
            // No mention can come from the job's text: mrkdwn is escaped
            // (plain_text headers are never parsed for mentions). The one
            // `<!` is the relay's own date token for TIMESTAMP.
            let date = "<!date^1796034615^{date_short_pretty} {time}|2026-11-30T10:30:15.123Z>";
            for text in mrkdwn_texts(&slack) {
                let text = text.replace(date, "");
                prop_assert!(!text.contains("<!") && !text.contains("<@"), "{}", text);
            }
        }
    }
}

/// The fallback and every mrkdwn text of a Slack message.
fn mrkdwn_texts(msg: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) if o.get("type") == Some(&json!("mrkdwn")) => {
                out.push(o["text"].as_str().unwrap_or_default().to_owned());
            }
            Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = vec![msg["text"].as_str().unwrap_or_default().to_owned()];
    walk(&msg["blocks"], &mut out);
    out
}

// ---------------------------------------------------------------------------
// Block Kit and Discord rules, as the platforms document them. Limits are
// counted in UTF-16 units, which is at least the number of characters.

/// Every way a Slack message breaks the Block Kit rules our bodies rely on:
/// only known block types, required fields present, limits held.
pub(crate) fn block_kit_problems(msg: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let Some(top) = msg.as_object() else { return vec!["the message is not an object".into()] };
    for key in top.keys().filter(|k| !["text", "blocks"].contains(&k.as_str())) {
        p.push(format!("unknown top-level key {key}"));
    }
    match msg["text"].as_str() {
        Some(t) if !t.is_empty() && len16(t) <= 40_000 => {}
        _ => p.push("text fallback missing, empty or over 40000".into()),
    }
    let Some(blocks) = msg["blocks"].as_array() else {
        p.push("blocks is not a list".into());
        return p;
    };
    if blocks.is_empty() || blocks.len() > 50 {
        p.push(format!("{} blocks (1..=50 allowed)", blocks.len()));
    }
    for (i, block) in blocks.iter().enumerate() {
        let at = |what: String| format!("block {i}: {what}");
        let keys = |allowed: &[&str]| -> Vec<String> {
            block.as_object().map_or(vec![], |o| {
                o.keys().filter(|k| !allowed.contains(&k.as_str())).map(|k| at(format!("unknown key {k}"))).collect()
            })
        };
        match block["type"].as_str() {
            Some("header") => {
                p.extend(keys(&["type", "text", "block_id"]));
                p.extend(text_object(&block["text"], &["plain_text"], 150).into_iter().map(at));
            }
            Some("section") => {
                p.extend(keys(&["type", "text", "fields", "accessory", "block_id"]));
                if block.get("text").is_none() && block.get("fields").is_none() {
                    p.push(at("a section needs text or fields".into()));
                }
                if let Some(text) = block.get("text") {
                    p.extend(text_object(text, &["mrkdwn", "plain_text"], 3000).into_iter().map(at));
                }
                if let Some(fields) = block.get("fields") {
                    match fields.as_array() {
                        Some(f) if !f.is_empty() && f.len() <= 10 => {
                            for field in f {
                                p.extend(text_object(field, &["mrkdwn", "plain_text"], 2000).into_iter().map(at));
                            }
                        }
                        _ => p.push(at("fields must be a list of 1..=10".into())),
                    }
                }
            }
            Some("context") => {
                p.extend(keys(&["type", "elements", "block_id"]));
                match block["elements"].as_array() {
                    Some(e) if !e.is_empty() && e.len() <= 10 => {
                        for element in e {
                            p.extend(text_object(element, &["mrkdwn", "plain_text"], 3000).into_iter().map(at));
                        }
                    }
                    _ => p.push(at("elements must be a list of 1..=10".into())),
                }
            }
            Some("divider") => p.extend(keys(&["type", "block_id"])),
            other => p.push(at(format!("unknown block type {other:?}"))),
        }
    }
    p
}

fn text_object(v: &Value, types: &[&str], max: usize) -> Vec<String> {
    let mut p = Vec::new();
    let kind = v["type"].as_str().unwrap_or_default();
    if !types.contains(&kind) {
        p.push(format!("text object of type {kind:?}, expected one of {types:?}"));
    }
    match v["text"].as_str() {
        Some(t) if !t.is_empty() && len16(t) <= max => {}
        Some(t) => p.push(format!("text of {} characters (1..={max} allowed)", len16(t))),
        None => p.push("text object without text".into()),
    }
    for key in v.as_object().into_iter().flat_map(|o| o.keys()) {
        let ok = match key.as_str() {
            "type" | "text" => true,
            "emoji" => kind == "plain_text" && v["emoji"].is_boolean(),
            "verbatim" => kind == "mrkdwn" && v["verbatim"].is_boolean(),
            _ => false,
        };
        if !ok {
            p.push(format!("text object key {key} not allowed for {kind}"));
        }
    }
    p
}

/// Every way a Discord message breaks the rules of a webhook message with
/// embeds.
pub(crate) fn discord_problems(msg: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let allowed = ["content", "embeds", "allowed_mentions", "username", "avatar_url", "tts"];
    for key in msg.as_object().into_iter().flat_map(|o| o.keys()).filter(|k| !allowed.contains(&k.as_str())) {
        p.push(format!("unknown top-level key {key}"));
    }
    if msg["content"].as_str().is_some_and(|c| len16(c) > 2000) {
        p.push("content over 2000".into());
    }
    if msg["allowed_mentions"] != json!({"parse": []}) {
        p.push("mentions are not disabled".into());
    }
    let embeds = msg["embeds"].as_array().cloned().unwrap_or_default();
    if embeds.is_empty() || embeds.len() > 10 {
        p.push(format!("{} embeds (1..=10 allowed)", embeds.len()));
    }
    let mut total = 0;
    let len = |v: &Value| v.as_str().map_or(0, len16);
    for (i, e) in embeds.iter().enumerate() {
        let at = |what: String| format!("embed {i}: {what}");
        let known = ["title", "description", "url", "color", "fields", "footer", "timestamp", "author"];
        for key in e.as_object().into_iter().flat_map(|o| o.keys()).filter(|k| !known.contains(&k.as_str())) {
            p.push(at(format!("unknown key {key}")));
        }
        for (key, max) in [("title", 256), ("description", 4096)] {
            if e.get(key).is_some() && !(1..=max).contains(&len(&e[key])) {
                p.push(at(format!("{key} of {} characters (1..={max} allowed)", len(&e[key]))));
            }
            total += len(&e[key]);
        }
        if e.get("color").is_some() && e["color"].as_u64().is_none_or(|c| c > 0xFF_FF_FF) {
            p.push(at("color is not 0..=0xFFFFFF".into()));
        }
        if let Some(url) = e.get("url")
            && !url.as_str().is_some_and(|u| u.starts_with("http") && len16(u) <= 2048)
        {
            p.push(at(format!("url {url} is not an http(s) URL of at most 2048")));
        }
        if let Some(ts) = e.get("timestamp")
            && ts.as_str().is_none_or(|t| humantime::parse_rfc3339(t).is_err())
        {
            p.push(at(format!("timestamp {ts} is not RFC 3339")));
        }
        let fields = e["fields"].as_array().cloned().unwrap_or_default();
        if fields.len() > 25 {
            p.push(at(format!("{} fields (25 allowed)", fields.len())));
        }
        for f in &fields {
            if !(1..=256).contains(&len(&f["name"])) || f["name"].as_str().unwrap_or_default().trim().is_empty() {
                p.push(at(format!("field name {:?} empty or over 256", f["name"])));
            }
            if !(1..=1024).contains(&len(&f["value"])) || f["value"].as_str().unwrap_or_default().trim().is_empty() {
                p.push(at(format!("field value of {} characters (1..=1024 allowed)", len(&f["value"]))));
            }
            total += len(&f["name"]) + len(&f["value"]);
        }
        if len(&e["footer"]["text"]) > 2048 {
            p.push(at("footer over 2048".into()));
        }
        total += len(&e["footer"]["text"]) + len(&e["author"]["name"]);
    }
    if total > 6000 {
        p.push(format!("{total} characters across embeds (6000 allowed)"));
    }
    p
}
